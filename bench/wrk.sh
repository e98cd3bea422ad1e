#!/usr/bin/env bash
# Requests/s and latency of the C hello served by Verge and by `wasmtime serve`,
# side by side in one run, with wrk.
#
#   bench/wrk.sh [DURATION=10s] [CONNECTIONS=32]
#
# Needs: wrk (apt-get install wrk), wasmtime-cli 48.0.8
# (cargo install wasmtime-cli --version 48.0.8 --locked), and the fixtures
# (cargo xtask guests). Builds Verge in release mode.
set -euo pipefail
cd "$(dirname "$0")/.."
duration=${1:-10s}
conns=${2:-32}
command -v wrk >/dev/null || { echo "wrk missing: apt-get install -y wrk" >&2; exit 1; }
command -v wasmtime >/dev/null || { echo "wasmtime missing: cargo install wasmtime-cli --version 48.0.8 --locked" >&2; exit 1; }
wasmtime --version | grep -q '48\.0\.8' || echo "warning: $(wasmtime --version), the comparison is meant against 48.0.8" >&2
[ -f target/guests/c-hello.wasm ] || cargo xtask guests c
cargo build --release -q -p verge
verge=target/release/verge
guest=target/guests/c-hello.wasm

data=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$data"; }
trap cleanup EXIT

VERGE_LOG=warn $verge up --listen 127.0.0.1:18080 --data-dir "$data" >"$data/out" 2>"$data/err" &
pids+=($!)
for _ in $(seq 100); do grep -q "listening" "$data/out" 2>/dev/null && break; sleep 0.1; done
$verge --data-dir "$data" deploy "$guest" --name hello --route / >/dev/null

wasmtime serve --addr 127.0.0.1:18081 -S cli "$guest" >/dev/null 2>&1 &
pids+=($!)
for _ in $(seq 100); do curl -fs http://127.0.0.1:18081/ >/dev/null 2>&1 && break; sleep 0.1; done

curl -fs http://127.0.0.1:18080/ | grep -q "Hello from C" || { echo "verge is not serving" >&2; exit 1; }
curl -fs http://127.0.0.1:18081/ | grep -q "Hello from C" || { echo "wasmtime serve is not serving" >&2; exit 1; }

run() {
  # warm up, then measure
  wrk -t2 -c"$conns" -d2s "$2" >/dev/null
  local out; out=$(wrk -t2 -c"$conns" -d"$duration" --latency "$2")
  local rps p50 p99
  rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  p50=$(awk '$1=="50%" {print $2}' <<<"$out")
  p99=$(awk '$1=="99%" {print $2}' <<<"$out")
  local errs; errs=$(awk '/Non-2xx|Socket errors/ {print}' <<<"$out")
  printf '| %s | %s | %s | %s | %s |\n' "$1" "$rps" "$p50" "$p99" "${errs:-none}"
  echo "$rps" >"$data/rps-$1"
}
echo "C hello, wrk -t2 -c$conns -d$duration, $(nproc) cores shared by server and client"
echo
echo "| server | requests/s | p50 | p99 | errors |"
echo "|---|---|---|---|---|"
run verge http://127.0.0.1:18080/
run "wasmtime serve" http://127.0.0.1:18081/
awk -v a="$(cat "$data/rps-verge")" -v b="$(cat "$data/rps-wasmtime serve")" 'BEGIN { printf "\nverge / wasmtime serve = %.2fx\n", a / b }'
