#!/usr/bin/env bash
# Overload scenario (BENCH.md, issue 7): 3× capacity offered open-loop, shedding on then off
# in the same run; admitted p50/p99 against the unloaded p99, rejection latency, goodput.
# See crates/keel-server/examples/overload_bench.rs for the set-up.
#
# Usage: bench/overload.sh [seconds=10]
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/keel-target}"
cargo build --release -q -p keel-server --example overload_bench
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
"$CARGO_TARGET_DIR/release/examples/overload_bench" "${1:-10}"
echo
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
