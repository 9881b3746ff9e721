#!/usr/bin/env bash
# Where a request's instructions go, per function, and what a change moved: callgrind on a
# server under a closed loop of one keep-alive connection (every request in its own wake-up,
# so counts repeat to about ±0.5 %), counters zeroed after a warm-up, each function's self
# cost divided by the requests answered. With a second binary, both are profiled in the same
# run and the functions that moved most are listed side by side.
#
# Usage: bench/profile.sh [--grpc] [--top N] SERVER [OTHER]
#   SERVER, OTHER  `hello` (this tree's examples/hello), `hyper`, `axum`, `tonic` (the bare
#                  baselines), or a path to a hello binary (an older build: make it in a git
#                  worktree with its own CARGO_TARGET_DIR, see BENCH.md's A/B note).
#   --grpc         a unary gRPC health check over h2c instead of GET / over HTTP/1.1.
#   --top N        rows to print (default 40).
# Prints instructions per request, then the top self costs (one server) or the largest
# differences (two servers). Callgrind outputs are kept under $PROFILE_DIR (default a temp
# directory, printed) for callgrind_annotate --tree=caller / --inclusive=yes.
# Needs: valgrind.
set -euo pipefail
cd "$(dirname "$0")/.."
grpc=""; top=40; servers=()
while [ $# -gt 0 ]; do
    case $1 in
        --grpc) grpc=1 ;;
        --top) top=$2; shift ;;
        *) servers+=("$1") ;;
    esac
    shift
done
[ ${#servers[@]} -ge 1 ] && [ ${#servers[@]} -le 2 ] || { sed -n 2,17p "$0"; exit 2; }
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/keel-target}"
cargo build --release -q -p keel-example-hello --bin hello
cargo build --release -q -p keel-server --example bare_hyper --example bare_tonic
cargo build --release -q -p keel-loadgen
bin="$CARGO_TARGET_DIR/release"
out=${PROFILE_DIR:-$(mktemp -d)}
mkdir -p "$out"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
lg_args=(); [ -n "$grpc" ] && lg_args=(--grpc-health)
lg() { "$bin/keel-loadgen" --url "http://127.0.0.1:$1/" "${lg_args[@]}" --closed 1 --warmup 0s --json --duration "$2"; }

profile() { # index name → writes $out/self.<index>.txt and $out/n.<index>
    local i=$1 name=$2 port cmd=()
    port=$(free_port)
    case $name in
        hyper) cmd=("$bin/examples/bare_hyper" "127.0.0.1:$port") ;;
        axum) cmd=("$bin/examples/bare_hyper" "127.0.0.1:$port" --axum) ;;
        tonic) cmd=("$bin/examples/bare_tonic" "127.0.0.1:$port") ;;
        hello) cmd=("$bin/hello") ;;
        *) [ -x "$name" ] || { echo "no such server or binary: $name" >&2; exit 2; }
           cmd=("$name") ;;
    esac
    # Exported, not passed through `env`: valgrind does not follow an exec.
    export KEEL_SERVER__ADDR=127.0.0.1:$port KEEL_ADMIN__ADDR=127.0.0.1:$(free_port) \
           KEEL_RUNTIME__WORKER_THREADS=1 KEEL_LOG__LEVEL=warn
    valgrind --tool=callgrind --dump-instr=no --compress-strings=no \
        --callgrind-out-file="$out/cg.$i" "${cmd[@]}" >"$out/server.$i.log" 2>&1 &
    local pid=$!
    for _ in $(seq 200); do (echo >/dev/tcp/127.0.0.1/"$port") 2>/dev/null && break; sleep 0.1; done
    lg "$port" 2s >/dev/null
    callgrind_control -z "$pid" >/dev/null 2>&1
    local res
    res=$(lg "$port" 3s)
    callgrind_control -d "$pid" >/dev/null 2>&1
    sleep 1
    kill -9 "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true
    python3 -c 'import json,sys; r=json.loads(sys.argv[1]); sys.exit(f"{sys.argv[2]}: errors: {r}") if r["errors"] else print(r["ok"])' \
        "$res" "$name" >"$out/n.$i"
    # The dump holds the measured window; the file without a suffix is the exit's leftover.
    local dump
    dump=$(ls -t "$out"/cg."$i".* 2>/dev/null | head -1)
    callgrind_annotate --threshold=100 --auto=no "${dump:-$out/cg.$i}" >"$out/self.$i.txt" 2>/dev/null
}

for i in "${!servers[@]}"; do profile "$i" "${servers[$i]}"; done
echo "callgrind outputs: $out"
python3 - "$out" "$top" "${servers[@]}" <<'PY'
import re, sys
out, top, names = sys.argv[1], int(sys.argv[2]), sys.argv[3:]

def load(i):
    n = int(open(f"{out}/n.{i}").read())
    costs, total = {}, 0
    for line in open(f"{out}/self.{i}.txt"):
        m = re.match(r"\s*([\d,]+) \(\s*[\d.]+%\)\s+(.*)", line)
        if not m:
            continue
        v = int(m.group(1).replace(",", ""))
        name = re.sub(r"\s*\[/.*?\]", "", m.group(2)).strip()
        if name == "PROGRAM TOTALS":
            total = v
        elif v < total / 2:
            # Rows at or near the program total are the thread's entry frames, which
            # callgrind_annotate charges with everything below them through tokio's recursive
            # polls (`Harness::poll'2` and the like); no function's own cost comes close.
            costs[name] = costs.get(name, 0) + v
    return n, total, costs

runs = [load(i) for i in range(len(names))]
for name, (n, total, _) in zip(names, runs):
    print(f"{name}: {n} requests, {total // n} instructions per request")
if len(runs) == 1:
    n, _, costs = runs[0]
    print(f"\n| self instructions per request | function |\n|---:|---|")
    for f, v in sorted(costs.items(), key=lambda kv: -kv[1])[:top]:
        print(f"| {v / n:.0f} | `{f[:120]}` |")
else:
    (na, _, a), (nb, _, b) = runs
    diff = {f: b.get(f, 0) / nb - a.get(f, 0) / na for f in set(a) | set(b)}
    print(f"\n| {names[1]} − {names[0]} | {names[0]} | {names[1]} | function (self instructions per request) |")
    print("|---:|---:|---:|---|")
    for f, d in sorted(diff.items(), key=lambda kv: -abs(kv[1]))[:top]:
        print(f"| {d:+.0f} | {a.get(f, 0) / na:.0f} | {b.get(f, 0) / nb:.0f} | `{f[:110]}` |")
PY
