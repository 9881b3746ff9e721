#!/usr/bin/env bash
# Instructions per call in the *client* process, counted by callgrind (deterministic, unlike
# wall-clock numbers on these shared machines): the Keel client (pool, balancer, breaker,
# retry budget, context propagation) against hyper-util's pooled client at its defaults, on
# the same bare hyper upstream (a separate process, not counted). Each system runs twice,
# with N calls and with none, after the same warm-up; (I(N) − I(0)) / N is per call.
#
# Usage: bench/client-instructions.sh [calls=20000] [concurrency=32]   Needs: valgrind.
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-20000}
conc=${2:-32}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/keel-target}"
cargo build --release -q -p keel-client --example bench_client
bin="$CARGO_TARGET_DIR/release/examples/bench_client"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
out=$(mktemp -d)
"$bin" upstream "127.0.0.1:$port" >"$out/up.log" &
up=$!
trap 'kill $up 2>/dev/null || true; rm -rf "$out"' EXIT
for _ in $(seq 100); do grep -q ready "$out/up.log" && break; sleep 0.1; done

instr() { # system calls
    valgrind --tool=callgrind --callgrind-out-file=/dev/null "$bin" count "$1" "127.0.0.1:$port" "$2" "$conc" 2>&1 >/dev/null |
        sed -n 's/.*Collected : \([0-9]*\).*/\1/p'
}
echo "| system | instructions per call |"
echo "|---|---|"
declare -A per
for sys in hyper keel; do
    full=$(instr "$sys" "$n")
    base=$(instr "$sys" 0)
    per[$sys]=$(( (full - base) / n ))
    echo "| $sys | ${per[$sys]} |"
done
echo
awk -v k="${per[keel]}" -v h="${per[hyper]}" 'BEGIN { printf "Keel/hyper: %.2f×\n", k / h }'
