//! `verge-sim`: runs Verge nodes in a deterministic simulation.
//!
//! `list` prints the scenarios; `run` runs one seed of one scenario and prints its verdict;
//! `sweep` runs a range of seeds; `bench broadcast` measures broadcast cost and latency.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use verge_sim::bench::{self, BroadcastConfig};
use verge_sim::run::{Report, RunConfig, run};
use verge_sim::scenario::{self, SCENARIOS};
use verge_sim::workload::WorkloadConfig;

#[derive(Parser)]
#[command(
    name = "verge-sim",
    version,
    about = "Run Verge nodes under simulated faults, replayable from a seed"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the scenarios, one name a line.
    List {
        /// Also print what each one does.
        #[arg(long)]
        verbose: bool,
    },
    /// Run one seed of one scenario and check the invariants.
    Run {
        /// The seed.
        #[arg(long)]
        seed: u64,
        /// Nodes.
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// The scenario (see `list`).
        #[arg(long, default_value = "baseline")]
        scenario: String,
        /// How long the workload runs, in simulated seconds (revival scenarios: one document
        /// per 2 s of it).
        #[arg(long, default_value_t = 10)]
        duration: u64,
        /// Revival scenarios: cycles per document (2 or more).
        #[arg(long, default_value_t = 4)]
        cycles: usize,
        /// Print the whole trace.
        #[arg(long)]
        trace: bool,
    },
    /// Run many seeds; print the count run and every failing seed.
    Sweep {
        /// Seeds, as A..B (B excluded).
        #[arg(long)]
        seeds: String,
        /// Only this scenario (default: all, in turn).
        #[arg(long)]
        scenario: Option<String>,
        /// Nodes.
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// How long each workload runs, in simulated seconds (revival scenarios: one
        /// document per 2 s of it).
        #[arg(long, default_value_t = 10)]
        duration: u64,
        /// Revival scenarios: cycles per document (2 or more).
        #[arg(long, default_value_t = 4)]
        cycles: usize,
    },
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        bench: Bench,
    },
}

#[derive(Subcommand)]
enum Bench {
    /// Messages per write and latency from ack to visible on all nodes.
    Broadcast {
        /// Nodes.
        #[arg(long, default_value_t = 25)]
        nodes: usize,
        /// One-way link latency in ms.
        #[arg(long, default_value_t = 100)]
        latency_ms: u64,
        /// Writes per second over the cluster.
        #[arg(long, default_value_t = 100)]
        rate: u32,
        /// Seconds of writes.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// The seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
}

fn main() -> ExitCode {
    verge_sim::init_logging();
    verge_sim::panics::install();
    let cli = Cli::parse();
    match cli.command {
        Command::List { verbose } => {
            for s in SCENARIOS {
                if verbose {
                    println!("{:<22} {}", s.name, s.about);
                } else {
                    println!("{}", s.name);
                }
            }
            ExitCode::SUCCESS
        }
        Command::Run {
            seed,
            nodes,
            scenario,
            duration,
            cycles,
            trace,
        } => {
            let Some(scenario) = scenario::find(&scenario) else {
                eprintln!("error: no scenario {scenario:?} (see `verge-sim list`)");
                return ExitCode::from(2);
            };
            let config = match run_config(seed, nodes, scenario, duration, cycles) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            let started = Instant::now();
            match run(&config) {
                Ok(report) => {
                    print_report(&report, started.elapsed());
                    if trace {
                        println!("--- trace");
                        for event in report.trace.matching(&[]) {
                            println!("{event}");
                        }
                        println!("---");
                    }
                    if report.ok() {
                        println!("verdict: ok");
                        ExitCode::SUCCESS
                    } else {
                        println!("verdict: violation: {}", summary(&report));
                        ExitCode::FAILURE
                    }
                }
                Err(e) => {
                    println!("seed: {seed}");
                    println!("verdict: violation: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Sweep {
            seeds,
            scenario,
            nodes,
            duration,
            cycles,
        } => sweep(&seeds, scenario.as_deref(), nodes, duration, cycles),
        Command::Bench {
            bench:
                Bench::Broadcast {
                    nodes,
                    latency_ms,
                    rate,
                    seconds,
                    seed,
                },
        } => {
            let config = BroadcastConfig {
                nodes,
                latency: Duration::from_millis(latency_ms),
                rate,
                duration: Duration::from_secs(seconds),
                seed,
            };
            let started = Instant::now();
            match bench::broadcast(&config) {
                Ok(r) => {
                    println!(
                        "nodes={nodes} latency_ms={latency_ms} rate={rate} seconds={seconds} seed={seed}"
                    );
                    println!(
                        "writes={} visible_everywhere={} messages={} p90_ms={} wall_s={:.1}",
                        r.writes,
                        r.complete,
                        r.messages,
                        r.quantile_ms(0.9),
                        started.elapsed().as_secs_f64()
                    );
                    for (kind, n) in &r.by_kind {
                        println!("messages{kind} per_write={:.2}", n / r.writes.max(1) as f64);
                    }
                    println!(
                        "latency_ms p10={} p50={} p90={} p99={}",
                        r.quantile_ms(0.1),
                        r.quantile_ms(0.5),
                        r.quantile_ms(0.9),
                        r.quantile_ms(0.99)
                    );
                    println!(
                        "messages_per_write={:.2} median_ms={} max_ms={}",
                        r.messages_per_write(),
                        r.quantile_ms(0.5),
                        r.latencies_ms.last().copied().unwrap_or(0)
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn run_config(
    seed: u64,
    nodes: usize,
    scenario: &'static scenario::Scenario,
    duration: u64,
    cycles: usize,
) -> Result<RunConfig, String> {
    if !(1..=verge_sim::cluster::NODES_MAX).contains(&nodes) {
        return Err(format!(
            "--nodes must be 1 to {}",
            verge_sim::cluster::NODES_MAX
        ));
    }
    if nodes < scenario.nodes_min {
        return Err(format!(
            "scenario {} needs at least {} nodes",
            scenario.name, scenario.nodes_min
        ));
    }
    if !(1..=3600).contains(&duration) {
        return Err("--duration must be 1 to 3600 seconds".into());
    }
    if !(2..=100).contains(&cycles) {
        return Err("--cycles must be 2 to 100".into());
    }
    Ok(RunConfig {
        seed,
        nodes,
        scenario,
        duration: Duration::from_secs(duration),
        workload: WorkloadConfig {
            revival_cycles: cycles,
            ..WorkloadConfig::default()
        },
    })
}

fn summary(report: &Report) -> String {
    let mut parts: Vec<String> = report.violations.iter().map(ToString::to_string).collect();
    parts.extend(report.panics.iter().map(|p| format!("panic: {p}")));
    let first = parts.first().cloned().unwrap_or_default();
    if parts.len() > 1 {
        format!("{first} (and {} more)", parts.len() - 1)
    } else {
        first
    }
}

fn print_report(report: &Report, wall: Duration) {
    println!("seed: {}", report.seed);
    println!("scenario: {}", report.scenario);
    println!("nodes: {}", report.nodes);
    for line in &report.notes {
        println!("note: {line}");
    }
    for fault in &report.faults {
        println!("fault: {fault}");
    }
    let (acked, refused, unknown) = report.writes;
    println!(
        "writes: {acked} acknowledged, {refused} refused, {unknown} unknown; {} reads",
        report.reads
    );
    println!(
        "simulated: {:.1}s (wall {:.1}s); converged: {} after {:.1}s",
        report.simulated.as_secs_f64(),
        wall.as_secs_f64(),
        report.converged,
        report.converge_took.as_secs_f64()
    );
    println!(
        "invariant convergence: {}",
        if report.converged { "ok" } else { "violated" }
    );
    println!(
        "invariant acknowledged-writes: {}",
        if report.violations.is_empty() {
            "ok"
        } else {
            "violated"
        }
    );
    println!(
        "invariant no-panic: {}",
        if report.panics.is_empty() {
            "ok"
        } else {
            "violated"
        }
    );
    for v in &report.violations {
        println!("violation: {v}");
    }
    for p in &report.panics {
        println!("panic: {p}");
    }
    if !report.evidence.is_empty() {
        println!(
            "--- events to replay (verge-sim run --seed {} --nodes {} --scenario {} --trace)",
            report.seed, report.nodes, report.scenario
        );
        for e in &report.evidence {
            println!("{e}");
        }
        println!("---");
    }
    println!("trace: {}", report.trace_hash);
}

fn sweep(
    seeds: &str,
    scenario: Option<&str>,
    nodes: usize,
    duration: u64,
    cycles: usize,
) -> ExitCode {
    let Some((a, b)) = seeds
        .split_once("..")
        .and_then(|(a, b)| Some((a.parse::<u64>().ok()?, b.parse::<u64>().ok()?)))
        .filter(|(a, b)| a < b)
    else {
        eprintln!("error: --seeds must be A..B with A < B");
        return ExitCode::from(2);
    };
    let scenarios: Vec<&'static scenario::Scenario> = match scenario {
        Some(name) => match scenario::find(name) {
            Some(s) => vec![s],
            None => {
                eprintln!("error: no scenario {name:?}");
                return ExitCode::from(2);
            }
        },
        None => SCENARIOS.iter().filter(|s| s.nodes_min <= nodes).collect(),
    };
    if scenarios.is_empty() || nodes > verge_sim::cluster::NODES_MAX {
        eprintln!(
            "error: --nodes must be 1 to {}",
            verge_sim::cluster::NODES_MAX
        );
        return ExitCode::from(2);
    }
    let started = Instant::now();
    let (mut runs, mut failed, mut simulated) = (0u64, Vec::new(), Duration::ZERO);
    for seed in a..b {
        let scenario = scenarios[(seed % scenarios.len() as u64) as usize];
        let config = match run_config(seed, nodes, scenario, duration, cycles) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
        };
        runs += 1;
        match run(&config) {
            Ok(report) => {
                simulated += report.simulated;
                if !report.ok() {
                    println!(
                        "FAIL seed={seed} scenario={}: {}",
                        scenario.name,
                        summary(&report)
                    );
                    failed.push(seed);
                }
            }
            Err(e) => {
                println!("FAIL seed={seed} scenario={}: {e}", scenario.name);
                failed.push(seed);
            }
        }
        if runs % 10 == 0 {
            eprintln!(
                "{runs} runs, {} failed, {:.1} simulated hours, {:.0}s",
                failed.len(),
                simulated.as_secs_f64() / 3600.0,
                started.elapsed().as_secs_f64()
            );
        }
    }
    println!(
        "runs={runs} failed={} simulated_hours={:.2} wall_s={:.0}",
        failed.len(),
        simulated.as_secs_f64() / 3600.0,
        started.elapsed().as_secs_f64()
    );
    if !failed.is_empty() {
        println!("failing seeds: {failed:?}");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
