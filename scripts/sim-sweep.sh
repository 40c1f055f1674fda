#!/usr/bin/env bash
# Sweeps many simulator seeds over every scenario, on 3 and on 5 nodes, and prints how many
# runs were made, how many simulated hours they covered and every failing seed. Not part of CI
# (CI runs a fixed set of seeds through `cargo test -p verge-sim`).
#
#   scripts/sim-sweep.sh [SEEDS] [FIRST_SEED]      (defaults: 1000 0)
#
# Replay a failing seed with:
#   target/release/verge-sim run --seed S --nodes N --scenario NAME --trace
set -euo pipefail
cd "$(dirname "$0")/.."
seeds=${1:-1000}
first=${2:-0}
last=$((first + seeds))

cargo build --release -p verge-sim --quiet
sim=${CARGO_TARGET_DIR:-target}/release/verge-sim
status=0
for nodes in 3 5; do
  echo "== $nodes nodes, seeds $first..$last"
  "$sim" sweep --seeds "$first..$last" --nodes "$nodes" || status=1
done
exit $status
