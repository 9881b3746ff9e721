#!/usr/bin/env bash
# Client benchmark (BENCH.md): the Keel client against a bare hyper client (hyper-util's
# pooled client at its defaults) on the same upstream, same run, alternating. The upstream, a
# bare hyper server, runs in a network namespace behind a veth pair, so connections cross a
# real interface and TIME_WAIT/ESTABLISHED counts are the client's own. Both processes are
# pinned (upstream CPU 0, client CPU 1) and single-threaded.
#
# Usage: bench/client.sh [seconds=10] [concurrency=32] [rounds=3]   (needs root for ip netns)
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
conc=${2:-32}
rounds=${3:-3}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/keel-target}"
cargo build --release -q -p keel-client --example bench_client
bin="$CARGO_TARGET_DIR/release/examples/bench_client"

ns="keelbench$$"
host="kbh$$"
peer="kbp$$"
net="10.213.$(($$ % 250))"
up_pid=""
cleanup() {
    [ -n "$up_pid" ] && kill "$up_pid" 2>/dev/null || true
    ip link del "$host" 2>/dev/null || true
    ip netns del "$ns" 2>/dev/null || true
}
trap cleanup EXIT
ip netns add "$ns"
ip link add "$host" type veth peer name "$peer"
ip link set "$peer" netns "$ns"
ip addr add "$net.1/24" dev "$host"
ip link set "$host" up
ip netns exec "$ns" ip addr add "$net.2/24" dev "$peer"
ip netns exec "$ns" ip link set "$peer" up
ip netns exec "$ns" ip link set lo up

base=9000
addrs=()
for i in $(seq 0 $((2 * rounds + 3))); do addrs+=("$net.2:$((base + i))"); done
out=$(mktemp)
ip netns exec "$ns" taskset -c 0 "$bin" upstream "${addrs[@]}" >"$out" &
up_pid=$!
for _ in $(seq 100); do grep -q ready "$out" && break; sleep 0.1; done
grep -q ready "$out" || { echo "upstream did not start" >&2; exit 1; }

echo "# Keel client vs bare hyper client — $(date -u +%FT%TZ), $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo
taskset -c 1 "$bin" run "$net.2" "$base" "$secs" "$conc" "$rounds"
echo
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
