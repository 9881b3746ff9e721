#!/usr/bin/env bash
# The overload scenario set (BENCH.md "Overload"): async, CPU-bound, a gateway before an
# upstream that slows tenfold, a three-hop chain on one core — each at 25/50/80 % of its
# saturation and at 3× it, shedding on and off in the same run, plus the gateway's slow-phase
# run. Writes bench/results/overload-TS.{md,json,png}. See bench/overload/src/main.rs.
#
# Usage: bench/overload.sh [seconds per point=5] [scenario…]
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/keel-target}"
cargo build --release -q -p keel-bench-overload
mkdir -p bench/results
ts="$(date -u +%Y%m%dT%H%M%SZ)"
out="bench/results/overload-$ts"
secs="${1:-5}"
shift || true
{
    echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo
    KEEL_OVERLOAD_JSON="$out.json" "$CARGO_TARGET_DIR/release/keel-overload" "$secs" "$@"
    echo
    echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
} | tee "$out.md"
python3 bench/overload-chart.py "$out.json" "$out.png" && echo "chart: $out.png"
