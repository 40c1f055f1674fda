#!/usr/bin/env bash
# Starts a local three-node Verge cluster with one command; Ctrl-C stops it.
#
#   examples/cluster/run.sh
#
# Builds the `verge` binary with cargo (a no-op when it is up to date), creates a cluster CA and
# one certificate per node, and starts edge-1, edge-2 and edge-3 on loopback, each seeded with
# the other two. Data, certificates and logs go to ./cluster-data (kept between runs, so a
# restart keeps the documents; delete the directory to start afresh).
#
# Environment (all optional):
#   CLUSTER_DIR           where data, certificates and logs go (default ./cluster-data)
#   CLUSTER_API_PORTS     three HTTP API ports    (default "7070 7080 7090")
#   CLUSTER_GOSSIP_PORTS  three gossip UDP ports  (default "7071 7081 7091")
#   VERGE_BIN             a verge binary to use instead of building one
#   CARGO_PROFILE         cargo profile to build with (default dev; e.g. release)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
DIR=${CLUSTER_DIR:-./cluster-data}
read -r -a API_PORTS <<<"${CLUSTER_API_PORTS:-7070 7080 7090}"
read -r -a GOSSIP_PORTS <<<"${CLUSTER_GOSSIP_PORTS:-7071 7081 7091}"
if [ "${#API_PORTS[@]}" -ne 3 ] || [ "${#GOSSIP_PORTS[@]}" -ne 3 ]; then
  echo "error: CLUSTER_API_PORTS and CLUSTER_GOSSIP_PORTS need three ports each" >&2
  exit 2
fi
NAMES=(edge-1 edge-2 edge-3)

# Settings of whoever runs this must not leak into the nodes (flags override them, but
# VERGE_CONFIG or VERGE_PEERS would still add to them).
for v in $(compgen -e | grep '^VERGE_' || true); do
  [ "$v" = VERGE_BIN ] || unset "$v"
done
# Plain log files, without colour escapes.
export NO_COLOR=1

if [ -n "${VERGE_BIN:-}" ]; then
  BIN=$VERGE_BIN
else
  PROFILE=${CARGO_PROFILE:-dev}
  echo "building verge (cargo build --profile $PROFILE) ..."
  (cd "$ROOT" && cargo build --quiet --profile "$PROFILE" -p verge-node --bin verge)
  TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
  case $PROFILE in dev) BIN=$TARGET_DIR/debug/verge ;; *) BIN=$TARGET_DIR/$PROFILE/verge ;; esac
fi
[ -x "$BIN" ] || { echo "error: no verge binary at $BIN" >&2; exit 1; }

mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
CERTS=$DIR/certs
if [ ! -f "$CERTS/ca.pem" ]; then
  "$BIN" certs ca --dir "$CERTS" >/dev/null
fi
for name in "${NAMES[@]}"; do
  [ -f "$CERTS/$name.pem" ] || "$BIN" certs node --name "$name" --dir "$CERTS" >/dev/null
done

PIDS=()
stop() {
  trap - INT TERM EXIT
  if [ "${#PIDS[@]}" -gt 0 ]; then
    echo
    echo "stopping the nodes ..."
    kill -TERM "${PIDS[@]}" 2>/dev/null || true
    wait "${PIDS[@]}" 2>/dev/null || true
    echo "stopped. Data, certificates and logs are in $DIR"
  fi
}
trap 'stop; exit 130' INT
trap 'stop; exit 143' TERM
trap stop EXIT

for i in 0 1 2; do
  name=${NAMES[$i]}
  args=(node --node-id "$name" --data-dir "$DIR/$name"
        --api-addr "127.0.0.1:${API_PORTS[$i]}" --gossip-addr "127.0.0.1:${GOSSIP_PORTS[$i]}"
        --tls-ca "$CERTS/ca.pem" --tls-cert "$CERTS/$name.pem" --tls-key "$CERTS/$name.key")
  for j in 0 1 2; do
    [ "$j" = "$i" ] || args+=(--peer "127.0.0.1:${GOSSIP_PORTS[$j]}")
  done
  rm -f "$DIR/$name/api.addr"
  echo "===== run.sh: starting $name at $(date -u +%FT%TZ) =====" >>"$DIR/$name.log"
  "$BIN" "${args[@]}" >>"$DIR/$name.log" 2>&1 &
  PIDS+=($!)
done

# Ready when each node has written its address file and answers /readyz.
ready() {
  local port=$1
  if command -v curl >/dev/null; then
    curl -fsS -m 1 "http://127.0.0.1:$port/readyz" >/dev/null 2>&1
  else
    "$BIN" --url "http://127.0.0.1:$port" status >/dev/null 2>&1
  fi
}
for i in 0 1 2; do
  name=${NAMES[$i]}
  for _ in $(seq 1 300); do
    if ! kill -0 "${PIDS[$i]}" 2>/dev/null; then
      echo "error: $name exited; the end of $DIR/$name.log:" >&2
      tail -n 20 "$DIR/$name.log" >&2
      exit 1
    fi
    if [ -f "$DIR/$name/api.addr" ] && ready "${API_PORTS[$i]}"; then
      continue 2
    fi
    sleep 0.1
  done
  echo "error: $name did not become ready in 30 s; see $DIR/$name.log" >&2
  exit 1
done

A=${API_PORTS[0]}; B=${API_PORTS[1]}; C=${API_PORTS[2]}
cat <<INFO

The cluster is up: three nodes, mutual TLS with the CA in $CERTS.

  node    HTTP API                 gossip (QUIC)      log
  edge-1  http://127.0.0.1:$A   127.0.0.1:${GOSSIP_PORTS[0]}   $DIR/edge-1.log
  edge-2  http://127.0.0.1:$B   127.0.0.1:${GOSSIP_PORTS[1]}   $DIR/edge-2.log
  edge-3  http://127.0.0.1:$C   127.0.0.1:${GOSSIP_PORTS[2]}   $DIR/edge-3.log

Write at one node, read at another:
  curl -X PUT http://127.0.0.1:$A/v1/docs/cart/u-42 -d '{"items":{"sku-1":{"qty":1}}}'
  curl http://127.0.0.1:$C/v1/docs/cart/u-42
  curl -X PATCH 'http://127.0.0.1:$B/v1/docs/cart/u-42?replicas=2' \\
       -d '{"ops":[{"op":"inc","path":["views"],"by":1}]}'    # 200 once both others persisted it
With the CLI:
  $BIN --url http://127.0.0.1:$B get cart/u-42
  $BIN --url http://127.0.0.1:$C status

Press Ctrl-C to stop all three nodes.
INFO
echo "cluster is up"

# Stay until Ctrl-C, or until a node exits on its own (then stop the others).
set +e
wait -n "${PIDS[@]}"
rc=$?
# Ctrl-C in a terminal reaches the nodes too; one that stopped cleanly (status 0) may be seen
# here before the INT trap runs. That is a normal stop, not a failure.
if [ "$rc" -eq 0 ]; then
  exit 130
fi
for i in 0 1 2; do
  if ! kill -0 "${PIDS[$i]}" 2>/dev/null; then
    echo "${NAMES[$i]} exited (status $rc); the end of $DIR/${NAMES[$i]}.log:" >&2
    tail -n 20 "$DIR/${NAMES[$i]}.log" >&2
  fi
done
exit 1
