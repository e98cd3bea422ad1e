#!/usr/bin/env bash
# Loaded code of distinct components, then dropped by the unloader: N
# distinct copies of the C hello (each with a custom section of its own, so
# each is compiled and loaded apart) are deployed and called once each; RSS
# then, after --unload-after has passed, and the latency of the first
# request to an unloaded function.
#   bench/unload.sh [N=1000] [UNLOAD_AFTER=5s]
source "$(dirname "$0")/lib.sh"
n=${1:-1000}; after=${2:-5s}
build
tmp=$(mktemp -d); trap 'stop_node; rm -rf "$tmp"' EXIT
python3 - "$tmp" "$n" <<'PY'
import sys
tmp, n = sys.argv[1], int(sys.argv[2])
base = open("target/guests/c-hello.wasm", "rb").read()
def leb(v):
    out = bytearray()
    while True:
        b = v & 0x7f; v >>= 7
        out.append(b | (0x80 if v else 0))
        if not v: return bytes(out)
for i in range(n):
    name = b"verge-bench"
    payload = leb(len(name)) + name + str(i).encode()
    open(f"{tmp}/v{i}.wasm", "wb").write(base + b"\x00" + leb(len(payload)) + payload)
PY
d="$tmp/node"; mkdir -p "$d"
start_node "$d" 18130 --unload-after "$after"
token=$(cat "$d/admin.token")
t0=$(date +%s%N)
for i in $(seq 0 $((n - 1))); do
  curl -fs -o /dev/null -H "Authorization: Bearer $token" --data-binary @"$tmp/v$i.wasm" \
    "http://127.0.0.1:18130/v1/functions/f$i/versions?route=/f$i"
done
t1=$(date +%s%N)
for i in $(seq 0 $((n - 1))); do echo "url = \"http://127.0.0.1:18130/f$i\""; echo "output = /dev/null"; done >"$d.urls"
curl -fs --no-progress-meter --parallel --parallel-max 8 -K "$d.urls" 2>/dev/null
loaded=$(curl -fs http://127.0.0.1:18130/v1/health | python3 -c 'import json,sys; print(json.load(sys.stdin)["versions_loaded"])')
rss_called=$(rss_kib "$NODE_PID")
for _ in $(seq 600); do
  left=$(curl -fs http://127.0.0.1:18130/v1/health | python3 -c 'import json,sys; print(json.load(sys.stdin)["versions_loaded"])')
  [ "$left" = 0 ] && break; sleep 0.5
done
sleep 1
rss_unloaded=$(rss_kib "$NODE_PID")
first=$(curl -fs -o /dev/null -w '%{time_total}' "http://127.0.0.1:18130/f$((n / 2))")
second=$(curl -fs -o /dev/null -w '%{time_total}' "http://127.0.0.1:18130/f$((n / 2))")
echo "| distinct functions | deploy all | loaded after one call each | RSS then | RSS after --unload-after $after | first request after unloading | the next |"
echo "|---|---|---|---|---|---|---|"
awk -v n="$n" -v dep="$(( (t1 - t0) / 1000000 ))" -v l="$loaded" -v a="$rss_called" -v b="$rss_unloaded" -v f="$first" -v s="$second" \
  'BEGIN { printf "| %d | %d ms | %d | %.1f MiB | %.1f MiB | %.2f ms | %.2f ms |\n", n, dep, l, a / 1024, b / 1024, f * 1000, s * 1000 }'
