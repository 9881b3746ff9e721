#!/usr/bin/env bash
# The CI regression gate of BENCH.md: instructions per request on the core paths, counted by
# callgrind (deterministic: no wall-clock timing is asserted anywhere). Two paths:
#   server  a Keel service's request path (examples/hello, default stack) vs bare hyper
#           (bench/instructions.sh);
#   client  one call through Keel's client vs hyper-util's pooled client
#           (bench/client-instructions.sh);
#   grpc    a unary gRPC call (health check over h2c) to examples/hello vs bare tonic
#           (bench/instructions.sh --grpc);
#   gateway a request proxied by the shop's gateway vs the bare hyper proxy
#           (bench/gateway-instructions.sh).
# Each is compared as a ratio to its bare baseline measured in the same run, so a compiler or
# dependency update that moves both does not trip it; a ratio more than `tolerance` above
# bench/instructions-baseline.json fails with the numbers.
#
# Usage: bench/gate.sh            check against the baseline (exit 1 on a regression)
#        bench/gate.sh --update   measure and write the baseline (after an intended change)
# Needs: valgrind (apt-installed if missing), a release build (made here).
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-check}
baseline=bench/instructions-baseline.json
if ! command -v valgrind >/dev/null 2>&1; then
    echo "installing Debian's valgrind (for callgrind)" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q valgrind >/dev/null 2>&1 ||
        { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q valgrind >/dev/null; }
fi
# One connection: no batching of requests per wake-up, so the count is stable to ±0.3 % (four
# connections spread ±1.5 % with the machine's load, too close to the tolerance).
server=$(bench/instructions.sh 3 1)
client=$(bench/client-instructions.sh 5000)
grpc=$(bench/instructions.sh 3 1 --grpc)
gateway=$(bench/gateway-instructions.sh 3 1)
echo "$server"
echo
echo "$client"
echo
echo "$grpc"
echo
echo "$gateway"
python3 - "$mode" "$baseline" "$server" "$client" "$grpc" "$gateway" <<'PY'
import json, re, sys
mode, path, server, client, grpc, gateway = sys.argv[1:]

def per(table, system):
    m = re.search(rf"^\| {system} \| (\d+) \|", table, re.M)
    if not m:
        sys.exit(f"gate: no '{system}' row in:\n{table}")
    return int(m.group(1))

now = {
    "server": {"keel": per(server, "keel"), "bare": per(server, "hyper")},
    "client": {"keel": per(client, "keel"), "bare": per(client, "hyper")},
    "grpc": {"keel": per(grpc, "keel"), "bare": per(grpc, "tonic")},
    "gateway": {"keel": per(gateway, "gateway"), "bare": per(gateway, "proxy")},
}
for v in now.values():
    v["ratio"] = round(v["keel"] / v["bare"], 3)
if mode == "--update":
    json.dump({"tolerance": 0.05, "paths": now,
               "note": "instructions per request/call under callgrind; written by bench/gate.sh --update"},
              open(path, "w"), indent=1)
    print(f"\nwrote {path}: " + ", ".join(f"{k} {v['ratio']}×" for k, v in now.items()))
    sys.exit(0)
base = json.load(open(path))
tol = base["tolerance"]
failed = False
print()
for name, v in now.items():
    b = base["paths"][name]
    limit = b["ratio"] * (1 + tol)
    ok = v["ratio"] <= limit
    failed |= not ok
    print(f"{name}: Keel {v['keel']} vs bare {v['bare']} instructions = {v['ratio']:.3f}×; "
          f"baseline {b['ratio']:.3f}×, limit {limit:.3f}× → {'ok' if ok else 'REGRESSION'}")
if failed:
    sys.exit("gate: Keel's instructions per request grew more than "
             f"{tol:.0%} against its bare baseline. Find the cause (callgrind_annotate on the "
             "output of valgrind --tool=callgrind on the service), or, if the cost is intended, run "
             "bench/gate.sh --update and commit the new baseline with the reason.")
PY
