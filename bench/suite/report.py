#!/usr/bin/env python3
"""Turns the tagged keel-loadgen lines that bench/suite/s1.sh collected into the S1 report.

Usage (s1.sh calls it): report.py --raw RAW.jsonl --out bench/results/s1-TS [--timestamp TS]
    [--load-start "a b c"] [--load-end "a b c"] [--rounds N] [--secs S] [--warmup S]
    [--sweep "8 32 128"] [--sweep-secs S] [--quick 0|1] [--command CMD] [--notes TEXT]

Writes OUT.md (markdown tables) and OUT.json (metadata, every raw point, per-system medians)
for chart.py. Every figure in the tables is the median over rounds; ratios are the median of
the per-round ratios to bare hyper, as BENCH.md asks.
"""

import argparse
import json
import statistics
from collections import defaultdict

POINTS = ["p25", "p50", "p90", "shared"]
POINT_NAMES = {"p25": "25 % of own sat.", "p50": "50 % of own sat.", "p90": "90 % of own sat.",
               "shared": "shared rate"}
BASE = "hyper"
LABEL = {"hyper": "bare hyper", "tonic": "bare tonic", "keel": "Keel hello", "nginx": "nginx",
         "go": "Go net/http"}


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(x, digits=0):
    if x is None:
        return "–"
    return f"{x:,.{digits}f}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--raw", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--timestamp", default="")
    ap.add_argument("--load-start", default="")
    ap.add_argument("--load-end", default="")
    ap.add_argument("--rounds", type=int, default=0)
    ap.add_argument("--secs", default="")
    ap.add_argument("--warmup", default="")
    ap.add_argument("--sweep", default="")
    ap.add_argument("--sweep-secs", default="")
    ap.add_argument("--quick", default="0")
    ap.add_argument("--command", default="")
    ap.add_argument("--notes", default="")
    ap.add_argument("--route", default="hello")
    ap.add_argument("--proto", default="h1")
    ap.add_argument("--base", default="hyper")
    a = ap.parse_args()
    global BASE
    BASE = a.base
    LABEL["go"] = {"grpc": "grpc-go", "h2c": "Go net/http + x/net h2c"}.get(a.proto, "Go net/http")
    proto_name = {"h1": "HTTP/1.1", "h2c": "h2c (HTTP/2, prior knowledge)", "grpc": "gRPC (unary health check over h2c)"}[a.proto]

    raw = [json.loads(line) for line in open(a.raw) if line.strip()]
    systems = []
    for r in raw:
        if r["system"] not in systems:
            systems.append(r["system"])
    rounds = sorted({r["round"] for r in raw})
    # by[(round, system, point)] = result
    by = {(r["round"], r["system"], r["point"]): r["result"] for r in raw}

    # Per round and system: saturation, the sweep point that reached it, memory.
    per = defaultdict(dict)  # per[(round, system)][metric] = value
    for rd in rounds:
        for s in systems:
            m = per[(rd, s)]
            sweeps = [v for (r2, s2, p), v in by.items()
                      if r2 == rd and s2 == s and p.startswith("sweep-")]
            ok = [v for v in sweeps if v["errors"] == 0]
            if ok:
                best = max(ok, key=lambda v: v["achieved_rps"])
                m["sat"] = best["achieved_rps"]
                m["sat_conc"] = best["concurrency"]
                m["cpu_sat"] = best.get("server_cpu_us_per_req")
                cpu = best.get("server_cpu_us")
                m["util_sat"] = cpu / (best["duration_s"] * 1e6) if cpu is not None else None
                m["lg_util_sat"] = best.get("loadgen_cpu_util")
            mem = by.get((rd, s, "memory"))
            m["rss_mib"] = mem["vmhwm_kib"] / 1024 if mem else None
            for p in POINTS:
                v = by.get((rd, s, p))
                if v is None:
                    continue
                m[f"{p}_target"] = v["target_rps"]
                m[f"{p}_achieved"] = v["achieved_rps"]
                m[f"{p}_valid"] = v["valid"]
                m[f"{p}_cpu"] = v.get("server_cpu_us_per_req")
                for q in ("p50_us", "p99_us", "p999_us"):
                    m[f"{p}_{q}"] = v[q]
                m[f"{p}_lag99"] = v["send_lag_p99_us"]

    def medm(s, key):
        return med([per[(rd, s)].get(key) for rd in rounds])

    def nvalid(s, p):
        vs = [per[(rd, s)].get(f"{p}_valid") for rd in rounds]
        vs = [v for v in vs if v is not None]
        return sum(1 for v in vs if v), len(vs)

    summary = {}
    for s in systems:
        summary[s] = {
            "saturation_rps": medm(s, "sat"),
            "cpu_us_per_req_at_saturation": medm(s, "cpu_sat"),
            "server_cpu_util_at_saturation": medm(s, "util_sat"),
            "loadgen_cpu_util_at_saturation": medm(s, "lg_util_sat"),
            "peak_rss_mib": medm(s, "rss_mib"),
            "points": {},
        }
        for p in POINTS:
            k, n = nvalid(s, p)
            if n == 0:
                continue
            summary[s]["points"][p] = {
                "offered_rps": medm(s, f"{p}_target"),
                "achieved_rps": medm(s, f"{p}_achieved"),
                "p50_us": medm(s, f"{p}_p50_us"),
                "p99_us": medm(s, f"{p}_p99_us"),
                "p999_us": medm(s, f"{p}_p999_us"),
                "cpu_us_per_req": medm(s, f"{p}_cpu"),
                "send_lag_p99_us": medm(s, f"{p}_lag99"),
                "valid_rounds": k,
                "rounds": n,
            }

    def ratio(s, key, valid_key=None):
        """Median of per-round ratios s/BASE, and how many rounds had an invalid point."""
        rs, bad = [], 0
        for rd in rounds:
            x, b = per[(rd, s)].get(key), per[(rd, BASE)].get(key)
            if x is None or not b:
                continue
            rs.append(x / b)
            if valid_key and not (per[(rd, s)].get(valid_key) and per[(rd, BASE)].get(valid_key)):
                bad += 1
        return (statistics.median(rs) if rs else None), bad, len(rs)

    lines = []
    w = lines.append
    mode = "quick (smoke) mode" if a.quick == "1" else "full mode"
    w(f"# S1 one hop, {proto_name} — {a.timestamp}")
    w("")
    w(f"- Command: `{a.command.strip()}` ({mode}: {len(rounds)} round(s); open-loop points "
      f"{a.warmup} s warm-up + {a.secs} s; saturation sweep over closed-loop concurrency "
      f"{a.sweep} with {a.sweep_secs} s windows)")
    w(f"- Load average (1/5/15 min): {a.load_start} at start, {a.load_end} at the end. "
      "**This 2-core machine is shared with other work** (other engineers' builds and tests); "
      "the server is pinned to CPU 1 and keel-loadgen to CPU 0 but neither core is exclusive, "
      "so absolute numbers are noisy — read the same-run ratios.")
    if a.proto == "grpc":
        w("- Request: unary `grpc.health.v1.Health/Check` for the service `\"\"` over h2c, answered by "
          "tonic-health in both systems (Keel's example service; a bare tonic server). nginx does not "
          "answer gRPC itself, so it is not in this run; grpc-go is Debian's golang-google-grpc-dev "
          "(1.33) with its own health service (`bench/peers/go/extra.go`). volo-grpc is not measured.")
    elif a.route == "echo":
        w("- Request: `POST /echo` with a 1 KiB JSON body → 200 with the same 1 KiB (BENCH.md S1). "
          "Keel's example service and bare_hyper echo the body; nginx cannot echo without a "
          "module, so it answers with the same 1 KiB from `return 200` (it reads and discards the "
          "request body). Headers differ slightly (nginx sends `Server`, `Connection: keep-alive`); "
          "nginx runs one process (`master_process off`), access log off. Go net/http "
          "(`bench/peers/go/main.go`, stdlib only) echoes with `io.ReadAll`.")
    else:
        w("- Request: `GET /` → 200 `hello from keel\\n` (16 B, text/plain) for every system; "
          "nginx serves the same body with `return 200` (headers differ slightly: nginx sends "
          "`Server`, `Connection: keep-alive`), one process (`master_process off`), access log off.")
    w("- One runtime thread each: Keel `KEEL_RUNTIME__WORKER_THREADS=1` (its default stack "
      "otherwise), bare_hyper 1 tokio worker, nginx one process, Go `GOMAXPROCS=1`.")
    w("- Latency is measured from each request's scheduled send time (open loop, "
      "HdrHistogram); a point whose achieved rate is < 99 % of its target is marked ✗ "
      "(invalid). CPU is the server's utime+stime over the measured window.")
    if a.notes.strip():
        w(f"- Note: {a.notes.strip()}")
    w("")
    w("## Per system (medians over rounds)")
    w("")
    w("| system | saturation req/s | server CPU util. at sat. | generator CPU util. at sat. "
      "| CPU µs/req at sat. | CPU µs/req at shared rate | peak RSS MiB |")
    w("|---|---:|---:|---:|---:|---:|---:|")
    for s in systems:
        m = summary[s]
        sh = m["points"].get("shared", {})
        w(f"| {LABEL.get(s, s)} | {fmt(m['saturation_rps'])} | "
          f"{fmt(m['server_cpu_util_at_saturation'], 2)} | "
          f"{fmt(m['loadgen_cpu_util_at_saturation'], 2)} | "
          f"{fmt(m['cpu_us_per_req_at_saturation'], 2)} | {fmt(sh.get('cpu_us_per_req'), 2)} | "
          f"{fmt(m['peak_rss_mib'], 1)} |")
    w("")
    w("## Latency at fixed arrival rates (µs from scheduled send time; medians over rounds)")
    w("")
    w("| system | load point | offered req/s | achieved req/s | p50 | p99 | p99.9 | "
      "generator send-lag p99 | CPU µs/req | valid rounds |")
    w("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for s in systems:
        for p in POINTS:
            v = summary[s]["points"].get(p)
            if not v:
                continue
            mark = "" if v["valid_rounds"] == v["rounds"] else " ✗"
            w(f"| {LABEL.get(s, s)} | {POINT_NAMES[p]} | {fmt(v['offered_rps'])} | "
              f"{fmt(v['achieved_rps'])}{mark} | {fmt(v['p50_us'])} | {fmt(v['p99_us'])} | "
              f"{fmt(v['p999_us'])} | {fmt(v['send_lag_p99_us'])} | "
              f"{fmt(v['cpu_us_per_req'], 2)} | {v['valid_rounds']}/{v['rounds']} |")
    w("")
    ratios = {}
    if BASE in systems:
        w(f"## Ratios to {LABEL.get(BASE, BASE)} (median of per-round ratios)")
        w("")
        w("| system | throughput (sat.) | CPU/req at sat. | CPU/req at shared rate | "
          "p99 at 50 % own load | p99 at shared rate | peak RSS |")
        w("|---|---:|---:|---:|---:|---:|---:|")
        for s in systems:
            if s == BASE:
                continue
            cells, rs = [], {}
            for name, key, vk in (("throughput", "sat", None), ("cpu_sat", "cpu_sat", None),
                                  ("cpu_shared", "shared_cpu", "shared_valid"),
                                  ("p99_p50", "p50_p99_us", "p50_valid"),
                                  ("p99_shared", "shared_p99_us", "shared_valid"),
                                  ("rss", "rss_mib", None)):
                r, bad, n = ratio(s, key, vk)
                rs[name] = r
                cells.append(fmt(r, 3) + (f" ✗ ({bad}/{n} rounds invalid)" if bad else ""))
            ratios[s] = rs
            w(f"| {LABEL.get(s, s)} | " + " | ".join(cells) + " |")
        w("")
    if "keel" in ratios:
        rs = ratios["keel"]
        hy, ke = summary[BASE], summary["keel"]
        w(f"## {'T2' if a.proto == 'grpc' else 'T1'} check (Keel vs {LABEL.get(BASE, BASE)}, this run only)")
        w("")

        def verdict(ok):
            return "not computable" if ok is None else ("met" if ok else "**not met**")

        t = rs["throughput"]
        c = rs["cpu_sat"]
        tmin = 0.9 if a.proto == "grpc" else 0.92
        w(f"- Throughput ≥ {tmin}×: {fmt(t, 3)}× → {verdict(None if t is None else t >= tmin)}")
        w(f"- CPU per request ≤ 1.10× (at saturation): {fmt(c, 3)}× → "
          f"{verdict(None if c is None else c <= 1.10)}")
        k50, h50 = ke["points"].get("p50", {}), hy["points"].get("p50", {})
        if k50 and h50:
            lim = 1.2 * h50["p99_us"] + 50
            w(f"- p99 at 50 % load ≤ 1.2× bare + 50 µs: Keel {fmt(k50['p99_us'])} µs vs limit "
              f"{fmt(lim)} µs (bare {fmt(h50['p99_us'])} µs; each at 50 % of its own "
              f"saturation) → {verdict(k50['p99_us'] <= lim)}")
        if "go" in summary:
            kc, gc = ke["cpu_us_per_req_at_saturation"], summary["go"]["cpu_us_per_req_at_saturation"]
            r = kc / gc if kc and gc else None
            w(f"- CPU per request ≤ 0.5× {LABEL['go']} (at saturation, medians): Keel {fmt(kc, 2)} µs "
              f"vs {fmt(gc, 2)} µs = {fmt(r, 3)}× → {verdict(None if r is None else r <= 0.5)}")
        caveats = []
        for s, v in (("keel", k50), (BASE, h50)):
            if v and v["send_lag_p99_us"] >= 0.5 * v["p99_us"]:
                caveats.append(f"{LABEL[s]}'s p99 at 50 % load is mostly send lag (generator "
                               f"send-lag p99 {fmt(v['send_lag_p99_us'])} µs of "
                               f"{fmt(v['p99_us'])} µs): requests waited for the generator or "
                               "for a free connection, so the p99 check says little about the "
                               "server")
        if a.quick == "1":
            caveats.append("smoke mode (1 round, 3 s windows, no warm-up)")
        for s in (BASE, "keel"):
            u = summary[s]["server_cpu_util_at_saturation"]
            if u is not None and u < 0.9:
                caveats.append(f"{LABEL[s]} used only {u:.2f} of its core at 'saturation': the "
                               "generator or the shared machine limited it, not the server")
        if caveats:
            w("- Caveats: " + "; ".join(caveats) + ". Not a basis for claiming T1.")
        w("")
    w(f"Chart: `{a.out.split('/')[-1]}.png`; raw points: `{a.out.split('/')[-1]}.json`.")
    md = "\n".join(lines) + "\n"
    with open(a.out + ".md", "w") as f:
        f.write(md)
    with open(a.out + ".json", "w") as f:
        json.dump({"meta": {**{k: v for k, v in vars(a).items() if k not in ("raw", "out")}, "labels": LABEL},
                   "summary": summary, "ratios_to_bare_hyper": ratios, "raw": raw}, f, indent=1)
    print(md)


if __name__ == "__main__":
    main()
