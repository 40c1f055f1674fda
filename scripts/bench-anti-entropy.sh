#!/usr/bin/env bash
# Anti-entropy between two nodes holding DOCS documents of which 10 differ: bytes exchanged and
# time to find the differences, end to end over QUIC on loopback. Not part of CI (it writes
# 100,000 documents and takes a minute or two).
#
#   scripts/bench-anti-entropy.sh [DOCS]        (default 100000)
set -euo pipefail
cd "$(dirname "$0")/.."
docs=${1:-100000}
clients=64
per_client=$(( (docs + clients - 1) / clients ))

cargo build --release -p verge-node --quiet
verge=$PWD/target/release/verge
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"' EXIT
cd "$work"
"$verge" certs ca --dir certs >/dev/null
"$verge" certs node --name a --dir certs >/dev/null
"$verge" certs node --name b --dir certs >/dev/null
printf '[replication]\nanti_entropy_interval_s = 3600\n' > quiet.toml

start() { # name api gossip peer
    "$verge" node --config quiet.toml --data-dir "$1" --node-id "$1" --api-addr "127.0.0.1:$2" \
        --gossip-addr "127.0.0.1:$3" --peer "127.0.0.1:$4" --tls-ca certs/ca.pem \
        --tls-cert "certs/$1.pem" --tls-key "certs/$1.key" >>"$1.log" 2>&1 &
    eval "pid_$1=$!"
    for _ in $(seq 1 200); do curl -sf "127.0.0.1:$2/readyz" >/dev/null && return; sleep 0.05; done
    echo "node $1 did not start" >&2; cat "$1.log" >&2; exit 1
}
metric() { # api name
    curl -s "127.0.0.1:$1/metrics" | awk -v n="$2" '$1 == n { print $2 }'
}
count_docs() { curl -s "127.0.0.1:$1/v1/status" | sed 's/.*"docs":\([0-9]*\).*/\1/'; }

start a 27070 27071 27081
start b 27080 27081 27071
echo "writing $docs documents at a (they replicate to b)..."
"$verge" --url http://127.0.0.1:27070 bench --mode write --clients $clients \
    --docs-per-client "$per_client" --warmup 0 --duration $(( docs / 2500 + 5 )) | tail -1
for _ in $(seq 1 600); do
    [ "$(count_docs 27080)" -ge "$docs" ] && break; sleep 0.2
done
[ "$(count_docs 27070)" -ge "$docs" ] || { echo "the load wrote only $(count_docs 27070) documents" >&2; exit 1; }
echo "b holds $(count_docs 27080) documents, a $(count_docs 27070)"

kill -TERM "$pid_b"; wait "$pid_b" || true
for i in $(seq 0 9); do
    curl -s -X PATCH "127.0.0.1:27070/v1/docs/bench/$i/0" -d '{"ops":[{"op":"set","path":["changed"],"value":true}]}' >/dev/null
done
echo "changed 10 documents at a while b was down; restarting b"
t0=$(date +%s.%N)
start b 27080 27081 27071
t1=$(date +%s.%N)
for _ in $(seq 1 200); do
    ok=$(metric 27080 'verge_anti_entropy_sessions_total{outcome="ok"}'); [ -n "$ok" ] && [ "${ok%.*}" -ge 1 ] && break; sleep 0.05
done
for i in $(seq 0 9); do
    until curl -s "127.0.0.1:27080/v1/docs/bench/$i/0" | grep -q '"changed":true'; do sleep 0.05; done
done
t2=$(date +%s.%N)
bytes=$(metric 27080 verge_anti_entropy_bytes_total)
sessions=$(metric 27080 'verge_anti_entropy_sessions_total{outcome="ok"}')
rsum=$(metric 27080 verge_anti_entropy_reconcile_seconds_sum)
rcount=$(metric 27080 verge_anti_entropy_reconcile_seconds_count)
synced=$(metric 27080 verge_anti_entropy_docs_total)
awk -v docs="$docs" -v t0="$t0" -v t1="$t1" -v t2="$t2" \
    -v bytes="$bytes" -v sessions="$sessions" -v rsum="$rsum" -v rcount="$rcount" -v synced="$synced" 'BEGIN {
    start = t1 - t0; all = t2 - t1
    printf "docs=%d restart_to_ready_s=%.3f reconcile_bytes_per_session=%.0f find_ms=%.1f docs_synced=%d caught_up_ms=%.0f\n",
        docs, start, bytes / (sessions > 0 ? sessions : 1), 1000 * rsum / (rcount > 0 ? rcount : 1), synced, 1000 * all }'
