"""Plot the main table (run with the peers venv's python, which has matplotlib):

benchmarks/.venv-peers/bin/python benchmarks/plot.py results.json results.png
"""

from __future__ import annotations

import json
import statistics
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

TOOLS = [("ferry", "Ferry"), ("raw", "raw OpenSSH (copy; no-op: ssh host true)"),
         ("pyinfra", "pyinfra"), ("ansible", "Ansible")]  # fmt: skip
ROWS = [("cold", "cold push"), ("incremental", "incremental 1%"), ("noop", "no-op redeploy"),
        ("noop-big", "no-op redeploy"), ("backout", "backout")]  # fmt: skip
RAW = {"noop": "fanout", "noop-big": "fanout-big"}  # raw OpenSSH's cell for a no-op row


def main(src: str, dest: str) -> None:
    cells = json.load(open(src))
    groups = sorted(
        {(c["scenario"], c["hosts"]) for k, c in cells.items() if not k.startswith("_")
         and c["scenario"] in dict(ROWS) and c["tool"] == "ferry" and c.get("seconds")},
        key=lambda g: ([s for s, _ in ROWS].index(g[0]), g[1]),
    )  # fmt: skip
    fig, ax = plt.subplots(figsize=(10, 5))
    width = 0.2
    for i, (tool, label) in enumerate(TOOLS):
        xs, ys = [], []
        for j, (sc, n) in enumerate(groups):
            src = RAW.get(sc, sc) if tool == "raw" else sc
            vals = cells.get(f"{src}|{tool}|{n}", {}).get("seconds")
            if vals:
                xs.append(j + (i - 1.5) * width)
                ys.append(statistics.median(vals))
        bars = ax.bar(xs, ys, width, label=label)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{dict(ROWS)[s]}\n{n} hosts" for s, n in groups])
    ax.set_yscale("log")
    ax.set_ylabel("seconds (median, log scale)")
    reps = cells.get("_notes", {}).get("reps", "?")
    ax.set_title(f"Ferry vs peers on one 2-core machine (medians of {reps})")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    fig.tight_layout()
    fig.savefig(dest, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
