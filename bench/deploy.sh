#!/usr/bin/env bash
# Deploy-to-first-200 of the C, Rust, JS and Python hello, and requests/s of
# the JS and Python hello on baseline versus optimized code.
#
#   bench/deploy.sh [N=20] [LANGS="c rust js python"]
#
# Each deploy sends distinct bytes (a custom section varies), so every one
# compiles; the time runs from before the API call until the route answers
# 200 with the new version (its verge-version header). Before each deploy the
# script waits until the node has no background optimization running, so every
# deploy meets an idle node. The node's first deploy of a language is also
# printed on its own: shared libraries (CPython's modules) compile there once
# and every later Python deploy links them. Needs wrk (apt-get install -y wrk) and the
# fixtures (cargo xtask guests).
source "$(dirname "$0")/lib.sh"
n=${1:-20}
langs=${2:-c rust js python}
command -v wrk >/dev/null || { echo "wrk missing: apt-get install -y wrk" >&2; exit 1; }
for l in $langs; do [ -f "target/guests/$l-hello.wasm" ] || cargo xtask guests "$l"; done
cargo build --release -q -p verge
work=$(mktemp -d)
NODE_PID=
trap 'stop_node; rm -rf "$work"' EXIT
port=18095
url=http://127.0.0.1:$port

stats() { sort -n | awk '{a[NR]=$1} END {printf "p50 %.0f ms, p99 %.0f ms, min %.0f ms, max %.0f ms (n=%d)", a[int((NR+1)/2)], a[int(NR*0.99+0.999)], a[1], a[NR], NR}'; }
health() { curl -fs "$url/v1/health"; }
# Waits until every component that started on baseline code is optimized.
idle() {
  for _ in $(seq 1200); do
    local h; h=$(health)
    local b o; b=$(grep -o '"baseline":[0-9]*' <<<"$h" | cut -d: -f2); o=$(grep -o '"optimized":[0-9]*' <<<"$h" | cut -d: -f2)
    [ "$b" = "$o" ] && return; sleep 0.1
  done
  echo "background optimization never finished" >&2; exit 1
}
variant() { # variant SRC DST I
  python3 - "$1" "$2" "$3" <<'PY'
import sys
src, dst, i = sys.argv[1], sys.argv[2], sys.argv[3]
b = open(src, "rb").read()
name = b"verge-bench"
payload = bytes([len(name)]) + name + i.encode()
open(dst, "wb").write(b + bytes([0]) + bytes([len(payload)]) + payload)
PY
}

start_node "$work/node" $port
token=$(cat "$work/node/admin.token")
for lang in $langs; do
  : >"$work/$lang.ms"; : >"$work/$lang.opt"
  for i in $(seq "$n"); do
    variant "target/guests/$lang-hello.wasm" "$work/g.wasm" "$i"
    idle
    t0=$(date +%s%N)
    resp=$(curl -fs -H "Authorization: Bearer $token" --data-binary @"$work/g.wasm" \
      "$url/v1/functions/$lang/versions?route=/$lang")
    version=$(grep -o '"version":[0-9]*' <<<"$resp" | head -1 | cut -d: -f2)
    until curl -fs -D - -o /dev/null "$url/$lang" | tr -d '\r' | grep -qi "^verge-version: $version$"; do :; done
    t1=$(date +%s%N)
    awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f\n", (b - a) / 1e6 }' >>"$work/$lang.ms"
    tier=$(grep -o '"tier":"[a-z]*"' <<<"$resp" | cut -d'"' -f4)
    if [ "$tier" = baseline ]; then
      idle; t2=$(date +%s%N)
      awk -v a="$t0" -v b="$t2" 'BEGIN { printf "%.1f\n", (b - a) / 1e6 }' >>"$work/$lang.opt"
    fi
  done
  echo "deploy to first 200, $lang hello ($tier code first): $(stats <"$work/$lang.ms"); the node's first: $(head -1 "$work/$lang.ms") ms"
  if [ -s "$work/$lang.opt" ]; then
    echo "  deploy to optimized code in place, $lang hello: $(stats <"$work/$lang.opt"); the node's first: $(head -1 "$work/$lang.opt") ms"
  fi
done
stop_node

# Requests/s on each kind of code: one node per kind.
for code in baseline optimized; do
  for lang in js python; do
    case " $langs " in *" $lang "*) ;; *) continue ;; esac
    rm -rf "$work/$code"; start_node "$work/$code" $port --code "$code"
    $VERGE --data-dir "$work/$code" deploy "target/guests/$lang-hello.wasm" --name h --route / >/dev/null
    curl -fs "$url/" >/dev/null
    wrk -t2 -c32 -d3s "$url/" >/dev/null
    read -r rps p50 p99 < <(wrk_run "$url/" 10s 32)
    echo "$lang hello on $code code: $rps req/s, p50 $p50, p99 $p99"
    stop_node
  done
done
