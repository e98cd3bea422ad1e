#!/usr/bin/env bash
# The same hello in every runtime, side by side in one run, with wrk:
# Verge (fresh instances, and --reuse), workerd (Cloudflare Workers'
# runtime) for JavaScript, `wasmtime serve` for the Rust and C components.
# Prints requests/s, latency and the ratios issue 19 asks about.
#
#   bench/languages.sh [DURATION=10s] [CONNECTIONS=8] [REUSE=1000]
#
# Needs: wrk, curl, wasmtime-cli 48.0.8 (cargo install wasmtime-cli
# --version 48.0.8 --locked), npm (workerd is installed into
# target/bench-workerd at the version pinned below), the fixtures (cargo
# xtask guests). Builds Verge in release mode. Ports 18080-18084.
source "$(dirname "$0")/lib.sh"
duration=${1:-10s}
conns=${2:-8}
reuse=${3:-1000}
WORKERD_VERSION=1.20261117.1
command -v wrk >/dev/null || { echo "wrk missing: apt-get install -y wrk" >&2; exit 1; }
command -v wasmtime >/dev/null || { echo "wasmtime missing: cargo install wasmtime-cli --version 48.0.8 --locked" >&2; exit 1; }
wasmtime --version | grep -q '48\.0\.8' || echo "warning: $(wasmtime --version), the comparison is meant against 48.0.8" >&2
workerd=target/bench-workerd/node_modules/.bin/workerd
if [ ! -x "$workerd" ] || ! "$workerd" --version >/dev/null 2>&1; then
  command -v npm >/dev/null || { echo "npm missing: apt-get install -y npm" >&2; exit 1; }
  mkdir -p target/bench-workerd
  npm install --prefix target/bench-workerd --no-audit --no-fund "workerd@$WORKERD_VERSION" >/dev/null
fi
for g in c-hello rust-hello js-hello python-hello; do
  [ -f "target/guests/$g.wasm" ] || cargo xtask guests rust c python js
done
build

data=$(mktemp -d)
pids=()
cleanup() { stop_node; for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$data"; }
trap cleanup EXIT

start_node "$data/node" 18080
v() { $VERGE --data-dir "$data/node" "$@"; }
v deploy target/guests/c-hello.wasm --name c --route /c >/dev/null
v deploy target/guests/rust-hello.wasm --name rust --route /rust >/dev/null
v deploy target/guests/js-hello.wasm --name js --route /js >/dev/null
v deploy target/guests/js-hello.wasm --name js-reuse --route /js-reuse --reuse "$reuse" >/dev/null
v deploy target/guests/python-hello.wasm --name py --route /py >/dev/null
v deploy target/guests/python-hello.wasm --name py-reuse --route /py-reuse --reuse "$reuse" >/dev/null
# The code a node serves once settled: optimized (JS and Python start on
# baseline code).
settle "$data/node" 18080 js js-reuse py py-reuse

wasmtime serve --addr 127.0.0.1:18081 -S cli target/guests/c-hello.wasm >/dev/null 2>&1 &
pids+=($!)
wasmtime serve --addr 127.0.0.1:18083 -S cli target/guests/rust-hello.wasm >/dev/null 2>&1 &
pids+=($!)
"$workerd" serve bench/workerd/config.capnp >"$data/workerd.log" 2>&1 &
pids+=($!)
for port in 18081 18082 18083; do
  for _ in $(seq 200); do curl -fs "http://127.0.0.1:$port/" >/dev/null 2>&1 && break; sleep 0.1; done
done
check() { curl -fs "$1" | grep -q "$2" || { echo "$1 does not answer $2" >&2; cat "$data/workerd.log" >&2; exit 1; }; }
check http://127.0.0.1:18082/ "Hello from JavaScript"
check http://127.0.0.1:18080/js-reuse "Hello from JavaScript"
check http://127.0.0.1:18081/ "Hello from C"
check http://127.0.0.1:18083/ "Hello from Rust"

declare -A rps
row() {
  wrk -t2 -c"$conns" -d2s "$2" >/dev/null
  read -r r p50 p99 < <(wrk_run "$2" "$duration" "$conns")
  rps[$1]=$r
  printf '| %s | %s | %s | %s |\n' "$1" "$r" "$p50" "$p99"
}
echo "hello in each runtime, wrk -c$conns -d$duration, $(nproc) cores shared by servers and client"
echo
echo "| server | requests/s | p50 | p99 |"
echo "|---|---|---|---|"
row "workerd, JavaScript" http://127.0.0.1:18082/
row "Verge, JavaScript, --reuse $reuse" http://127.0.0.1:18080/js-reuse
row "Verge, JavaScript, fresh instances" http://127.0.0.1:18080/js
row "Verge, Python, --reuse $reuse" http://127.0.0.1:18080/py-reuse
row "Verge, Python, fresh instances" http://127.0.0.1:18080/py
row "Verge, C" http://127.0.0.1:18080/c
row "wasmtime serve, C" http://127.0.0.1:18081/
row "Verge, Rust" http://127.0.0.1:18080/rust
row "wasmtime serve, Rust" http://127.0.0.1:18083/
ratio() { awk -v a="$2" -v b="$3" -v g="$4" 'BEGIN { printf "| %s | %.2fx | %s |\n", "'"$1"'", a / b, g }'; }
echo
echo "| ratio | measured | goal |"
echo "|---|---|---|"
ratio "JavaScript --reuse / workerd" "${rps[Verge, JavaScript, --reuse $reuse]}" "${rps[workerd, JavaScript]}" ">= 0.5x"
ratio "JavaScript fresh / workerd" "${rps[Verge, JavaScript, fresh instances]}" "${rps[workerd, JavaScript]}" "-"
ratio "Python --reuse / Python fresh" "${rps[Verge, Python, --reuse $reuse]}" "${rps[Verge, Python, fresh instances]}" ">= 5x (of 490 req/s)"
ratio "C: Verge / wasmtime serve" "${rps[Verge, C]}" "${rps[wasmtime serve, C]}" ">= 2.5x"
ratio "Rust: Verge / wasmtime serve" "${rps[Verge, Rust]}" "${rps[wasmtime serve, Rust]}" ">= 2.5x"
