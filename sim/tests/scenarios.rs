//! Every scenario over a fixed set of seeds, on 3 nodes and on 5: the invariants hold. A
//! failure prints the command that replays it and the events that matter. Thousands more
//! seeds: `scripts/sim-sweep.sh`.

use std::time::Duration;

use verge_sim::run::{RunConfig, run};
use verge_sim::scenario;
use verge_sim::workload::{Creation, WorkloadConfig};

/// Seeds each scenario runs with on 3 nodes in CI.
const SEEDS: &[u64] = &[1, 2, 3];
/// The seed each scenario runs with on 5 nodes in CI.
const SEED_5_NODES: u64 = 4;
/// Simulated seconds of workload per run.
const DURATION_S: u64 = 8;
/// Revival scenarios: simulated seconds that set the number of documents (one per 2 s), each
/// living through [`REVIVAL_CYCLES`] cycles of about 9 s (kept short: idle simulated time
/// costs CPU too).
const REVIVAL_DURATION_S: u64 = 4;
/// Revival scenarios: cycles per document (a delete or an expiry, an expiry, the last).
const REVIVAL_CYCLES: usize = 3;

fn check(name: &str) {
    verge_sim::panics::install();
    let scenario = scenario::find(name).expect("scenario exists");
    let runs = SEEDS.iter().map(|s| (*s, 3)).chain([(SEED_5_NODES, 5)]);
    let mut failures = Vec::new();
    let revival = scenario.creation == Creation::Revival;
    let (duration, workload) = if revival {
        let workload = WorkloadConfig {
            revival_cycles: REVIVAL_CYCLES,
            ..WorkloadConfig::default()
        };
        (REVIVAL_DURATION_S, workload)
    } else {
        (DURATION_S, WorkloadConfig::default())
    };
    for (seed, nodes) in runs {
        let config = RunConfig {
            seed,
            nodes: nodes.max(scenario.nodes_min),
            scenario,
            duration: Duration::from_secs(duration),
            workload: workload.clone(),
        };
        let replay = format!(
            "verge-sim run --seed {seed} --nodes {} --scenario {name} --duration {duration}{} --trace",
            config.nodes,
            if revival {
                format!(" --cycles {REVIVAL_CYCLES}")
            } else {
                String::new()
            }
        );
        let report = match run(&config) {
            Ok(r) => r,
            Err(e) => {
                failures.push(format!("{replay}\n  {e}"));
                continue;
            }
        };
        let (acked, _, _) = report.writes;
        assert!(
            acked > 50,
            "{replay}: only {acked} writes were acknowledged"
        );
        if !report.ok() {
            failures.push(failure(&replay, &report));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// What a failed run prints: the command that replays it, what broke and the events that matter.
fn failure(replay: &str, report: &verge_sim::run::Report) -> String {
    format!(
        "{replay}\n  violations: {:?}\n  panics: {:?}\n{}",
        report
            .violations
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        report.panics,
        report.evidence.join("\n")
    )
}

macro_rules! scenarios {
    ($($test:ident => $name:literal),* $(,)?) => {
        $(
            #[test]
            fn $test() {
                check($name);
            }
        )*

        #[test]
        fn every_scenario_is_tested() {
            let tested = [$($name),*];
            for s in scenario::SCENARIOS {
                assert!(tested.contains(&s.name), "scenario {} has no test", s.name);
            }
        }
    };
}

scenarios! {
    baseline => "baseline",
    partition_isolate => "partition-isolate",
    partition_majority => "partition-majority",
    partition_oneway => "partition-oneway",
    partition_flapping => "partition-flapping",
    loss_reorder => "loss-reorder",
    crash_restart => "crash-restart",
    disk_errors => "disk-errors",
    slow_node => "slow-node",
    relay_crash => "relay-crash",
    chaos => "chaos",
    create_race => "create-race",
    create_race_partition => "create-race-partition",
    ttl_revive => "ttl-revive",
    ttl_revive_partition => "ttl-revive-partition",
    leave => "leave",
    forget => "forget",
}

/// The run that found a write acknowledged during a leave and lost with the node (its
/// broadcast still in the batch window): a leaving node now hands its writes off first.
#[test]
fn leave_hands_off_the_writes_it_acknowledged() {
    verge_sim::panics::install();
    let config = RunConfig {
        seed: 20,
        nodes: 3,
        scenario: scenario::find("leave").expect("scenario exists"),
        duration: Duration::from_secs(10),
        workload: WorkloadConfig::default(),
    };
    let report = run(&config).expect("the run completes");
    assert!(
        report.ok(),
        "{}",
        failure(
            "verge-sim run --seed 20 --nodes 3 --scenario leave --trace",
            &report
        )
    );
}
