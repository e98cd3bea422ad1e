#!/usr/bin/env bash
# Figures of nodes on NATS JetStream (docs/cluster.md):
#   1. deploy propagation: acknowledgement on node A to the first 200 on node B;
#   2. hello requests/s of a node on NATS against the same node embedded
#      (the request path never touches NATS), and how long after the load the
#      other node has imported all of its usage records;
#   3. catch-up after a NATS outage: NATS stopped for OUTAGE seconds while
#      deploys are refused, then the time from NATS back to a deploy through A
#      serving on B.
#
#   bench/cluster.sh [N=50] [DURATION=10s] [OUTAGE=30]
#
# Needs wrk (apt-get install -y wrk), nats-server 2.15.1 (scripts/install-nats)
# and the fixtures (cargo xtask guests rust).
source "$(dirname "$0")/lib.sh"
n=${1:-50}
duration=${2:-10s}
outage=${3:-30}
command -v wrk >/dev/null || { echo "wrk missing: apt-get install -y wrk" >&2; exit 1; }
command -v nats-server >/dev/null || ./scripts/install-nats
[ -f target/guests/rust-hello.wasm ] || cargo xtask guests rust
[ "$VERGE" != target/release/verge ] || cargo build --release -q -p verge
work=$(mktemp -d)
pids=()
nats_pid=
stop_all() { for p in "${pids[@]}" $nats_pid; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; }
trap 'stop_all; rm -rf "$work"' EXIT
nport=14399
cat >"$work/nats.conf" <<CONF
listen: 127.0.0.1:$nport
jetstream { store_dir: "$work/js", sync_interval: always }
CONF
start_nats() {
  nats-server -c "$work/nats.conf" -l "$work/nats.log" & nats_pid=$!
  for _ in $(seq 200); do (exec 3<>/dev/tcp/127.0.0.1/$nport) 2>/dev/null && return; sleep 0.05; done
  echo "nats-server did not start" >&2; exit 1
}
start_nats
nats=nats://127.0.0.1:$nport
start_node "$work/a" 18111 --nats "$nats" --node-name a; pids+=("$NODE_PID")
start_node "$work/b" 18112 --nats "$nats" --node-name b; pids+=("$NODE_PID")
token=$(cat "$work/a/admin.token")
a=http://127.0.0.1:18111 b=http://127.0.0.1:18112
wasm=target/guests/rust-hello.wasm

echo "== deploy propagation ($n deploys, one NATS server, loopback)"
python3 bench/cluster.py "$a" "$b" "$token" "$wasm" "$n"

echo "== hello requests/s (wrk -c8 $duration): node on NATS vs the same node embedded"
curl -fs -X POST -H "Authorization: Bearer $token" --data-binary @"$wasm" "$a/v1/functions/hello/versions?route=/hello" >/dev/null
until curl -fs "$b/hello" >/dev/null; do sleep 0.05; done
read -r rps p50 p99 < <(wrk_run "$b/hello" "$duration" 8)
echo "on NATS   $rps req/s  p50 $p50  p99 $p99"
# The other node imports B's records in the background: wait until both count
# the same (the usage stream's catch-up), so that the embedded run below
# shares the machine with idle nodes only.
total() { curl -fs -H "Authorization: Bearer $token" "$1/v1/usage" | python3 -c 'import json,sys; print(json.load(sys.stdin)["total"]["invocations"])'; }
t0=$(date +%s.%N)
until [ "$(total "$a")" = "$(total "$b")" ]; do sleep 0.2; done
t1=$(date +%s.%N)
python3 - "$t0" "$t1" "$(total "$a")" <<'PY'
import sys
t0, t1, n = float(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
print(f"usage records: A counted all {n} of the cluster {t1 - t0:.1f} s after the load ended")
PY
start_node "$work/e" 18113; pids+=("$NODE_PID")
etoken=$(cat "$work/e/admin.token")
curl -fs -X POST -H "Authorization: Bearer $etoken" --data-binary @"$wasm" "http://127.0.0.1:18113/v1/functions/hello/versions?route=/hello" >/dev/null
read -r rps p50 p99 < <(wrk_run "http://127.0.0.1:18113/hello" "$duration" 8)
echo "embedded  $rps req/s  p50 $p50  p99 $p99"
kill "$NODE_PID"; wait "$NODE_PID" 2>/dev/null || true

echo "== catch-up after a ${outage} s NATS outage"
kill -9 "$nats_pid"; wait "$nats_pid" 2>/dev/null || true; nats_pid=
sleep 1
code=$(curl -s -o /dev/null -w '%{http_code}' -X POST -H "Authorization: Bearer $token" --data-binary @"$wasm" "$a/v1/functions/late/versions?route=/late")
echo "deploy during the outage: HTTP $code"
sleep "$outage"
start_nats
back=$(date +%s.%N)
until [ "$(curl -s -o /dev/null -w '%{http_code}' -X POST -H "Authorization: Bearer $token" --data-binary @"$wasm" "$a/v1/functions/late/versions?route=/late")" = 201 ]; do sleep 0.02; done
acked=$(date +%s.%N)
until curl -fs "$b/late" >/dev/null; do sleep 0.005; done
served=$(date +%s.%N)
python3 - "$back" "$acked" "$served" <<'PY'
import sys
back, acked, served = map(float, sys.argv[1:])
print(f"NATS back -> first deploy acknowledged: {(acked - back) * 1000:.0f} ms; -> served on B: {(served - back) * 1000:.0f} ms")
PY
