//! Certificates for a simulated cluster, made in memory from the seed.
//!
//! The node's own certificate commands draw keys from the operating system. A simulation needs
//! the same bytes on every run: Ed25519 keys from seeded bytes (their signatures are
//! deterministic and always the same length, so handshakes are the same size), fixed serial
//! numbers, and rcgen's fixed default validity. What the certificates say is the node's own
//! (`verge_node::tls::ca_params`, `node_cert_params`).

use std::path::Path;

use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use rcgen::{Issuer, KeyPair, PKCS_ED25519, SerialNumber};
use rustls_pki_types::PrivatePkcs8KeyDer;
use verge_node::tls::NodeTls;

/// The DER prefix of a PKCS#8 v1 document holding an Ed25519 private key; the 32-byte seed
/// follows it (RFC 8410).
const ED25519_PKCS8_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

/// Why certificates could not be made.
#[derive(Debug, thiserror::Error)]
#[error("making simulated certificates: {0}")]
pub struct CertError(String);

fn err(e: impl std::fmt::Display) -> CertError {
    CertError(e.to_string())
}

fn key_from(rng: &mut StdRng) -> Result<(KeyPair, String), CertError> {
    let mut der = ED25519_PKCS8_PREFIX.to_vec();
    let mut seed = [0u8; 32];
    rng.fill_bytes(&mut seed);
    der.extend_from_slice(&seed);
    let pkcs8 = PrivatePkcs8KeyDer::from(der);
    let key = KeyPair::from_pkcs8_der_and_sign_algo(&pkcs8, &PKCS_ED25519).map_err(err)?;
    let pem = key.serialize_pem();
    Ok((key, pem))
}

/// A cluster CA and one certificate per node, all derived from `seed`.
#[derive(Debug, Clone)]
pub struct ClusterCerts {
    ca_pem: String,
    nodes: Vec<(String, String)>,
}

impl ClusterCerts {
    /// Makes the CA and `nodes` node certificates.
    pub fn generate(seed: u64, nodes: usize) -> Result<Self, CertError> {
        let mut rng = StdRng::seed_from_u64(seed ^ 0x7365_7274_7321);
        let (ca_key, _) = key_from(&mut rng)?;
        let mut params = verge_node::tls::ca_params().map_err(err)?;
        params.serial_number = Some(SerialNumber::from(vec![1]));
        let ca = params.self_signed(&ca_key).map_err(err)?;
        let ca_pem = ca.pem();
        let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).map_err(err)?;
        let mut certs = Vec::with_capacity(nodes);
        for i in 0..nodes {
            let (key, key_pem) = key_from(&mut rng)?;
            let name = format!("n{i}");
            let mut params = verge_node::tls::node_cert_params(&name).map_err(err)?;
            params.serial_number = Some(SerialNumber::from((i as u64 + 2).to_be_bytes().to_vec()));
            let cert = params.signed_by(&key, &issuer).map_err(err)?;
            certs.push((cert.pem(), key_pem));
        }
        Ok(Self {
            ca_pem,
            nodes: certs,
        })
    }

    /// The TLS configuration of node `index`, whose handshakes draw their randomness from
    /// `seed` (see [`crate::crypto`]).
    pub fn node_tls(&self, index: usize, seed: u64) -> Result<NodeTls, CertError> {
        let (cert, key) = self
            .nodes
            .get(index)
            .ok_or_else(|| CertError(format!("no certificate for node {index}")))?;
        NodeTls::from_pem_with_provider(
            (Path::new("sim/ca.pem"), &self.ca_pem),
            (Path::new("sim/node.pem"), cert),
            (Path::new("sim/node.key"), key),
            crate::crypto::seeded_provider(seed),
        )
        .map_err(err)
    }
}
