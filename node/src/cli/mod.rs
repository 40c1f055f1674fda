//! Client side of the `verge` binary: the commands that talk to a node over its HTTP API
//! (`get`, `put`, `patch`, `del`, `ls`, `inc`, `watch`, `status`) and the `bench` load tool.
//!
//! They live in the node crate so the single `verge` binary carries them, but they use nothing
//! of the server: only the HTTP contract of docs/api.md (and the id alphabet and limits of
//! `verge-core`). `main.rs` wires them in as
//!
//! ```text
//! enum Command { Node(NodeArgs), #[command(flatten)] Client(cli::ClientCommand), Bench(cli::BenchArgs) }
//! ```
//!
//! with `#[command(flatten)] client: cli::ClientOpts` on the top-level parser (its flags are
//! global, so `verge get ID --url ...` and `verge --url ... get ID` both work), then calls
//! [`run`] or [`bench()`].

mod bench;
mod bench_replication;
mod client;
mod http;
mod sse;

pub use bench::{BenchArgs, BenchMode, bench};
pub use bench_replication::{ReplicationBenchArgs, bench_replication};
pub use client::{BackupCommand, ClientCommand, MembersCommand, run};

/// Where the client commands and the bench find the node, shared by all of them so scripts can
/// set `VERGE_URL` / `VERGE_TOKEN` once.
// `about = None`: clap applies the doc comment of a flattened item to the command it is
// flattened into, and this one must not become the help text of `verge`.
#[derive(Debug, Clone, clap::Args)]
#[command(about = None, long_about = None)]
pub struct ClientOpts {
    /// Base URL of the node's HTTP API.
    #[arg(
        long,
        global = true,
        env = "VERGE_URL",
        default_value = "http://127.0.0.1:7070",
        value_name = "URL"
    )]
    pub url: String,
    /// Bearer token for the API, sent as `Authorization: Bearer TOKEN`.
    #[arg(
        long,
        global = true,
        env = "VERGE_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub token: Option<String>,
}
