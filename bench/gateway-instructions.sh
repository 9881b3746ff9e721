#!/usr/bin/env bash
# Instructions and allocations per proxied request through the shop's gateway, counted by
# valgrind's callgrind (deterministic, where wall-clock numbers on shared machines swing):
# `GET /api/users/x` with the demo key, the gateway binary (one worker) in front of a bare
# hyper upstream, keel-loadgen closed loop with 4 connections; counters zeroed after a 2 s
# warm-up, then the requests answered in a fixed window are counted. This is how the issue
# notes measure the gateway's cost (BENCH.md S3 compares it with nginx and haproxy on the
# clock).
#
# Usage: bench/gateway-instructions.sh [seconds=3]
# Needs: valgrind.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-3}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/keel-target}"
cargo build --release -q -p keel-shop --bin gateway
cargo build --release -q -p keel-server --example bare_hyper
cargo build --release -q -p keel-loadgen
bin="$CARGO_TARGET_DIR/release"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
out=$(mktemp -d)
up=$(free_port); gw=$(free_port)
"$bin/examples/bare_hyper" "127.0.0.1:$up" >"$out/upstream.log" 2>&1 &
upstream=$!
cfg="$out/gateway.toml"
printf '[server]\naddr = "127.0.0.1:%s"\n\n[admin]\naddr = "127.0.0.1:%s"\n\n[runtime]\nworker_threads = 1\n\n[log]\nlevel = "warn"\n\n' \
    "$gw" "$(free_port)" >"$cfg"
for n in user order inventory; do
    printf '[clients.%s]\nendpoints = ["127.0.0.1:%s"]\n\n' "$n" "$up" >>"$cfg"
done
# Exported, not passed through `env`: valgrind does not follow an exec.
export KEEL_CONFIG=$cfg SHOP_RATE=1000000000 SHOP_BURST=1000000000
valgrind --tool=callgrind --callgrind-out-file="$out/cg" "$bin/gateway" >"$out/gateway.log" 2>&1 &
pid=$!
for _ in $(seq 300); do (echo >/dev/tcp/127.0.0.1/"$gw") 2>/dev/null && break; sleep 0.1; done
lg() {
    "$bin/keel-loadgen" --url "http://127.0.0.1:$gw/api/users/x" --header "x-api-key: demo-secret-key" \
        --closed 4 --warmup 0s --json --duration "$1"
}
lg 2s >/dev/null
callgrind_control -z "$pid" >/dev/null 2>&1
res=$(lg "${secs}s")
callgrind_control -d "$pid" >/dev/null 2>&1
sleep 1
kill -9 "$pid" "$upstream" 2>/dev/null || true
wait 2>/dev/null || true
n=$(python3 -c 'import json,sys; r=json.loads(sys.argv[1]); print(r["ok"] if r["errors"] == 0 else 0)' "$res")
[ "$n" -gt 0 ] || { echo "errors or no answers: $res"; exit 1; }
python3 - "$out/cg.1" "$n" <<'PY'
import re, sys
path, n = sys.argv[1], int(sys.argv[2])
names, total, mallocs, fn = {}, 0, 0, None
def name(s):
    m = re.match(r'\((\d+)\)(?: (.*))?', s)
    if not m:
        return s
    if m.group(2) is not None:
        names[m.group(1)] = m.group(2)
    return names.get(m.group(1), s)
for line in open(path):
    # Names are compressed: `(id) name` the first time, `(id)` after; the first may be on
    # an fn= line as well as a cfn= one.
    if line.startswith('fn='):
        name(line[3:].strip())
    elif line.startswith('cfn='):
        fn = name(line[4:].strip())
    elif line.startswith('calls=') and fn == 'malloc':
        mallocs += int(line[6:].split()[0])
    elif line.startswith('totals:'):
        total = int(line.split()[1])
print(f"| proxied requests | instructions per request | allocations per request |\n|---|---|---|\n| {n} | {total // n} | {mallocs / n:.1f} |")
PY
rm -rf "$out"
