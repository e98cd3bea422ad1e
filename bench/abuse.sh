#!/usr/bin/env bash
# Issue 14's figures: a neighbour's latency while one function is abused,
# time limits under spinning guests, memory under big uploads.
#   bench/abuse.sh [DURATION=10s] [all|spinners]
# Prints markdown tables (docs/BENCHMARKS.md, "Abuse").
source "$(dirname "$0")/lib.sh"
duration=${1:-10s}
what=${2:-all}
secs=${duration%s}
command -v wrk >/dev/null || { echo "wrk missing: apt-get install -y wrk" >&2; exit 1; }
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true  # 1,000 slow clients need the descriptors
build
tmp=$(mktemp -d); bg=(); NODE_PID=
trap 'for p in "${bg[@]}"; do kill "$p" 2>/dev/null || true; done; stop_node; rm -rf "$tmp"' EXIT
py="python3 bench/abuse.py"

# node ARGS...: a fresh node on port 18120 with hello, spin (2 s limit) and echo
node() {
  [ -z "$NODE_PID" ] || stop_node
  d="$tmp/n$RANDOM"; mkdir -p "$d"
  start_node "$d" 18120 "$@"
  $VERGE --data-dir "$d" deploy target/guests/c-hello.wasm --name hello --route /hello >/dev/null
  $VERGE --data-dir "$d" deploy target/guests/rust-hostile.wasm --name spin --route /spin --timeout 2s >/dev/null
  $VERGE --data-dir "$d" deploy target/guests/rust-echo.wasm --name echo --route /echo --memory 64MiB >/dev/null
  wrk -t2 -c8 -d2s http://127.0.0.1:18120/hello >/dev/null
}
neighbour() { wrk_run http://127.0.0.1:18120/hello "$duration" 8; }
# limits: p50, p99 and max wall time of the spinners' timed-out invocations, ms
limits() {
  $VERGE --data-dir "$d" invocations spin --limit 10000 --json |
    python3 -c 'import json,sys; w=sorted(r["wall_us"]/1000 for r in json.load(sys.stdin) if r["outcome"]=="timeout"); print(f"{w[len(w)//2]:.0f} {w[len(w)*99//100]:.0f} {w[-1]:.0f} {len(w)}" if w else "- - - 0")'
}

echo "| neighbour (C hello, wrk -c8) while | settings | requests/s | p50 | p99 | abuse |"
echo "|---|---|---|---|---|---|"
node
read -r rps p50 p99 < <(neighbour)
echo "| an idle node | defaults | $rps | $p50 | $p99 | |"

if [ "$what" = all ]; then
$py slow 18120 /echo 1000 $((secs + 15)) & bg+=($!)
sleep 3
read -r rps p50 p99 < <(neighbour)
echo "| 1,000 slow bodies on /echo | defaults | $rps | $p50 | $p99 | |"
kill "${bg[-1]}" 2>/dev/null || true
fi

for n in 64 300; do
  for settings in defaults unlimited; do
    if [ "$settings" = unlimited ]; then
      node --function-concurrency 1000 --memory-budget 1000GiB
    else
      node
    fi
    $py spin 18120 /spin/loop "$n" $((secs + 6)) > "$tmp/spin.out" & bg+=($!)
    sleep 3
    # One more spinner from curl, a client of its own (the load generator's
    # times include its own scheduling among hundreds of clients).
    (for _ in 1 2 3; do curl -s -o /dev/null -w '%{http_code}:%{time_total} ' http://127.0.0.1:18120/spin/loop; done) > "$tmp/curl.out" & curl_pid=$!
    read -r rps p50 p99 < <(neighbour)
    wait "${bg[-1]}" || true
    wait "$curl_pid" || true
    sleep 1  # the ledger commits records every 100 ms: count them all
    read -r lp50 lp99 lmax lcount < <(limits)
    echo "| $n spinners (2 s limit) | $settings | $rps | $p50 | $p99 | timed out: $lcount, wall p50 $lp50 ms, p99 $lp99 ms, max $lmax ms; $(cat "$tmp/spin.out"); curl: $(cat "$tmp/curl.out")|"
  done
done

[ "$what" = all ] || exit 0
echo
echo "| 100 clients post 15 MiB to /echo at once | statuses | node peak RSS |"
echo "|---|---|---|"
for budget in 1GiB 64GiB; do
  node --memory-budget "$budget" --max-wait 60s
  statuses=$($py upload 18120 /echo 100 15)
  echo "| --memory-budget $budget | $statuses | $(awk '/VmHWM/ {printf "%.0f MiB", $2/1024}' "/proc/$NODE_PID/status") |"
done
