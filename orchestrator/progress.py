"""Progress of a wave while it runs: hosts done, hosts failed (by name), bytes sent, rate.

Bytes are counted as they leave (each session's sendfile reports what it wrote), not when
a host finishes, so a long transfer shows movement. On a terminal (stderr a TTY) it is a
live `rich` bar on stderr, redrawn at most every 0.2 s; in a pipeline it is a plain line
every few seconds while the wave runs, so CI logs stay readable and a wave that stalls (a
link gone quiet, a long hook) still says so. Thread-safe: every host's worker and session
reports to it; a beat thread, one per wave, keeps the time moving between reports.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import Any

Say = Callable[[str], None]
REDRAW = 0.2  # s between two redraws of the bar
NAMED = 3  # failed hosts named in the line; more are counted


class WaveProgress:
    """`beat`: a thread that shows where the wave stands every so often (off: the caller
    calls beat_once, as a test does with its own clock)."""

    def __init__(
        self, label: str, hosts: int, say: Say, *, every: float = 5.0, beat: bool = True
    ) -> None:
        self.label, self.hosts, self.say, self.every = label, hosts, say, every
        self.done = self.sent = 0
        self.failed: list[str] = []
        self.started = time.monotonic()
        self._last = self.started
        self._lock = threading.Lock()  # counts only: nothing that may block runs under it
        self._bar: Any = None
        self._task: Any = None
        if hosts > 1 and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn

            self._bar = Progress(
                TextColumn("  {task.description}"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total} hosts"),
                TextColumn("{task.fields[detail]}"),
                console=Console(stderr=True),  # stdout may be a command's JSON result
                transient=True,
            )
            self._task = self._bar.add_task(label, total=hosts, detail="")
            self._bar.start()
        self._closed = threading.Event()
        self._beat: threading.Thread | None = None
        if beat:
            self._beat = threading.Thread(target=self._beats, name=f"{label} progress", daemon=True)
            self._beat.start()

    def _beats(self) -> None:
        while not self._closed.wait(REDRAW if self._bar is not None else self.every / 4):
            self.beat_once()

    def beat_once(self, now: float | None = None) -> None:
        """Show where the wave stands: redraw the bar, or say a line if one is due. Called
        by the beat thread only, never by a host's worker or session: a `say` that blocks
        (a full stderr pipe) holds up the line, not the transfers."""
        now = time.monotonic() if now is None else now
        with self._lock:
            due = self._bar is None and now - self._last >= self.every
            if due:
                self._last = now
            done, text = self.done, (self.line(now) if self._bar is None else self.detail(now))
        if self._bar is not None:
            self._bar.update(self._task, completed=done, detail=text)
        elif due and done < self.hosts:
            self.say(f"  {text}")

    def sending(self, n: int) -> None:
        """`n` more bytes written to a host's session (from inside its transfer: a count)."""
        with self._lock:
            self.sent += n

    def host_done(self, host: str, ok: bool) -> None:
        with self._lock:
            self.done += 1
            if not ok:
                self.failed.append(host)

    def detail(self, now: float | None = None) -> str:
        """What the bar shows beside the hosts: failures, bytes and rate, time."""
        took = (now or time.monotonic()) - self.started
        parts = []
        if self.failed:
            names = ", ".join(self.failed[:NAMED]) + (", …" if len(self.failed) > NAMED else "")
            parts.append(f"{len(self.failed)} failed ({names})")
        if self.sent:
            parts.append(f"{_mb(self.sent)} sent ({_mb(self.sent / max(took, 1e-6))}/s)")
        parts.append(f"{took:.1f}s")
        return ", ".join(parts)

    def line(self, now: float | None = None) -> str:
        return f"{self.label}: {self.done}/{self.hosts} hosts done, {self.detail(now)}"

    def close(self) -> None:
        self._closed.set()
        if self._beat is not None:
            self._beat.join(timeout=self.every)  # (a `say` stuck on stderr: not waited out)
        if self._bar is not None:
            self._bar.stop()


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"
