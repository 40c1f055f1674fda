//! The same seed gives the same trace, in one process and across processes.

use std::process::Command;
use std::time::Duration;

use verge_sim::run::{RunConfig, run};
use verge_sim::scenario;
use verge_sim::workload::WorkloadConfig;

fn config(seed: u64, name: &str) -> RunConfig {
    RunConfig {
        seed,
        nodes: 3,
        scenario: scenario::find(name).expect("scenario exists"),
        duration: Duration::from_secs(5),
        workload: WorkloadConfig::default(),
    }
}

#[test]
fn same_seed_same_trace_in_one_process() {
    let first = run(&config(11, "chaos")).expect("runs");
    let second = run(&config(11, "chaos")).expect("runs");
    assert!(first.trace.len() > 100, "the trace records the run");
    assert_eq!(first.trace_hash, second.trace_hash);
    let other = run(&config(12, "chaos")).expect("runs");
    assert_ne!(
        first.trace_hash, other.trace_hash,
        "another seed, another run"
    );
}

#[test]
fn same_seed_same_trace_when_nodes_race_to_create() {
    let config = RunConfig {
        duration: Duration::from_secs(3),
        ..config(13, "create-race-partition")
    };
    let first = run(&config).expect("runs");
    let second = run(&config).expect("runs");
    assert!(first.ok(), "{:?}", first.violations);
    assert_eq!(first.trace_hash, second.trace_hash);
}

/// Revival: clock offsets, per-node purge schedules, documents revived at several nodes at
/// once, and (with faults) the wait for every node to hold the same histories all replay.
#[test]
fn same_seed_same_trace_when_documents_expire_and_revive() {
    for name in ["ttl-revive", "ttl-revive-partition"] {
        let config = RunConfig {
            duration: Duration::from_secs(2),
            workload: WorkloadConfig {
                revival_cycles: 3,
                ..WorkloadConfig::default()
            },
            ..config(17, name)
        };
        let first = run(&config).expect("runs");
        let second = run(&config).expect("runs");
        assert!(first.ok(), "{name}: {:?}", first.violations);
        assert_eq!(first.trace_hash, second.trace_hash, "{name}");
        assert!(
            first.notes.iter().any(|n| n.starts_with("clock offsets")),
            "{name}: {:?}",
            first.notes
        );
    }
}

fn trace_line(seed: u64) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_verge-sim"))
        .args([
            "run",
            "--seed",
            &seed.to_string(),
            "--scenario",
            "crash-restart",
            "--duration",
            "5",
        ])
        .output()
        .expect("runs verge-sim");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "verge-sim run failed:\n{stdout}");
    assert_eq!(stdout.lines().last(), Some("verdict: ok"), "{stdout}");
    stdout
        .lines()
        .find(|l| l.starts_with("trace: "))
        .unwrap_or_else(|| panic!("no trace line in:\n{stdout}"))
        .to_owned()
}

#[test]
fn same_seed_same_trace_across_processes() {
    assert_eq!(trace_line(21), trace_line(21));
}
