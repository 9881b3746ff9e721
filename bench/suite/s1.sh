#!/usr/bin/env bash
# Scenario S1 (one hop) per BENCH.md: Keel's example service `hello` against the physical
# limit (bare hyper; bare tonic for gRPC) and the peers nginx (HTTP) and Go (net/http; h2c from
# golang.org/x/net and grpc-go, both Debian packages), in the same run, alternating. --proto h1 (default, HTTP/1.1 keep-alive), h2c, or grpc (unary health check).
#
# Usage: bench/suite/s1.sh [--quick] [--proto h1|h2c|grpc] [--route echo|hello] [--rounds N]
#                          [--secs S] [--warmup S] [--sweep "8 32 128"] [--systems "hyper keel nginx go"]
#   --quick    1 round, 3 s windows, no warm-up (smoke mode; BENCH.md wants 5 s + 30 s)
#   default    3 rounds; open-loop points: 5 s warm-up + 30 s; saturation sweep: 2 s + 5 s per level
#
# Per round, every system is started fresh on its own free port, pinned to CPU 1 with one
# runtime thread (Keel: KEEL_RUNTIME__WORKER_THREADS=1; bare_hyper: 1 tokio worker; nginx:
# master_process off = one process; Go: GOMAXPROCS=1); keel-loadgen runs pinned to CPU 0. Systems take turns in
# a rotated order each round. For each system: a closed-loop sweep finds saturation (highest
# achieved rate with zero errors), then open-loop latency (timed from the scheduled send time)
# at 25/50/90 % of its own saturation; then, for every system, one open-loop point at the
# shared absolute rate = 50 % of the lowest saturation of that round. CPU per request is the
# server's utime+stime over each measured window (/proc/PID/stat, read by keel-loadgen), peak
# RSS is VmHWM, the load average is recorded with every point.
#
# Route (--route): `echo` (default, BENCH.md's S1) is `POST /echo` with a 1 KiB JSON body,
# answered with the same 1 KiB: Keel's example service and bare_hyper echo it; nginx cannot
# echo without a module, so it answers that request with the same 1 KiB from `return 200`
# (it reads and discards the body). `hello` is `GET /` → `hello from keel\n` everywhere.
#
# Output: bench/results/s1-<UTC timestamp>.{md,json,png} (report, results, chart).
# Needs: taskset, ss, python3 (matplotlib is pip-installed for the chart if missing);
# nginx is apt-installed if missing and skipped with a note if that fails.
set -euo pipefail
cd "$(dirname "$0")/../.."

orig_args="$*"
rounds=3; secs=30; warmup=5; sweep_secs=5; sweep_warmup=2; sweep="8 32 128"
systems=""; quick=0; open_conns=64; route=echo; proto=h1
while [ $# -gt 0 ]; do
    case $1 in
        --quick) quick=1; rounds=1; secs=3; warmup=0; sweep_secs=3; sweep_warmup=0 ;;
        --rounds) rounds=$2; shift ;;
        --secs) secs=$2; shift ;;
        --warmup) warmup=$2; shift ;;
        --sweep) sweep=$2; shift ;;
        --systems) systems=$2; shift ;;
        --route) route=$2; shift ;;
        --proto) proto=$2; shift ;;
        -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done

# The exact body keel-loadgen sends with --body-bytes 1024: {"pad":"xxx…"}, 1024 bytes.
echo_body="{\"pad\":\"$(printf 'x%.0s' $(seq 1014))\"}"
# The physical limit: bare hyper for HTTP, bare tonic for gRPC (nginx does not answer gRPC).
if [ "$proto" = grpc ]; then base=tonic; else base=hyper; fi
# nginx speaks h2c (HTTP/2 with prior knowledge) on a plain listener marked http2.
listen_opts=""; [ "$proto" = h2c ] && listen_opts=" http2"
if [ -z "$systems" ]; then
    case $proto in
        grpc) systems="tonic keel go" ;;
        *) systems="hyper keel nginx go" ;;
    esac
fi
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/keel-target}"
echo "building (release) …" >&2
cargo build --release -q -p keel-example-hello --bin hello
cargo build --release -q -p keel-server --example bare_hyper --example bare_tonic
cargo build --release -q -p keel-loadgen
bin="$CARGO_TARGET_DIR/release"
lg="$bin/keel-loadgen"

notes=()
if [[ " $systems " == *" go "* ]]; then
    if [ "$proto" = h1 ]; then gobuild=stdlib; gorole=echo; else gobuild=extra; gorole=$proto; fi
    if ! gopeer=$(bench/peers/go/build.sh "$gobuild"); then
        notes+=("Go skipped: Debian's Go packages could not be installed or the peer did not build.")
        systems=${systems//go/}
    fi
fi
if [[ " $systems " == *" nginx "* ]] && ! command -v nginx >/dev/null; then
    echo "nginx missing: trying apt-get install nginx-light / nginx" >&2
    apt-get update -q >/dev/null 2>&1 || true
    if ! { apt-get install -y -q nginx-light >/dev/null 2>&1 || apt-get install -y -q nginx >/dev/null 2>&1; } \
        || ! command -v nginx >/dev/null; then
        notes+=("nginx skipped: it could not be installed here.")
        systems=${systems//nginx/}
    fi
fi

ts=$(date -u +%Y-%m-%dT%H%M%SZ)
mkdir -p bench/results
out="bench/results/s1-$ts"
work=$(mktemp -d)
raw="$work/raw.jsonl"; : >"$raw"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
jfield() { python3 -c 'import json,sys; print(json.loads(sys.stdin.read())[sys.argv[1]])' "$1"; }

nginx_conf() { # port dir → config file
    local port=$1 dir=$2
    mkdir -p "$dir"
    cat >"$dir/nginx.conf" <<EOF
# One process (no master, no separate worker) so that /proc/PID/stat of the started PID is
# all of nginx's CPU; same bytes as bare_hyper's answer; no access log.
master_process off;
daemon off;
worker_processes 1;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_requests 10000000;
    keepalive_timeout 75s;
    client_body_temp_path $dir/body;
    proxy_temp_path $dir/proxy;
    fastcgi_temp_path $dir/fastcgi;
    uwsgi_temp_path $dir/uwsgi;
    scgi_temp_path $dir/scgi;
    server {
        listen 127.0.0.1:$port$listen_opts;
        location = / {
            default_type "text/plain; charset=utf-8";
            return 200 "hello from keel\n";
        }
        location = /echo {
            default_type "application/octet-stream";
            return 200 '$echo_body';
        }
    }
}
EOF
    echo "$dir/nginx.conf"
}

start() { # name port → pid
    local name=$1 port=$2
    case $name in
        keel) KEEL_SERVER__ADDR=127.0.0.1:$port KEEL_ADMIN__ADDR=127.0.0.1:$(free_port) \
              KEEL_RUNTIME__WORKER_THREADS=1 KEEL_LOG__LEVEL=warn \
              taskset -c 1 "$bin/hello" >"$work/keel-$port.log" 2>&1 & ;;
        hyper) taskset -c 1 "$bin/examples/bare_hyper" 127.0.0.1:"$port" >"$work/hyper-$port.log" 2>&1 & ;;
        tonic) taskset -c 1 "$bin/examples/bare_tonic" 127.0.0.1:"$port" >"$work/tonic-$port.log" 2>&1 & ;;
        go) GOMAXPROCS=1 taskset -c 1 "$gopeer" -role "$gorole" -listen 127.0.0.1:"$port" >"$work/go-$port.log" 2>&1 & ;;
        nginx) local conf; conf=$(nginx_conf "$port" "$work/nginx-$port")
               taskset -c 1 nginx -p "$work/nginx-$port" -c "$conf" >"$work/nginx-$port.log" 2>&1 & ;;
    esac
    echo $!
}

wait_ready() { # name pid port
    local name=$1 pid=$2 port=$3
    for _ in $(seq 200); do (echo >/dev/tcp/127.0.0.1/"$port") 2>/dev/null && break; sleep 0.05; done
    # Check that the process answering is the one we started.
    ss -ltnp "sport = :$port" | grep -q "pid=$pid," || { echo "$name: port $port not owned by $pid" >&2; exit 1; }
    # Over h2c and gRPC a server may speak only HTTP/2 (bare tonic; nginx's http2 listener):
    # the answers are then checked by the sweep's first point (any error shows there).
    [ "$proto" = h1 ] || return 0
    local body
    body=$(exec 3<>/dev/tcp/127.0.0.1/"$port"; printf 'GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n' >&3; cat <&3)
    [[ "$body" == *"hello from keel"* ]] || { echo "$name: unexpected answer to GET /: $body" >&2; exit 1; }
}

run_lg() { # round system point pid port args… → appends a tagged line to $raw, prints the JSON
    local r=$1 sys=$2 pt=$3 pid=$4 port=$5; shift 5
    local res
    res=$(taskset -c 0 "$lg" --url "http://127.0.0.1:$port$path" --server-pid "$pid" --json "${req_args[@]}" "$@")
    echo "{\"round\":$r,\"system\":\"$sys\",\"point\":\"$pt\",\"result\":$res}" >>"$raw"
    echo "$res"
}

case $route in
    echo) path=/echo; req_args=(--body-bytes 1024) ;;
    hello) path=/; req_args=() ;;
    *) echo "--route: echo or hello, not $route" >&2; exit 2 ;;
esac
case $proto in
    h1) ;;
    h2c) req_args+=(--h2c) ;;
    grpc) path=/; req_args=(--grpc-health) ;;
    *) echo "--proto: h1, h2c or grpc, not $proto" >&2; exit 2 ;;
esac
load_start=$(cut -d' ' -f1-3 /proc/loadavg)
echo "load average at start: $load_start; systems: $systems; rounds: $rounds" >&2
read -r -a sys_list <<<"$systems"
n=${#sys_list[@]}
declare -A port pid sat
for r in $(seq "$rounds"); do
    # Rotate the order each round: A B C, B C A, C A B, …
    order=()
    for i in $(seq 0 $((n - 1))); do order+=("${sys_list[$(((i + r - 1) % n))]}"); done
    for sys in "${order[@]}"; do
        port[$sys]=$(free_port); pid[$sys]=$(start "$sys" "${port[$sys]}"); pids+=("${pid[$sys]}")
        wait_ready "$sys" "${pid[$sys]}" "${port[$sys]}"
    done
    for sys in "${order[@]}"; do
        best=0
        for c in $sweep; do
            res=$(run_lg "$r" "$sys" "sweep-c$c" "${pid[$sys]}" "${port[$sys]}" \
                  --closed "$c" --warmup "${sweep_warmup}s" --duration "${sweep_secs}s")
            a=$(jfield achieved_rps <<<"$res"); e=$(jfield errors <<<"$res")
            printf 'round %s %-6s closed c=%-4s %10.0f req/s errors %s\n' "$r" "$sys" "$c" "$a" "$e" >&2
            if [ "$e" = 0 ]; then best=$(python3 -c "print(max($best, $a))"); fi
        done
        [ "$best" != 0 ] || { echo "$sys: every sweep level had errors" >&2; exit 1; }
        sat[$sys]=$best
        echo "{\"round\":$r,\"system\":\"$sys\",\"point\":\"saturation\",\"result\":{\"achieved_rps\":$best}}" >>"$raw"
        for pct in 25 50 90; do
            rate=$(python3 -c "print(round($best * $pct / 100, 1))")
            res=$(run_lg "$r" "$sys" "p$pct" "${pid[$sys]}" "${port[$sys]}" --rate "$rate" \
                  --connections "$open_conns" --warmup "${warmup}s" --duration "${secs}s")
            printf 'round %s %-6s open %s%% = %8.0f req/s: achieved %.0f, p99 %s µs, valid %s\n' "$r" "$sys" "$pct" \
                "$rate" "$(jfield achieved_rps <<<"$res")" "$(jfield p99_us <<<"$res")" "$(jfield valid <<<"$res")" >&2
        done
    done
    sats=$(IFS=,; echo "${sat[*]}")
    shared=$(python3 -c "print(round(min([$sats]) * 0.5, 1))")
    for sys in "${order[@]}"; do
        res=$(run_lg "$r" "$sys" "shared" "${pid[$sys]}" "${port[$sys]}" --rate "$shared" \
              --connections "$open_conns" --warmup "${warmup}s" --duration "${secs}s")
        printf 'round %s %-6s open shared = %8.0f req/s: achieved %.0f, p99 %s µs, valid %s\n' "$r" "$sys" "$shared" \
            "$(jfield achieved_rps <<<"$res")" "$(jfield p99_us <<<"$res")" "$(jfield valid <<<"$res")" >&2
    done
    for sys in "${order[@]}"; do
        hwm=$(awk '/VmHWM/ {print $2}' "/proc/${pid[$sys]}/status")
        echo "{\"round\":$r,\"system\":\"$sys\",\"point\":\"memory\",\"result\":{\"vmhwm_kib\":$hwm}}" >>"$raw"
        kill "${pid[$sys]}"; wait "${pid[$sys]}" 2>/dev/null || true
    done
    pids=()
    unset sat; declare -A sat
done
load_end=$(cut -d' ' -f1-3 /proc/loadavg)

python3 bench/suite/report.py --raw "$raw" --out "$out" --timestamp "$ts" \
    --load-start "$load_start" --load-end "$load_end" --rounds "$rounds" --secs "$secs" \
    --warmup "$warmup" --sweep "$sweep" --sweep-secs "$sweep_secs" --quick "$quick" \
    --command "bench/suite/s1.sh $orig_args" --notes "${notes[*]:-}" --route "$route" \
    --proto "$proto" --base "$base"
python3 -c 'import matplotlib' 2>/dev/null || pip install --quiet matplotlib >/dev/null 2>&1 || true
python3 bench/suite/chart.py "$out.json" "$out.png" || echo "chart failed (matplotlib missing?)" >&2
echo "$out.md"
