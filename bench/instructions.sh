#!/usr/bin/env bash
# Instructions per request, counted by valgrind's callgrind: deterministic where wall-clock
# numbers on these shared machines swing ±30 %. Each system serves the same GET / over
# HTTP/1.1 keep-alive (h2load --h1, 4 connections); counters are zeroed after a warm-up, then
# N requests are counted. Prints user-space instructions per request and the ratio to bare
# hyper. (BENCH.md: the CI regression gate counts instructions, not seconds.)
#
# Usage: bench/instructions.sh [requests=5000]
# Needs: valgrind, h2load (Debian nghttp2-client).
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-5000}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/keel-target}"
cargo build --release -q -p keel-example-hello --bin hello
cargo build --release -q -p keel-server --example bare_hyper
bin="$CARGO_TARGET_DIR/release"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
out=$(mktemp -d)
declare -A ipr
for sys in hyper axum keel; do
    port=$(free_port)
    case $sys in
        hyper) cmd=("$bin/examples/bare_hyper" "127.0.0.1:$port") ;;
        axum) cmd=("$bin/examples/bare_hyper" "127.0.0.1:$port" --axum) ;;
        keel) cmd=("$bin/hello")
              # Exported, not passed through `env`: valgrind does not follow an exec.
              export KEEL_SERVER__ADDR=127.0.0.1:$port KEEL_ADMIN__ADDR=127.0.0.1:$(free_port) \
                     KEEL_RUNTIME__WORKER_THREADS=1 KEEL_LOG__LEVEL=warn ;;
    esac
    valgrind --tool=callgrind --callgrind-out-file="$out/cg.$sys" "${cmd[@]}" >"$out/$sys.log" 2>&1 &
    pid=$!
    for _ in $(seq 200); do (echo >/dev/tcp/127.0.0.1/"$port") 2>/dev/null && break; sleep 0.1; done
    h2load --h1 -n 500 -c 4 "http://127.0.0.1:$port/" >/dev/null
    callgrind_control -z "$pid" >/dev/null 2>&1
    res=$(h2load --h1 -n "$n" -c 4 "http://127.0.0.1:$port/")
    echo "$res" | grep -q "$n succeeded" || { echo "$sys: not all requests succeeded"; echo "$res"; kill -9 $pid; exit 1; }
    callgrind_control -d "$pid" >/dev/null 2>&1
    sleep 1
    kill -9 $pid 2>/dev/null || true; wait $pid 2>/dev/null || true
    total=$(cat "$out"/cg.$sys* 2>/dev/null | awk '/^totals:/ {s+=$2} END {print s+0}')
    ipr[$sys]=$((total / n))
done
printf '| system | instructions per request | ratio to bare hyper |\n|---|---|---|\n'
for sys in hyper axum keel; do
    printf '| %s | %d | %s |\n' "$sys" "${ipr[$sys]}" "$(python3 -c "print(f'{${ipr[$sys]}/${ipr[hyper]}:.2f}')")"
done
rm -rf "$out"
