#!/usr/bin/env bash
# A storm of failing requests beside a well-behaved neighbour: wrk drives a
# trapping function (every request a 500, every failure a usage record and a
# `dev.verge.invocation.failed` event) with 16 connections while a second wrk
# loads the C hello with 4. Prints each one's requests/s, p50 and p99.
#
#   bench/failures.sh [DURATION=10s]
#
# Needs: wrk (apt-get install wrk) and the fixtures (cargo xtask guests).
source "$(dirname "$0")/lib.sh"
duration=${1:-10s}
[ -f target/guests/rust-trap.wasm ] || cargo xtask guests rust
build
work=$(mktemp -d)
NODE_PID=
trap 'stop_node; rm -rf "$work"' EXIT

start_node "$work/n" 18111
$VERGE --data-dir "$work/n" deploy target/guests/rust-trap.wasm --name trap --route /t >/dev/null
$VERGE --data-dir "$work/n" deploy target/guests/c-hello.wasm --name hello --route /hello >/dev/null
curl -s -o /dev/null http://127.0.0.1:18111/t || true
curl -fs -o /dev/null http://127.0.0.1:18111/hello

wrk_run http://127.0.0.1:18111/t "$duration" 16 >"$work/trap" &
storm=$!
sleep 1
neighbour=$(wrk_run http://127.0.0.1:18111/hello "$duration" 4)
wait "$storm"
echo "| load | requests/s | p50 | p99 |"
echo "|---|---|---|---|"
read -r rps p50 p99 <"$work/trap"
echo "| failing function (16 connections, all 500) | $rps | $p50 | $p99 |"
read -r rps p50 p99 <<<"$neighbour"
echo "| C hello beside it (4 connections) | $rps | $p50 | $p99 |"
