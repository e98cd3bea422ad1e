#!/usr/bin/env bash
# Deploy-to-first-200 of the C hello, and the first request to a function after
# a node restart (compiled code cached), each repeated N times; prints p50/max.
#
#   bench/coldstart.sh [N=20]
#
# Times are taken by curl (time_total) and by date +%s%N around the deploy call.
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-20}
[ -f target/guests/c-hello.wasm ] || cargo xtask guests c
cargo build --release -q -p verge
verge=target/release/verge
guest=target/guests/c-hello.wasm
data=$(mktemp -d)
pid=
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null || true; rm -rf "$data"; }
trap cleanup EXIT

start() {
  : >"$data/out"
  VERGE_LOG=warn $verge up --listen 127.0.0.1:18090 --data-dir "$data" >"$data/out" 2>"$data/err" &
  pid=$!
  for _ in $(seq 200); do grep -q "listening" "$data/out" 2>/dev/null && return; sleep 0.05; done
  echo "node did not start" >&2; cat "$data/err" >&2; exit 1
}
stats() { sort -n | awk '{a[NR]=$1} END {printf "p50 %.1f ms, max %.1f ms (n=%d)", a[int((NR+1)/2)], a[NR], NR}'; }

start
token=$(cat "$data/admin.token")
# Deploy to first 200: distinct bytes each time (a custom section varies), so
# every deploy compiles; measured from before the API call until the route answers.
: >"$data/deploy"
for i in $(seq "$n"); do
  python3 - "$guest" "$data/g.wasm" "$i" <<'PY'
import sys
src, dst, i = sys.argv[1], sys.argv[2], sys.argv[3]
b = open(src, "rb").read()
name = b"verge-bench"
payload = bytes([len(name)]) + name + i.encode()
open(dst, "wb").write(b + bytes([0]) + bytes([len(payload)]) + payload)
PY
  t0=$(date +%s%N)
  curl -fs -o /dev/null -H "Authorization: Bearer $token" --data-binary @"$data/g.wasm" \
    "http://127.0.0.1:18090/v1/functions/fn-$i/versions?route=/fn-$i"
  curl -fs -o /dev/null "http://127.0.0.1:18090/fn-$i"
  t1=$(date +%s%N)
  awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f\n", (b - a) / 1e6 }' >>"$data/deploy"
done
echo "deploy to first 200 (C hello, compiled each time): $(stats <"$data/deploy")"

: >"$data/first"
for i in $(seq "$n"); do
  kill "$pid"; wait "$pid" 2>/dev/null || true
  start
  curl -fs -o /dev/null -w '%{time_total}\n' "http://127.0.0.1:18090/fn-$i" | awk '{printf "%.3f\n", $1*1000}' >>"$data/first"
done
echo "first request after a restart (code cached): $(stats <"$data/first")"
