//! Certificates for mutual TLS between nodes.
//!
//! Every node of a cluster holds a certificate signed by the cluster's CA and refuses peers
//! without one. Certificates are Ed25519 (small, fast, and of fixed signature length, which
//! keeps simulated runs deterministic). Every node certificate carries the DNS name
//! [`CLUSTER_SERVER_NAME`] besides its own name: peers are dialled by address, so chain
//! validation against the CA is what authenticates them, and a fixed name lets the standard
//! verifier do it.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ED25519,
};
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// The DNS name every node certificate carries and every node dials.
pub const CLUSTER_SERVER_NAME: &str = "verge-node";
/// ALPN protocol of node-to-node connections; a peer speaking anything else is refused.
pub const ALPN: &[u8] = b"verge/1";
/// Largest certificate or key file read.
const PEM_FILE_BYTES_MAX: u64 = 64 * 1024;

/// A certificate or TLS setup problem.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A file does not hold what it should.
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// Certificate generation failed.
    #[error("generating a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    /// The client verifier could not be built.
    #[error("TLS client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// The three files a node needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The cluster CA certificate.
    pub ca: PathBuf,
    /// This node's certificate.
    pub cert: PathBuf,
    /// This node's private key.
    pub key: PathBuf,
}

impl TlsFiles {
    /// The files a node creates for itself in `dir` when none are configured.
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            ca: dir.join("ca.pem"),
            cert: dir.join("node.pem"),
            key: dir.join("node.key"),
        }
    }
}

fn write_file(path: &Path, contents: &str, secret: bool) -> Result<(), TlsError> {
    let io = |source| TlsError::Io {
        path: path.to_owned(),
        source,
    };
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(io)?;
    }
    fs::write(path, contents).map_err(io)?;
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(io)?;
    }
    #[cfg(not(unix))]
    let _ = secret;
    Ok(())
}

fn read_file(path: &Path) -> Result<String, TlsError> {
    let io = |source| TlsError::Io {
        path: path.to_owned(),
        source,
    };
    let len = fs::metadata(path).map_err(io)?.len();
    if len > PEM_FILE_BYTES_MAX {
        return Err(TlsError::Invalid {
            path: path.to_owned(),
            message: format!("{len} bytes is too large for a PEM file"),
        });
    }
    fs::read_to_string(path).map_err(io)
}

/// Creates a cluster CA: writes `dir/ca.pem` and `dir/ca.key`. Refuses to overwrite.
pub fn create_ca(dir: &Path) -> Result<(PathBuf, PathBuf), TlsError> {
    let (cert_path, key_path) = (dir.join("ca.pem"), dir.join("ca.key"));
    for p in [&cert_path, &key_path] {
        if p.exists() {
            return Err(TlsError::Invalid {
                path: p.clone(),
                message: "already exists; remove it to create a new CA".into(),
            });
        }
    }
    let key = KeyPair::generate_for(&PKCS_ED25519)?;
    let cert = ca_params()?.self_signed(&key)?;
    write_file(&cert_path, &cert.pem(), false)?;
    write_file(&key_path, &key.serialize_pem(), true)?;
    Ok((cert_path, key_path))
}

/// Creates a node certificate signed by the CA in `dir`: writes `dir/NAME.pem` and
/// `dir/NAME.key`. Refuses to overwrite.
pub fn create_node_cert(dir: &Path, name: &str) -> Result<(PathBuf, PathBuf), TlsError> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
    {
        return Err(TlsError::Invalid {
            path: dir.to_owned(),
            message: format!("node name {name:?} must be 1-64 characters of [A-Za-z0-9.-]"),
        });
    }
    let (ca_cert, ca_key) = (dir.join("ca.pem"), dir.join("ca.key"));
    let (cert_path, key_path) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    );
    for p in [&cert_path, &key_path] {
        if p.exists() {
            return Err(TlsError::Invalid {
                path: p.clone(),
                message: "already exists".into(),
            });
        }
    }
    let ca_key_pem = read_file(&ca_key)?;
    let signing = KeyPair::from_pem(&ca_key_pem).map_err(|e| TlsError::Invalid {
        path: ca_key.clone(),
        message: format!("not a private key: {e}"),
    })?;
    let issuer = Issuer::from_ca_cert_pem(&read_file(&ca_cert)?, signing).map_err(|e| {
        TlsError::Invalid {
            path: ca_cert.clone(),
            message: format!("not a CA certificate: {e}"),
        }
    })?;
    let (cert, key) = node_cert(name, &issuer)?;
    write_file(&cert_path, &cert, false)?;
    write_file(&key_path, &key, true)?;
    Ok((cert_path, key_path))
}

/// What a cluster CA certificate says (the simulator signs its own with these too).
pub fn ca_params() -> Result<CertificateParams, TlsError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(DnType::CommonName, "Verge cluster CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(params)
}

/// What a node certificate says: [`CLUSTER_SERVER_NAME`] and the node's name, for both ends
/// of mutual TLS.
pub fn node_cert_params(name: &str) -> Result<CertificateParams, TlsError> {
    let mut params = CertificateParams::new(vec![CLUSTER_SERVER_NAME.to_owned(), name.to_owned()])?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    Ok(params)
}

fn node_cert(name: &str, issuer: &Issuer<'_, KeyPair>) -> Result<(String, String), TlsError> {
    let key = KeyPair::generate_for(&PKCS_ED25519)?;
    let cert = node_cert_params(name)?.signed_by(&key, issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Returns the configured files, or creates a CA and a node certificate in `dir` on first use
/// so that a node started without configuration has working TLS. Peers of such a node need
/// certificates from the CA it created (`dir/ca.pem`, `dir/ca.key`).
pub fn ensure_node_files(
    configured: Option<TlsFiles>,
    dir: &Path,
    node_name: &str,
) -> Result<TlsFiles, TlsError> {
    if let Some(files) = configured {
        return Ok(files);
    }
    let files = TlsFiles::in_dir(dir);
    if files.ca.exists() && files.cert.exists() && files.key.exists() {
        return Ok(files);
    }
    if !dir.join("ca.key").exists() {
        create_ca(dir)?;
    }
    let signing =
        KeyPair::from_pem(&read_file(&dir.join("ca.key"))?).map_err(|e| TlsError::Invalid {
            path: dir.join("ca.key"),
            message: e.to_string(),
        })?;
    let issuer = Issuer::from_ca_cert_pem(&read_file(&files.ca)?, signing).map_err(|e| {
        TlsError::Invalid {
            path: files.ca.clone(),
            message: e.to_string(),
        }
    })?;
    let name: String = node_name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect();
    let (cert, key) = node_cert(&name, &issuer)?;
    write_file(&files.cert, &cert, false)?;
    write_file(&files.key, &key, true)?;
    Ok(files)
}

/// The rustls configurations of a node: as a server it requires a client certificate from the
/// CA; as a client it presents its own and accepts only servers certified by the CA.
#[derive(Debug, Clone)]
pub struct NodeTls {
    /// For accepting connections.
    pub server: Arc<ServerConfig>,
    /// For dialling peers.
    pub client: Arc<ClientConfig>,
}

/// The crypto provider: ring (no aws-lc-rs, which needs cmake).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl NodeTls {
    /// Loads the files and builds both configurations.
    pub fn load(files: &TlsFiles) -> Result<Self, TlsError> {
        Self::from_pem(
            (&files.ca, &read_file(&files.ca)?),
            (&files.cert, &read_file(&files.cert)?),
            (&files.key, &read_file(&files.key)?),
        )
    }

    /// Builds both configurations from PEM text, each named by the path it came from (the
    /// simulator passes certificates it made in memory).
    pub fn from_pem(
        ca: (&Path, &str),
        cert: (&Path, &str),
        key: (&Path, &str),
    ) -> Result<Self, TlsError> {
        Self::from_pem_with_provider(ca, cert, key, provider())
    }

    /// [`Self::from_pem`] with another crypto provider (the simulator's draws its randomness
    /// from the run's seed).
    pub fn from_pem_with_provider(
        (ca_path, ca_pem): (&Path, &str),
        (cert_path, cert_pem): (&Path, &str),
        (key_path, key_pem): (&Path, &str),
        provider: Arc<CryptoProvider>,
    ) -> Result<Self, TlsError> {
        let invalid = |path: &Path, message: String| TlsError::Invalid {
            path: path.to_owned(),
            message,
        };
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
            let cert = cert.map_err(|e| invalid(ca_path, format!("bad PEM: {e}")))?;
            roots
                .add(cert)
                .map_err(|e| invalid(ca_path, format!("not a usable CA certificate: {e}")))?;
        }
        if roots.is_empty() {
            return Err(invalid(ca_path, "no certificate in file".into()));
        }
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(cert_pem.as_bytes())
                .collect::<Result<_, _>>()
                .map_err(|e| invalid(cert_path, format!("bad PEM: {e}")))?;
        if chain.is_empty() {
            return Err(invalid(cert_path, "no certificate in file".into()));
        }
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| invalid(key_path, format!("no private key: {e}")))?;
        let roots = Arc::new(roots);
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::clone(&roots), Arc::clone(&provider))
                .build()?;
        let mut server = ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())?;
        server.alpn_protocols = vec![ALPN.to_vec()];
        let mut client = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)?;
        client.alpn_protocols = vec![ALPN.to_vec()];
        Ok(Self {
            server: Arc::new(server),
            client: Arc::new(client),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_and_node_certs_load() {
        let dir = tempfile::tempdir().expect("tempdir");
        create_ca(dir.path()).expect("ca");
        assert!(create_ca(dir.path()).is_err(), "never overwrites a CA");
        let (cert, key) = create_node_cert(dir.path(), "edge-1").expect("node cert");
        let tls = NodeTls::load(&TlsFiles {
            ca: dir.path().join("ca.pem"),
            cert,
            key,
        })
        .expect("loads");
        assert_eq!(tls.server.alpn_protocols, vec![ALPN.to_vec()]);
        assert!(create_node_cert(dir.path(), "bad name").is_err());
    }

    #[test]
    fn ensure_creates_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let files = ensure_node_files(None, dir.path(), "node-1").expect("created");
        let first = fs::read(&files.cert).expect("cert");
        let again = ensure_node_files(None, dir.path(), "node-1").expect("kept");
        assert_eq!(fs::read(&again.cert).expect("cert"), first);
        NodeTls::load(&files).expect("loads");
    }
}
