#!/usr/bin/env python3
"""BENCH.md S2: the three-hop chain gateway → order → inventory.

One request, `GET /api/orders/quote/keel-mug` with the demo's API key: the gateway checks the
key and forwards to order (HTTP/1.1), order asks inventory for the stock (gRPC `Stock`, with a
deadline) and answers `{"sku":"keel-mug","available":1000}` (35 bytes, identical everywhere).
Inventory keeps its stock in memory on every system, so the chain measures what each hop's
framework costs, not a database (bench/chain/src/main.rs).

Systems (each hop one process with one runtime thread, all three pinned to CPU 1; the load
generator and the OTLP sink share CPU 0):
  bare      the physical limit: bare_proxy (hyper + hyper-util pool, strips /api) → bare-order
            (hyper + tonic client, 1 s grpc-timeout) → bare-inventory (tonic)
  keel-off  the shop's gateway → keel-order → keel-inventory, with no trace endpoint (tracing off)
  keel      the same with tracing at 1 % (T1's default stack), exported over OTLP/gRPC to a sink
  keel-100  the same with tracing at 100 %
  go        Go net/http (bench/peers/go, stdlib only): gateway with httputil.ReverseProxy →
            order → inventory over HTTP/JSON (gRPC is not in Go's standard library)

Per round (systems in rotated order): a closed-loop sweep over 8/16/32/64 connections finds
each system's saturation (best zero-error throughput); open-loop points at 25/50/90 % of its
own saturation, then one at the shared rate (50 % of the round's lowest saturation) for every
system. CPU per request is utime+stime of the three hop processes over each measured window;
peak RSS is the sum of their VmHWM. Ratios are medians of per-round ratios.

T4 (BENCH.md): added latency per hop over the bare chain ≤ 50 µs p50 and ≤ 200 µs p99 (here:
(Keel − bare) at the shared rate ÷ 3 hops); tracing at 100 % costs ≤ 10 % throughput and at
1 % ≤ 2 % (saturation against keel-off).

Usage: bench/suite/s2.py [--rounds 3] [--seconds 30] [--warmup 5] [--quick] [--systems ...]
Writes bench/results/s2-<UTC time>.md, .json and .png.
"""

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from s3 import REL, ROOT, TARGET, free_port, loadgen, peak_rss_kib, spawn, wait_port  # noqa: E402

PATH = "/api/orders/quote/keel-mug"
KEY = "demo-secret-key"
EXPECTED = b'{"sku":"keel-mug","available":1000}'
SYSTEMS = ["bare", "keel-off", "keel", "keel-100", "go"]
LABELS = {"bare": "bare hyper/tonic", "keel-off": "Keel, tracing off", "keel": "Keel, tracing 1 %",
          "keel-100": "Keel, tracing 100 %", "go": "Go net/http"}
SAMPLING = {"keel-off": None, "keel": 0.01, "keel-100": 1.0}
POINTS = ["p25", "p50", "p90", "shared"]


def keel_config(tmp, name, port, sampling, sink, clients):
    path = os.path.join(tmp, f"{name}-{port}.toml")
    with open(path, "w") as f:
        f.write(f'[server]\naddr = "127.0.0.1:{port}"\n\n[admin]\naddr = "127.0.0.1:{free_port()}"\n\n'
                f'[runtime]\nworker_threads = 1\n\n[log]\nlevel = "warn"\n\n')
        if sampling is None:
            f.write("[tracing]\nenabled = false\n\n")
        else:
            f.write(f'[tracing]\nendpoint = "http://127.0.0.1:{sink}"\nsample_ratio = {sampling}\n\n')
        for client, (addr, proto) in clients.items():
            f.write(f'[clients.{client}]\nendpoints = ["{addr}"]\nprotocol = "{proto}"\n\n')
    return path


def start_chain(system, tmp, sink, gopeer):
    """Start inventory, order and gateway; return (gateway port, [processes])."""
    inv, order, gw = free_port(), free_port(), free_port()
    chain = os.path.join(REL, "keel-chain")
    procs = []
    try:
        if system == "bare":
            procs.append(spawn([chain, "bare-inventory", f"127.0.0.1:{inv}"], inv))
            procs.append(spawn([chain, "bare-order", f"127.0.0.1:{order}", f"127.0.0.1:{inv}"], order))
            procs.append(spawn([os.path.join(REL, "examples", "bare_proxy"), f"127.0.0.1:{gw}",
                                f"127.0.0.1:{order}", "/api"], gw))
        elif system == "go":
            env = {"GOMAXPROCS": "1"}
            procs.append(spawn([gopeer, "-role", "inventory", "-listen", f"127.0.0.1:{inv}"], inv, env))
            procs.append(spawn([gopeer, "-role", "order", "-listen", f"127.0.0.1:{order}",
                                "-upstream", f"127.0.0.1:{inv}"], order, env))
            procs.append(spawn([gopeer, "-role", "gateway", "-listen", f"127.0.0.1:{gw}",
                                "-upstream", f"127.0.0.1:{order}", "-key", KEY], gw, env))
        else:
            ratio = SAMPLING[system]
            cfg = keel_config(tmp, "inventory", inv, ratio, sink, {})
            procs.append(spawn([chain, "keel-inventory"], inv, {"KEEL_CONFIG": cfg}))
            cfg = keel_config(tmp, "order", order, ratio, sink, {"inventory": (f"127.0.0.1:{inv}", "h2c")})
            procs.append(spawn([chain, "keel-order"], order, {"KEEL_CONFIG": cfg}))
            # The gateway needs all three upstreams configured; only order is used here.
            up = (f"127.0.0.1:{order}", "http1")
            cfg = keel_config(tmp, "gateway", gw, ratio, sink, {"user": up, "order": up, "inventory": up})
            procs.append(spawn([os.path.join(REL, "gateway")], gw,
                               {"KEEL_CONFIG": cfg, "SHOP_RATE": "1000000000", "SHOP_BURST": "1000000000"}))
        # Same bytes everywhere: check the answer before measuring anything.
        req = urllib.request.Request(f"http://127.0.0.1:{gw}{PATH}", headers={"x-api-key": KEY})
        with urllib.request.urlopen(req, timeout=5) as r:
            body = r.read()
        if body != EXPECTED:
            raise RuntimeError(f"{system}: unexpected answer {body!r}")
        return gw, procs
    except Exception:
        for p in procs:
            p.kill()
        raise


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--warmup", type=float, default=5)
    ap.add_argument("--quick", action="store_true", help="1 round, 3 s windows, 1 s warm-up (smoke mode)")
    ap.add_argument("--systems", default=" ".join(SYSTEMS))
    a = ap.parse_args()
    if a.quick:
        a.rounds, a.seconds, a.warmup = 1, 3, 1
    systems = a.systems.split()
    build_env = {**os.environ, "CARGO_TARGET_DIR": TARGET}
    for what in (["-p", "keel-shop", "--bin", "gateway"], ["-p", "keel-bench-chain"],
                 ["-p", "keel-server", "--example", "bare_proxy"], ["-p", "keel-loadgen"]):
        subprocess.run(["cargo", "build", "--release", "-q"] + what, cwd=ROOT, check=True, env=build_env)
    notes, gopeer = [], None
    if "go" in systems:
        r = subprocess.run([os.path.join(ROOT, "bench", "peers", "go", "build.sh")], capture_output=True, text=True)
        if r.returncode == 0:
            gopeer = r.stdout.strip().splitlines()[-1]
        else:
            systems.remove("go")
            notes.append("Go net/http skipped: golang-go could not be installed or the peer did not build.")
    tmp = tempfile.mkdtemp(prefix="keel-s2-")
    sink_port = free_port()
    sink = subprocess.Popen(["taskset", "-c", "0", os.path.join(REL, "keel-chain"), "sink", f"127.0.0.1:{sink_port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(sink_port, sink)
    load_start = open("/proc/loadavg").read().split()[:3]
    key = [f"x-api-key: {KEY}"]
    rows = []

    def measure(rnd, s, point, port, procs, extra):
        r = loadgen(f"http://127.0.0.1:{port}{PATH}",
                    extra + ["--server-pid", ",".join(str(p.pid) for p in procs)], key)
        row = {"round": rnd, "system": s, "point": point, "offered_rps": r.get("target_rps") or 0.0,
               "achieved_rps": r["achieved_rps"], "valid": r["valid"], "errors": r["errors"],
               "p50_us": r["p50_us"], "p99_us": r["p99_us"], "p999_us": r["p999_us"],
               "send_lag_p99_us": r.get("send_lag_p99_us", 0), "cpu_us_per_req": r["server_cpu_us_per_req"] or 0.0}
        rows.append(row)
        return row

    try:
        for rnd in range(1, a.rounds + 1):
            k = (rnd - 1) % len(systems)
            order = systems[k:] + systems[:k]
            running, sat, shed = {}, {}, {}
            try:
                for s in order:
                    running[s] = start_chain(s, tmp, sink_port, gopeer)
                for s in order:
                    port, procs = running[s]
                    sat[s], shed[s] = 0.0, []
                    for conc in (8, 16, 32, 64):
                        r = measure(rnd, s, f"c{conc}", port, procs,
                                    ["--closed", str(conc), "--duration", f"{min(a.seconds, 5)}s", "--warmup", "1s"])
                        if r["errors"] == 0:
                            sat[s] = max(sat[s], r["achieved_rps"])
                        else:
                            shed[s].append(f"{conc}: {r['errors']} errors")
                    if sat[s] == 0:
                        raise RuntimeError(f"{s}: every sweep level had errors: {shed[s]}")
                    rows.append({"round": rnd, "system": s, "point": "saturation", "achieved_rps": sat[s],
                                 "shed": shed[s]})
                    for pct in (25, 50, 90):
                        rate = sat[s] * pct / 100
                        r = measure(rnd, s, f"p{pct}", port, procs,
                                    ["--rate", f"{rate:.0f}", "--connections", "64", "--duration", f"{a.seconds}s",
                                     "--warmup", f"{a.warmup}s"])
                        r["offered_rps"] = rate
                    print(f"round {rnd} {s:9} saturation {sat[s]:8.0f} req/s", flush=True)
                shared = 0.5 * min(sat.values())
                for s in order:
                    port, procs = running[s]
                    r = measure(rnd, s, "shared", port, procs,
                                ["--rate", f"{shared:.0f}", "--connections", "64", "--duration", f"{a.seconds}s",
                                 "--warmup", f"{a.warmup}s"])
                    r["offered_rps"] = shared
                    rss = sum(peak_rss_kib(p.pid) for p in procs)
                    rows.append({"round": rnd, "system": s, "point": "memory", "peak_rss_kib": rss})
                    print(f"round {rnd} {s:9} at {shared:.0f} req/s: p50 {r['p50_us']} µs, p99 {r['p99_us']} µs, "
                          f"cpu {r['cpu_us_per_req']:.1f} µs/req, rss {rss} KiB, valid {r['valid']}", flush=True)
            finally:
                for _, procs in running.values():
                    for p in procs:
                        p.kill()
                        p.wait()
    finally:
        sink.kill()
    load_end = open("/proc/loadavg").read().split()[:3]
    write_report(a, systems, rows, notes, load_start, load_end)


def write_report(a, systems, rows, notes, load_start, load_end):
    def pick(rnd, s, point):
        hits = [x for x in rows if x["round"] == rnd and x["system"] == s and x["point"] == point]
        return hits[0] if hits else None

    def med(s, point, key):
        vals = [x[key] for x in rows if x["system"] == s and x["point"] == point and x.get(key) is not None]
        return statistics.median(vals) if vals else None

    def ratio(s, base, point, key):
        per = []
        for rnd in range(1, a.rounds + 1):
            x, b = pick(rnd, s, point), pick(rnd, base, point)
            if x and b and b.get(key):
                per.append(x[key] / b[key])
        return statistics.median(per) if per else None

    def fmt(v, d=0):
        return "–" if v is None else f"{v:,.{d}f}"

    def valid_rounds(s, point):
        pts = [x for x in rows if x["system"] == s and x["point"] == point]
        return sum(1 for x in pts if x["valid"] and x["errors"] == 0), len(pts)

    summary = {}
    for s in systems:
        pts = {}
        for p in POINTS:
            ok, n = valid_rounds(s, p)
            if n:
                pts[p] = {"offered_rps": med(s, p, "offered_rps"), "p50_us": med(s, p, "p50_us"),
                          "p99_us": med(s, p, "p99_us"), "p999_us": med(s, p, "p999_us"),
                          "cpu_us_per_req": med(s, p, "cpu_us_per_req"), "valid_rounds": ok, "rounds": n}
        summary[s] = {"saturation_rps": med(s, "saturation", "achieved_rps"),
                      "peak_rss_kib": med(s, "memory", "peak_rss_kib"), "points": pts}

    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H%M%SZ")
    smoke = " — SMOKE MODE" if a.quick else ""
    out = [f"# S2 — three-hop chain gateway → order → inventory{smoke}", "",
           f"- Command: `bench/suite/s2.py {' '.join(sys.argv[1:])}`; {a.rounds} round(s), open-loop windows "
           f"{a.warmup:g} s warm-up + {a.seconds:g} s; saturation from a closed-loop sweep over 8/16/32/64 "
           "connections (1 s + min(window, 5 s) each).",
           f"- Load average (1/5/15 min): {' '.join(load_start)} at start, {' '.join(load_end)} at the end; "
           "the 2 cores are shared with other work, so read the same-run ratios.",
           f"- Request: `GET {PATH}` with `x-api-key`, answer `{EXPECTED.decode()}` on every system "
           "(checked before measuring). All three hops of a system pinned to CPU 1, one runtime thread "
           "each; generator and OTLP sink on CPU 0.",
           "- CPU per request: utime+stime of the three hop processes over the window; RSS: sum of their VmHWM.",
           "", "## Per system (medians over rounds)", "",
           "| system | saturation req/s | p50 µs | p99 µs | p99.9 µs | CPU µs/req | peak RSS KiB (3 hops) | valid rounds |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for s in systems:
        m, sh = summary[s], summary[s]["points"].get("shared", {})
        out.append(f"| {LABELS.get(s, s)} | {fmt(m['saturation_rps'])} | {fmt(sh.get('p50_us'))} | "
                   f"{fmt(sh.get('p99_us'))} | {fmt(sh.get('p999_us'))} | {fmt(sh.get('cpu_us_per_req'), 1)} | "
                   f"{fmt(m['peak_rss_kib'])} | {sh.get('valid_rounds', 0)}/{sh.get('rounds', 0)} |")
    out += ["", "Latency and CPU at the shared rate (50 % of the round's lowest saturation; "
            f"median {fmt(med(systems[0], 'shared', 'offered_rps'))} req/s).", "",
            "## Latency against offered load (µs from scheduled send time, medians)", "",
            "| system | point | offered req/s | p50 | p99 | p99.9 | CPU µs/req | valid rounds |",
            "|---|---|---:|---:|---:|---:|---:|---:|"]
    for s in systems:
        for p in POINTS:
            v = summary[s]["points"].get(p)
            if v:
                mark = "" if v["valid_rounds"] == v["rounds"] else " ✗"
                out.append(f"| {LABELS.get(s, s)} | {p} | {fmt(v['offered_rps'])} | {fmt(v['p50_us'])}{mark} | "
                           f"{fmt(v['p99_us'])} | {fmt(v['p999_us'])} | {fmt(v['cpu_us_per_req'], 1)} | "
                           f"{v['valid_rounds']}/{v['rounds']} |")
    out += ["", "## Ratios to the bare chain (median of per-round ratios)", "",
            "| system | throughput | CPU/req at shared rate | p50 at shared rate | p99 at shared rate | peak RSS |",
            "|---|---:|---:|---:|---:|---:|"]
    for s in systems:
        if s == "bare" or "bare" not in systems:
            continue
        out.append(f"| {LABELS.get(s, s)} | {fmt(ratio(s, 'bare', 'saturation', 'achieved_rps'), 3)} | "
                   f"{fmt(ratio(s, 'bare', 'shared', 'cpu_us_per_req'), 3)} | "
                   f"{fmt(ratio(s, 'bare', 'shared', 'p50_us'), 3)} | {fmt(ratio(s, 'bare', 'shared', 'p99_us'), 3)} | "
                   f"{fmt(ratio(s, 'bare', 'memory', 'peak_rss_kib'), 3)} |")
    out += ["", "## T4 check (this run only)", ""]

    def verdict(ok):
        return "not computable" if ok is None else ("met" if ok else "**not met**")

    if "bare" in systems and "keel" in systems:
        for q, lim in (("p50_us", 50), ("p99_us", 200)):
            per = []
            for rnd in range(1, a.rounds + 1):
                k, b = pick(rnd, "keel", "shared"), pick(rnd, "bare", "shared")
                if k and b:
                    per.append((k[q] - b[q]) / 3)
            added = statistics.median(per) if per else None
            out.append(f"- Added {q[:3]} latency per hop at the shared rate ((Keel 1 % − bare) ÷ 3): "
                       f"{fmt(added, 1)} µs, target ≤ {lim} µs → {verdict(None if added is None else added <= lim)}")
    if "keel-off" in systems:
        for s, lim in (("keel-100", 0.10), ("keel", 0.02)):
            if s in systems:
                r = ratio(s, "keel-off", "saturation", "achieved_rps")
                cost = None if r is None else 1 - r
                out.append(f"- Tracing at {'100' if s == 'keel-100' else '1'} %: throughput {fmt(r, 3)}× tracing off, "
                           f"a cost of {fmt(None if cost is None else cost * 100, 1)} %, target ≤ {lim * 100:.0f} % → "
                           f"{verdict(None if cost is None else cost <= lim)}")
    if "go" in systems and "keel" in systems:
        r = ratio("keel", "go", "shared", "cpu_us_per_req")
        out.append(f"- For reference: Keel's CPU per request is {fmt(r, 3)}× Go net/http's at the shared rate "
                   "(Go's order → inventory hop is HTTP/JSON, not gRPC).")
    out.append("- An unsampled span's cost (T4: ≤ 100 ns) is measured apart, as the difference of two "
               "criterion groups: `cargo bench -p keel-telemetry --bench overhead -- record` "
               "(\"unsampled span (metrics + tracer)\" − \"metrics only\").")
    for s in systems:
        errs = [e for x in rows if x["system"] == s and x["point"] == "saturation" for e in x["shed"]]
        if errs:
            notes.append(f"{LABELS.get(s, s)}: sweep levels with errors (not counted for saturation): {'; '.join(errs)}")
    out += [""] + [f"- {n}" for n in notes]
    base = os.path.join(ROOT, "bench", "results", f"s2-{stamp}")
    out += ["", f"Chart: `s2-{stamp}.png`; raw points: `s2-{stamp}.json`."]
    report = "\n".join(out) + "\n"
    os.makedirs(os.path.dirname(base), exist_ok=True)
    with open(base + ".md", "w") as f:
        f.write(report)
    meta = {"title": "S2 chain gateway → order → inventory", "labels": LABELS, "timestamp": stamp,
            "quick": "1" if a.quick else "0", "load_start": " ".join(load_start), "load_end": " ".join(load_end)}
    with open(base + ".json", "w") as f:
        json.dump({"meta": meta, "summary": summary, "raw": rows}, f, indent=1)
    subprocess.run([sys.executable, os.path.join(HERE, "chart.py"), base + ".json", base + ".png"], check=False)
    print()
    print(report)


if __name__ == "__main__":
    sys.exit(main())
