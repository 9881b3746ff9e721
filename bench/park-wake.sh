#!/usr/bin/env bash
# What waking a parked connection costs (`server.park_idle_after`), in instructions per request
# counted by callgrind: `hello` with the delay set short (10 ms) and with parking off, under a
# client whose 100 keep-alive connections each send a request every ~50 ms — so with parking
# on, every request wakes a parked connection. The difference per request is one park and
# one wake. (Deterministic, unlike wall-clock time on these machines.)
#
# Usage: bench/park-wake.sh [rounds=20]
# Needs: valgrind.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-20}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/keel-target}"
cargo build --release -q -p keel-example-hello --bin hello
bin="$CARGO_TARGET_DIR/release"
out=$(mktemp -d)
cat >"$out/client.py" <<'PY'
import socket, sys, time
port, rounds = int(sys.argv[1]), int(sys.argv[2])
conns = [socket.create_connection(("127.0.0.1", port)) for _ in range(100)]
n = 0
for _ in range(rounds):
    for c in conns:
        c.sendall(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        buf = b""
        while b"hello" not in buf:
            got = c.recv(4096)
            if not got:
                sys.exit("connection closed")
            buf += got
        n += 1
    time.sleep(0.05)
print(n)
PY
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
declare -A ipr
for park in 10ms 0s; do
    port=$(free_port)
    # Exported, not passed through `env`: valgrind does not follow an exec.
    export KEEL_SERVER__ADDR=127.0.0.1:$port KEEL_ADMIN__ADDR=127.0.0.1:0 \
           KEEL_RUNTIME__WORKER_THREADS=1 KEEL_LOG__LEVEL=warn KEEL_SERVER__PARK_IDLE_AFTER=$park
    valgrind --tool=callgrind --callgrind-out-file="$out/cg.$park" "$bin/hello" >"$out/$park.log" 2>&1 &
    pid=$!
    for _ in $(seq 200); do (echo >/dev/tcp/127.0.0.1/"$port") 2>/dev/null && break; sleep 0.1; done
    python3 "$out/client.py" "$port" 2 >/dev/null   # warm-up
    callgrind_control -z "$pid" >/dev/null 2>&1
    n=$(python3 "$out/client.py" "$port" "$rounds")
    callgrind_control -d "$pid" >/dev/null 2>&1
    sleep 1
    kill -9 $pid 2>/dev/null || true; wait $pid 2>/dev/null || true
    total=$(cat "$out"/cg.$park* | awk '/^totals:/ {s+=$2} END {print s+0}')
    ipr[$park]=$((total / n))
done
printf '| park_idle_after | instructions per request |\n|---|---|\n| 10ms (every request wakes its connection) | %d |\n| 0s (never parked) | %d |\n' "${ipr[10ms]}" "${ipr[0s]}"
echo "one park and wake: $((ipr[10ms] - ipr[0s])) instructions"
rm -rf "$out"
