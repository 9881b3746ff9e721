#!/usr/bin/env python3
"""Memory per idle keep-alive connection (issue 16's target: <= 4 KiB at the gateway; nginx
about 0.5 KiB): N connections (default 10,000) each send one request and then sit idle; the
server's RSS before and after, divided by N. Measured, in one run:

- the shop's gateway and nginx, each proxying `GET /api/users/x` to the same bare hyper
  upstream; the gateway twice, as configured by default (idle connections parked after
  `server.park_idle_after`) and with parking off (`0s`);
- a Keel service (`hello`, `GET /`), parked and not, beside bare hyper serving the same.

Needs release builds (`cargo build --release -p keel-shop --bin gateway -p keel-example-hello
--bin hello -p keel-server --example bare_hyper`), nginx, and a hard limit of open files above
N (`ulimit -Hn`).
Usage: bench/idle-connections.py [N]"""
import asyncio, os, socket, subprocess, sys, tempfile, time, resource
h = resource.getrlimit(resource.RLIMIT_NOFILE)[1]; resource.setrlimit(resource.RLIMIT_NOFILE, (h, h))
T = os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.expanduser("~/.cache/keel-target")), "release")
def free():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p
def rss(pids):
    t = 0
    for pid in pids:
        for l in open(f"/proc/{pid}/status"):
            if l.startswith("VmRSS:"): t += int(l.split()[1])
    return t
N = int(sys.argv[1]) if len(sys.argv) > 1 else 10000
d = tempfile.mkdtemp(); up = free()
upstream = subprocess.Popen([f"{T}/examples/bare_hyper", f"127.0.0.1:{up}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
async def hold(port, path, hdr):
    conns = []
    for i in range(N):
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(f"GET {path} HTTP/1.1\r\nhost: x\r\n{hdr}\r\n".encode()); await w.drain()
        await r.readuntil(b"\r\n\r\n")
        conns.append((r, w))
    await asyncio.sleep(3)
    return conns
def run(name, start, path="/api/users/x", hdr="x-api-key: demo-secret-key\r\n"):
    p, port, pids_fn = start()
    for _ in range(100):
        try: socket.create_connection(("127.0.0.1", port), 0.2).close(); break
        except OSError: time.sleep(0.1)
    time.sleep(1)
    pids = pids_fn(p)
    before = rss(pids)
    loop = asyncio.new_event_loop()
    conns = loop.run_until_complete(hold(port, path, hdr))
    after = rss(pids)
    print(f"{name:16} idle conns {N}: RSS {before} -> {after} KiB = {(after-before)/N:.2f} KiB each")
    for r, w in conns: w.close()
    p.terminate(); p.wait()
def keel(park=None):
    port = free(); cfg = f"{d}/gw.toml"
    park = f'\npark_idle_after = "{park}"' if park else ""
    open(cfg, "w").write(f'[server]\naddr = "127.0.0.1:{port}"{park}\n\n[admin]\naddr = "127.0.0.1:{free()}"\n\n[runtime]\nworker_threads = 1\n\n[log]\nlevel = "warn"\n\n' + "".join(f'[clients.{n}]\nendpoints = ["127.0.0.1:{up}"]\n\n' for n in ("user","order","inventory")))
    env = dict(os.environ, KEEL_CONFIG=cfg, SHOP_RATE="1000000000", SHOP_BURST="1000000000")
    return subprocess.Popen([f"{T}/gateway"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), port, lambda p: [p.pid]
def nginx():
    port = free(); conf = f"{d}/nginx.conf"
    open(conf, "w").write(f"""worker_processes 1; daemon off; pid {d}/nginx.pid; error_log {d}/nginx.err; worker_rlimit_nofile 65536;
events {{ worker_connections 20000; }}
http {{ access_log off; keepalive_timeout 300s; keepalive_requests 100000; upstream u {{ server 127.0.0.1:{up}; keepalive 64; }}
 server {{ listen 127.0.0.1:{port} backlog=4096; location / {{ proxy_pass http://u; proxy_http_version 1.1; proxy_set_header Connection ""; }} }} }}""")
    def pids(p):
        out = subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True, text=True).stdout.split()
        return [p.pid] + [int(x) for x in out]
    return subprocess.Popen(["nginx", "-c", conf], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), port, pids
def hello(park=None):
    port = free()
    env = dict(os.environ, KEEL_SERVER__ADDR=f"127.0.0.1:{port}", KEEL_ADMIN__ADDR=f"127.0.0.1:{free()}",
               KEEL_RUNTIME__WORKER_THREADS="1", KEEL_LOG__LEVEL="warn")
    if park: env["KEEL_SERVER__PARK_IDLE_AFTER"] = park
    return subprocess.Popen([f"{T}/hello"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), port, lambda p: [p.pid]
def hyper():
    port = free()
    return subprocess.Popen([f"{T}/examples/bare_hyper", f"127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), port, lambda p: [p.pid]
# ONLY=name[,name] runs a subset; PARK=<duration> overrides the parked runs' delay (default:
# the server's own default).
only = os.environ.get("ONLY", "").split(",") if os.environ.get("ONLY") else None
park = os.environ.get("PARK")
for name, start, *req in [
    ("gateway", lambda: keel(park)), ("gateway unparked", lambda: keel("0s")), ("nginx", nginx),
    ("hello", lambda: hello(park), "/", ""), ("hello unparked", lambda: hello("0s"), "/", ""),
    ("bare hyper", hyper, "/", ""),
]:
    if only is None or name in only:
        run(name, start, *req)
upstream.terminate()
