"""The report's plots as PNG bytes: a deployment timeline and KPI trends (matplotlib).

matplotlib is imported only here, when a plot is drawn, and always with the Agg backend:
no display, no GUI toolkit, the same pixels on a server as on a laptop.
"""

from __future__ import annotations

import io
from collections import defaultdict
from datetime import datetime, timedelta
from typing import Any

STEP_COLOURS = {
    "stage": "#9ecae1",
    "verify": "#6baed6",
    "snapshot": "#c6dbef",
    "install": "#4292c6",
    "activate": "#2171b5",
    "check": "#41ab5d",
    "revert": "#e6550d",
    "reactivate": "#fd8d3c",
    "restore": "#fdae6b",
    "recheck": "#fdd0a2",
}
BACKOUT_STEPS = {"revert", "reactivate", "restore", "recheck"}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    _pyplot().close(fig)
    return buf.getvalue()


def timeline_png(deployments: list[dict[str, Any]], limit: int = 6) -> bytes:
    """The newest deployments' host steps over time, one row per deployment × host, waves
    shaded, backout steps in orange and a red marker where a milestone failed."""
    plt = _pyplot()
    deps = [d for d in sorted(deployments, key=lambda d: d["id"]) if d["steps"]][-limit:]
    rows: list[tuple[str, list[dict[str, Any]]]] = []
    for d in deps:
        by_host: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for s in d["steps"]:
            by_host[s["host"]].append(s)
        for host in sorted(by_host):
            rows.append((f"#{d['id']} {host}", by_host[host]))
    fig, ax = plt.subplots(figsize=(10, max(2.0, 0.28 * len(rows) + 1.2)))
    if not rows:
        ax.text(0.5, 0.5, "no deployments in the period", ha="center", va="center")
        ax.set_axis_off()
        return _png(fig)
    for y, (_label, steps) in enumerate(rows):
        for s in steps:
            start = s["started_at"]
            end = s["finished_at"] or start + timedelta(seconds=0.2)
            width = max((end - start).total_seconds(), 0.05) / 86400
            colour = STEP_COLOURS.get(s["step"], "#999999")
            ax.barh(y, width, left=_num(start), height=0.7, color=colour,
                    edgecolor="#b30000" if s["status"] == "failed" else "none")  # fmt: skip
    for d in deps:
        for w in d["waves"]:
            if w["status"] == "failed" and w["finished_at"]:
                ax.axvline(_num(w["finished_at"]), color="#b30000", linestyle="--", linewidth=1)
    ax.set_yticks(range(len(rows)), [r[0] for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.xaxis_date()
    ax.set_title("Deployment timeline (host steps; orange: backout; dashed red: failed milestone)")
    from matplotlib.patches import Patch

    ax.legend(
        handles=[Patch(color=c, label=n) for n, c in STEP_COLOURS.items()],
        fontsize=6, ncol=5, loc="lower right",
    )  # fmt: skip
    fig.autofmt_xdate()
    return _png(fig)


def _num(at: datetime) -> float:
    from matplotlib.dates import date2num

    return float(date2num(at))


def trend_series(deployments: list[dict[str, Any]], since: datetime, until: datetime) -> dict:
    """Per day of the period: deployments, failed deployments, change failure rate (pure)."""
    days = max(1, (until.date() - since.date()).days + 1)
    out: dict[str, list[Any]] = {"day": [], "deployments": [], "failed": [], "failure_rate": []}
    for i in range(days):
        day = since.date() + timedelta(days=i)
        mine = [
            d
            for d in deployments
            if d["strategy"] != "backout" and d["started_at"].date() == day
            and d["status"] not in ("planned", "running", "backing-out", "refused")
        ]  # fmt: skip
        bad = [d for d in mine if d["status"] != "succeeded"]
        out["day"].append(day.isoformat())
        out["deployments"].append(len(mine))
        out["failed"].append(len(bad))
        out["failure_rate"].append(round(len(bad) / len(mine), 4) if mine else 0.0)
    return out


def trends_png(series: dict[str, list[Any]]) -> bytes:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 3))
    x = list(range(len(series["day"])))
    ax.bar(x, series["deployments"], color="#6baed6", label="deployments")
    ax.bar(x, series["failed"], color="#de2d26", label="failed / backed out")
    ax2 = ax.twinx()
    ax2.plot(x, series["failure_rate"], color="#252525", marker="o", label="change failure rate")
    ax2.set_ylim(0, 1.05)
    ax.set_ylim(bottom=0)
    step = max(1, len(x) // 10)
    ax.set_xticks(x[::step], series["day"][::step], fontsize=7, rotation=30)
    ax.set_title("KPI trends per day")
    ax.legend(loc="upper left", fontsize=7)
    ax2.legend(loc="upper right", fontsize=7)
    return _png(fig)
