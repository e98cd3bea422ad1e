#!/usr/bin/env bash
# Compares the in-process cost of a request between two revisions.
#
# Builds the `instantiate` bench of each revision (git worktrees sharing this
# checkout's target directory, so only Verge's crates rebuild) and runs the
# two binaries in turn, N times each, on one core. For each revision it prints
# the median over the runs of Verge's instantiate+handle p50 and of Verge minus
# wasmtime + wasmtime-wasi-http measured in the same loop (the bench's floor
# table): the difference is what Verge adds, and it moves far less with this
# machine's drift than either figure alone.
#
# Usage: bench/instantiate-ab.sh REV_A REV_B [N=5] [GUEST=c-hello]
# Needs the guest fixtures: cargo xtask guests
set -euo pipefail

a=${1:?usage: bench/instantiate-ab.sh REV_A REV_B [N] [GUEST]}
b=${2:?usage: bench/instantiate-ab.sh REV_A REV_B [N] [GUEST]}
n=${3:-5}
guest=${4:-c-hello}

root=$(git rev-parse --show-toplevel)
target=${CARGO_TARGET_DIR:-$root/target}
guests=${VERGE_GUESTS_DIR:-$root/target/guests}
[ -f "$guests/$guest.wasm" ] || { echo "no $guests/$guest.wasm: run cargo xtask guests" >&2; exit 1; }

work=$(mktemp -d)
cleanup() {
    for rev in a b; do git -C "$root" worktree remove --force "$work/$rev" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

build() { # rev name -> path of the bench binary
    git -C "$root" worktree add --detach --quiet "$work/$2" "$1"
    (cd "$work/$2" && CARGO_TARGET_DIR="$target" cargo bench -p verge-host --bench instantiate \
        --no-run --message-format=json 2>/dev/null) |
        python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "instantiate" and m.get("executable"):
        print(m["executable"])' | tail -1
}

echo "building $a and $b (shared target dir: $target)..." >&2
bin_a=$(build "$a" a); cp "$bin_a" "$work/bench-a"
bin_b=$(build "$b" b); cp "$bin_b" "$work/bench-b"

cache="$work/cache"; mkdir -p "$cache/a" "$cache/b"
for i in $(seq "$n"); do
    for rev in a b; do
        line=$(VERGE_GUESTS_DIR="$guests" VERGE_BENCH_ONLY="$guest" VERGE_BENCH_CACHE="$cache/$rev" \
            taskset -c 1 "$work/bench-$rev" --bench | tail -1)
        echo "$rev $line"
    done
done | python3 -c '
import statistics, sys
names = {"a": sys.argv[1], "b": sys.argv[2]}
runs = {"a": [], "b": []}
for line in sys.stdin:
    rev, rest = line.split(" ", 1)
    cols = [c.strip() for c in rest.split("|")]
    floor, verge = float(cols[4].split()[0]), float(cols[6].split()[0])
    runs[rev].append((verge, verge - floor))
print("| revision | Verge instantiate+handle p50 (median of runs) | Verge minus wasmtime-wasi-http (median) | per run |")
print("|---|---|---|---|")
for rev, xs in runs.items():
    print("| %s | %.1f µs | %.1f µs | %s |" % (names[rev], statistics.median(x[0] for x in xs),
          statistics.median(x[1] for x in xs), ", ".join("%.1f" % x[1] for x in xs)))
' "$a" "$b"
