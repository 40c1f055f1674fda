#!/usr/bin/env bash
# What a document costs as its history grows (docs/compaction.md), with generations and
# without. First the document code natively (core/examples/history.rs: a counter and a map
# written WRITES times, a list of WRITES/10 items); then one node over HTTP, 16 clients
# incrementing one counter, measured in WINDOWS consecutive windows of SECONDS as the history
# grows. Not part of CI.
#
#   scripts/bench-compaction.sh [WRITES] [WINDOWS] [SECONDS]     (defaults: 1000000 6 10)
set -euo pipefail
cd "$(dirname "$0")/.."
writes=${1:-1000000}
windows=${2:-6}
seconds=${3:-10}

cargo build --release -p verge-node -p verge-core --example history --quiet
target/release/examples/history "$writes"

verge=$PWD/target/release/verge
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"' EXIT
for mode in generations none; do
    dir="$work/$mode"
    mkdir -p "$dir"
    if [[ $mode == generations ]]; then
        after=1000 # the default
    else
        after=1000000000000 # never
    fi
    printf '[compaction]\nafter_changes = %s\nafter_bytes = 1000000000000\n' "$after" >"$dir/verge.toml"
    "$verge" node --config "$dir/verge.toml" --data-dir "$dir/data" --api-addr 127.0.0.1:0 \
        --gossip-addr 127.0.0.1:0 >"$dir/node.log" 2>&1 &
    node=$!
    for _ in $(seq 1 100); do
        [[ -s "$dir/data/api.addr" ]] && break
        sleep 0.1
    done
    url="http://$(head -n1 "$dir/data/api.addr")"
    echo
    echo "one node, 16 clients incrementing one counter over HTTP, generations: $mode"
    for w in $(seq 1 "$windows"); do
        report=$("$verge" --url "$url" bench --mode counter --clients 16 --warmup 0 \
            --duration "$seconds" 2>/dev/null | tail -n1)
        doc=$(curl -s "$url/v1/docs/bench/counter")
        n=$(sed -E 's/.*"n":([0-9]+).*/\1/' <<<"$doc")
        history=$(sed -E 's/.*"history_changes":([0-9]+).*/\1/' <<<"$doc")
        echo "  window $w: counter at $n, $history changes of history; $report"
    done
    kill "$node"
    wait "$node" 2>/dev/null || true
done
