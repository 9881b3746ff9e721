#!/usr/bin/env python3
"""BENCH.md S3: the gateway as a reverse proxy to one bare upstream.

Systems (each pinned to CPU 1 with one worker/thread; the load generator and the upstream
share CPU 0):
  keel     the shop's gateway binary (API key check, rate limit, Keel's client: balancing,
           retries with a budget, breaker, telemetry) — the request carries a valid key
  bare     crates/keel-server/examples/bare_proxy.rs: hyper + hyper-util's pooled client,
           nothing else (the physical limit)
  nginx    Debian nginx, 1 worker, upstream keepalive, access log off (installed if missing)
  haproxy  Debian haproxy, nbthread 1, http-keep-alive (installed if missing)

The upstream is bare_hyper (same bytes for every path). Per round, systems alternate; each is
measured for saturation (closed loop), then at a fixed arrival rate (open loop) of 50 % of the
lowest saturation of the round, where p50/p99/p99.9, CPU per request (utime+stime of the
proxy over the window) and peak RSS are read. Ratios are medians of per-round ratios.

Usage: bench/suite/s3.py [--rounds 3] [--seconds 10] [--quick]
Writes bench/results/s3-<UTC time>.md, .json and .png (latency against offered load: 25/50/90 %
of each system's own saturation and the shared rate).
"""

import argparse
import datetime
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.expanduser("~/.cache/keel-target"))
REL = os.path.join(TARGET, "release")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_port(port, proc, timeout=20):
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"process {proc.args[0]} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def owner_is(port, pid):
    """The process answering on `port` is the one we started (other programs share the box)."""
    out = subprocess.run(["ss", "-ltnp", f"sport = :{port}"], capture_output=True, text=True).stdout
    return f"pid={pid}," in out


def peak_rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def cpu_seconds(pid):
    """CPU time (utime + stime) of every thread of `pid` so far, in seconds."""
    ticks = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def ensure(pkg, binary):
    if shutil.which(binary):
        return True
    r = subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", pkg],
                       capture_output=True, text=True, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    return r.returncode == 0 and shutil.which(binary) is not None


def loadgen(url, args, headers):
    cmd = ["taskset", "-c", "0", os.path.join(REL, "keel-loadgen"), "--url", url, "--json"] + args
    for h in headers:
        cmd += ["--header", h]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def command(system, listen, up, tmp):
    """The command line and extra environment that run `system` listening on `listen`
    (host:port) in front of the upstream `up` (host:port), its config written under `tmp`.
    Shared with bench/s3-churn.py, so both compare the same peer configurations."""
    env = {}
    tag = listen.replace(":", "-")
    if system == "keel":
        cfg = os.path.join(tmp, f"gateway-{tag}.toml")
        with open(cfg, "w") as f:
            f.write(f'[server]\naddr = "{listen}"\n\n[admin]\naddr = "127.0.0.1:{free_port()}"\n\n'
                    f'[runtime]\nworker_threads = 1\n\n[log]\nlevel = "warn"\n\n')
            for name in ("user", "order", "inventory"):
                f.write(f'[clients.{name}]\nendpoints = ["{up}"]\n\n')
        env.update({"KEEL_CONFIG": cfg, "SHOP_RATE": "1000000000", "SHOP_BURST": "1000000000"})
        cmd = [os.path.join(REL, "gateway")]
    elif system == "bare":
        cmd = [os.path.join(REL, "examples", "bare_proxy"), listen, up]
    elif system == "nginx":
        conf = os.path.join(tmp, f"nginx-{tag}.conf")
        with open(conf, "w") as f:
            # master_process off: one process, so the PID measured is the one doing the work.
            f.write(f"""worker_processes 1; master_process off; daemon off; pid {tmp}/nginx-{tag}.pid; error_log stderr error;
events {{ worker_connections 4096; }}
http {{ access_log off;
  upstream up {{ server {up}; keepalive 256; }}
  server {{ listen {listen}; location / {{ proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection ""; }} }}
}}
""")
        cmd = ["nginx", "-c", conf, "-p", tmp]
    elif system == "haproxy":
        conf = os.path.join(tmp, f"haproxy-{tag}.cfg")
        with open(conf, "w") as f:
            f.write(f"""global
  nbthread 1
  maxconn 8192
defaults
  mode http
  timeout connect 1s
  timeout client 30s
  timeout server 30s
  option http-keep-alive
frontend fe
  bind {listen}
  default_backend be
backend be
  http-reuse always
  server s1 {up}
""")
        cmd = ["haproxy", "-f", conf, "-db"]
    else:
        raise ValueError(system)
    return cmd, env


def start(system, port, upstream, tmp):
    cmd, env = command(system, f"127.0.0.1:{port}", f"127.0.0.1:{upstream}", tmp)
    return spawn(cmd, port, env)


def spawn(cmd, port, env=None):
    """Start `cmd` pinned to CPU 1 (the system under test's core) and wait until it serves
    `port`; refuse a port some other process answers on."""
    proc = subprocess.Popen(["taskset", "-c", "1"] + cmd, env={**os.environ, **(env or {})},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port, proc)
    if not owner_is(port, proc.pid):
        proc.kill()
        raise RuntimeError(f"port {port} is not served by the {cmd[0]} we started")
    return proc


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    if a.quick:
        a.rounds, a.seconds = 1, 3
    build_env = {**os.environ, "CARGO_TARGET_DIR": TARGET}
    for what in (["-p", "keel-shop", "--bin", "gateway"],
                 ["-p", "keel-server", "--example", "bare_proxy", "--example", "bare_hyper"],
                 ["-p", "keel-loadgen"]):
        subprocess.run(["cargo", "build", "--release", "-q"] + what, cwd=ROOT, check=True, env=build_env)
    systems = ["bare", "keel"]
    notes = []
    for pkg, binary in (("nginx-light", "nginx"), ("haproxy", "haproxy")):
        if ensure(pkg, binary):
            systems.append(binary)
        else:
            notes.append(f"{binary}: could not be installed here; skipped")
    tmp = tempfile.mkdtemp(prefix="keel-s3-")
    upstream_port = free_port()
    upstream = subprocess.Popen(["taskset", "-c", "0", os.path.join(REL, "examples", "bare_hyper"),
                                 f"127.0.0.1:{upstream_port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(upstream_port, upstream)
    load_start = open("/proc/loadavg").read().split()[:3]
    key = ["x-api-key: demo-secret-key"]
    secs = f"{a.seconds}s"
    rows, curve = [], []
    try:
        for rnd in range(1, a.rounds + 1):
            order = systems if rnd % 2 else list(reversed(systems))
            sat, shed = {}, {}
            for s in order:
                port = free_port()
                p = start(s, port, upstream_port, tmp)
                try:
                    # Saturation: the best zero-error throughput of a closed-loop sweep. (Keel's
                    # adaptive limit sheds with 503 when concurrency outgrows what the core
                    # serves at its baseline latency; such a point does not count.)
                    sat[s], shed[s] = 0.0, []
                    for conc in (8, 16, 32, 64):
                        r = loadgen(f"http://127.0.0.1:{port}/api/users/x",
                                    ["--closed", str(conc), "--duration", secs, "--warmup", "1s"], key)
                        if r["errors"] == 0:
                            sat[s] = max(sat[s], r["achieved_rps"])
                        else:
                            shed[s].append(f"{conc}: {r['errors']} errors of {r['ok'] + r['errors']}")
                    # Latency against load: 25/50/90 % of its own saturation (for the chart).
                    for pct in (25, 50, 90):
                        rate = sat[s] * pct / 100
                        r = loadgen(f"http://127.0.0.1:{port}/api/users/x",
                                    ["--rate", f"{rate:.0f}", "--connections", "64", "--duration", secs,
                                     "--warmup", "2s", "--server-pid", str(p.pid)], key)
                        curve.append({"round": rnd, "system": s, "point": f"p{pct}", "offered_rps": rate,
                                      "valid": r["valid"] and r["errors"] == 0, "p50_us": r["p50_us"],
                                      "p99_us": r["p99_us"], "p999_us": r["p999_us"]})
                finally:
                    p.kill()
                    p.wait()
            rate = 0.5 * min(v for v in sat.values() if v > 0)
            for s in order:
                port = free_port()
                p = start(s, port, upstream_port, tmp)
                try:
                    r = loadgen(f"http://127.0.0.1:{port}/api/users/x",
                                ["--rate", f"{rate:.0f}", "--connections", "64", "--duration", secs, "--warmup", "2s",
                                 "--server-pid", str(p.pid)], key)
                    rss = peak_rss_kib(p.pid)
                finally:
                    p.kill()
                    p.wait()
                rows.append({"round": rnd, "system": s, "saturation_rps": sat[s], "rate": rate, "shed": shed[s],
                             "achieved_rps": r["achieved_rps"], "valid": r["valid"], "errors": r["errors"],
                             "p50_us": r["p50_us"], "p99_us": r["p99_us"], "p999_us": r["p999_us"],
                             "cpu_us_per_req": r["server_cpu_us_per_req"] or 0.0, "peak_rss_kib": rss})
                print(f"round {rnd} {s:8} sat {sat[s]:9.0f} rps | at {rate:.0f} rps: p50 {r['p50_us']} µs p99 {r['p99_us']} µs, "
                      f"cpu {rows[-1]['cpu_us_per_req']:.1f} µs/req, rss {rss} KiB, valid {r['valid']}", flush=True)
    finally:
        upstream.kill()
    load_end = open("/proc/loadavg").read().split()[:3]

    def med(system, key):
        return statistics.median(x[key] for x in rows if x["system"] == system)

    def ratio(system, base, key):
        per_round = []
        for rnd in range(1, a.rounds + 1):
            s = [x for x in rows if x["round"] == rnd and x["system"] == system][0]
            b = [x for x in rows if x["round"] == rnd and x["system"] == base][0]
            if b[key]:
                per_round.append(s[key] / b[key])
        return statistics.median(per_round) if per_round else float("nan")

    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H%M%SZ")
    lines = [f"## S3 — gateway as reverse proxy ({a.rounds} rounds × {a.seconds:g} s, {os.cpu_count()} cores)", "",
             f"load average at start {' '.join(load_start)}, at end {' '.join(load_end)}", "",
             "| system | saturation req/s | p50 µs | p99 µs | p99.9 µs | CPU µs/req | peak RSS KiB | all points valid |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for s in systems:
        valid = all(x["valid"] and x["errors"] == 0 for x in rows if x["system"] == s)
        lines.append(f"| {s} | {med(s, 'saturation_rps'):.0f} | {med(s, 'p50_us'):.0f} | {med(s, 'p99_us'):.0f} | "
                     f"{med(s, 'p999_us'):.0f} | {med(s, 'cpu_us_per_req'):.1f} | {med(s, 'peak_rss_kib'):.0f} | {valid} |")
    lines += ["", "Latency at 50 % of the round's lowest saturation (the same offered load for every system).", "",
              "| Keel gateway ÷ | throughput | CPU per request | p99 | peak RSS |", "|---|---:|---:|---:|---:|"]
    for base in [s for s in systems if s != "keel"]:
        lines.append(f"| {base} | {ratio('keel', base, 'saturation_rps'):.2f} | {ratio('keel', base, 'cpu_us_per_req'):.2f} | "
                     f"{ratio('keel', base, 'p99_us'):.2f} | {ratio('keel', base, 'peak_rss_kib'):.2f} |")
    for s in systems:
        errs = [e for x in rows if x["system"] == s for e in x["shed"]]
        if errs:
            notes.append(f"{s}: closed-loop points with errors (not counted for saturation), by concurrency: {'; '.join(errs)}")
    notes.append("CPU per request is the proxy's utime+stime over the measured window (keel-loadgen --server-pid) "
                 "at the shared fixed rate; the upstream and the generator share CPU 0.")
    notes.append(f"Chart (p50/p99 against offered load, 25/50/90 % of each system's saturation and the shared "
                 f"rate): `s3-{stamp}.png`.")
    lines += [""] + [f"- {n}" for n in notes]
    report = "\n".join(lines) + "\n"
    os.makedirs(os.path.join(ROOT, "bench", "results"), exist_ok=True)
    with open(os.path.join(ROOT, "bench", "results", f"s3-{stamp}.md"), "w") as f:
        f.write(report)
    # The chart's input (bench/suite/chart.py): per system, points of offered load → latency.
    for x in rows:
        curve.append({"round": x["round"], "system": x["system"], "point": "shared", "offered_rps": x["rate"],
                      "valid": x["valid"] and x["errors"] == 0, "p50_us": x["p50_us"], "p99_us": x["p99_us"],
                      "p999_us": x["p999_us"]})
    summary = {}
    for s in systems:
        pts = {}
        for name in ("p25", "p50", "p90", "shared"):
            got = [x for x in curve if x["system"] == s and x["point"] == name]
            if got:
                pts[name] = {k: statistics.median(x[k] for x in got) for k in ("offered_rps", "p50_us", "p99_us", "p999_us")}
                pts[name].update(valid_rounds=sum(x["valid"] for x in got), rounds=len(got))
        summary[s] = {"points": pts}
    base = os.path.join(ROOT, "bench", "results", f"s3-{stamp}")
    meta = {"title": "S3 gateway as reverse proxy", "timestamp": stamp, "quick": "1" if a.quick else "0",
            "load_start": " ".join(load_start), "load_end": " ".join(load_end),
            "labels": {"keel": "Keel gateway", "bare": "bare hyper proxy"}}
    with open(base + ".json", "w") as f:
        json.dump({"meta": meta, "summary": summary, "raw": curve, "rows": rows}, f, indent=1)
    subprocess.run([sys.executable, os.path.join(ROOT, "bench", "suite", "chart.py"), base + ".json", base + ".png"],
                   check=False)
    print()
    print(report)


if __name__ == "__main__":
    sys.exit(main())
