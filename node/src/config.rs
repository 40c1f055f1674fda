//! Node configuration: defaults, then `verge.toml`, then `VERGE_*` environment, then flags.
//!
//! With no file, no environment and no flags a node runs alone on loopback with its data in
//! `./verge-data`, which is what a developer trying Verge wants.

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Default data directory, relative to the working directory.
pub const DEFAULT_DATA_DIR: &str = "verge-data";
/// Default API address: loopback, so a node started by hand is not exposed.
pub const DEFAULT_API_ADDR: &str = "127.0.0.1:7070";
/// Default gossip (QUIC) address.
pub const DEFAULT_GOSSIP_ADDR: &str = "127.0.0.1:7071";
/// File read from the working directory when `--config` is not given.
pub const DEFAULT_CONFIG_FILE: &str = "verge.toml";
/// Fewest changes a generation may be configured to hold: each compaction rewrites the
/// document, so a smaller one would rewrite it on nearly every write.
pub const COMPACTION_AFTER_CHANGES_MIN: u64 = 16;
/// Fewest bytes of history a generation may be configured to grow by, for the same reason.
pub const COMPACTION_AFTER_BYTES_MIN: u64 = 4096;
/// Most generations a document may be configured to retain (`[compaction] retain_generations`):
/// carrying a client's changes walks every one of them.
pub const RETAIN_GENERATIONS_MAX: u64 = 64;
/// Largest config file accepted.
const CONFIG_FILE_BYTES_MAX: u64 = 1024 * 1024;

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log pipelines.
    Json,
}

/// Flags of `verge node`; each can also come from its `VERGE_*` variable.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct NodeArgs {
    /// Config file (TOML). Without it, ./verge.toml is read when present.
    #[arg(long, env = "VERGE_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Directory holding the database and node files.
    #[arg(long, env = "VERGE_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Address of the HTTP API (port 0 picks a free port, written to DATA_DIR/api.addr).
    #[arg(long, env = "VERGE_API_ADDR", value_name = "ADDR")]
    pub api_addr: Option<String>,
    /// Name of this node in status and logs (default: generated once and kept in the data dir).
    #[arg(long, env = "VERGE_NODE_ID", value_name = "ID")]
    pub node_id: Option<String>,
    /// Log format.
    #[arg(long, env = "VERGE_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// Address peers reach this node on (QUIC, UDP).
    #[arg(long, env = "VERGE_GOSSIP_ADDR", value_name = "ADDR")]
    pub gossip_addr: Option<String>,
    /// Address peers are told to reach this node at, when `--gossip-addr` listens on every
    /// interface (`0.0.0.0` or `[::]`) or behind a NAT.
    #[arg(long, env = "VERGE_ADVERTISE_ADDR", value_name = "ADDR")]
    pub advertise_addr: Option<String>,
    /// A seed peer's gossip address (repeatable; the environment takes a comma-separated list).
    #[arg(
        long = "peer",
        env = "VERGE_PEERS",
        value_name = "ADDR",
        value_delimiter = ','
    )]
    pub peers: Vec<String>,
    /// The cluster CA certificate (PEM).
    #[arg(long, env = "VERGE_TLS_CA", value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// This node's certificate (PEM), signed by the cluster CA.
    #[arg(long, env = "VERGE_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// This node's private key (PEM).
    #[arg(long, env = "VERGE_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// Certificate chain (PEM) for HTTPS on the API; with --api-tls-key.
    #[arg(long, env = "VERGE_API_TLS_CERT", value_name = "FILE")]
    pub api_tls_cert: Option<PathBuf>,
    /// Private key (PEM) for HTTPS on the API; with --api-tls-cert.
    #[arg(long, env = "VERGE_API_TLS_KEY", value_name = "FILE")]
    pub api_tls_key: Option<PathBuf>,
    /// Encrypt stored documents with the 32-byte key in FILE (raw, hex or base64).
    #[arg(long, env = "VERGE_ENCRYPTION_KEY_FILE", value_name = "FILE")]
    pub encryption_key_file: Option<PathBuf>,
    /// The storage key itself, from `VERGE_ENCRYPTION_KEY` only (hex or base64; never a flag,
    /// so that it does not show in the process list).
    #[arg(skip = std::env::var("VERGE_ENCRYPTION_KEY").ok().map(SecretText))]
    pub encryption_key: Option<SecretText>,
    /// A browser origin allowed to call the API (`https://app.example.com`, or `*`);
    /// repeatable, and added to `[cors] allowed_origins`.
    #[arg(
        long = "cors-origin",
        env = "VERGE_CORS_ORIGINS",
        value_name = "ORIGIN",
        value_delimiter = ','
    )]
    pub cors_origins: Vec<String>,
    /// Leave the cluster on SIGINT/SIGTERM (`[replication] leave_on_shutdown`): the members
    /// drop this node instead of listing it as down. For a node being retired, not one being
    /// restarted. `--leave-on-shutdown=false` overrides a file that says true.
    #[arg(
        long,
        env = "VERGE_LEAVE_ON_SHUTDOWN",
        value_name = "BOOL",
        num_args = 0..=1,
        default_missing_value = "true",
        require_equals = true
    )]
    pub leave_on_shutdown: Option<bool>,
}

/// Browsers on other origins (`[cors]` in the file).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CorsFileConfig {
    /// Origins allowed to call the API from a browser: exact origins, or `*` for any.
    #[serde(default)]
    pub allowed_origins: Vec<String>,
}

/// A secret read from the environment; `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretText(pub String);

impl std::fmt::Debug for SecretText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// HTTPS for the API (`[api_tls]` in the file). Both or neither.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiTlsFileConfig {
    /// The certificate chain.
    pub cert: Option<PathBuf>,
    /// The private key.
    pub key: Option<PathBuf>,
}

/// TLS files (`[tls]` in the file). All three or none.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFileConfig {
    /// The cluster CA certificate.
    pub ca: Option<PathBuf>,
    /// This node's certificate.
    pub cert: Option<PathBuf>,
    /// This node's key.
    pub key: Option<PathBuf>,
}

/// Replication tunables (`[replication]` in the file).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReplicationFileConfig {
    /// Milliseconds changes wait to share a broadcast message.
    pub batch_window_ms: u64,
    /// A broadcast batch is sent at once when it holds this many bytes.
    pub batch_bytes_max: usize,
    /// Seconds between anti-entropy rounds with each peer (also run on every new connection).
    pub anti_entropy_interval_s: u64,
    /// Up to this many peers, every change goes straight to every peer; in larger clusters
    /// changes go through one relay node that forwards them to everyone else.
    pub full_fanout_max: usize,
    /// Milliseconds the relay merges the changes it forwards, so that one message to each
    /// member carries the writes of many nodes (a larger cluster's messages per write fall as
    /// this grows; its latency grows by up to this much).
    pub relay_window_ms: u64,
    /// Milliseconds a batch sent to the relay may go unconfirmed by its QUIC stack before the
    /// sender sends it to every peer itself (the relay may have died with its connection still
    /// cached). Raise it on links whose round trip nears it.
    pub relay_delivery_timeout_ms: u64,
    /// Whether a stop on SIGINT/SIGTERM first leaves the cluster, as `verge leave` does: the
    /// members drop this node and stop dialling it (until it starts again) instead of listing
    /// it as down. Off by default: a node stopped for a restart or an upgrade should be
    /// missed. Set it on nodes that are retired by stopping them (autoscaled instances).
    pub leave_on_shutdown: bool,
}

impl Default for ReplicationFileConfig {
    fn default() -> Self {
        Self {
            batch_window_ms: 2,
            batch_bytes_max: 256 * 1024,
            anti_entropy_interval_s: 30,
            full_fanout_max: 16,
            relay_window_ms: 40,
            relay_delivery_timeout_ms: 1_000,
            leave_on_shutdown: false,
        }
    }
}

/// Storage tunables (`[storage]` in the file).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// Memory budget for documents held in memory, in bytes.
    pub cache_bytes: usize,
    /// Writes that may wait for the writer before new ones are refused with 503.
    pub write_queue: usize,
    /// Most writes committed in one transaction.
    pub batch_max: usize,
    /// Change rows after which a document's snapshot is rewritten.
    pub compact_after_changes: u64,
    /// Seconds between scans for expired documents and old tombstones.
    pub purge_interval_s: u64,
    /// Seconds a tombstone is kept so that the delete reaches every replica.
    pub tombstone_retention_s: u64,
    /// File holding the key that encrypts stored documents; none stores them in plain form.
    pub encryption_key_file: Option<PathBuf>,
    /// Writes are refused (`507 insufficient_storage`, reads go on) while the data directory's
    /// filesystem has less than this many bytes free; 0 never refuses.
    pub min_free_bytes: u64,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            cache_bytes: 256 * 1024 * 1024,
            write_queue: 8192,
            batch_max: 1024,
            compact_after_changes: 256,
            purge_interval_s: 60,
            tombstone_retention_s: 7 * 24 * 3600,
            encryption_key_file: None,
            min_free_bytes: 64 * 1024 * 1024,
        }
    }
}

/// When documents start a new generation (`[compaction]` in the file; docs/compaction.md).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CompactionConfig {
    /// Changes in a document's current generation after which it starts the next one.
    pub after_changes: u64,
    /// Bytes a document's history grew since its generation started after which it starts the
    /// next one.
    pub after_bytes: u64,
    /// How long a node keeps a generation its documents left (the last few of each), so that
    /// the changes a client still holds of it are carried onto the new one instead of being
    /// made again by the client.
    pub retain_previous_s: u64,
    /// How many of the generations a document left a node keeps at most (the newest).
    pub retain_generations: u64,
}

impl Default for CompactionConfig {
    fn default() -> Self {
        Self {
            after_changes: 1000,
            after_bytes: 1024 * 1024,
            retain_previous_s: 3600,
            retain_generations: 16,
        }
    }
}

/// Most feed records a node may be configured to keep (`[feed] retain_events`).
pub const FEED_RETAIN_EVENTS_MAX: u64 = 100_000_000;
/// Longest a node may be configured to keep feed records (`[feed] retain_hours`): 90 days.
pub const FEED_RETAIN_HOURS_MAX: u64 = 90 * 24;

/// How much of the change feed a node keeps (`[feed]` in the file; docs/api.md).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FeedConfig {
    /// The newest records kept: a watcher or subscription further behind is told to reset.
    pub retain_events: u64,
    /// Records older than this are dropped (in the purge pass), however few there are.
    pub retain_hours: u64,
}

impl Default for FeedConfig {
    fn default() -> Self {
        Self {
            retain_events: 1_000_000,
            retain_hours: 7 * 24,
        }
    }
}

/// Shortest interval between shipped segments (`[backup] ship_interval_ms`).
pub const BACKUP_SHIP_INTERVAL_MS_MIN: u64 = 50;
/// Longest interval between shipped segments: an hour (the loss window of a lost node).
pub const BACKUP_SHIP_INTERVAL_MS_MAX: u64 = 3_600_000;
/// Shortest interval between snapshots (`[backup] snapshot_interval_s`).
pub const BACKUP_SNAPSHOT_INTERVAL_S_MIN: u64 = 10;
/// Longest interval between snapshots: a week (a restore replays every segment since).
pub const BACKUP_SNAPSHOT_INTERVAL_S_MAX: u64 = 7 * 24 * 3600;
/// Most snapshots a location may be configured to keep (`[backup] keep_snapshots`).
pub const BACKUP_KEEP_SNAPSHOTS_MAX: u64 = 1000;

/// Backups to object storage (`[backup]` in the file; docs/operations.md).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackupConfig {
    /// Where: `s3://bucket/prefix` or `file:///path`; `None` takes no backups.
    pub to: Option<String>,
    /// A full snapshot this often; segments carry the changes in between.
    pub snapshot_interval_s: u64,
    /// Committed changes are shipped this often: the most a lost node can lose.
    pub ship_interval_ms: u64,
    /// Snapshots kept (with the segments after the oldest): how far back `--at` can go.
    pub keep_snapshots: u64,
}

impl Default for BackupConfig {
    fn default() -> Self {
        Self {
            to: None,
            snapshot_interval_s: 3600,
            ship_interval_ms: 1000,
            keep_snapshots: 3,
        }
    }
}

/// Most idempotency records a node may be configured to keep (`[idempotency] keys_max`).
pub const IDEMPOTENCY_KEYS_MAX: u64 = 100_000_000;
/// Longest a node may be configured to keep idempotency records: 30 days.
pub const IDEMPOTENCY_RETAIN_HOURS_MAX: u64 = 30 * 24;

/// How long writes' idempotency keys are kept (`[idempotency]` in the file; docs/api.md).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IdempotencyConfig {
    /// Hours a key is kept after its write: a retry later than this writes again.
    pub retain_hours: u64,
    /// Most keys kept; beyond it the oldest go first (in the purge pass).
    pub keys_max: u64,
}

impl Default for IdempotencyConfig {
    fn default() -> Self {
        Self {
            retain_hours: 24,
            keys_max: 1_000_000,
        }
    }
}

/// The longest API timeout that may be configured (a day): a longer one is no bound.
pub const TIMEOUT_S_MAX: u64 = 24 * 3600;

/// Limits on what clients may take of the API (`[limits]` in the file).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Most API connections open at once; further ones get `503` (or a probe's answer) and
    /// are closed.
    pub api_connections_max: usize,
    /// Most API connections open at once from one client address, so that one client cannot
    /// hold every slot (raise it to `api_connections_max` behind a proxy that is the only
    /// client).
    pub api_connections_per_client_max: usize,
    /// Seconds a connection has to send a request's complete head, from when it opens or its
    /// previous response ends (this also closes kept-alive connections nobody uses).
    pub header_timeout_s: u64,
    /// Seconds a request's body has to arrive after its head; then `408 request_timeout`.
    pub body_timeout_s: u64,
    /// Seconds a connection may go with no byte moving either way while a request or its answer
    /// is under way (a client that stops reading); then it is closed.
    pub idle_timeout_s: u64,
    /// Requests per second (and at once) each API token may send, unless the token sets its
    /// own `requests_per_second`; `None` is unlimited.
    pub requests_per_second_per_token: Option<u32>,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            api_connections_max: 4096,
            api_connections_per_client_max: 1024,
            header_timeout_s: 10,
            body_timeout_s: 30,
            idle_timeout_s: 60,
            requests_per_second_per_token: None,
        }
    }
}

/// The file's shape.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    node_id: Option<String>,
    data_dir: Option<PathBuf>,
    api_addr: Option<String>,
    log_format: Option<LogFormat>,
    gossip_addr: Option<String>,
    advertise_addr: Option<String>,
    #[serde(default)]
    peers: Vec<String>,
    #[serde(default)]
    tls: TlsFileConfig,
    #[serde(default)]
    storage: StorageConfig,
    #[serde(default)]
    compaction: CompactionConfig,
    #[serde(default)]
    feed: FeedConfig,
    #[serde(default)]
    idempotency: IdempotencyConfig,
    #[serde(default)]
    backup: BackupConfig,
    #[serde(default)]
    subscriptions: Vec<crate::subscriptions::SubscriptionFileConfig>,
    #[serde(default)]
    replication: ReplicationFileConfig,
    auth: Option<crate::auth::AuthFileConfig>,
    #[serde(default)]
    api_tls: ApiTlsFileConfig,
    #[serde(default)]
    limits: LimitsConfig,
    #[serde(default)]
    cors: CorsFileConfig,
}

/// A fully resolved configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Explicit node id; `None` means the one kept in the data dir.
    pub node_id: Option<String>,
    /// Data directory.
    pub data_dir: PathBuf,
    /// API listen address.
    pub api_addr: SocketAddr,
    /// Log format.
    pub log_format: LogFormat,
    /// Storage tunables.
    pub storage: StorageConfig,
    /// When documents start a new generation.
    pub compaction: CompactionConfig,
    /// How much of the change feed is kept.
    pub feed: FeedConfig,
    /// How long idempotency keys are kept.
    pub idempotency: IdempotencyConfig,
    /// Backups to object storage.
    pub backup: BackupConfig,
    /// Webhook subscriptions to the change feed.
    pub subscriptions: Vec<crate::subscriptions::Subscription>,
    /// Key encrypting stored documents; `None` stores them in plain form.
    pub encryption_key: Option<crate::store::EncryptionKey>,
    /// Gossip listen address.
    pub gossip_addr: SocketAddr,
    /// The address peers are told to reach this node at; `None`: the gossip address itself
    /// (as bound, so a port 0 becomes the chosen port).
    pub advertise_addr: Option<SocketAddr>,
    /// Seed peers.
    pub peers: Vec<SocketAddr>,
    /// Configured TLS files; `None` means the node's own in `DATA_DIR/tls`.
    pub tls: Option<crate::tls::TlsFiles>,
    /// Replication tunables.
    pub replication: ReplicationFileConfig,
    /// Who may use the API.
    pub auth: crate::auth::Auth,
    /// HTTPS on the API; `None` serves plain HTTP.
    pub api_tls: Option<crate::http::ApiTlsFiles>,
    /// Connection and request rate limits of the API.
    pub limits: LimitsConfig,
    /// Browser origins allowed to call the API.
    pub cors: crate::http::cors::Cors,
    /// The file that was read, if any.
    pub source: Option<PathBuf>,
}

/// Why the configuration is unusable.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong, with its location.
        message: String,
    },
    /// A value is out of range.
    #[error("invalid setting {key}: {message}")]
    Invalid {
        /// The setting.
        key: &'static str,
        /// What is wrong.
        message: String,
    },
}

impl Config {
    /// Resolves flags and environment (already merged by clap) over the file over defaults.
    pub fn resolve(args: &NodeArgs) -> Result<Self, ConfigError> {
        let (file, source) = match &args.config {
            Some(path) => (read_file(path)?, Some(path.clone())),
            None if Path::new(DEFAULT_CONFIG_FILE).is_file() => {
                let path = PathBuf::from(DEFAULT_CONFIG_FILE);
                (read_file(&path)?, Some(path))
            }
            None => (FileConfig::default(), None),
        };
        Self::merge(args, file, source)
    }

    /// The built-in defaults alone: no file, no flags, no environment (the simulator starts
    /// from these and sets what its hosts need).
    pub fn defaults() -> Result<Self, ConfigError> {
        Self::merge(&NodeArgs::default(), FileConfig::default(), None)
    }

    fn merge(
        args: &NodeArgs,
        file: FileConfig,
        source: Option<PathBuf>,
    ) -> Result<Self, ConfigError> {
        let api_addr = args
            .api_addr
            .clone()
            .or(file.api_addr)
            .unwrap_or_else(|| DEFAULT_API_ADDR.to_owned());
        let api_addr = api_addr.parse().map_err(|e| ConfigError::Invalid {
            key: "api_addr",
            message: format!("{api_addr:?} is not an IP:port address ({e})"),
        })?;
        let node_id = args.node_id.clone().or(file.node_id);
        if let Some(id) = &node_id
            && (id.is_empty() || id.len() > 64 || !id.bytes().all(verge_core::doc_id::is_id_byte))
        {
            return Err(ConfigError::Invalid {
                key: "node_id",
                message: format!("{id:?} must be 1-64 bytes of [A-Za-z0-9._~:/@+-]"),
            });
        }
        let mut storage = file.storage;
        validate_storage(&storage)?;
        if args.encryption_key_file.is_some() {
            storage
                .encryption_key_file
                .clone_from(&args.encryption_key_file);
        }
        let encryption_key = match (&storage.encryption_key_file, &args.encryption_key) {
            (None, None) => None,
            (Some(path), None) => {
                Some(crate::store::EncryptionKey::from_file(path).map_err(|e| {
                    ConfigError::Invalid {
                        key: "storage.encryption_key_file",
                        message: e.to_string(),
                    }
                })?)
            }
            (None, Some(text)) => {
                Some(crate::store::EncryptionKey::parse(&text.0).map_err(|e| {
                    ConfigError::Invalid {
                        key: "VERGE_ENCRYPTION_KEY",
                        message: e.to_string(),
                    }
                })?)
            }
            (Some(_), Some(_)) => {
                return Err(ConfigError::Invalid {
                    key: "storage.encryption_key_file",
                    message: "give the encryption key either in a file or in \
                              VERGE_ENCRYPTION_KEY, not both"
                        .into(),
                });
            }
        };
        let gossip_addr = args
            .gossip_addr
            .clone()
            .or(file.gossip_addr)
            .unwrap_or_else(|| DEFAULT_GOSSIP_ADDR.to_owned());
        let gossip_addr: SocketAddr = gossip_addr.parse().map_err(|e| ConfigError::Invalid {
            key: "gossip_addr",
            message: format!("{gossip_addr:?} is not an IP:port address ({e})"),
        })?;
        let advertise_addr = match args.advertise_addr.clone().or(file.advertise_addr) {
            Some(text) => {
                let addr: SocketAddr = text.parse().map_err(|e| ConfigError::Invalid {
                    key: "advertise_addr",
                    message: format!("{text:?} is not an IP:port address ({e})"),
                })?;
                if addr.ip().is_unspecified() || addr.port() == 0 {
                    return Err(ConfigError::Invalid {
                        key: "advertise_addr",
                        message: format!("{addr} is not an address peers can reach"),
                    });
                }
                Some(addr)
            }
            // A node listening on every interface would otherwise introduce itself to its
            // peers as 0.0.0.0, which they cannot reach and membership refuses.
            None if gossip_addr.ip().is_unspecified() => {
                return Err(ConfigError::Invalid {
                    key: "advertise_addr",
                    message: format!(
                        "gossip_addr {gossip_addr} listens on every interface; set advertise_addr \
                         (--advertise-addr, VERGE_ADVERTISE_ADDR) to the address peers reach \
                         this node at"
                    ),
                });
            }
            None => None,
        };
        let peer_names = if args.peers.is_empty() {
            file.peers
        } else {
            args.peers.clone()
        };
        let mut peers = Vec::with_capacity(peer_names.len());
        for name in peer_names.iter().filter(|p| !p.trim().is_empty()) {
            let addr = std::net::ToSocketAddrs::to_socket_addrs(name.trim())
                .ok()
                .and_then(|mut a| a.next())
                .ok_or_else(|| ConfigError::Invalid {
                    key: "peers",
                    message: format!("{name:?} is not a reachable HOST:port"),
                })?;
            peers.push(addr);
        }
        let tls = match (
            args.tls_ca.clone().or(file.tls.ca),
            args.tls_cert.clone().or(file.tls.cert),
            args.tls_key.clone().or(file.tls.key),
        ) {
            (None, None, None) => None,
            (Some(ca), Some(cert), Some(key)) => Some(crate::tls::TlsFiles { ca, cert, key }),
            _ => {
                return Err(ConfigError::Invalid {
                    key: "tls",
                    message: "give all three of the CA certificate, the node certificate and its key, or none".into(),
                });
            }
        };
        let auth = crate::auth::Auth::resolve(file.auth.as_ref(), api_addr).map_err(|e| {
            ConfigError::Invalid {
                key: e.key,
                message: e.message,
            }
        })?;
        let api_tls = match (
            args.api_tls_cert.clone().or(file.api_tls.cert),
            args.api_tls_key.clone().or(file.api_tls.key),
        ) {
            (None, None) => None,
            (Some(cert), Some(key)) => Some(crate::http::ApiTlsFiles { cert, key }),
            _ => {
                return Err(ConfigError::Invalid {
                    key: "api_tls",
                    message: "give both the API certificate and its key, or neither".into(),
                });
            }
        };
        let limits = file.limits;
        if limits.api_connections_max == 0
            || limits.api_connections_per_client_max == 0
            || limits.requests_per_second_per_token == Some(0)
        {
            return Err(ConfigError::Invalid {
                key: "limits",
                message: "api_connections_max, api_connections_per_client_max and \
                          requests_per_second_per_token must be at least 1 (omit \
                          requests_per_second_per_token for no limit)"
                    .into(),
            });
        }
        for (name, seconds) in [
            ("header_timeout_s", limits.header_timeout_s),
            ("body_timeout_s", limits.body_timeout_s),
            ("idle_timeout_s", limits.idle_timeout_s),
        ] {
            if !(1..=TIMEOUT_S_MAX).contains(&seconds) {
                return Err(ConfigError::Invalid {
                    key: "limits",
                    message: format!("{name} must be from 1 to {TIMEOUT_S_MAX} seconds"),
                });
            }
        }
        let mut origins = file.cors.allowed_origins;
        origins.extend(args.cors_origins.iter().cloned());
        let cors = crate::http::cors::Cors::new(&origins).map_err(|e| ConfigError::Invalid {
            key: "cors.allowed_origins",
            message: e.to_string(),
        })?;
        let compaction = file.compaction;
        if !(1..=RETAIN_GENERATIONS_MAX).contains(&compaction.retain_generations) {
            return Err(ConfigError::Invalid {
                key: "compaction.retain_generations",
                message: format!("must be between 1 and {RETAIN_GENERATIONS_MAX}"),
            });
        }
        if compaction.after_changes < COMPACTION_AFTER_CHANGES_MIN
            || compaction.after_bytes < COMPACTION_AFTER_BYTES_MIN
        {
            return Err(ConfigError::Invalid {
                key: "compaction",
                message: format!(
                    "after_changes must be at least {COMPACTION_AFTER_CHANGES_MIN} and \
                     after_bytes at least {COMPACTION_AFTER_BYTES_MIN} (each compaction \
                     rewrites the document)"
                ),
            });
        }
        let feed = file.feed;
        if !(1..=FEED_RETAIN_EVENTS_MAX).contains(&feed.retain_events)
            || !(1..=FEED_RETAIN_HOURS_MAX).contains(&feed.retain_hours)
        {
            return Err(ConfigError::Invalid {
                key: "feed",
                message: format!(
                    "retain_events must be between 1 and {FEED_RETAIN_EVENTS_MAX}, retain_hours \
                     between 1 and {FEED_RETAIN_HOURS_MAX}"
                ),
            });
        }
        let idempotency = file.idempotency;
        if !(1..=IDEMPOTENCY_KEYS_MAX).contains(&idempotency.keys_max)
            || !(1..=IDEMPOTENCY_RETAIN_HOURS_MAX).contains(&idempotency.retain_hours)
        {
            return Err(ConfigError::Invalid {
                key: "idempotency",
                message: format!(
                    "keys_max must be between 1 and {IDEMPOTENCY_KEYS_MAX}, retain_hours \
                     between 1 and {IDEMPOTENCY_RETAIN_HOURS_MAX}"
                ),
            });
        }
        let backup = file.backup;
        if !(BACKUP_SHIP_INTERVAL_MS_MIN..=BACKUP_SHIP_INTERVAL_MS_MAX)
            .contains(&backup.ship_interval_ms)
            || !(BACKUP_SNAPSHOT_INTERVAL_S_MIN..=BACKUP_SNAPSHOT_INTERVAL_S_MAX)
                .contains(&backup.snapshot_interval_s)
            || !(1..=BACKUP_KEEP_SNAPSHOTS_MAX).contains(&backup.keep_snapshots)
        {
            return Err(ConfigError::Invalid {
                key: "backup",
                message: format!(
                    "ship_interval_ms must be between {BACKUP_SHIP_INTERVAL_MS_MIN} and \
                     {BACKUP_SHIP_INTERVAL_MS_MAX}, snapshot_interval_s between \
                     {BACKUP_SNAPSHOT_INTERVAL_S_MIN} and {BACKUP_SNAPSHOT_INTERVAL_S_MAX}, \
                     keep_snapshots between 1 and {BACKUP_KEEP_SNAPSHOTS_MAX}"
                ),
            });
        }
        if let Some(to) = &backup.to
            && !(to.starts_with("s3://") || to.starts_with("file:///"))
        {
            return Err(ConfigError::Invalid {
                key: "backup",
                message: format!("to = {to:?}: use s3://BUCKET/PREFIX or file:///ABSOLUTE/PATH"),
            });
        }
        // Secret files, like key files, are found from the working directory.
        let subscriptions = crate::subscriptions::resolve(&file.subscriptions, Path::new(""))
            .map_err(|message| ConfigError::Invalid {
                key: "subscriptions",
                message,
            })?;
        let mut replication = file.replication;
        if let Some(leave) = args.leave_on_shutdown {
            replication.leave_on_shutdown = leave;
        }
        if replication.anti_entropy_interval_s == 0 || replication.batch_bytes_max == 0 {
            return Err(ConfigError::Invalid {
                key: "replication",
                message: "anti_entropy_interval_s and batch_bytes_max must be at least 1".into(),
            });
        }
        Ok(Self {
            node_id,
            data_dir: args
                .data_dir
                .clone()
                .or(file.data_dir)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)),
            api_addr,
            log_format: args.log_format.or(file.log_format).unwrap_or_default(),
            storage,
            compaction,
            feed,
            idempotency,
            backup,
            subscriptions,
            encryption_key,
            gossip_addr,
            advertise_addr,
            peers,
            tls,
            replication,
            auth,
            api_tls,
            limits,
            cors,
            source,
        })
    }
}

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let read_err = |source| ConfigError::Read {
        path: path.to_owned(),
        source,
    };
    let len = fs::metadata(path).map_err(read_err)?.len();
    if len > CONFIG_FILE_BYTES_MAX {
        return Err(ConfigError::Parse {
            path: path.to_owned(),
            message: format!("file is {len} bytes, larger than {CONFIG_FILE_BYTES_MAX}"),
        });
    }
    let text = fs::read_to_string(path).map_err(read_err)?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

fn validate_storage(s: &StorageConfig) -> Result<(), ConfigError> {
    let check = |ok: bool, key: &'static str, message: &str| {
        if ok {
            Ok(())
        } else {
            Err(ConfigError::Invalid {
                key,
                message: message.to_owned(),
            })
        }
    };
    check(
        s.cache_bytes >= 1024 * 1024,
        "storage.cache_bytes",
        "must be at least 1 MiB",
    )?;
    check(
        (1..=1_000_000).contains(&s.write_queue),
        "storage.write_queue",
        "must be 1..=1000000",
    )?;
    check(
        (1..=65_536).contains(&s.batch_max),
        "storage.batch_max",
        "must be 1..=65536",
    )?;
    check(
        s.compact_after_changes >= 1,
        "storage.compact_after_changes",
        "must be at least 1",
    )?;
    check(
        s.purge_interval_s >= 1,
        "storage.purge_interval_s",
        "must be at least 1",
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, text: &str) -> PathBuf {
        let path = dir.join("verge.toml");
        fs::write(&path, text).expect("write config");
        path
    }

    #[test]
    fn defaults_without_anything() {
        let c = Config::resolve(&NodeArgs::default()).expect("defaults resolve");
        assert_eq!(c.api_addr.to_string(), DEFAULT_API_ADDR);
        assert_eq!(c.data_dir, PathBuf::from(DEFAULT_DATA_DIR));
        assert_eq!(c.storage, StorageConfig::default());
    }

    #[test]
    fn flags_override_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(
            dir.path(),
            "api_addr = \"127.0.0.1:9000\"\nnode_id = \"edge-1\"\n[storage]\nbatch_max = 7\n",
        );
        let args = NodeArgs {
            config: Some(path),
            api_addr: Some("127.0.0.1:9001".into()),
            ..NodeArgs::default()
        };
        let c = Config::resolve(&args).expect("resolves");
        assert_eq!(c.api_addr.to_string(), "127.0.0.1:9001");
        assert_eq!(c.node_id.as_deref(), Some("edge-1"));
        assert_eq!(c.storage.batch_max, 7);
    }

    #[test]
    fn example_file_matches_the_defaults() {
        let file: FileConfig =
            toml::from_str(include_str!("../../examples/verge.toml")).expect("example parses");
        assert_eq!(file.storage, StorageConfig::default());
        assert_eq!(file.api_addr.as_deref(), Some(DEFAULT_API_ADDR));
        assert_eq!(
            file.data_dir,
            Some(PathBuf::from(format!("./{DEFAULT_DATA_DIR}")))
        );
        assert_eq!(file.log_format, Some(LogFormat::Text));
        assert_eq!(file.gossip_addr.as_deref(), Some(DEFAULT_GOSSIP_ADDR));
        assert_eq!(file.replication, ReplicationFileConfig::default());
        assert_eq!(file.limits, LimitsConfig::default());
        assert_eq!(file.compaction, CompactionConfig::default());
        assert_eq!(file.feed, FeedConfig::default());
        assert_eq!(file.idempotency, IdempotencyConfig::default());
        assert!(file.subscriptions.is_empty());
    }

    #[test]
    fn auth_is_required_beyond_loopback() {
        let dir = tempfile::tempdir().expect("tempdir");
        let exposed = NodeArgs {
            api_addr: Some("0.0.0.0:7070".into()),
            ..NodeArgs::default()
        };
        let err = Config::resolve(&exposed).expect_err("no tokens beyond loopback");
        assert!(
            matches!(err, ConfigError::Invalid { key: "auth", .. }),
            "{err}"
        );
        let none = write(dir.path(), "[auth]\nmode = \"none\"\n");
        let c = Config::resolve(&NodeArgs {
            config: Some(none),
            ..exposed.clone()
        })
        .expect("explicit no-auth");
        assert_eq!(c.auth, crate::auth::Auth::Open { explicit: true });
        let hash = crate::auth::format_hash(&crate::auth::hash_token("t"));
        let tokens = write(
            dir.path(),
            &format!(
                "[[auth.tokens]]\nname = \"svc\"\nhash = \"{hash}\"\nrole = \"write\"\nprefixes = [\"cart/\"]\n"
            ),
        );
        let c = Config::resolve(&NodeArgs {
            config: Some(tokens),
            ..exposed
        })
        .expect("tokens");
        assert!(matches!(&c.auth, crate::auth::Auth::Tokens(t) if t.len() == 1));
    }

    #[test]
    fn encryption_key_from_file_or_environment_not_both() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key_file = dir.path().join("key");
        fs::write(&key_file, "11".repeat(32)).expect("write key");
        let from_toml = write(
            dir.path(),
            &format!(
                "[storage]\nencryption_key_file = {:?}\n",
                key_file.display().to_string()
            ),
        );
        let c = Config::resolve(&NodeArgs {
            config: Some(from_toml),
            ..NodeArgs::default()
        })
        .expect("key file from the config file");
        assert_eq!(
            c.encryption_key,
            Some(crate::store::EncryptionKey::from_bytes([0x11; 32]))
        );
        let from_env = NodeArgs {
            encryption_key: Some(SecretText("22".repeat(32))),
            ..NodeArgs::default()
        };
        let c = Config::resolve(&from_env).expect("key from the environment");
        assert_eq!(
            c.encryption_key,
            Some(crate::store::EncryptionKey::from_bytes([0x22; 32]))
        );
        assert!(!format!("{from_env:?}").contains("2222"));
        let both = NodeArgs {
            encryption_key_file: Some(key_file),
            ..from_env
        };
        assert!(matches!(
            Config::resolve(&both),
            Err(ConfigError::Invalid {
                key: "storage.encryption_key_file",
                ..
            })
        ));
        let bad = NodeArgs {
            encryption_key: Some(SecretText("not a key".into())),
            ..NodeArgs::default()
        };
        assert!(matches!(
            Config::resolve(&bad),
            Err(ConfigError::Invalid {
                key: "VERGE_ENCRYPTION_KEY",
                ..
            })
        ));
        assert_eq!(
            Config::resolve(&NodeArgs::default())
                .expect("none")
                .encryption_key,
            None
        );
    }

    #[test]
    fn api_tls_needs_both_files() {
        let half = NodeArgs {
            api_tls_cert: Some("api.pem".into()),
            ..NodeArgs::default()
        };
        assert!(matches!(
            Config::resolve(&half),
            Err(ConfigError::Invalid { key: "api_tls", .. })
        ));
        let both = NodeArgs {
            api_tls_key: Some("api.key".into()),
            ..half
        };
        let c = Config::resolve(&both).expect("both given");
        assert_eq!(
            c.api_tls.map(|f| (f.cert, f.key)),
            Some(("api.pem".into(), "api.key".into()))
        );
    }

    #[test]
    fn rejects_bad_files_and_values() {
        let dir = tempfile::tempdir().expect("tempdir");
        let unknown = write(dir.path(), "colour = \"blue\"\n");
        let err = Config::resolve(&NodeArgs {
            config: Some(unknown),
            ..NodeArgs::default()
        })
        .expect_err("unknown key");
        assert!(err.to_string().contains("colour"), "{err}");
        let bad_addr = NodeArgs {
            api_addr: Some("nowhere".into()),
            ..NodeArgs::default()
        };
        assert!(matches!(
            Config::resolve(&bad_addr),
            Err(ConfigError::Invalid {
                key: "api_addr",
                ..
            })
        ));
        let bad_id = NodeArgs {
            node_id: Some("a b".into()),
            ..NodeArgs::default()
        };
        assert!(matches!(
            Config::resolve(&bad_id),
            Err(ConfigError::Invalid { key: "node_id", .. })
        ));
        let partial_tls = NodeArgs {
            tls_ca: Some("ca.pem".into()),
            ..NodeArgs::default()
        };
        assert!(matches!(
            Config::resolve(&partial_tls),
            Err(ConfigError::Invalid { key: "tls", .. })
        ));
        let bad_peer = NodeArgs {
            peers: vec!["no-port".into()],
            ..NodeArgs::default()
        };
        assert!(matches!(
            Config::resolve(&bad_peer),
            Err(ConfigError::Invalid { key: "peers", .. })
        ));
        let missing = NodeArgs {
            config: Some(dir.path().join("absent.toml")),
            ..NodeArgs::default()
        };
        assert!(matches!(
            Config::resolve(&missing),
            Err(ConfigError::Read { .. })
        ));
    }
}
