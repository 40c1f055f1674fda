#!/usr/bin/env bash
# What backups cost and give (docs/benchmarks.md), against a real S3 API (s3s-fs on loopback,
# installed by scripts/setup.sh):
#   1. durable writes (`verge bench`, 64 clients, closed loop) with backups off, then on
#      (default [backup] settings: a segment a second);
#   2. a snapshot of DOCS documents (`verge backup now`): bytes and time;
#   3. `verge restore` of those documents after a SIGKILL: time;
#   4. the loss window: a node SIGKILLed under write load, restored; how much older than the
#      kill the restored state is.
# Not part of CI.
#
#   scripts/bench-backup.sh [SECONDS] [DOCS]      (defaults: 10 100000)
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-10}
docs=${2:-100000}

bash scripts/setup.sh >/dev/null
cargo build --release -p verge-node --quiet
verge=$PWD/target/release/verge
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"' EXIT

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
mkdir -p "$work/s3/bench"
s3s-fs --host 127.0.0.1 --port "$port" --access-key bench --secret-key bench-secret "$work/s3" \
    >"$work/s3.log" 2>&1 &
export AWS_ENDPOINT=http://127.0.0.1:$port AWS_ALLOW_HTTP=true AWS_ACCESS_KEY_ID=bench \
    AWS_SECRET_ACCESS_KEY=bench-secret AWS_REGION=us-east-1

now_ms() { date +%s%3N; }

start_node() { # dir [backup url]
    local dir=$1
    mkdir -p "$dir"
    : >"$dir/verge.toml"
    if [[ -n "${2:-}" ]]; then
        printf '[backup]\nto = "%s"\n' "$2" >"$dir/verge.toml"
    fi
    "$verge" node --config "$dir/verge.toml" --data-dir "$dir/data" --api-addr 127.0.0.1:0 \
        --gossip-addr 127.0.0.1:0 >"$dir/node.log" 2>&1 &
    echo $! >"$dir/pid"
    for _ in $(seq 1 100); do
        [[ -s "$dir/data/api.addr" ]] && break
        sleep 0.1
    done
    echo "http://$(head -n1 "$dir/data/api.addr")"
}

bench() { # url seconds docs-per-client
    "$verge" --url "$1" bench --mode write --clients 64 --docs-per-client "$3" --warmup 2 \
        --duration "$2" 2>/dev/null | tail -n1
}

echo "== 1. durable writes, 64 clients, $seconds s"
url=$(start_node "$work/off")
echo "backup off: $(bench "$url" "$seconds" 16)"
kill "$(cat "$work/off/pid")"; wait "$(cat "$work/off/pid")" 2>/dev/null || true
url=$(start_node "$work/on" "s3://bench/on")
echo "backup on:  $(bench "$url" "$seconds" 16)"
sleep 2
"$verge" --url "$url" status >/dev/null
python3 - "$url" <<'PY'
import json, sys, urllib.request
s = json.load(urllib.request.urlopen(sys.argv[1] + "/v1/status"))
m = urllib.request.urlopen(sys.argv[1] + "/metrics").read().decode()
get = lambda name: next((l.split()[-1] for l in m.splitlines() if l.startswith(name + " ")), "?")
print(f"  shipped to feed position {s['backup']['shipped_seq']} of {s['feed_last_seq']}; "
      f"{get('verge_backup_segments_total')} segments, {get('verge_backup_bytes_total')} bytes shipped")
PY
kill "$(cat "$work/on/pid")"; wait "$(cat "$work/on/pid")" 2>/dev/null || true

echo "== 2. snapshot of $docs documents"
url=$(start_node "$work/big" "s3://bench/big")
per_client=$(( (docs + 63) / 64 ))
# Each client writes its documents in turn: enough writes reach every one of them.
"$verge" --url "$url" bench --mode write --clients 64 --docs-per-client "$per_client" \
    --warmup 0 --duration $(( docs / 4000 + 5 )) >/dev/null 2>&1
count=$(python3 -c 'import json,sys,urllib.request; print(json.load(urllib.request.urlopen(sys.argv[1]+"/v1/status"))["docs"])' "$url")
t0=$(now_ms)
"$verge" --url "$url" backup now
t1=$(now_ms)
echo "  $count documents; backup now took $((t1 - t0)) ms"

echo "== 3. restore of that store after a SIGKILL"
kill -9 "$(cat "$work/big/pid")"; wait "$(cat "$work/big/pid")" 2>/dev/null || true
t0=$(now_ms)
"$verge" restore --from s3://bench/big --data-dir "$work/restored" 2>/dev/null
t1=$(now_ms)
echo "  verge restore took $((t1 - t0)) ms"

echo "== 4. loss window: SIGKILL under write load"
url=$(start_node "$work/loss" "s3://bench/loss")
"$verge" --url "$url" bench --mode write --clients 16 --docs-per-client 16 --warmup 0 \
    --duration 30 >/dev/null 2>&1 &
sleep 5
kill -9 "$(cat "$work/loss/pid")"
killed=$(now_ms)
wait "$(cat "$work/loss/pid")" 2>/dev/null || true
out=$("$verge" restore --from s3://bench/loss --data-dir "$work/loss-restored" 2>/dev/null)
as_of=$(python3 -c 'import sys,datetime; t=sys.argv[1].split(" as of ")[1].split()[0]; print(int(datetime.datetime.fromisoformat(t.replace("Z","+00:00")).timestamp()*1000))' "$out")
echo "  restored state is $((killed - as_of)) ms older than the kill (ship_interval_ms = 1000)"
