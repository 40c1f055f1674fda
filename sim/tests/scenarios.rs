//! Every scenario over a fixed set of seeds: the invariants hold. A failure prints the command
//! that replays it.

use std::time::Duration;

use verge_sim::run::{RunConfig, run};
use verge_sim::scenario::SCENARIOS;
use verge_sim::workload::WorkloadConfig;

/// Seeds per scenario in CI; `scripts/sim-sweep.sh` runs thousands.
const SEEDS: &[u64] = &[1, 2];

#[test]
fn every_scenario_keeps_the_invariants() {
    verge_sim::panics::install();
    let mut failures = Vec::new();
    for scenario in SCENARIOS {
        for &seed in SEEDS {
            let config = RunConfig {
                seed,
                nodes: 3.max(scenario.nodes_min),
                scenario,
                duration: Duration::from_secs(8),
                workload: WorkloadConfig::default(),
            };
            let report =
                run(&config).unwrap_or_else(|e| panic!("{} seed {seed}: {e}", scenario.name));
            let (acked, _, _) = report.writes;
            assert!(
                acked > 0,
                "{} seed {seed}: the workload made no acknowledged write",
                scenario.name
            );
            if !report.ok() {
                failures.push(format!(
                    "verge-sim run --seed {seed} --nodes {} --scenario {}: {:?} {:?}\n{}",
                    config.nodes,
                    scenario.name,
                    report
                        .violations
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>(),
                    report.panics,
                    report.evidence.join("\n")
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
