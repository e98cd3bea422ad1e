#!/usr/bin/env bash
# The memory a node keeps after compiling a large component: RSS of a
# fresh node, after deploying the JavaScript hello (baseline code), and
# once its optimized code is in place.
#
#   bench/compile-rss.sh [FIXTURE=js-hello]
#
# Needs the fixtures (cargo xtask guests js). Port 18080.
source "$(dirname "$0")/lib.sh"
fixture=${1:-js-hello}
[ -f "target/guests/$fixture.wasm" ] || cargo xtask guests js
build
work=$(mktemp -d)
trap 'stop_node; rm -rf "$work"' EXIT
start_node "$work/node" 18080
echo "| $fixture | RSS |"
echo "|---|---|"
echo "| fresh node | $(( $(rss_kib "$NODE_PID") / 1024 )) MiB |"
$VERGE --data-dir "$work/node" deploy "target/guests/$fixture.wasm" --name f --route /f >/dev/null
echo "| after the deploy (baseline code) | $(( $(rss_kib "$NODE_PID") / 1024 )) MiB |"
settle "$work/node" 18080 f
echo "| after optimized code is in place | $(( $(rss_kib "$NODE_PID") / 1024 )) MiB |"
