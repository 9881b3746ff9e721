#!/usr/bin/env bash
# Quick S1 (one hop, HTTP/1.1 keep-alive, GET /) comparison: Keel's example service against
# bare hyper, bare hyper+axum and (when installed) nginx serving the same bytes. Server pinned to CPU 1 with one tokio
# worker, wrk pinned to CPU 0, systems alternated each round; prints per-round throughput,
# CPU time per request (utime+stime of the server over the window) and ratios to bare hyper.
#
# Usage: bench/server-s1.sh [rounds=3] [seconds=10] [connections=64]   (even rounds for an A/B)
#        KEEL_BASELINE_BIN=/path/to/older/hello bench/server-s1.sh …   adds that build as
#        `keel-base`, measured in the same run: a before/after of a change to the request path
#        (build the older commit's `hello` in a worktree with its own target directory).
# Needs: wrk (Debian package). Smoke-level: the full suite with open-loop latency is issue 8's.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}; secs=${2:-10}; conns=${3:-64}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/keel-target}"
cargo build --release -q -p keel-example-hello --bin hello
cargo build --release -q -p keel-server --example bare_hyper
bin="$CARGO_TARGET_DIR/release"
tck=$(getconf CLK_TCK)

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
cpu_ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }

start() { # name port → pid
    local name=$1 port=$2
    case $name in
        keel|keel-base)
              exe="$bin/hello"; [ "$name" = keel-base ] && exe=$KEEL_BASELINE_BIN
              KEEL_SERVER__ADDR=127.0.0.1:$port KEEL_ADMIN__ADDR=127.0.0.1:$(free_port) \
              KEEL_RUNTIME__WORKER_THREADS=1 KEEL_LOG__LEVEL=warn \
              taskset -c 1 "$exe" >/dev/null 2>&1 & ;;
        hyper) taskset -c 1 "$bin/examples/bare_hyper" 127.0.0.1:$port >/dev/null 2>&1 & ;;
        axum) taskset -c 1 "$bin/examples/bare_hyper" 127.0.0.1:$port --axum >/dev/null 2>&1 & ;;
        nginx) # One worker, no master process (the PID measured is the one serving), same bytes.
              conf=$(mktemp -d)/nginx.conf
              printf '%s\n' "worker_processes 1; master_process off; daemon off; pid ${conf%.conf}.pid; error_log stderr error;" \
                  'events { worker_connections 4096; }' \
                  "http { access_log off; server { listen 127.0.0.1:$port; location / { default_type \"text/plain; charset=utf-8\"; return 200 \"hello from keel\\n\"; } } }" >"$conf"
              taskset -c 1 nginx -c "$conf" -p "$(dirname "$conf")" >/dev/null 2>&1 & ;;
    esac
    echo $!
}

systems="hyper axum keel"
[ -n "${KEEL_BASELINE_BIN:-}" ] && systems="$systems keel-base"
command -v nginx >/dev/null 2>&1 && systems="$systems nginx"
# Odd rounds run the systems in this order, even rounds in reverse: where a system runs in a
# round moves its figures by a few per cent (an A/A run with the same binary as `keel` and
# `keel-base`, one after the other in every round, measured the second 1-6 % cheaper per
# request), so an A/B wants an even number of rounds.
reversed=$(echo "$systems" | tr ' ' '\n' | tac | tr '\n' ' ')
declare -A rps cpu
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
printf '%-6s %-6s %12s %14s\n' round system req/s cpu_us/req
for r in $(seq "$rounds"); do
    order=$systems
    [ $((r % 2)) -eq 0 ] && order=$reversed
    for sys in $order; do
        port=$(free_port); pid=$(start $sys "$port")
        for _ in $(seq 100); do (echo >/dev/tcp/127.0.0.1/"$port") 2>/dev/null && break; sleep 0.05; done
        # Check that the process answering is the one we started.
        ss -ltnp "sport = :$port" | grep -q "pid=$pid," || { echo "port $port not owned by $pid"; kill $pid; exit 1; }
        taskset -c 0 wrk -t1 -c"$conns" -d2s "http://127.0.0.1:$port/" >/dev/null  # warm-up
        t0=$(cpu_ticks $pid)
        out=$(taskset -c 0 wrk -t1 -c"$conns" -d"${secs}s" "http://127.0.0.1:$port/")
        t1=$(cpu_ticks $pid)
        kill $pid; wait $pid 2>/dev/null || true
        reqs=$(echo "$out" | awk '/requests in/ {print $1}')
        errs=$(echo "$out" | awk '/Non-2xx|Socket errors/ {print}')
        [ -z "$errs" ] || { echo "$sys: errors: $errs"; exit 1; }
        r_s=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
        c_us=$(python3 -c "print(round(($t1-$t0)/$tck*1e6/$reqs, 2))")
        rps[$r,$sys]=$r_s; cpu[$r,$sys]=$c_us
        printf '%-6s %-6s %12s %14s\n' "$r" "$sys" "$r_s" "$c_us"
    done
done
python3 - "$rounds" <<PY
import statistics, sys
rounds = int(sys.argv[1])
rps = {$(for r in $(seq "$rounds"); do for s in $systems; do printf '(%s,"%s"):%s,' $r $s "${rps[$r,$s]}"; done; done)}
cpu = {$(for r in $(seq "$rounds"); do for s in $systems; do printf '(%s,"%s"):%s,' $r $s "${cpu[$r,$s]}"; done; done)}
systems = "$systems".split()
print()
print("| system | throughput / bare hyper (median of rounds) | CPU per request / bare hyper |")
print("|---|---|---|")
for s in systems[1:]:
    t = statistics.median(rps[(r, s)] / rps[(r, "hyper")] for r in range(1, rounds + 1))
    c = statistics.median(cpu[(r, s)] / cpu[(r, "hyper")] for r in range(1, rounds + 1))
    print(f"| {s} | {t:.3f} | {c:.3f} |")
PY
