#!/usr/bin/env bash
# Key-value figures: latency of get, set and increment from a guest (the
# Rust KV fixture behind HTTP, wrk with 1 connection), and, for backlogs of
# 1k, 10k and 100k keys written at an edge while its core is down, the time
# to converge once the core is reachable, replication deltas/s and metadata
# bytes per key.
#
#   bench/kv.sh ["1000 10000 100000"]     ("" measures the latencies only)
source "$(dirname "$0")/lib.sh"
sizes=${1-1000 10000 100000}
[ -f target/guests/rust-kv.wasm ] || cargo xtask guests rust
cargo build --release -q -p verge
work=$(mktemp -d)
NODE_PID=
pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; stop_node; rm -rf "$work"' EXIT

start_node "$work/g" 18097
$VERGE --data-dir "$work/g" deploy target/guests/rust-kv.wasm --name kv --route /count --route /docs --route /bench \
  --kv-bucket views --kv-bucket docs >/dev/null
cat >"$work/put.lua" <<'LUA'
wrk.method = "PUT"
wrk.body = '{"title":"hello"}'
LUA
curl -fs -X PUT --data '{}' http://127.0.0.1:18097/docs/d1 >/dev/null
one() { # one LABEL URL [wrk args]: 1 connection, 5 s
  local label=$1 url=$2; shift 2
  local out; out=$(wrk -t1 -c1 -d5s --latency "$@" "$url")
  echo "guest $label (HTTP round trip, 1 connection): p50 $(awk '$1=="50%" {print $2}' <<<"$out"), p99 $(awk '$1=="99%" {print $2}' <<<"$out") ($(awk '/Requests\/sec/ {print $2}' <<<"$out") req/s)"
}
echo "guest-side, timed inside the guest around each wasi:keyvalue call (2000 each):"
curl -fs http://127.0.0.1:18097/bench/2000 | sed 's/^/  /'
one increment http://127.0.0.1:18097/count/home
one get http://127.0.0.1:18097/docs/d1
one set http://127.0.0.1:18097/docs/d2 -s "$work/put.lua"
# Reads while writes run: 4 connections PUT for 8 s, a get loop measured inside.
wrk -t1 -c4 -d8s -s "$work/put.lua" http://127.0.0.1:18097/docs/d3 >/dev/null &
writer=$!
sleep 1
one "get while 4 connections write" http://127.0.0.1:18097/docs/d1
wait "$writer"
stop_node

for n in $sizes; do
  rm -rf "$work/edge" "$work/core"; mkdir -p "$work/core"
  # The core's token must exist before the edge points at it: start it once.
  start_node "$work/core" 18098; stop_node
  start_node "$work/edge" 18099 --peer http://127.0.0.1:18098 --peer-token "$(cat "$work/core/admin.token")"
  edge_pid=$NODE_PID; pids+=("$edge_pid")
  # Fill while the core is down, then start the core and time convergence.
  (python3 bench/kv.py http://127.0.0.1:18099 "$(cat "$work/edge/admin.token")" "$work/edge" \
     http://127.0.0.1:18098 "$work/core/admin.token" "$n" >"$work/kv-$n.out" 2>&1) &
  filler=$!
  # Start the core once the edge has all keys (the script waits for the core to answer).
  until grep -q "written at the edge" "$work/kv-$n.out" 2>/dev/null; do sleep 0.2; done
  start_node "$work/core" 18098; core_pid=$NODE_PID
  wait "$filler"
  cat "$work/kv-$n.out"
  kill "$core_pid" "$edge_pid" 2>/dev/null || true; wait "$core_pid" "$edge_pid" 2>/dev/null || true
  NODE_PID=
done
