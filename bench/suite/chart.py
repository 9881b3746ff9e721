#!/usr/bin/env python3
"""Plots p50 and p99 latency against offered load, one line per system, from the JSON that
bench/suite/report.py (S1) or bench/suite/s2.py (S2) writes next to its report.

Usage: bench/suite/chart.py bench/results/s1-TS.json [bench/results/s1-TS.png]
Needs matplotlib (`pip install --quiet matplotlib`). Invalid points (errors, or achieved < 99 % of the
target in some round) are drawn hollow with a red ring.
"""

import json
import sys

try:
    import matplotlib
except ImportError:
    import subprocess
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "matplotlib"], check=True)
    import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LABEL = {"hyper": "bare hyper", "tonic": "bare tonic", "keel": "Keel hello", "nginx": "nginx",
         "go": "Go net/http"}
STYLE = {"hyper": ("tab:gray", "o"), "tonic": ("tab:gray", "o"), "bare": ("tab:gray", "o"),
         "keel": ("tab:blue", "s"), "keel-off": ("tab:purple", "s"), "keel-100": ("navy", "s"),
         "nginx": ("tab:green", "^"), "go": ("tab:cyan", "v"), "haproxy": ("tab:orange", "D")}


def main():
    src = sys.argv[1]
    dst = sys.argv[2] if len(sys.argv) > 2 else src.rsplit(".", 1)[0] + ".png"
    data = json.load(open(src))
    meta, summary = data["meta"], data["summary"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 5), sharey=True)
    for ax, (q, title) in zip(axes, (("p50_us", "p50"), ("p99_us", "p99"))):
        for s, m in summary.items():
            pts = sorted((v["offered_rps"], v[q], v["valid_rounds"] == v["rounds"], name)
                         for name, v in m["points"].items() if v.get(q) is not None)
            if not pts:
                continue
            color, marker = STYLE.get(s, ("tab:red", "D"))
            xs = [p[0] / 1000 for p in pts]
            ys = [p[1] for p in pts]
            ax.plot(xs, ys, color=color, marker=marker, label=meta.get("labels", {}).get(s) or LABEL.get(s, s), linewidth=1.8)
            for x, y, valid, name in ((p[0] / 1000, p[1], p[2], p[3]) for p in pts):
                if not valid:
                    ax.plot([x], [y], marker="o", markersize=14, markerfacecolor="none",
                            markeredgecolor="red", linestyle="none")
                if name == "shared":
                    ax.annotate("shared", (x, y), textcoords="offset points", xytext=(4, -12),
                                fontsize=7, color=color)
        ax.set_yscale("log")
        ax.set_xlabel("offered load (k req/s, open loop)")
        ax.set_title(f"{title} latency from scheduled send time")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("latency (µs, log scale)")
    axes[0].legend()
    axes[1].plot([], [], marker="o", markersize=10, markerfacecolor="none",
                 markeredgecolor="red", linestyle="none", label="invalid (errors, or < 99 % of target)")
    axes[1].legend(loc="upper left", fontsize=8)
    quick = " — SMOKE MODE" if str(meta.get("quick")) == "1" else ""
    what = meta.get("title") or (
        f"S1 {dict(h1='HTTP/1.1', h2c='h2c', grpc='gRPC').get(meta.get('proto', 'h1'), '')} "
        f"{'POST /echo 1 KiB' if meta.get('route') == 'echo' and meta.get('proto') != 'grpc' else ''}")
    fig.suptitle(f"{what}, 1 thread each, server CPU 1 / generator CPU 0 — "
                 f"{meta.get('timestamp', '')}{quick}\nmedians of {len(set(r['round'] for r in data['raw']))} "
                 f"round(s); load average {meta.get('load_start', '')} → {meta.get('load_end', '')} "
                 "(shared 2-core machine)", fontsize=10)
    fig.tight_layout()
    fig.savefig(dst, dpi=110)
    print(dst)


if __name__ == "__main__":
    main()
