#!/usr/bin/env bash
# Resident memory of a node with N deployed, idle functions (copies of the C
# hello under different names), measured after a restart (every function
# registered, none loaded or called), and the first request to a
# function never called since that restart; then every function is called
# once and the RSS read again (functions that ran, now idle).
#   bench/idle-rss.sh [COUNTS="1 100 1000 10000"]
source "$(dirname "$0")/lib.sh"
counts=${1:-"1 100 1000 10000"}
build
tmp=$(mktemp -d); trap 'stop_node; rm -rf "$tmp"' EXIT
echo "| functions | deploy all | start | RSS idle after restart | first request to an uncalled function | RSS after each was called once |"
echo "|---|---|---|---|---|---|"
for n in $counts; do
  d="$tmp/n$n"; mkdir -p "$d"
  start_node "$d" 18120
  token=$(cat "$d/admin.token")
  t0=$(date +%s%N)
  for i in $(seq "$n"); do
    curl -fs -o /dev/null -H "Authorization: Bearer $token" --data-binary @target/guests/c-hello.wasm \
      "http://127.0.0.1:18120/v1/functions/f$i/versions?route=/f$i"
  done
  t1=$(date +%s%N)
  stop_node
  s0=$(date +%s%N)
  start_node "$d" 18120
  s1=$(date +%s%N)
  sleep 1
  rss=$(rss_kib "$NODE_PID")
  first=$(curl -fs -o /dev/null -w '%{time_total}' "http://127.0.0.1:18120/f$n")
  for i in $(seq "$n"); do echo "url = \"http://127.0.0.1:18120/f$i\""; echo "output = /dev/null"; done >"$d.urls"
  curl -fs --no-progress-meter --parallel --parallel-max 8 -K "$d.urls" 2>/dev/null
  sleep 1
  called=$(rss_kib "$NODE_PID")
  stop_node
  awk -v n="$n" -v dep="$(( (t1 - t0) / 1000000 ))" -v st="$(( (s1 - s0) / 1000000 ))" -v rss="$rss" -v first="$first" -v called="$called" \
    'BEGIN { printf "| %d | %d ms | %d ms | %.1f MiB | %.2f ms | %.1f MiB |\n", n, dep, st, rss / 1024, first * 1000, called / 1024 }'
done
