#!/usr/bin/env bash
# Disk used by invocation records while a guest that prints 1 MiB per request
# runs under load: bounded by the retention size (issue 14).
#   bench/retention.sh [MINUTES=3] [RETAIN_SIZE=default] [CONNECTIONS=8]
# (RETAIN_SIZE `default`: `verge up` as shipped, 7 days and 1 GiB; fewer connections leave a
# core to other work during a long run.) Prints the data directory's size
# every minute (every 15 s in runs of 5 minutes or less).
source "$(dirname "$0")/lib.sh"
minutes=${1:-3}
size=${2:-default}
retain=(); [ "$size" = default ] || retain=(--retain-size "$size")
conns=${3:-8}
step=15; [ "$minutes" -le 5 ] || step=60
command -v wrk >/dev/null || { echo "wrk missing: apt-get install -y wrk" >&2; exit 1; }
build
tmp=$(mktemp -d); NODE_PID=; load=
trap '[ -z "$load" ] || kill "$load" 2>/dev/null; stop_node; rm -rf "$tmp"' EXIT
d="$tmp/n"; mkdir -p "$d"
start_node "$d" 18140 "${retain[@]}"
$VERGE --data-dir "$d" deploy target/guests/rust-hostile.wasm --name printer --route /p >/dev/null
wrk -t2 -c"$conns" -d"${minutes}m" "http://127.0.0.1:18140/p/print?mib=1" >"$tmp/wrk" 2>&1 & load=$!
echo "| after | verge.db | its WAL | data dir | invocations counted by verge usage |"
echo "|---|---|---|---|---|"
for t in $(seq "$step" "$step" $((minutes * 60))); do
  sleep "$step"
  db=$(stat -c %s "$d/verge.db"); wal=$(stat -c %s "$d/verge.db-wal" 2>/dev/null || echo 0)
  all=$(du -sm "$d" | cut -f1)
  used=$($VERGE --data-dir "$d" usage --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["total"]["invocations"])')
  echo "| ${t} s | $((db >> 20)) MiB | $((wal >> 20)) MiB | ${all} MiB | $used |"
done
wait "$load" || true
grep "Requests/sec" "$tmp/wrk"
