//! Certificates for mutual TLS between nodes.
//!
//! Every node of a cluster holds a certificate signed by the cluster's CA and refuses peers
//! without one. Certificates are Ed25519 (small, fast, and of fixed signature length, which
//! keeps simulated runs deterministic). Every node certificate carries the DNS name
//! [`CLUSTER_SERVER_NAME`] besides its own name: peers are dialled by address, so chain
//! validation against the CA is what authenticates them, and a fixed name lets the standard
//! verifier do it.
//!
//! A member certificate also carries the URI name [`MEMBER_URI`], and both ends of a peer
//! connection refuse a certificate without it, even one from the cluster's CA: a certificate
//! made for another purpose (the API's HTTPS, which clients and proxies hold) must not let its
//! holder join the cluster and receive every document. API certificates come from their own CA
//! ([`create_api_cert`]) and never carry the mark.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ED25519, SanType,
};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, OtherError,
    RootCertStore, ServerConfig, SignatureScheme,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

/// The DNS name every node certificate carries and every node dials.
pub const CLUSTER_SERVER_NAME: &str = "verge-node";
/// The URI name that marks a certificate as a cluster member's (see the module docs).
pub const MEMBER_URI: &str = "urn:verge:cluster-member";
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
    check_name(dir, name)?;
    let (ca_cert, ca_key) = (dir.join("ca.pem"), dir.join("ca.key"));
    let (cert_path, key_path) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    );
    refuse_existing(&[&cert_path, &key_path])?;
    let issuer = load_issuer(&ca_cert, &ca_key)?;
    let (cert, key) = node_cert(name, &issuer)?;
    write_file(&cert_path, &cert, false)?;
    write_file(&key_path, &key, true)?;
    Ok((cert_path, key_path))
}

/// A certificate's name: 1-64 characters of `[A-Za-z0-9.-]` (it names its files too).
fn check_name(dir: &Path, name: &str) -> Result<(), TlsError> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
    {
        return Err(TlsError::Invalid {
            path: dir.to_owned(),
            message: format!("name {name:?} must be 1-64 characters of [A-Za-z0-9.-]"),
        });
    }
    Ok(())
}

fn refuse_existing(paths: &[&PathBuf]) -> Result<(), TlsError> {
    for p in paths {
        if p.exists() {
            return Err(TlsError::Invalid {
                path: (*p).clone(),
                message: "already exists".into(),
            });
        }
    }
    Ok(())
}

fn load_issuer(ca_cert: &Path, ca_key: &Path) -> Result<Issuer<'static, KeyPair>, TlsError> {
    let signing = KeyPair::from_pem(&read_file(ca_key)?).map_err(|e| TlsError::Invalid {
        path: ca_key.to_owned(),
        message: format!("not a private key: {e}"),
    })?;
    Issuer::from_ca_cert_pem(&read_file(ca_cert)?, signing).map_err(|e| TlsError::Invalid {
        path: ca_cert.to_owned(),
        message: format!("not a CA certificate: {e}"),
    })
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
    params
        .subject_alt_names
        .push(SanType::URI(MEMBER_URI.try_into()?));
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
        // Certificates made before member certificates were marked are made again (the CA
        // stays): the node's peers would refuse them.
        let current = CertificateDer::pem_slice_iter(read_file(&files.cert)?.as_bytes())
            .next()
            .and_then(Result::ok)
            .is_some_and(|cert| is_member_cert(&cert));
        if current || !dir.join("ca.key").exists() {
            return Ok(files);
        }
        tracing::info!(cert = %files.cert.display(), "re-issuing the node certificate with the cluster member mark");
        for path in [&files.cert, &files.key] {
            fs::remove_file(path).map_err(|source| TlsError::Io {
                path: path.clone(),
                source,
            })?;
        }
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

/// Whether `cert` (DER) carries the [`MEMBER_URI`] name.
pub fn is_member_cert(cert: &[u8]) -> bool {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let Ok((_, cert)) = X509Certificate::from_der(cert) else {
        return false;
    };
    let Ok(Some(names)) = cert.subject_alternative_name() else {
        return false;
    };
    names
        .value
        .general_names
        .iter()
        .any(|name| matches!(name, GeneralName::URI(uri) if *uri == MEMBER_URI))
}

/// Why a peer's certificate was refused although its chain is valid.
#[derive(Debug, thiserror::Error)]
#[error("the peer's certificate is not a cluster member's (it lacks the {MEMBER_URI} name)")]
struct NotAMember;

fn require_member(cert: &CertificateDer<'_>) -> Result<(), rustls::Error> {
    if is_member_cert(cert) {
        Ok(())
    } else {
        Err(rustls::Error::InvalidCertificate(CertificateError::Other(
            OtherError(Arc::new(NotAMember)),
        )))
    }
}

/// The CA's verification of connecting peers, then the member mark.
#[derive(Debug)]
struct MemberClients(Arc<dyn ClientCertVerifier>);

impl ClientCertVerifier for MemberClients {
    fn offer_client_auth(&self) -> bool {
        self.0.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.0.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.0.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self.0.verify_client_cert(end_entity, intermediates, now)?;
        require_member(end_entity)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// The CA's verification of dialled peers, then the member mark.
#[derive(Debug)]
struct MemberServers(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for MemberServers {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified = self.0.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        require_member(end_entity)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// Creates an API (HTTPS) certificate for `hosts` (DNS names or IP addresses), signed by the
/// API CA in `dir` (`api-ca.pem`, `api-ca.key`, created on first use): writes `dir/NAME.pem`
/// and `dir/NAME.key`. The API CA is not the cluster's, and the certificate lacks the member
/// mark, so whoever holds it (a proxy, a load balancer) cannot join the cluster with it.
pub fn create_api_cert(
    dir: &Path,
    name: &str,
    hosts: &[String],
) -> Result<(PathBuf, PathBuf), TlsError> {
    check_name(dir, name)?;
    if hosts.is_empty() || hosts.len() > API_CERT_HOSTS_MAX {
        return Err(TlsError::Invalid {
            path: dir.to_owned(),
            message: format!("give 1 to {API_CERT_HOSTS_MAX} hosts (--host) the API is reached at"),
        });
    }
    let (ca_cert, ca_key) = (dir.join("api-ca.pem"), dir.join("api-ca.key"));
    if !ca_cert.exists() && !ca_key.exists() {
        let key = KeyPair::generate_for(&PKCS_ED25519)?;
        let mut params = ca_params()?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, "Verge API CA");
        let cert = params.self_signed(&key)?;
        write_file(&ca_cert, &cert.pem(), false)?;
        write_file(&ca_key, &key.serialize_pem(), true)?;
    }
    let (cert_path, key_path) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    );
    refuse_existing(&[&cert_path, &key_path])?;
    let issuer = load_issuer(&ca_cert, &ca_key)?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    for host in hosts {
        let san = match host.parse::<std::net::IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => {
                SanType::DnsName(host.as_str().try_into().map_err(|e| TlsError::Invalid {
                    path: dir.to_owned(),
                    message: format!("host {host:?} is neither an IP address nor a DNS name: {e}"),
                })?)
            }
        };
        params.subject_alt_names.push(san);
    }
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate_for(&PKCS_ED25519)?;
    let cert = params.signed_by(&key, &issuer)?;
    write_file(&cert_path, &cert.pem(), false)?;
    write_file(&key_path, &key.serialize_pem(), true)?;
    Ok((cert_path, key_path))
}

/// Most hosts one API certificate names.
pub const API_CERT_HOSTS_MAX: usize = 64;

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
        if !is_member_cert(&chain[0]) {
            return Err(invalid(
                cert_path,
                format!(
                    "not a cluster member certificate: it lacks the {MEMBER_URI} name, so peers \
                     would refuse it; make one with `verge certs node` (certificates made before \
                     this mark existed lack it, and API certificates never carry it)"
                ),
            ));
        }
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| invalid(key_path, format!("no private key: {e}")))?;
        let roots = Arc::new(roots);
        let clients =
            WebPkiClientVerifier::builder_with_provider(Arc::clone(&roots), Arc::clone(&provider))
                .build()?;
        let mut server = ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(Arc::new(MemberClients(clients)))
            .with_single_cert(chain.clone(), key.clone_key())?;
        server.alpn_protocols = vec![ALPN.to_vec()];
        let servers =
            WebPkiServerVerifier::builder_with_provider(roots, Arc::clone(&provider)).build()?;
        let mut client = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(MemberServers(servers)))
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
    /// A certificate from the cluster's CA without the member mark, as `verge certs node` made
    /// them before the mark existed.
    fn unmarked(dir: &Path, name: &str) -> (String, String) {
        let issuer = load_issuer(&dir.join("ca.pem"), &dir.join("ca.key")).expect("issuer");
        let mut params = node_cert_params(name).expect("params");
        params
            .subject_alt_names
            .retain(|san| !matches!(san, SanType::URI(_)));
        let key = KeyPair::generate_for(&PKCS_ED25519).expect("key");
        let cert = params.signed_by(&key, &issuer).expect("signed");
        (cert.pem(), key.serialize_pem())
    }

    /// A rustls handshake in memory: `Ok` when both ends accept each other.
    fn handshake(client: &Arc<ClientConfig>, server: &Arc<ServerConfig>) -> Result<(), String> {
        let name = ServerName::try_from(CLUSTER_SERVER_NAME).expect("name");
        let mut client =
            rustls::ClientConnection::new(Arc::clone(client), name).map_err(|e| e.to_string())?;
        let mut server =
            rustls::ServerConnection::new(Arc::clone(server)).map_err(|e| e.to_string())?;
        for _ in 0..10 {
            let mut buf = Vec::new();
            client.write_tls(&mut buf).map_err(|e| e.to_string())?;
            server
                .read_tls(&mut buf.as_slice())
                .map_err(|e| e.to_string())?;
            server
                .process_new_packets()
                .map_err(|e| format!("server: {e}"))?;
            let mut buf = Vec::new();
            server.write_tls(&mut buf).map_err(|e| e.to_string())?;
            client
                .read_tls(&mut buf.as_slice())
                .map_err(|e| e.to_string())?;
            client
                .process_new_packets()
                .map_err(|e| format!("client: {e}"))?;
            if !client.is_handshaking() && !server.is_handshaking() {
                return Ok(());
            }
        }
        Err("the handshake did not finish".into())
    }

    #[test]
    fn peers_without_the_member_mark_are_refused_both_ways() {
        let dir = tempfile::tempdir().expect("tempdir");
        create_ca(dir.path()).expect("ca");
        let ca = read_file(&dir.path().join("ca.pem")).expect("ca");
        let member = |name: &str| {
            let (cert, key) = create_node_cert(dir.path(), name).expect("cert");
            let (cert, key) = (
                read_file(&cert).expect("pem"),
                read_file(&key).expect("pem"),
            );
            NodeTls::from_pem((dir.path(), &ca), (dir.path(), &cert), (dir.path(), &key))
                .expect("member loads")
        };
        let (a, b) = (member("a"), member("b"));
        handshake(&a.client, &b.server).expect("members accept each other");

        let (cert, key) = unmarked(dir.path(), "intruder");
        let refused = NodeTls::from_pem((dir.path(), &ca), (dir.path(), &cert), (dir.path(), &key))
            .expect_err("a node does not start with it");
        assert!(
            refused
                .to_string()
                .contains("not a cluster member certificate")
        );
        // Configurations a modified node would build with it: plain CA verification.
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert.as_bytes())
            .collect::<Result<_, _>>()
            .expect("chain");
        let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).expect("key");
        let mut roots = RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(ca.as_bytes()) {
            roots.add(c.expect("ca")).expect("root");
        }
        let roots = Arc::new(roots);
        let intruder_client = Arc::new(
            ClientConfig::builder_with_provider(provider())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .expect("versions")
                .with_root_certificates(Arc::clone(&roots))
                .with_client_auth_cert(chain.clone(), key.clone_key())
                .expect("client"),
        );
        let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider())
            .build()
            .expect("verifier");
        let intruder_server = Arc::new(
            ServerConfig::builder_with_provider(provider())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .expect("versions")
                .with_client_cert_verifier(verifier)
                .with_single_cert(chain, key)
                .expect("server"),
        );
        // Sanity: with plain CA verification on both ends it would get in.
        handshake(&intruder_client, &intruder_server).expect("the CA alone accepts it");
        let dialling = handshake(&intruder_client, &a.server).expect_err("a member refuses it");
        assert!(dialling.contains("NotAMember"), "{dialling}");
        let dialled = handshake(&a.client, &intruder_server).expect_err("a member refuses it");
        assert!(dialled.contains("NotAMember"), "{dialled}");
    }

    #[test]
    fn certificates_made_before_the_member_mark_are_made_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let files = ensure_node_files(None, dir.path(), "node-1").expect("created");
        let (cert, key) = unmarked(dir.path(), "node-1");
        write_file(&files.cert, &cert, false).expect("old cert");
        write_file(&files.key, &key, true).expect("old key");
        assert!(NodeTls::load(&files).is_err());
        let again = ensure_node_files(None, dir.path(), "node-1").expect("re-issued");
        NodeTls::load(&again).expect("loads");
    }

    #[test]
    fn api_certificates_name_their_hosts_and_are_no_members() {
        let dir = tempfile::tempdir().expect("tempdir");
        let hosts = vec!["edge-1.example".to_string(), "10.0.0.5".to_string()];
        let (cert, _) = create_api_cert(dir.path(), "edge-1-api", &hosts).expect("api cert");
        assert!(dir.path().join("api-ca.pem").exists());
        let der = CertificateDer::pem_slice_iter(read_file(&cert).expect("pem").as_bytes())
            .next()
            .expect("one")
            .expect("der");
        assert!(!is_member_cert(&der));
        assert!(
            create_api_cert(dir.path(), "other", &[]).is_err(),
            "no host"
        );
        assert!(
            create_api_cert(dir.path(), "edge-1-api", &hosts).is_err(),
            "exists"
        );
        create_api_cert(dir.path(), "second", &hosts).expect("the API CA is reused");
    }
}
