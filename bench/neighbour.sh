#!/usr/bin/env bash
# Latency of a neighbour (the C hello) while two guests spin without yielding,
# against the same neighbour on an idle node.
#   bench/neighbour.sh [DURATION=10s]
source "$(dirname "$0")/lib.sh"
duration=${1:-10s}
command -v wrk >/dev/null || { echo "wrk missing: apt-get install -y wrk" >&2; exit 1; }
build
tmp=$(mktemp -d); loops=()
trap 'for p in "${loops[@]}"; do kill "$p" 2>/dev/null || true; done; stop_node; rm -rf "$tmp"' EXIT
d="$tmp/n"; mkdir -p "$d"
start_node "$d" 18110 --timeout 20s
$VERGE --data-dir "$d" deploy target/guests/c-hello.wasm --name hello --route /hello >/dev/null
$VERGE --data-dir "$d" deploy target/guests/rust-hostile.wasm --name spin --route /spin >/dev/null
wrk -t2 -c8 -d2s http://127.0.0.1:18110/hello >/dev/null
read -r rps0 p50_0 p99_0 < <(wrk_run http://127.0.0.1:18110/hello "$duration" 8)
for _ in 1 2; do
  ( while true; do curl -s -o /dev/null http://127.0.0.1:18110/spin/loop; done ) &
  loops+=($!)
done
sleep 1
read -r rps1 p50_1 p99_1 < <(wrk_run http://127.0.0.1:18110/hello "$duration" 8)
echo "| neighbour of | requests/s | p50 | p99 |"
echo "|---|---|---|---|"
echo "| an idle node | $rps0 | $p50_0 | $p99_0 |"
echo "| two spinning guests | $rps1 | $p50_1 | $p99_1 |"
