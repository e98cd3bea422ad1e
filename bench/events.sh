#!/usr/bin/env bash
# Event bus figures: events/s end to end into a no-op function, queue depth
# and memory under a producer faster than the consumers, and latency from
# ingest to the handler's start; on the embedded bus (SQLite) and on a
# cluster's (NATS JetStream: one node, then two nodes sharing the work).
#
#   bench/events.sh [N=20000] [embedded|nats|nats2|all (default)]
#
# The no-op function is the Rust relay fixture (it prints the event id).
# The NATS runs need nats-server 2.15.1 (scripts/install-nats). NATS_SYNC=2m
# runs the server with the fsync interval it defaults to, to measure what
# `sync_interval: always` (the setting Verge requires) costs.
source "$(dirname "$0")/lib.sh"
n=${1:-20000}
mode=${2:-all}
[ -f target/guests/rust-relay.wasm ] || cargo xtask guests rust
[ "$VERGE" != target/release/verge ] || cargo build --release -q -p verge
work=$(mktemp -d)
pids=()
nats_pid=
stop_all() { for p in "${pids[@]}" $nats_pid; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; pids=(); nats_pid=; }
trap 'stop_all; rm -rf "$work"' EXIT
nport=14398

# run NAME NODES [ARGS...]: starts NODES nodes (ARGS: on NATS), the relay
# on a trigger, and the producers against the first node.
run() {
  local name=$1 nodes=$2; shift 2
  echo "== $name"
  local i
  for i in $(seq "$nodes"); do
    start_node "$work/$name-$i" $((18096 + i)) "$@" --node-name "$name-$i"; pids+=("$NODE_PID")
    if [ "$i" = 1 ]; then first=$NODE_PID; fi
  done
  local d="$work/$name-1"
  $VERGE --data-dir "$d" deploy target/guests/rust-relay.wasm --name noop >/dev/null
  $VERGE --data-dir "$d" trigger add noop --on 'com.bench.*' >/dev/null
  # Every node knows the trigger and the function before the load.
  for i in $(seq 2 "$nodes"); do
    until $VERGE --server "http://127.0.0.1:$((18096 + i))" --token "$(cat "$d/admin.token")" trigger ls 2>/dev/null | grep -q com.bench; do sleep 0.1; done
  done
  python3 bench/events.py http://127.0.0.1:18097 "$(cat "$d/admin.token")" "$n" "$first"
  stop_all
}

if [ "$mode" = embedded ] || [ "$mode" = all ]; then
  run embedded 1
fi
if [ "$mode" != embedded ]; then
  command -v nats-server >/dev/null || ./scripts/install-nats
  start_nats() {
    rm -rf "$work/js"
    cat >"$work/nats.conf" <<CONF
listen: 127.0.0.1:$nport
jetstream { store_dir: "$work/js", sync_interval: ${NATS_SYNC:-always} }
CONF
    nats-server -c "$work/nats.conf" -l "$work/nats.log" & nats_pid=$!
    for _ in $(seq 200); do (exec 3<>/dev/tcp/127.0.0.1/$nport) 2>/dev/null && return; sleep 0.05; done
    echo "nats-server did not start" >&2; exit 1
  }
  if [ "$mode" = nats ] || [ "$mode" = all ]; then
    start_nats
    run nats-one-node 1 --nats nats://127.0.0.1:$nport
  fi
  if [ "$mode" = nats2 ] || [ "$mode" = all ]; then
    start_nats
    run nats-two-nodes 2 --nats nats://127.0.0.1:$nport
  fi
fi
