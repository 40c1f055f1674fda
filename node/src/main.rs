//! The `verge` binary: a node daemon and its command-line client.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;
use verge_node::cli::{BenchArgs, ClientCommand, ClientOpts};
use verge_node::config::{Config, LogFormat, NodeArgs};

/// Request handling allocates many small short-lived buffers (JSON, Automerge ops, HTTP
/// headers); mimalloc serves them markedly faster than the system allocator.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Verge: replicated edge state on Automerge documents.
#[derive(Debug, Parser)]
#[command(name = "verge", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    client: ClientOpts,
}

// Parsed once at start; the size of the node's flags does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Command {
    /// Run a node.
    Node(NodeArgs),
    #[command(flatten)]
    Client(ClientCommand),
    /// Drive a node's HTTP API with concurrent clients and report throughput and latency.
    Bench(BenchArgs),
    /// Measure replication latency from a write at one node to its arrival at another.
    BenchReplication(verge_node::cli::ReplicationBenchArgs),
    /// Create the certificates nodes use for mutual TLS.
    #[command(subcommand)]
    Certs(CertsCommand),
    /// Create an API token: prints it once, with the config lines that accept it.
    Token(verge_node::auth::TokenArgs),
    /// Re-encrypt a stopped node's store under a new key, in one transaction (or encrypt a
    /// plaintext store, or decrypt one).
    Rekey(verge_node::store::RekeyArgs),
    /// Check that every document of a stopped node's store loads; with --repair, rebuild the
    /// store without those that do not, for the node to fetch them again from its peers.
    Check(verge_node::store::CheckArgs),
    /// Build a data directory from a backup location (the latest state, or `--at` a time).
    ///
    /// Starting a node on it (with the same --encryption-key-file for an encrypted store) serves
    /// the restored documents; joined to a cluster, it converges with its peers.
    Restore(verge_node::backup::restore::RestoreArgs),
}

#[derive(Debug, Subcommand)]
enum CertsCommand {
    /// Create a cluster CA: writes DIR/ca.pem and DIR/ca.key (keep ca.key secret).
    Ca {
        /// Directory to write to.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
    /// Create a node (cluster member) certificate signed by the CA in DIR: writes DIR/NAME.pem
    /// and DIR/NAME.key. Only for nodes: it lets its holder join the cluster.
    Node {
        /// The node's name (also written into the certificate).
        #[arg(long)]
        name: String,
        /// Directory holding ca.pem and ca.key, and receiving the node's files.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
    /// Create an HTTPS certificate for the API, signed by the API CA in DIR (api-ca.pem and
    /// api-ca.key, created on first use; clients trust api-ca.pem): writes DIR/NAME.pem and
    /// DIR/NAME.key. It cannot join the cluster.
    Api {
        /// The certificate's name (its files are named after it).
        #[arg(long)]
        name: String,
        /// A DNS name or IP address clients reach the API at; repeat for several.
        #[arg(long = "host", required = true)]
        hosts: Vec<String>,
        /// Directory holding (or receiving) the API CA, and receiving the certificate's files.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
}

fn run_certs(cmd: CertsCommand) -> ExitCode {
    let result = match cmd {
        CertsCommand::Ca { dir } => verge_node::tls::create_ca(&dir),
        CertsCommand::Node { name, dir } => verge_node::tls::create_node_cert(&dir, &name),
        CertsCommand::Api { name, hosts, dir } => {
            verge_node::tls::create_api_cert(&dir, &name, &hosts)
        }
    };
    match result {
        Ok((cert, key)) => {
            println!("wrote {}", cert.display());
            println!("wrote {}", key.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Certs(cmd) = cli.command {
        return run_certs(cmd);
    }
    if let Command::Token(args) = &cli.command {
        return match verge_node::auth::create_token(args) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
        };
    }
    if let Command::Check(args) = &cli.command {
        return match verge_node::store::check_command(args) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(text) => {
                eprint!("{text}");
                if !text.ends_with('\n') {
                    eprintln!();
                }
                ExitCode::FAILURE
            }
        };
    }
    if let Command::Rekey(args) = &cli.command {
        return match verge_node::store::rekey_command(args) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        Command::Node(args) => runtime.block_on(run_node(args)),
        Command::Client(cmd) => runtime.block_on(verge_node::cli::run(cmd, &cli.client)),
        Command::BenchReplication(args) => {
            match runtime.block_on(verge_node::cli::bench_replication(args)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        // Handled above, before the runtime starts.
        Command::Certs(_) | Command::Token(_) | Command::Rekey(_) | Command::Check(_) => {
            ExitCode::SUCCESS
        }
        Command::Restore(args) => {
            init_logging(LogFormat::Text);
            match runtime.block_on(verge_node::backup::restore::restore(&args)) {
                Ok(done) => {
                    println!(
                        "restored {} documents into {} as of {} (snapshot {} and {} segments, {} bytes read in {} ms)",
                        done.documents,
                        args.data_dir.display(),
                        verge_node::backup::restore::rfc3339(done.as_of_ms),
                        done.snapshot.path(),
                        done.segments,
                        done.bytes,
                        done.elapsed_ms,
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    eprintln!("nothing was written to {}", args.data_dir.display());
                    ExitCode::FAILURE
                }
            }
        }
        Command::Bench(args) => match runtime.block_on(verge_node::cli::bench(args, &cli.client)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

async fn run_node(args: NodeArgs) -> ExitCode {
    let config = match Config::resolve(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    init_logging(config.log_format);
    match verge_node::node::run(config, shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "node failed");
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only on a terminal: log files and pipelines get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
