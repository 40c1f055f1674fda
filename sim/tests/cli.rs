//! The `verge-sim` command line, as a user runs it.

use std::process::{Command, Output};

fn sim(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_verge-sim"))
        .args(args)
        .output()
        .expect("runs verge-sim")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn list_prints_one_scenario_a_line() {
    let out = sim(&["list"]);
    assert!(out.status.success());
    let names: Vec<String> = stdout(&out).lines().map(str::to_owned).collect();
    let expected: Vec<&str> = verge_sim::scenario::SCENARIOS
        .iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(names, expected);
}

#[test]
fn run_reports_faults_invariants_trace_and_verdict() {
    let out = sim(&[
        "run",
        "--seed",
        "3",
        "--nodes",
        "3",
        "--scenario",
        "partition-isolate",
        "--duration",
        "4",
    ]);
    let text = stdout(&out);
    assert!(out.status.success(), "{text}");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.first(), Some(&"seed: 3"), "{text}");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("fault:") && l.contains("Partition")),
        "{text}"
    );
    for invariant in ["convergence", "acknowledged-writes", "no-panic"] {
        assert!(
            lines.contains(&format!("invariant {invariant}: ok").as_str()),
            "{text}"
        );
    }
    let trace = lines[lines.len() - 2];
    assert!(
        trace.starts_with("trace: ") && trace.len() == "trace: ".len() + 64,
        "{text}"
    );
    assert_eq!(lines.last(), Some(&"verdict: ok"));
}

#[test]
fn bad_arguments_exit_2_with_a_reason() {
    let out = sim(&["run", "--seed", "1", "--scenario", "no-such"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no scenario \"no-such\""));
    let out = sim(&[
        "run",
        "--seed",
        "1",
        "--nodes",
        "1",
        "--scenario",
        "partition-majority",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs at least 3 nodes"));
    let out = sim(&["sweep", "--seeds", "5..5"]);
    assert_eq!(out.status.code(), Some(2));
    let out = sim(&["run", "--seed", "1", "--nodes", "0"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn sweep_counts_runs_and_failures() {
    let out = sim(&[
        "sweep",
        "--seeds",
        "0..2",
        "--scenario",
        "baseline",
        "--duration",
        "2",
    ]);
    let text = stdout(&out);
    assert!(out.status.success(), "{text}");
    assert!(
        text.lines()
            .last()
            .is_some_and(|l| l.starts_with("runs=2 failed=0 ")),
        "{text}"
    );
}

#[test]
fn bench_broadcast_ends_with_its_figures() {
    let out = sim(&[
        "bench",
        "broadcast",
        "--nodes",
        "4",
        "--latency-ms",
        "20",
        "--rate",
        "20",
        "--seconds",
        "2",
    ]);
    let text = stdout(&out);
    assert!(out.status.success(), "{text}");
    let last = text.lines().last().unwrap_or_default();
    let fields: Vec<(&str, f64)> = last
        .split(' ')
        .filter_map(|kv| kv.split_once('='))
        .filter_map(|(k, v)| Some((k, v.parse().ok()?)))
        .collect();
    let keys: Vec<&str> = fields.iter().map(|(k, _)| *k).collect();
    assert_eq!(
        keys,
        ["messages_per_write", "median_ms", "max_ms"],
        "{text}"
    );
    // Four nodes: each write goes straight to the three peers, one 20 ms hop away.
    assert!(fields[0].1 >= 3.0, "{text}");
    assert!((20.0..100.0).contains(&fields[1].1), "{text}");
}
