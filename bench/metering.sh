#!/usr/bin/env bash
# Requests/s of the C hello with metering on and off (a hidden --no-metering
# switch), alternated on/off/on/off to spread the machine's noise.
#   bench/metering.sh [DURATION=10s]
source "$(dirname "$0")/lib.sh"
duration=${1:-10s}
command -v wrk >/dev/null || { echo "wrk missing: apt-get install -y wrk" >&2; exit 1; }
build
tmp=$(mktemp -d); trap 'stop_node; rm -rf "$tmp"' EXIT
declare -A sum=([on]=0 [off]=0)
echo "| run | metering | requests/s | p50 | p99 |"
echo "|---|---|---|---|---|"
for round in 1 2; do
  for mode in on off; do
    d="$tmp/$mode$round"; mkdir -p "$d"
    args=(); [ "$mode" = off ] && args=(--no-metering)
    start_node "$d" 18100 "${args[@]}"
    $VERGE --data-dir "$d" deploy target/guests/c-hello.wasm --name hello --route / >/dev/null
    wrk -t2 -c32 -d2s http://127.0.0.1:18100/ >/dev/null
    read -r rps p50 p99 < <(wrk_run http://127.0.0.1:18100/ "$duration" 32)
    echo "| $round | $mode | $rps | $p50 | $p99 |"
    sum[$mode]=$(awk -v a="${sum[$mode]}" -v b="$rps" 'BEGIN {print a + b}')
    stop_node
  done
done
awk -v on="${sum[on]}" -v off="${sum[off]}" 'BEGIN { printf "\nmetering on / off = %.3f (loss %.1f%%)\n", on / off, (1 - on / off) * 100 }'
