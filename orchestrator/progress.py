"""Progress of a wave while it runs: hosts done, bytes sent, rate.

On a terminal it is a live `rich` bar; in a pipeline (stderr is not a TTY) it is a plain
line at most every few seconds and at the end, so CI logs stay readable. Thread-safe: every
host's worker reports to it.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import Any

Say = Callable[[str], None]


class WaveProgress:
    def __init__(self, label: str, hosts: int, say: Say, *, every: float = 5.0) -> None:
        self.label, self.hosts, self.say, self.every = label, hosts, say, every
        self.done = self.failed = self.bytes = 0
        self.started = time.monotonic()
        self._last = self.started
        self._lock = threading.Lock()
        self._bar: Any = None
        self._task: Any = None
        if hosts > 1 and sys.stderr.isatty():
            from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

            self._bar = Progress(
                TextColumn("  {task.description}"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total} hosts"),
                DownloadColumn(),
                TextColumn("{task.fields[rate]}"),
                transient=True,
            )
            self._task = self._bar.add_task(label, total=hosts, rate="")
            self._bar.start()

    def host_done(self, ok: bool, sent: int) -> None:
        with self._lock:
            self.done += 1
            self.failed += 0 if ok else 1
            self.bytes += sent
            now = time.monotonic()
            rate = self.bytes / max(now - self.started, 1e-6)
            if self._bar is not None:
                self._bar.update(
                    self._task,
                    completed=self.done,
                    rate=f"{rate / 1e6:.0f} MB/s" if self.bytes else "",
                )
                return
            if self.hosts > 1 and now - self._last >= self.every and self.done < self.hosts:
                self._last = now
                self.say(f"  {self.line(now)}")

    def line(self, now: float | None = None) -> str:
        took = (now or time.monotonic()) - self.started
        sent = f", {self.bytes / 1e6:.1f} MB sent ({self.bytes / 1e6 / max(took, 1e-6):.0f} MB/s)"
        return (
            f"{self.label}: {self.done}/{self.hosts} hosts done"
            + (f", {self.failed} failed" if self.failed else "")
            + (sent if self.bytes else "")
            + f", {took:.1f}s"
        )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
