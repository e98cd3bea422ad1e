#!/usr/bin/env bash
# Fresh instances per request with each kind of instance memory
# (`verge up --instance-memory resident|shared`): requests/s of the
# JavaScript, Python and C hello on optimized code, and the node's RSS after.
#
#   bench/instance-memory.sh [DURATION=8s] [CONNECTIONS=8]
#
# Needs: wrk, curl, the fixtures (cargo xtask guests). Port 18080.
source "$(dirname "$0")/lib.sh"
duration=${1:-8s}
conns=${2:-8}
command -v wrk >/dev/null || { echo "wrk missing: apt-get install -y wrk" >&2; exit 1; }
for g in c-hello js-hello python-hello; do
  [ -f "target/guests/$g.wasm" ] || cargo xtask guests c python js
done
build
work=$(mktemp -d)
trap 'stop_node; rm -rf "$work"' EXIT
echo "fresh instance per request, wrk -c$conns -d$duration, $(nproc) cores shared by the node and wrk"
echo
echo "| --instance-memory | guest | requests/s | p50 | p99 | node RSS after |"
echo "|---|---|---|---|---|---|"
for kind in shared resident; do
  start_node "$work/$kind" 18080 --instance-memory "$kind"
  for lang in js python c; do
    $VERGE --data-dir "$work/$kind" deploy "target/guests/$lang-hello.wasm" --name "$lang" --route "/$lang" >/dev/null
  done
  settle "$work/$kind" 18080 js python c
  for lang in js python c; do
    wrk -t2 -c"$conns" -d2s "http://127.0.0.1:18080/$lang" >/dev/null
    read -r r p50 p99 < <(wrk_run "http://127.0.0.1:18080/$lang" "$duration" "$conns")
    printf '| %s | %s | %s | %s | %s | %s MiB |\n' "$kind" "$lang" "$r" "$p50" "$p99" "$(( $(rss_kib "$NODE_PID") / 1024 ))"
  done
  stop_node
done
