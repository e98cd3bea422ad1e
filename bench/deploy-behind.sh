#!/usr/bin/env bash
# A deploy behind another's background work (issue 19): on a fresh node, a
# JavaScript hello is deployed (it serves on baseline code while its
# optimized code compiles in the background), and one second later a C
# hello; the C deploy's time to its first 200 is measured. Each round uses a
# fresh node, so that the JavaScript engine's code is compiled from scratch.
#
#   bench/deploy-behind.sh [ROUNDS=5] [LANG=c]
#
# Needs the fixtures (cargo xtask guests c js).
source "$(dirname "$0")/lib.sh"
rounds=${1:-5}
lang=${2:-c}
for l in js "$lang"; do [ -f "target/guests/$l-hello.wasm" ] || cargo xtask guests "$l"; done
[ "$VERGE" != target/release/verge ] || cargo build --release -q -p verge
work=$(mktemp -d)
NODE_PID=
trap 'stop_node; rm -rf "$work"' EXIT
port=18096
url=http://127.0.0.1:$port
: >"$work/ms"
for i in $(seq "$rounds"); do
  rm -rf "$work/node"
  start_node "$work/node" $port
  token=$(cat "$work/node/admin.token")
  curl -fs -H "Authorization: Bearer $token" --data-binary @target/guests/js-hello.wasm \
    "$url/v1/functions/js/versions?route=/js" >/dev/null
  sleep 1
  t0=$(date +%s%N)
  curl -fs -H "Authorization: Bearer $token" --data-binary @"target/guests/$lang-hello.wasm" \
    "$url/v1/functions/$lang/versions?route=/$lang" >/dev/null
  until curl -fs -o /dev/null "$url/$lang"; do :; done
  t1=$(date +%s%N)
  awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f\n", (b - a) / 1e6 }' | tee -a "$work/ms"
  stop_node
done
sort -n "$work/ms" | awk '{a[NR]=$1} END {printf "%s hello deploy to first 200, 1 s after a JS deploy on a fresh node: p50 %.0f ms, min %.0f ms, max %.0f ms (n=%d)\n", "'"$lang"'", a[int((NR+1)/2)], a[1], a[NR], NR}'
