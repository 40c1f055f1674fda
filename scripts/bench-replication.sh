#!/usr/bin/env bash
# Replication latency (write acknowledged at the first node -> visible at the last) and gossip
# messages per write, for a local cluster of NODES nodes on loopback under RATE writes/s.
# Not part of CI.
#
#   scripts/bench-replication.sh [NODES] [RATE] [SECONDS]     (defaults: 3 1000 10)
set -euo pipefail
cd "$(dirname "$0")/.."
nodes=${1:-3}
rate=${2:-1000}
seconds=${3:-10}

cargo build --release -p verge-node --quiet
verge=$PWD/target/release/verge
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"' EXIT
cd "$work"
"$verge" certs ca --dir certs >/dev/null
metrics=()
for i in $(seq 1 "$nodes"); do
    "$verge" certs node --name "n$i" --dir certs >/dev/null
    api=$((28000 + 10 * i)); gossip=$((api + 1))
    "$verge" node --data-dir "n$i" --node-id "n$i" --api-addr "127.0.0.1:$api" \
        --gossip-addr "127.0.0.1:$gossip" --peer 127.0.0.1:28011 --tls-ca certs/ca.pem \
        --tls-cert "certs/n$i.pem" --tls-key "certs/n$i.key" >"n$i.log" 2>&1 &
    metrics+=(--metrics-url "http://127.0.0.1:$api")
done
last=$((28000 + 10 * nodes))
# Wait until the first node sees every other member up.
for _ in $(seq 1 300); do
    up=$(curl -s 127.0.0.1:28010/v1/status | grep -o '"state":"up"' | wc -l || true)
    [ "$up" -ge $((nodes - 1)) ] && break; sleep 0.1
done
echo "cluster of $nodes nodes up ($up peers seen by n1)"
"$verge" bench-replication --write-url http://127.0.0.1:28010 --watch-url "http://127.0.0.1:$last" \
    "${metrics[@]}" --rate "$rate" --duration "$seconds" | tail -4
