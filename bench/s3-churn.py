#!/usr/bin/env python3
"""S3's client-churn variant (BENCH.md): every client request on a new TCP connection
(`Connection: close`), through the shop's gateway, nginx and haproxy in turn, each in front of
the same bare hyper upstream. What it measures is whether the proxy keeps its *upstream*
connections while its clients come and go: the upstream reuse ratio, 1 − (connections the
upstream accepted ÷ requests proxied), target ≥ 99.9 % (T3).

Loopback would hide TIME_WAIT (its `tcp_tw_reuse` behaviour), so the three parties sit in
different network namespaces joined by veth pairs, as BENCH.md asks:

    ns "client" (wrk, CPU 0) ──veth── root ns (the proxy, CPU 1) ──veth── ns "upstream" (CPU 0)

Each namespace has its own TCP counters: the upstream namespace's `PassiveOpens` is the number
of upstream connections the proxy opened, whoever the proxy is. Sockets in TIME_WAIT and
ESTABLISHED are counted on each side at the end of every window, with the proxy's peak
resident memory (VmHWM). The proxies run with bench/suite/s3.py's configurations (nginx
with `keepalive 256` and no master process, haproxy with `http-reuse always`). The proxy's CPU time per
request comes from /proc (all its threads, utime + stime). Wall-clock figures: compare only
within one run.

Needs root (namespaces), release builds (`cargo build --release -p keel-shop --bin gateway`
and `cargo build --release -p keel-server --example bare_hyper`), wrk, nginx, haproxy.
Usage: bench/s3-churn.py [rounds=3] [seconds=5]"""
import os, re, subprocess, sys, tempfile, time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "suite"))
import s3  # noqa: E402  (the suite's peer configurations and /proc readers)

T = s3.REL
ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 3
SECS = int(sys.argv[2]) if len(sys.argv) > 2 else 5
TAG = f"k{os.getpid() % 100000}"  # unique names: other programs may share the machine
CLIENT_NS, UP_NS = f"{TAG}c", f"{TAG}u"
# Addresses from TEST-NET-like private ranges picked per run, so two runs never collide.
NET = 64 + os.getpid() % 64
PROXY_IP, CLIENT_IP = f"10.{NET}.1.1", f"10.{NET}.1.2"
GW_UP_IP, UP_IP = f"10.{NET}.2.1", f"10.{NET}.2.2"
PROXY_PORT, UP_PORT = 18080, 18081  # on this run's own addresses




def sh(*args, check=True, **kw):
    return subprocess.run(list(args), check=check, capture_output=True, text=True, **kw)


def in_ns(ns, *args):
    return ["ip", "netns", "exec", ns, *args]


def setup():
    for ns, (here, there), (a, b) in (
        (CLIENT_NS, (f"{TAG}c0", f"{TAG}c1"), (PROXY_IP, CLIENT_IP)),
        (UP_NS, (f"{TAG}u0", f"{TAG}u1"), (GW_UP_IP, UP_IP)),
    ):
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", here, "type", "veth", "peer", "name", there)
        sh("ip", "link", "set", there, "netns", ns)
        sh("ip", "addr", "add", f"{a}/24", "dev", here)
        sh("ip", "link", "set", here, "up")
        sh(*in_ns(ns, "ip", "addr", "add", f"{b}/24", "dev", there))
        sh(*in_ns(ns, "ip", "link", "set", there, "up"))
        sh(*in_ns(ns, "ip", "link", "set", "lo", "up"))
    # The client opens a connection per request: give it the whole port range and let it
    # reuse its own TIME_WAIT ports, so the client's limits are not what is measured.
    sh(*in_ns(CLIENT_NS, "sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65000"))
    sh(*in_ns(CLIENT_NS, "sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1"))


def teardown():
    for link in (f"{TAG}c0", f"{TAG}u0"):
        sh("ip", "link", "del", link, check=False)
    for ns in (CLIENT_NS, UP_NS):
        sh("ip", "netns", "del", ns, check=False)


def tcp_counter(ns, name):
    lines = [l.split() for l in sh(*in_ns(ns, "cat", "/proc/net/snmp")).stdout.splitlines() if l.startswith("Tcp:")]
    return int(lines[1][lines[0].index(name)])


def states(ns=None):
    """(TIME_WAIT, ESTABLISHED) sockets in a namespace (the root one when ns is None)."""
    cmd = ["ss", "-tanH"]
    out = sh(*(in_ns(ns, *cmd) if ns else cmd)).stdout.splitlines()
    return sum(l.startswith("TIME-WAIT") for l in out), sum(l.startswith("ESTAB") for l in out)


def wait_port(ip, port, ns=None):
    probe = f"import socket; socket.create_connection(('{ip}', {port}), 0.2).close()"
    for _ in range(200):
        cmd = ["python3", "-c", probe]
        if sh(*(in_ns(ns, *cmd) if ns else cmd), check=False).returncode == 0:
            return
        time.sleep(0.05)
    raise SystemExit(f"{ip}:{port} never opened")


def start(name, d):
    """`name` on CPU 1 in the root namespace, with the suite's own configuration for it
    (bench/suite/s3.py), in front of the upstream namespace's server."""
    cmd, env = s3.command(name, f"{PROXY_IP}:{PROXY_PORT}", f"{UP_IP}:{UP_PORT}", d)
    return subprocess.Popen(["taskset", "-c", "1"] + cmd, env={**os.environ, **env},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main():
    if os.geteuid() != 0:
        raise SystemExit("s3-churn.py needs root (network namespaces)")
    d = tempfile.mkdtemp()
    setup()
    upstream = None
    try:
        upstream = subprocess.Popen(in_ns(UP_NS, "taskset", "-c", "0", f"{T}/examples/bare_hyper", f"{UP_IP}:{UP_PORT}"),
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(UP_IP, UP_PORT, UP_NS)
        rows = {}
        for _ in range(ROUNDS):
            for name in ("keel", "nginx", "haproxy"):
                p = start(name, d)
                wait_port(PROXY_IP, PROXY_PORT, CLIENT_NS)
                url = f"http://{PROXY_IP}:{PROXY_PORT}/api/users/x"
                wrk = in_ns(CLIENT_NS, "taskset", "-c", "0", "wrk", "-t1", "-c64",
                            "-H", "x-api-key: demo-secret-key", "-H", "Connection: close")
                sh(*wrk, "-d2s", url)  # warm-up
                opened, c0 = tcp_counter(UP_NS, "PassiveOpens"), s3.cpu_seconds(p.pid)
                out = sh(*wrk, f"-d{SECS}s", url).stdout
                opened, c1 = tcp_counter(UP_NS, "PassiveOpens") - opened, s3.cpu_seconds(p.pid)
                rss = s3.peak_rss_kib(p.pid)
                tw_proxy, est_proxy = states()
                tw_client, _ = states(CLIENT_NS)
                tw_up, est_up = states(UP_NS)
                n = int(re.search(r"(\d+) requests in", out).group(1))
                bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
                errs = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
                p.terminate()
                p.wait()
                time.sleep(1.0)
                rows.setdefault(name, []).append(dict(
                    rps=n / SECS, n=n, opened=opened, us=(c1 - c0) / max(n, 1) * 1e6,
                    non2xx=int(bad.group(1)) if bad else 0,
                    errors=sum(int(x) for x in errs.groups()) if errs else 0,
                    rss=rss, tw_proxy=tw_proxy, tw_client=tw_client, tw_up=tw_up, est_up=est_up))
        print(f"# S3 churn: a new client connection per request, {ROUNDS} rounds x {SECS} s, wrk -c64 on CPU 0, proxy on CPU 1")
        print(f"load average: {open('/proc/loadavg').read().split()[:3]}")
        print()
        print("| proxy | req/s | CPU µs/req | peak RSS | upstream connections opened | upstream reuse | TIME_WAIT proxy / client / upstream | upstream ESTABLISHED | non-2xx | socket errors |")
        print("|---|---:|---:|---:|---:|---:|---|---:|---:|---:|")
        for name, rs in rows.items():
            for r in rs:
                reuse = 1 - r["opened"] / max(r["n"], 1)
                print(f"| {name} | {r['rps']:.0f} | {r['us']:.2f} | {r['rss'] / 1024:.1f} MiB | {r['opened']} of {r['n']} requests | {reuse * 100:.3f} % | "
                      f"{r['tw_proxy']} / {r['tw_client']} / {r['tw_up']} | {r['est_up']} | {r['non2xx']} | {r['errors']} |")
        k = [r["us"] for r in rows["keel"]]
        for peer in ("nginx", "haproxy"):
            ratios = sorted(a / b["us"] for a, b in zip(k, rows[peer]))
            print(f"keel/{peer} CPU per request, median of rounds: {ratios[len(ratios) // 2]:.2f}x")
    finally:
        if upstream:
            upstream.terminate()
            upstream.wait()
        teardown()


main()
