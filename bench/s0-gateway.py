#!/usr/bin/env python3
"""BENCH.md's S0 quick check for the proxy: `GET /api/users/x` through the shop's gateway,
nginx, haproxy, the bare hyper proxy and (when built) pingora, each pinned to CPU 1 with one worker and in front of
the same bare hyper upstream (on CPU 0 with wrk), wrk -t1 -c64 on CPU 0; three alternating
rounds of a 2 s warm-up and a 5 s window. Prints throughput, the proxy's CPU time per request
(its threads' utime + stime from /proc) and the ratios. Wall-clock numbers: compare only within
one run.

Needs release builds (`cargo build --release -p keel-shop --bin gateway` and
`cargo build --release -p keel-server --example bare_hyper`), wrk, nginx, haproxy.
The pingora peer is optional, skipped with a note when its binary is missing; it is a standalone
crate (bench/peers/pingora, outside the workspace), built once into a cache outside the clone:
`cd bench/peers/pingora && CARGO_TARGET_DIR=~/.cache/pingora-peer-target cargo build --release`
Usage: bench/s0-gateway.py"""
import os, re, socket, subprocess, sys, tempfile, time
T = os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.expanduser("~/.cache/keel-target")), "release")
def free():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p
def wait(port):
    for _ in range(200):
        try: socket.create_connection(("127.0.0.1", port), 0.2).close(); return
        except OSError: time.sleep(0.05)
    raise SystemExit(f"port {port} never opened")
def cpu(pids):
    t = 0
    for pid in pids:
        for task in os.listdir(f"/proc/{pid}/task"):
            f = open(f"/proc/{pid}/task/{task}/stat").read().rsplit(")", 1)[1].split()
            t += int(f[11]) + int(f[12])
    return t / os.sysconf("SC_CLK_TCK")
def children(pid):
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]
d = tempfile.mkdtemp()
up = free()
# The upstream beside wrk on CPU 0, as BENCH.md's S0 has it: CPU 1 is the proxy's alone.
upstream = subprocess.Popen(["taskset", "-c", "0", f"{T}/examples/bare_hyper", f"127.0.0.1:{up}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
wait(up)
def keel(exe=None):
    port = free()
    cfg = f"{d}/gw.toml"
    open(cfg, "w").write(f'[server]\naddr = "127.0.0.1:{port}"\n\n[admin]\naddr = "127.0.0.1:{free()}"\n\n[runtime]\nworker_threads = 1\n\n[log]\nlevel = "warn"\n\n' + "".join(f'[clients.{n}]\nendpoints = ["127.0.0.1:{up}"]\n\n' for n in ("user", "order", "inventory")))
    env = dict(os.environ, KEEL_CONFIG=cfg, SHOP_RATE="1000000000", SHOP_BURST="1000000000")
    p = subprocess.Popen(["taskset", "-c", "1", exe or f"{T}/gateway"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return p, port, [p.pid]
def nginx():
    port = free()
    conf = f"{d}/nginx.conf"
    open(conf, "w").write(f"""worker_processes 1; daemon off; pid {d}/nginx.pid; error_log {d}/nginx.err;
events {{ worker_connections 4096; }}
http {{ access_log off; upstream u {{ server 127.0.0.1:{up}; keepalive 64; }}
 server {{ listen 127.0.0.1:{port}; location / {{ proxy_pass http://u; proxy_http_version 1.1; proxy_set_header Connection ""; }} }} }}""")
    p = subprocess.Popen(["taskset", "-c", "1", "nginx", "-c", conf], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    return p, port, None
def haproxy():
    port = free()
    conf = f"{d}/haproxy.cfg"
    open(conf, "w").write(f"""global
  nbthread 1
defaults
  mode http
  timeout connect 1s
  timeout client 30s
  timeout server 30s
  option http-keep-alive
frontend f
  bind 127.0.0.1:{port}
  default_backend b
backend b
  http-reuse always
  server s 127.0.0.1:{up}
""")
    p = subprocess.Popen(["taskset", "-c", "1", "haproxy", "-f", conf], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return p, port, [p.pid]
def bare_proxy():
    # hyper's server and hyper-util's pooled client with nothing between them: the floor of a
    # proxy built on the same stack as the gateway.
    port = free()
    p = subprocess.Popen(["taskset", "-c", "1", f"{T}/examples/bare_proxy", f"127.0.0.1:{port}", f"127.0.0.1:{up}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return p, port, [p.pid]
PINGORA = os.path.expanduser("~/.cache/pingora-peer-target/release/pingora-proxy-peer")
def pingora():
    # One process; its `threads = 1` worker, main and timer threads all count in cpu().
    port = free()
    p = subprocess.Popen(["taskset", "-c", "1", PINGORA, f"127.0.0.1:{port}", f"127.0.0.1:{up}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return p, port, [p.pid]
peers = [("keel", keel), ("nginx", nginx), ("haproxy", haproxy)]
if os.path.exists(f"{T}/examples/bare_proxy"): peers.append(("bare-proxy", bare_proxy))
else: print(f"bare-proxy skipped: no {T}/examples/bare_proxy (cargo build --release -p keel-server --example bare_proxy)")
if os.path.exists(PINGORA): peers.append(("pingora", pingora))
else: print(f"pingora skipped: no {PINGORA} (build: see bench/peers/pingora/README.md)")
# KEEL_BASELINE_GATEWAY=/path/to/an/older/gateway adds it as `keel-base`, measured in the same
# rounds: a before/after of a change (build the older commit in a worktree and copy its binary).
if os.environ.get("KEEL_BASELINE_GATEWAY"):
    peers.append(("keel-base", lambda: keel(os.environ["KEEL_BASELINE_GATEWAY"])))
res = {}
for rnd in range(3):
    for name, start in peers:
        p, port, pids = start()
        wait(port)
        if pids is None:
            pids = [p.pid] + children(p.pid)
        url = f"http://127.0.0.1:{port}/api/users/x"
        hdr = ["-H", "x-api-key: demo-secret-key"]
        subprocess.run(["taskset", "-c", "0", "wrk", "-t1", "-c64", "-d2s", *hdr, url], capture_output=True)
        c0 = cpu(pids)
        out = subprocess.run(["taskset", "-c", "0", "wrk", "-t1", "-c64", "-d5s", *hdr, url], capture_output=True, text=True).stdout
        c1 = cpu(pids)
        n = int(re.search(r"(\d+) requests in", out).group(1))
        non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        p.terminate(); p.wait()
        for c in pids[1:]:
            try: os.kill(c, 15)
            except OSError: pass
        time.sleep(0.3)
        res.setdefault(name, []).append((n / 5, (c1 - c0) / n * 1e6, int(non2xx.group(1)) if non2xx else 0))
upstream.terminate()
for name, rows in res.items():
    rps = sum(r[0] for r in rows) / len(rows); us = sum(r[1] for r in rows) / len(rows); bad = sum(r[2] for r in rows)
    print(f"{name:8} {rps:10.0f} req/s {us:6.2f} us CPU/req  non-2xx {bad}")
k = sum(r[1] for r in res["keel"]); print(f"keel/nginx CPU {k/sum(r[1] for r in res['nginx']):.2f}x  keel/haproxy CPU {k/sum(r[1] for r in res['haproxy']):.2f}x"
    + (f"  keel/pingora CPU {k/sum(r[1] for r in res['pingora']):.2f}x" if "pingora" in res else "")
    + (f"  keel/bare-proxy CPU {k/sum(r[1] for r in res['bare-proxy']):.2f}x" if "bare-proxy" in res else "")
    + (f"  keel/keel-base CPU {k/sum(r[1] for r in res['keel-base']):.2f}x" if "keel-base" in res else ""))
