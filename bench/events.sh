#!/usr/bin/env bash
# Event bus figures: events/s end to end into a no-op function, queue depth
# and memory under a producer faster than the consumers, and latency from
# ingest to the handler's start.
#
#   bench/events.sh [N=20000]
#
# The no-op function is the Rust relay fixture (it prints the event id).
source "$(dirname "$0")/lib.sh"
n=${1:-20000}
[ -f target/guests/rust-relay.wasm ] || cargo xtask guests rust
cargo build --release -q -p verge
work=$(mktemp -d)
NODE_PID=
trap 'stop_node; rm -rf "$work"' EXIT
start_node "$work/node" 18096
$VERGE --data-dir "$work/node" deploy target/guests/rust-relay.wasm --name noop >/dev/null
$VERGE --data-dir "$work/node" trigger add noop --on 'com.bench.*' >/dev/null
python3 bench/events.py http://127.0.0.1:18096 "$(cat "$work/node/admin.token")" "$n" "$NODE_PID"
