#!/usr/bin/env bash
# Figures of edge nodes (docs/edge.md), on `scripts/cluster up --edges 2`
# (3 NATS servers, a core node, two edges, each edge's link through a proxy):
#   1. deploy propagation: acknowledgement on the core to the first 200 on an edge;
#   2. an edge's local request latency: linked, cut, and with 100 ms added to its link;
#   3. a forwarded request (edge-1 -> edge-2, which the version is placed on)
#      against the same request made at edge-2;
#   4. convergence after a CUT-second cut with key-value writes on both sides:
#      from the heal to both sides reading the same values, counters exact.
#
#   bench/edge.sh [N=50] [DURATION=10s] [CUT=60]
#
# Needs wrk (apt-get install -y wrk), nats-server 2.15.1 (scripts/install-nats),
# python3 and the fixtures (cargo xtask guests rust).
source "$(dirname "$0")/lib.sh"
n=${1:-50}
duration=${2:-10s}
cut=${3:-60}
command -v wrk >/dev/null || { echo "wrk missing: apt-get install -y wrk" >&2; exit 1; }
[ -f target/guests/rust-hello.wasm ] || cargo xtask guests rust
[ "$VERGE" != target/release/verge ] || cargo build --release -q -p verge
export VERGE_CLUSTER_DIR
VERGE_CLUSTER_DIR=$(mktemp -d)
export VERGE
trap 'scripts/cluster down --wipe >/dev/null 2>&1 || true' EXIT
scripts/cluster up --edges 2 >/dev/null
token=$(cat "$VERGE_CLUSTER_DIR/node-1/admin.token")
core=http://127.0.0.1:8081 e1=http://127.0.0.1:8181 e2=http://127.0.0.1:8182
wasm=target/guests/rust-hello.wasm
auth=(-H "Authorization: Bearer $token")

# forwarded_latency LOCAL_URL FORWARDING_URL PATH LOCAL_NAME FORWARDING_NAME:
# one client, 400 sequential GETs of PATH at each; p50 and p99 of both.
forwarded_latency() {
  python3 - "$@" <<'PY'
import http.client, sys, time, urllib.parse
local_url, fwd_url, path, local_name, fwd_name = sys.argv[1:6]
def lat(url, n=400):
    u = urllib.parse.urlparse(url)
    c, xs = http.client.HTTPConnection(u.hostname, u.port, timeout=30), []
    for _ in range(n):
        t = time.perf_counter()
        c.request("GET", path); r = c.getresponse(); r.read()
        assert r.status == 200, r.status
        xs.append((time.perf_counter() - t) * 1e6)
    xs.sort()
    return xs[len(xs) // 2], xs[int(len(xs) * 0.99)]
local, fwd = lat(local_url), lat(fwd_url)
print(f"one client, sequential: at {local_name} p50 {local[0]:.0f} us p99 {local[1]:.0f} us; "
      f"{fwd_name} forwards p50 {fwd[0]:.0f} us p99 {fwd[1]:.0f} us; added p50 {fwd[0] - local[0]:.0f} us")
PY
}

echo "== deploy propagation, core -> edge-1 ($n deploys, loopback)"
python3 bench/cluster.py "$core" "$e1" "$token" "$wasm" "$n"

curl -fs "${auth[@]}" -X POST --data-binary @"$wasm" "$core/v1/functions/hello/versions?route=/hello" >/dev/null
until curl -fs "$e1/hello" >/dev/null; do sleep 0.05; done
echo "== edge-1 local requests (wrk -c8 $duration): hello"
read -r rps p50 p99 < <(wrk_run "$e1/hello" "$duration" 8)
echo "linked           $rps req/s  p50 $p50  p99 $p99"
scripts/cluster cut 1 >/dev/null
sleep 2
read -r rps p50 p99 < <(wrk_run "$e1/hello" "$duration" 8)
echo "cut              $rps req/s  p50 $p50  p99 $p99"
scripts/cluster heal 1 >/dev/null
scripts/cluster delay 1 100 >/dev/null
sleep 2
read -r rps p50 p99 < <(wrk_run "$e1/hello" "$duration" 8)
echo "100 ms link      $rps req/s  p50 $p50  p99 $p99"
scripts/cluster delay 1 0 >/dev/null

echo "== a forwarded request (wrk -c8 $duration): placed on site-2, asked at edge-1"
curl -fs "${auth[@]}" -X POST --data-binary @"$wasm" "$core/v1/functions/far/versions?route=/far&place=site%3Dsite-2" >/dev/null
until curl -fs "$e1/far" >/dev/null; do sleep 0.05; done
read -r rps p50 p99 < <(wrk_run "$e2/far" "$duration" 8)
echo "at edge-2        $rps req/s  p50 $p50  p99 $p99"
read -r rps p50 p99 < <(wrk_run "$e1/far" "$duration" 8)
echo "edge-1 forwards  $rps req/s  p50 $p50  p99 $p99"
forwarded_latency "$e2" "$e1" /far edge-2 edge-1

echo "== the same between two core nodes (no proxy on the path)"
start_node "$VERGE_CLUSTER_DIR/node-b" 18190 --nats "$(cat "$VERGE_CLUSTER_DIR/nats-url")" --node-name node-b --label tier=b
pids_extra=$NODE_PID
trap 'kill $pids_extra 2>/dev/null || true; scripts/cluster down --wipe >/dev/null 2>&1 || true' EXIT
nb=http://127.0.0.1:18190
curl -fs "${auth[@]}" -X POST --data-binary @"$wasm" "$core/v1/functions/near/versions?route=/near&place=tier%3Db" >/dev/null
until curl -fs "$core/near" >/dev/null; do sleep 0.05; done
forwarded_latency "$nb" "$core" /near node-b node-1

echo "== convergence after a ${cut} s cut with key-value writes on both sides"
scripts/cluster cut 1 >/dev/null
python3 - "$core" "$e1" "$token" "$cut" <<'PY'
import http.client, sys, time, urllib.parse
core, e1, token, cut = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
H = {"Authorization": f"Bearer {token}"}
def conn(url):
    u = urllib.parse.urlparse(url)
    return http.client.HTTPConnection(u.hostname, u.port, timeout=30)
def call(c, method, path, body=None):
    c.request(method, path, body, H); r = c.getresponse(); data = r.read()
    return r.status, data
cc, ce = conn(core), conn(e1)
start = time.time()
writes = 0
i = 0
# Both sides write the same keys through the cut: counters, and values
# (each side its own value for "k<i>", the later one wins).
while time.time() - start < cut - 1:
    for c in (cc, ce):
        s, _ = call(c, "POST", "/v1/kv/bench/hits/incr", b"1"); assert s == 200, s
        s, _ = call(c, "PUT", f"/v1/kv/bench/k{i % 100}", f"v{i}".encode()); assert s in (200, 204), s
        writes += 1
    i += 1
    time.sleep(0.05)
print(f"{writes} increments ({writes // 2} per side) and as many sets on 100 keys during the cut")
open("/tmp/verge-edge-bench-writes", "w").write(str(writes))
PY
writes=$(cat /tmp/verge-edge-bench-writes)
scripts/cluster heal 1 >/dev/null
python3 - "$core" "$e1" "$token" "$writes" <<'PY'
import http.client, json, sys, time, urllib.parse
core, e1, token, writes = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
H = {"Authorization": f"Bearer {token}"}
def conn(url):
    u = urllib.parse.urlparse(url)
    return http.client.HTTPConnection(u.hostname, u.port, timeout=30)
def get(c, key):
    c.request("GET", f"/v1/kv/bench/{key}", None, H); r = c.getresponse(); d = r.read()
    return json.loads(d) if r.status == 200 else None
cc, ce = conn(core), conn(e1)
healed = time.perf_counter()
while True:
    a = [get(cc, "hits")] + [get(cc, f"k{i}") for i in range(100)]
    b = [get(ce, "hits")] + [get(ce, f"k{i}") for i in range(100)]
    if a == b and a[0] is not None and a[0]["count"] == writes:
        break
    if time.perf_counter() - healed > 120:
        sys.exit(f"not converged after 120 s: hits {a[0]} vs {b[0]}, expected {writes}")
    time.sleep(0.05)
print(f"converged {(time.perf_counter() - healed) * 1000:.0f} ms after the heal: "
      f"hits = {a[0]['count']} on both (exact: {writes} increments), 100 values equal")
PY
