#!/usr/bin/env bash
# What `--prewarm K` does to latency: the same hello deployed with fresh
# instances made on the request's path, and with K never-used instances
# made ahead, loaded by wrk with 1 connection (one request at a time:
# spare CPU between requests) and with more.
#
#   bench/prewarm.sh [DURATION=10s] [K=4] [CONNECTIONS="1 4"]
#
# Needs: wrk, curl, the fixtures (cargo xtask guests). Port 18080.
source "$(dirname "$0")/lib.sh"
duration=${1:-10s}
k=${2:-4}
conns=${3:-1 4}
command -v wrk >/dev/null || { echo "wrk missing: apt-get install -y wrk" >&2; exit 1; }
for g in c-hello js-hello python-hello; do
  [ -f "target/guests/$g.wasm" ] || cargo xtask guests rust c python js
done
build
data=$(mktemp -d)
trap 'stop_node; rm -rf "$data"' EXIT
start_node "$data/node" 18080
v() { $VERGE --data-dir "$data/node" "$@"; }
for lang in c js python; do
  v deploy "target/guests/$lang-hello.wasm" --name "$lang" --route "/$lang" >/dev/null
  v deploy "target/guests/$lang-hello.wasm" --name "$lang-pre" --route "/$lang-pre" --prewarm "$k" >/dev/null
done
settle "$data/node" 18080 c c-pre js js-pre python python-pre
echo "hello, wrk -d$duration, fresh instances against --prewarm $k, $(nproc) cores shared by server and client"
echo
echo "| guest | connections | instances | requests/s | p50 | p99 |"
echo "|---|---|---|---|---|---|"
for lang in c js python; do
  for c in $conns; do
    for f in "$lang" "$lang-pre"; do
      wrk -t1 -c"$c" -d2s "http://127.0.0.1:18080/$f" >/dev/null
      read -r r p50 p99 < <(wrk_run "http://127.0.0.1:18080/$f" "$duration" "$c")
      kind=fresh; [ "$f" = "$lang" ] || kind="prewarm $k"
      printf '| %s | %s | %s | %s | %s | %s |\n' "$lang" "$c" "$kind" "$r" "$p50" "$p99"
    done
  done
done
echo
health=$(curl -fs -H "authorization: Bearer $(cat "$data/node/admin.token")" http://127.0.0.1:18080/v1/health)
echo "requests served by a prewarmed instance: $(grep -o '"instances_prewarmed":[0-9]*' <<<"$health" | cut -d: -f2)"
