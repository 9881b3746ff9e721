#!/usr/bin/env python3
"""Charts bench/overload.sh's JSON: per scenario, goodput and admitted p99 against offered load,
shedding on and off.

Usage: bench/overload-chart.py bench/results/overload-TS.json bench/results/overload-TS.png
Needs matplotlib (installed with pip if missing).
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
from matplotlib.ticker import NullFormatter  # noqa: E402


def main():
    src, dst = sys.argv[1], sys.argv[2]
    points = [p for p in json.load(open(src)) if "offered" in p]
    scenarios = list(dict.fromkeys(p["scenario"] for p in points))
    fig, axes = plt.subplots(2, len(scenarios), figsize=(4 * len(scenarios), 7), squeeze=False)
    for col, name in enumerate(scenarios):
        for mode, colour in (("on", "tab:blue"), ("off", "tab:red")):
            pts = sorted((p for p in points if p["scenario"] == name and p["shedding"] == mode),
                         key=lambda p: p["offered"])
            x = [p["offered"] for p in pts]
            axes[0][col].plot(x, [p["goodput"] for p in pts], "o-", color=colour,
                              label=f"shedding {mode}")
            axes[1][col].plot(x, [p["p99_ms"] for p in pts], "o-", color=colour,
                              label=f"shedding {mode}")
        axes[0][col].set_title(name)
        axes[0][col].set_ylabel("goodput ÷ saturation")
        axes[1][col].set_ylabel("admitted p99 (ms)")
        axes[1][col].set_yscale("log")
        for row in (0, 1):
            axes[row][col].set_xscale("log")
            axes[row][col].set_xticks([0.25, 0.5, 0.8, 3.0], ["0.25", "0.5", "0.8", "3"])
            axes[row][col].xaxis.set_minor_formatter(NullFormatter())
            axes[row][col].set_xlabel("offered ÷ saturation")
            axes[row][col].grid(True, alpha=0.3)
            axes[row][col].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


if __name__ == "__main__":
    main()
