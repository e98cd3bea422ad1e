#!/usr/bin/env bash
# What observability costs and how fast it answers:
#  1. C hello requests/s (wrk) on three nodes, interleaved RUNS times:
#     "off" (--no-metering: no records, hence no metrics and no spans),
#     "metrics" (the default: records, metrics from them), and
#     "metrics+traces" (--otlp-endpoint to a local OTLP sink, bench/otlp_sink.py),
#     and the same with --trace-sample 0.1;
#  2. the time of one scrape of /v1/metrics with FUNCTIONS functions deployed
#     and idle, then after each was called once (every one has series).
#  With BEFORE=path/to/verge (a build of the revision before them), a
#  fourth node, "before", runs that binary with metering on: the cost of
#  metrics and trace context together is "metrics" against it.
#   [BEFORE=...] bench/observe.sh [DURATION=10s] [CONNS=8] [FUNCTIONS=10000] [RUNS=3]
source "$(dirname "$0")/lib.sh"
duration=${1:-10s}; conns=${2:-8}; functions=${3:-10000}; runs=${4:-3}
command -v wrk >/dev/null || { echo "wrk missing: apt-get install -y wrk" >&2; exit 1; }
build
tmp=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; stop_node; rm -rf "$tmp"; }
trap cleanup EXIT
python3 bench/otlp_sink.py 18199 & pids+=($!)

declare -A port=([off]=18191 [metrics]=18192 [traces]=18193 [before]=18195 [sampled]=18196)
declare -A args=([off]="--no-metering" [metrics]="" [traces]="--otlp-endpoint http://127.0.0.1:18199" [before]=""
  [sampled]="--otlp-endpoint http://127.0.0.1:18199 --trace-sample 0.1")
modes="off metrics traces sampled"
[ -z "${BEFORE:-}" ] || modes="off before metrics traces sampled"
for mode in $modes; do
  bin=$VERGE
  [ "$mode" != before ] || bin=$BEFORE
  # shellcheck disable=SC2086
  VERGE=$bin start_node "$tmp/$mode" "${port[$mode]}" ${args[$mode]}
  pids+=("$NODE_PID")
  $bin --data-dir "$tmp/$mode" deploy target/guests/c-hello.wasm --name hello --route / >/dev/null
  wrk_run "http://127.0.0.1:${port[$mode]}/" 2s "$conns" >/dev/null  # warm-up
done
declare -A results
for run in $(seq "$runs"); do
  for mode in $modes; do
    read -r rps p50 p99 < <(wrk_run "http://127.0.0.1:${port[$mode]}/" "$duration" "$conns")
    results[$mode]+="$rps "
    echo "run $run $mode: $rps req/s, p50 $p50, p99 $p99" >&2
  done
done
median() { tr ' ' '\n' <<<"$1" | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
off=$(median "${results[off]}"); met=$(median "${results[metrics]}"); tra=$(median "${results[traces]}")
sam=$(median "${results[sampled]}")
bef=$(median "${results[before]:-0}")
dropped=$(curl -fs -H "Authorization: Bearer $(cat "$tmp/traces/admin.token")" http://127.0.0.1:18193/v1/metrics \
  | awk '/^verge_trace_spans_dropped_total/ {print $2}')
exported=$(curl -fs -H "Authorization: Bearer $(cat "$tmp/traces/admin.token")" http://127.0.0.1:18193/v1/metrics \
  | awk '/^verge_trace_spans_exported_total/ {print $2}')
echo "| C hello, wrk -c$conns -d$duration, median of $runs | req/s | vs off |"
echo "|---|---|---|"
awk -v o="$off" -v m="$met" -v t="$tra" -v b="$bef" -v s="$sam" 'BEGIN {
  printf "| off (--no-metering) | %.0f | 100%% |\n", o
  if (b > 0) printf "| before (metering, no metrics, no trace context) | %.0f | %.1f%% |\n", b, 100 * b / o
  printf "| metrics (default) | %.0f | %.1f%% |\n", m, 100 * m / o
  printf "| metrics + traces (OTLP) | %.0f | %.1f%% |\n", t, 100 * t / o
  printf "| metrics + traces, --trace-sample 0.1 | %.0f | %.1f%% |\n", s, 100 * s / o }'
echo "spans exported: $exported, dropped: $dropped"
for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
pids=()
python3 bench/otlp_sink.py 18199 & pids+=($!)

# 2. Scrape time with many functions.
d="$tmp/many"; mkdir -p "$d"
start_node "$d" 18194
token=$(cat "$d/admin.token")
for i in $(seq "$functions"); do
  curl -fs -o /dev/null -H "Authorization: Bearer $token" --data-binary @target/guests/c-hello.wasm \
    "http://127.0.0.1:18194/v1/functions/f$i/versions?route=/f$i"
done
scrape() {
  local times=()
  for _ in 1 2 3 4 5; do
    times+=("$(curl -fs -o "$d.metrics" -w '%{time_total}' -H "Authorization: Bearer $token" http://127.0.0.1:18194/v1/metrics)")
  done
  printf '%s\n' "${times[@]}" | sort -g | awk '{a[NR]=$1} END {printf "%.1f ms", a[3] * 1000}'
}
idle=$(scrape); idle_bytes=$(wc -c <"$d.metrics")
for i in $(seq "$functions"); do echo "url = \"http://127.0.0.1:18194/f$i\""; echo "output = /dev/null"; done >"$d.urls"
curl -fs --no-progress-meter --parallel --parallel-max 8 -K "$d.urls" 2>/dev/null
sleep 1
called=$(scrape); called_bytes=$(wc -c <"$d.metrics")
echo
echo "| /v1/metrics with $functions functions (median of 5) | scrape | size |"
echo "|---|---|---|"
echo "| deployed, idle since start | $idle | $(( idle_bytes / 1024 )) KiB |"
echo "| each called once | $called | $(( called_bytes / 1024 )) KiB |"
