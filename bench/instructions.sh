#!/usr/bin/env bash
# Instructions per request, counted by valgrind's callgrind: deterministic where wall-clock
# numbers on these shared machines swing ±30 %. Each system serves the same GET / over
# HTTP/1.1 keep-alive (keel-loadgen, closed loop, 4 connections by default); counters are zeroed after a
# warm-up, then the requests answered in a fixed window are counted. Prints user-space
# instructions per request and the ratio to bare hyper. (BENCH.md: the CI regression gate
# counts instructions, not seconds.)
#
# Usage: bench/instructions.sh [seconds=5] [connections=4] [--grpc]
#   With one connection every request is served in its own wake-up, so the count does not
#   depend on how many requests the scheduler happened to batch per wake (with 4, runs on a
#   loaded machine spread ±1.5 %; with 1, ±0.3 %): the CI gate uses 1.
#   --grpc: a unary gRPC health check over h2c instead (keel-loadgen --grpc-health), bare tonic
#   as the baseline (rows `tonic` and `keel`).
# Needs: valgrind.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-5}
conns=${2:-4}
grpc=${3:-}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/keel-target}"
cargo build --release -q -p keel-example-hello --bin hello
cargo build --release -q -p keel-server --example bare_hyper
[ "$grpc" = --grpc ] && cargo build --release -q -p keel-server --example bare_tonic
cargo build --release -q -p keel-loadgen
bin="$CARGO_TARGET_DIR/release"
lg_args=(); systems="hyper axum keel"; base=hyper
if [ "$grpc" = --grpc ]; then lg_args=(--grpc-health); systems="tonic keel"; base=tonic; fi
lg() { "$bin/keel-loadgen" --url "http://127.0.0.1:$1/" "${lg_args[@]}" --closed "$conns" --warmup 0s --json --duration "$2"; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
out=$(mktemp -d)
declare -A ipr
for sys in $systems; do
    port=$(free_port)
    case $sys in
        hyper) cmd=("$bin/examples/bare_hyper" "127.0.0.1:$port") ;;
        axum) cmd=("$bin/examples/bare_hyper" "127.0.0.1:$port" --axum) ;;
        tonic) cmd=("$bin/examples/bare_tonic" "127.0.0.1:$port") ;;
        keel) cmd=("$bin/hello")
              # Exported, not passed through `env`: valgrind does not follow an exec.
              export KEEL_SERVER__ADDR=127.0.0.1:$port KEEL_ADMIN__ADDR=127.0.0.1:$(free_port) \
                     KEEL_RUNTIME__WORKER_THREADS=1 KEEL_LOG__LEVEL=warn ;;
    esac
    valgrind --tool=callgrind --callgrind-out-file="$out/cg.$sys" "${cmd[@]}" >"$out/$sys.log" 2>&1 &
    pid=$!
    for _ in $(seq 200); do (echo >/dev/tcp/127.0.0.1/"$port") 2>/dev/null && break; sleep 0.1; done
    lg "$port" 2s >/dev/null   # warm-up
    callgrind_control -z "$pid" >/dev/null 2>&1
    res=$(lg "$port" "${secs}s")
    callgrind_control -d "$pid" >/dev/null 2>&1
    n=$(python3 -c 'import json,sys; r=json.loads(sys.argv[1]); print(r["ok"] if r["errors"] == 0 else 0)' "$res")
    [ "$n" -gt 0 ] || { echo "$sys: errors or no answers: $res"; kill -9 $pid; exit 1; }
    sleep 1
    kill -9 $pid 2>/dev/null || true; wait $pid 2>/dev/null || true
    total=$(cat "$out"/cg.$sys* 2>/dev/null | awk '/^totals:/ {s+=$2} END {print s+0}')
    ipr[$sys]=$((total / n))
done
printf '| system | instructions per request | ratio to bare %s |\n|---|---|---|\n' "$base"
for sys in $systems; do
    printf '| %s | %d | %s |\n' "$sys" "${ipr[$sys]}" "$(python3 -c "print(f'{${ipr[$sys]}/${ipr[$base]}:.2f}')")"
done
rm -rf "$out"
