//! TLS on the HTTP API: the server configuration and a listener that hands axum connections
//! whose handshake is already done.
//!
//! Handshakes run in their own tasks, each bounded in time, so that a client that connects and
//! then stalls holds up neither the accept loop nor other clients. The listener plugs into
//! `axum::serve`, which keeps graceful shutdown working exactly as for plain TCP.

use std::fs;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// Largest certificate or key file read.
const PEM_FILE_BYTES_MAX: u64 = 1024 * 1024;
/// How long a client may take to complete the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most handshakes in progress at once; further connections wait in the kernel's backlog.
const HANDSHAKES_MAX: usize = 1024;
/// Completed connections waiting for the server to pick them up.
const ACCEPTED_QUEUE: usize = 64;

/// The API's certificate chain and key (`[api_tls]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiTlsFiles {
    /// The certificate chain (PEM), leaf first.
    pub cert: PathBuf,
    /// The private key (PEM).
    pub key: PathBuf,
}

/// Why the API's TLS configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApiTlsError {
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// A file does not hold what it should.
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// rustls refused the certificate or key (for example, a key that does not match).
    #[error("API TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

fn read_pem(path: &Path) -> Result<Vec<u8>, ApiTlsError> {
    let io = |source| ApiTlsError::Io {
        path: path.to_owned(),
        source,
    };
    let len = fs::metadata(path).map_err(io)?.len();
    if len > PEM_FILE_BYTES_MAX {
        return Err(ApiTlsError::Invalid {
            path: path.to_owned(),
            message: format!("{len} bytes is too large for a PEM file"),
        });
    }
    fs::read(path).map_err(io)
}

/// Loads the files into a server configuration (TLS 1.2 and 1.3, ring, HTTP/1.1 by ALPN).
pub fn server_config(files: &ApiTlsFiles) -> Result<Arc<ServerConfig>, ApiTlsError> {
    let invalid = |path: &Path, message: String| ApiTlsError::Invalid {
        path: path.to_owned(),
        message,
    };
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(&read_pem(&files.cert)?)
            .collect::<Result<_, _>>()
            .map_err(|e| invalid(&files.cert, format!("bad PEM: {e}")))?;
    if chain.is_empty() {
        return Err(invalid(&files.cert, "no certificate in file".into()));
    }
    if crate::tls::is_member_cert(&chain[0]) {
        // Clients and proxies see the API's certificate, and may be handed its key: a member
        // certificate there would let them join the cluster.
        return Err(invalid(
            &files.cert,
            "this is a cluster member certificate (from `verge certs node`); serve the API with \
             one from `verge certs api` or a public CA"
                .into(),
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(&read_pem(&files.key)?)
        .map_err(|e| invalid(&files.key, format!("no private key: {e}")))?;
    let mut config = ServerConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A listener whose connections have completed a TLS handshake, over any listener (TCP, or the
/// simulator's network).
pub struct TlsListener<L: axum::serve::Listener> {
    accepted: mpsc::Receiver<(TlsStream<L::Io>, SocketAddr)>,
    local: SocketAddr,
    task: JoinHandle<()>,
}

impl<L: axum::serve::Listener> std::fmt::Debug for TlsListener<L> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsListener")
            .field("local", &self.local)
            .finish_non_exhaustive()
    }
}

impl<L> TlsListener<L>
where
    L: axum::serve::Listener<Addr = SocketAddr>,
    L::Io: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    /// Starts accepting on `listener` with `config`.
    pub fn new(listener: L, config: Arc<ServerConfig>) -> io::Result<Self> {
        let local = listener.local_addr()?;
        let (tx, accepted) = mpsc::channel(ACCEPTED_QUEUE);
        let task = tokio::spawn(accept_loop(listener, TlsAcceptor::from(config), tx));
        Ok(Self {
            accepted,
            local,
            task,
        })
    }
}

impl<L: axum::serve::Listener> Drop for TlsListener<L> {
    /// Stops accepting: the server dropped the listener because it is shutting down.
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept_loop<L>(
    mut listener: L,
    acceptor: TlsAcceptor,
    tx: mpsc::Sender<(TlsStream<L::Io>, SocketAddr)>,
) where
    L: axum::serve::Listener<Addr = SocketAddr>,
    L::Io: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let handshakes = Arc::new(Semaphore::new(HANDSHAKES_MAX));
    loop {
        let Ok(permit) = Arc::clone(&handshakes).acquire_owned().await else {
            return;
        };
        // The listener retries failed accepts (out of file descriptors and the like) itself.
        let (tcp, peer) = listener.accept().await;
        let acceptor = acceptor.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => {
                    drop(permit);
                    let _ = tx.send((stream, peer)).await;
                }
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "API TLS handshake failed"),
                Err(_) => tracing::debug!(%peer, "API TLS handshake timed out"),
            }
        });
    }
}

impl<L> axum::serve::Listener for TlsListener<L>
where
    L: axum::serve::Listener<Addr = SocketAddr>,
    L::Io: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Io = TlsStream<L::Io>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.accepted.recv().await {
            Some(accepted) => accepted,
            // The accept loop only ends when the listener is dropped; never return.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_a_certificate_and_refuses_garbage() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (cert, key) =
            crate::tls::create_api_cert(dir.path(), "api", &["api".into()]).expect("cert");
        let config = server_config(&ApiTlsFiles {
            cert: cert.clone(),
            key: key.clone(),
        })
        .expect("loads");
        assert_eq!(config.alpn_protocols, vec![b"http/1.1".to_vec()]);
        let swapped = server_config(&ApiTlsFiles {
            cert: key.clone(),
            key: cert.clone(),
        });
        assert!(swapped.is_err(), "a key is not a certificate");
        let missing = server_config(&ApiTlsFiles {
            cert: dir.path().join("absent.pem"),
            key,
        });
        assert!(matches!(missing, Err(ApiTlsError::Io { .. })));
    }
}
