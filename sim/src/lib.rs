//! Adapters that let the real Verge node run inside a [turmoil] simulation.
//!
//! turmoil runs every host of a cluster on one thread, on simulated time, with a simulated
//! network and a per-host simulated file system, all driven by one seed: a failing run can be
//! replayed exactly, and hours of partitions, crashes and disk faults take seconds. The node
//! talks to the outside world through three things, and this crate supplies a simulated
//! version of each (DESIGN.md §7):
//!
//! - [`net::udp::SimUdpSocket`]: quinn's `AsyncUdpSocket` over turmoil's UDP, so replication
//!   (QUIC) runs on the simulated network through `Endpoint::new_with_abstract_socket`.
//! - [`net::tcp::SimListener`] and [`net::tcp::SimHttp`]: axum serving over turmoil's TCP, and
//!   an HTTP/1 client for simulated users of the API.
//! - [`disk::SimBackend`] and [`disk::Disk`]: redb storage on turmoil's file system, with
//!   power cuts and injected I/O errors.
//!
//! Everything here must be called from inside a turmoil host (or client): turmoil's sockets
//! and files reach the simulated world through a thread-local that only its scheduler sets.
//! Nothing here reads the wall clock or the thread RNG, so a run depends only on its seeds.

pub mod api;
pub mod bench;
pub mod certs;
pub mod check;
pub mod clock;
pub mod cluster;
pub mod crypto;
pub mod departure;
pub mod disk;
pub mod feed;
pub mod net;
pub mod panics;
pub mod replica_client;
pub mod revival;
pub mod run;
pub mod scenario;
pub mod trace;
pub mod workload;

pub use cluster::{Cluster, ClusterBuilder, SimError, now};

/// Locks a mutex shared by simulated hosts, whose holders never panic while holding it (a
/// panic fails the run anyway).
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Logs to stderr when `RUST_LOG` asks for it (`RUST_LOG=verge_node=debug`); silent otherwise,
/// since a sweep runs thousands of nodes.
pub fn init_logging() {
    if std::env::var_os("RUST_LOG").is_none() {
        return;
    }
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .without_time()
        .try_init();
}
