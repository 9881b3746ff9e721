#!/usr/bin/env bash
# Instructions and allocations per proxied request through the shop's gateway, counted by
# valgrind's callgrind (deterministic, where wall-clock numbers on shared machines swing):
# `GET /api/users/x` with the demo key, the gateway binary (one worker) in front of a bare
# hyper upstream, keel-loadgen closed loop; counters zeroed after a 2 s warm-up, then the
# requests answered in a fixed window are counted. The same is measured, in the same run, for
# the bare hyper proxy (crates/keel-server/examples/bare_proxy.rs: hyper's server and pooled
# client with nothing between them), the floor under any hyper-based proxy, so the gateway's
# figure reads as a ratio to it. This is how the issue notes measure the gateway's cost, and
# the CI gate's `gateway` path (BENCH.md S3 compares it with nginx and haproxy on the clock).
#
# Usage: bench/gateway-instructions.sh [seconds=3] [connections=4]
#   With one connection each request is served in its own wake-ups, and counts repeat to
#   about ±0.5 % (with 4 they move ±1.5 % with the machine's load): the gate uses 1.
#   KEEL_GATEWAY_BIN=<path> measures another gateway binary (an older build) instead of
#   this tree's.
# Needs: valgrind.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-3}
conns=${2:-4}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/keel-target}"
cargo build --release -q -p keel-shop --bin gateway
cargo build --release -q -p keel-server --example bare_hyper --example bare_proxy
cargo build --release -q -p keel-loadgen
bin="$CARGO_TARGET_DIR/release"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
out=$(mktemp -d)
up=$(free_port)
"$bin/examples/bare_hyper" "127.0.0.1:$up" >"$out/upstream.log" 2>&1 &
upstream=$!
# The script's own status survives the clean-up: under `set -e` the killed upstream's 137,
# which `wait` returns, would end the trap and become the script's.
trap 'st=$?; { kill -9 $upstream; wait $upstream || true; } 2>/dev/null; rm -rf "$out"; exit $st' EXIT

# measure NAME PORT CMD...: the proxy under callgrind; prints "requests instructions mallocs".
measure() {
    local name=$1 port=$2
    shift 2
    valgrind --tool=callgrind --callgrind-out-file="$out/cg.$name" "$@" >"$out/$name.log" 2>&1 &
    local pid=$!
    for _ in $(seq 300); do (echo >/dev/tcp/127.0.0.1/"$port") 2>/dev/null && break; sleep 0.1; done
    lg() {
        "$bin/keel-loadgen" --url "http://127.0.0.1:$port/api/users/x" \
            --header "x-api-key: demo-secret-key" \
            --closed "$conns" --warmup 0s --json --duration "$1"
    }
    lg 2s >/dev/null
    callgrind_control -z "$pid" >/dev/null 2>&1
    local res
    res=$(lg "${secs}s")
    callgrind_control -d "$pid" >/dev/null 2>&1
    sleep 1
    kill -9 "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    python3 - "$out/cg.$name.1" "$res" "$name" <<'PY'
import json, re, sys
path, res, system = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
if res["errors"] or not res["ok"]:
    sys.exit(f"{system}: errors or no answers: {res}")
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
print(res["ok"], total, mallocs)
PY
}

port=$(free_port)
proxy=$(measure proxy "$port" "$bin/examples/bare_proxy" "127.0.0.1:$port" "127.0.0.1:$up")

gw=$(free_port)
cfg="$out/gateway.toml"
printf '[server]\naddr = "127.0.0.1:%s"\n\n[admin]\naddr = "127.0.0.1:%s"\n\n[runtime]\nworker_threads = 1\n\n[log]\nlevel = "warn"\n\n' \
    "$gw" "$(free_port)" >"$cfg"
for n in user order inventory; do
    printf '[clients.%s]\nendpoints = ["127.0.0.1:%s"]\n\n' "$n" "$up" >>"$cfg"
done
# Exported, not passed through `env`: valgrind does not follow an exec.
export KEEL_CONFIG=$cfg SHOP_RATE=1000000000 SHOP_BURST=1000000000
gateway=$(measure gateway "$gw" "${KEEL_GATEWAY_BIN:-$bin/gateway}")

python3 - "$proxy" "$gateway" <<'PY'
import sys
(pn, pi, pm), (gn, gi, gm) = (map(int, a.split()) for a in sys.argv[1:])
print("| system | instructions per request | allocations per request | requests counted | ratio to bare proxy |")
print("|---|---|---|---|---|")
for system, n, i, m in (("proxy", pn, pi, pm), ("gateway", gn, gi, gm)):
    print(f"| {system} | {i // n} | {m / n:.1f} | {n} | {(i / n) / (pi / pn):.2f} |")
PY
