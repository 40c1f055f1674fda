#!/usr/bin/env bash
# What following the change feed costs the writes (docs/benchmarks.md): one node takes writes at
# RATE per second (`verge bench --rate`, open loop) for SECONDS, first with nobody following its
# feed, then with WATCHERS server-sent-event watchers (`GET /v1/watch`) and one webhook
# subscription delivering to a local receiver. Prints the write rate and latency of both runs,
# and the events per second each follower received. Not part of CI.
#
#   scripts/bench-feed.sh [RATE] [SECONDS] [WATCHERS]     (defaults: 5000 10 100)
set -euo pipefail
cd "$(dirname "$0")/.."
rate=${1:-5000}
seconds=${2:-10}
watchers=${3:-100}
warmup=2

cargo build --release -p verge-node --quiet
verge=$PWD/target/release/verge
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"' EXIT

# The webhook receiver: answers 200 and counts the events of each batch.
cat >"$work/receiver.py" <<'PY'
import http.server, json, sys
count = 0
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        global count
        body = self.rfile.read(int(self.headers["Content-Length"]))
        count += len(json.loads(body)["events"])
        with open(sys.argv[2], "w") as f:
            f.write(str(count))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
PY

start_node() { # dir [config]
    local dir=$1
    mkdir -p "$dir"
    "$verge" node --config "$dir/verge.toml" --data-dir "$dir/data" --api-addr 127.0.0.1:0 \
        --gossip-addr 127.0.0.1:0 >"$dir/node.log" 2>&1 &
    echo $! >"$dir/pid"
    for _ in $(seq 1 100); do
        [[ -s "$dir/data/api.addr" ]] && break
        sleep 0.1
    done
    echo "http://$(head -n1 "$dir/data/api.addr")"
}

run_bench() { # url
    "$verge" --url "$1" bench --mode write --rate "$rate" --clients 64 --docs-per-client 16 \
        --warmup "$warmup" --duration "$seconds" 2>/dev/null | tail -n1
}

echo "one node, $rate writes/s for $seconds s (after $warmup s of warm-up)"

dir=$work/alone
mkdir -p "$dir" && : >"$dir/verge.toml"
url=$(start_node "$dir")
echo "  nobody following:          $(run_bench "$url")"
kill "$(cat "$dir/pid")"

dir=$work/followed
mkdir -p "$dir"
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$dir/secret"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
python3 "$work/receiver.py" "$port" "$dir/received" &
printf '[[subscriptions]]\nname = "bench"\nurl = "http://127.0.0.1:%s/"\nprefix = "bench/"\nsecret_file = "%s"\nbatch_max = 1000\nmax_delay_ms = 100\n' \
    "$port" "$dir/secret" >"$dir/verge.toml"
url=$(start_node "$dir")
for w in $(seq 1 "$watchers"); do
    curl -sN "$url/v1/watch?prefix=bench/" >"$dir/watch.$w" &
done
sleep 1
began=$(date +%s.%N)
echo "  $watchers watchers, 1 webhook: $(run_bench "$url")"
sleep 2 # let the followers drain
ended=$(date +%s.%N)
kill "$(cat "$dir/pid")"
counts=$(for w in $(seq 1 "$watchers"); do grep -c '^event: change' "$dir/watch.$w" || true; done | sort -n)
written=$(( rate * (seconds + warmup) ))
secs=$(python3 -c "print($ended - $began)")
min=$(head -n1 <<<"$counts")
max=$(tail -n1 <<<"$counts")
received=$(cat "$dir/received" 2>/dev/null || echo 0)
python3 - "$min" "$max" "$received" "$secs" "$watchers" <<'PY'
import sys
lo, hi, hook, secs, n = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
print(f"  each watcher received {lo}..{hi} events ({lo/secs:,.0f}/s each, {n*lo/secs:,.0f}/s in all over {secs:.1f} s)")
print(f"  the webhook received {hook} events ({hook/secs:,.0f}/s)")
PY
