#!/usr/bin/env bash
# Figures of guests' outbound HTTP and of calls between functions
# (docs/outbound.md), one client sending sequential requests:
#   1. an outbound request against the same request from a native client: GET
#      /hello on an upstream node (127.0.0.2), made by Python's http.client (on a
#      new connection per request, as a guest's request is, and on a kept one)
#      and by the fetch guest on another node; the guest's own cost without the
#      request (its /config path) is subtracted from the latter;
#   2. a call between two functions in process (a -> b at
#      http://b.fn.verge.internal/) against the same call through an HTTP
#      route on loopback (b on the upstream node); b alone is subtracted.
#
#   bench/outbound.sh [N=2000]
#
# Needs python3 and the fixtures (cargo xtask guests rust).
source "$(dirname "$0")/lib.sh"
n=${1:-2000}
[ -f target/guests/rust-fetch.wasm ] || cargo xtask guests rust
[ "$VERGE" != target/release/verge ] || cargo build --release -q -p verge
tmp=$(mktemp -d)
up=18480 main=18481
VERGE_LOG=warn $VERGE up --listen 127.0.0.2:$up --data-dir "$tmp/up" >"$tmp/up.out" 2>"$tmp/up.err" &
UP_PID=$!
start_node "$tmp/main" $main
trap 'kill $UP_PID $NODE_PID 2>/dev/null; wait 2>/dev/null; rm -rf "$tmp"' EXIT
until grep -q listening "$tmp/up.out" 2>/dev/null; do sleep 0.05; done

deploy() { # DATA_DIR URL NAME FIXTURE QUERY
  curl -fsS -H "Authorization: Bearer $(cat "$1/admin.token")" --data-binary @"target/guests/$4.wasm" \
    "$2/v1/functions/$3/versions?route=/$3&$5" >/dev/null
}
U=http://127.0.0.2:$up M=http://127.0.0.1:$main
deploy "$tmp/up" "$U" hello rust-hello ""
deploy "$tmp/up" "$U" b rust-fetch "env=NAME=b"
grant="allow_outbound=http://127.0.0.2:$up&allow_private=127.0.0.2/32"
deploy "$tmp/main" "$M" f rust-fetch "$grant"
deploy "$tmp/main" "$M" b rust-fetch "env=NAME=b"
deploy "$tmp/main" "$M" a rust-fetch "env=NAME=a&env=NEXT=b&allow_call=b"
deploy "$tmp/main" "$M" la rust-fetch "env=NAME=a&env=NEXT=b&env=NEXT_URL=http://127.0.0.2:$up/b/chain&$grant"

python3 - "$U" "$M" "$n" <<'PY'
import http.client, sys, time, urllib.parse
up, main, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
def lat(base, path, method="GET", headers={}, want=(200,), fresh=False):
    u = urllib.parse.urlparse(base)
    c, xs = http.client.HTTPConnection(u.hostname, u.port, timeout=30), []
    for i in range(n + 100):
        t = time.perf_counter()
        if fresh:  # a new connection per request, as a guest's request makes
            c.close(); c = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
        c.request(method, path, headers=headers); r = c.getresponse(); body = r.read()
        assert r.status in want, (path, r.status, body[:200])
        if i >= 100:  # warm-up
            xs.append((time.perf_counter() - t) * 1e6)
    xs.sort()
    return xs[len(xs) // 2], xs[int(len(xs) * 0.99)]
def show(name, v):
    print(f"  {name:<44} p50 {v[0]:7.0f} us   p99 {v[1]:7.0f} us")
print(f"== outbound request ({n} sequential requests each)")
native = lat(up, "/hello", fresh=True); show("native client -> upstream /hello (new conn.)", native)
kept = lat(up, "/hello"); show("native client -> upstream /hello (kept conn.)", kept)
guest = lat(main, "/f/fetch", "POST", {"x-fetch-url": f"{up}/hello"}); show("client -> fetch guest -> upstream /hello", guest)
noop = lat(main, "/f/config/none", want=(404,)); show("client -> fetch guest, no request", noop)
added = guest[0] - noop[0]
print(f"  the guest's request costs p50 {added:.0f} us; the native client's {native[0]:.0f} us "
      f"on a new connection: {added - native[0]:+.0f} us through Verge")
print(f"== call between functions ({n} sequential requests each)")
alone = lat(main, "/b/chain"); show("b alone", alone)
inproc = lat(main, "/a/chain"); show("a -> b in process", inproc)
loop = lat(main, "/la/chain"); show("a -> b through a loopback HTTP route", loop)
print(f"  a call adds p50 {inproc[0] - alone[0]:.0f} us in process (a's own run included), "
      f"{loop[0] - alone[0]:.0f} us through loopback HTTP")
PY
if command -v wrk >/dev/null; then
  echo "== the same with wrk, one connection, 5 s each (p50 latency, requests/s)"
  for p in /b/chain /a/chain /la/chain; do
    read -r rps p50 _ < <(wrk_run "$M$p" 5s 1)
    printf '  %-12s p50 %8s  %8s req/s\n' "$p" "$p50" "$rps"
  done
fi
