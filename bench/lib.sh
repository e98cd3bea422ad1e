# Shared helpers of the bench scripts: build, start and stop a release node.
# shellcheck shell=bash
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# VERGE=path runs another build of verge (comparing two revisions); by
# default the scripts build and run this checkout's.
VERGE=${VERGE:-target/release/verge}
build() {
  [ -f target/guests/c-hello.wasm ] && [ -f target/guests/rust-hostile.wasm ] || cargo xtask guests rust c
  [ "$VERGE" != target/release/verge ] || cargo build --release -q -p verge
}
# start DATA_DIR PORT [ARGS...]: starts a node, sets NODE_PID
start_node() {
  local data=$1 port=$2; shift 2
  VERGE_LOG=warn $VERGE up --listen "127.0.0.1:$port" --data-dir "$data" "$@" >"$data.out" 2>"$data.err" &
  NODE_PID=$!
  for _ in $(seq 600); do grep -q "listening" "$data.out" 2>/dev/null && return; sleep 0.05; done
  echo "node did not start" >&2; cat "$data.err" >&2; exit 1
}
stop_node() { kill "$NODE_PID" 2>/dev/null || true; wait "$NODE_PID" 2>/dev/null || true; }
rss_kib() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
# wrk_run URL DURATION CONNS: prints "rps p50 p99"
wrk_run() {
  local out; out=$(wrk -t"$(( $3 < 2 ? $3 : 2 ))" -c"$3" -d"$2" --latency "$1")
  printf '%s %s %s\n' "$(awk '/Requests\/sec/ {print $2}' <<<"$out")" \
    "$(awk '$1=="50%" {print $2}' <<<"$out")" "$(awk '$1=="99%" {print $2}' <<<"$out")"
}
# settle DATA_DIR PORT NAME...: calls each function once and waits until it
# serves on optimized code (JS and Python start on baseline code), as a
# node serves once settled.
settle() {
  local data=$1 port=$2; shift 2
  local f
  for f in "$@"; do
    curl -fs "http://127.0.0.1:$port/$f" >/dev/null
    for _ in $(seq 600); do
      $VERGE --data-dir "$data" versions "$f" --json | grep -q '"code": *"optimized"' && break
      sleep 0.5
    done
  done
}
