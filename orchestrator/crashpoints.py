"""Fault injection for the crash-point matrix (tests only): the journal is where it strikes.

`FERRY_CRASH_AT=STEP:PHASE[:N]` makes this process SIGKILL itself right after the journal
committed the Nth (default first) row of host step STEP — PHASE `begin` (the `started` row,
before the step acts) or `end` (its outcome, after it acted). Every step boundary of a
deployment, of its automatic backout and of `ferry remediate recover` is such a point, so a
test can kill the process at each and check that recover brings CMS and hosts back together.
Unset (always, outside tests), `reached` is one dictionary lookup.
"""

from __future__ import annotations

import os
import signal
import threading

_lock = threading.Lock()
_seen = 0


def _target() -> tuple[str, str, int] | None:
    spec = os.environ.get("FERRY_CRASH_AT")
    if not spec:
        return None
    parts = spec.split(":")
    n = int(parts[2]) if len(parts) > 2 and parts[2].isdigit() else 1
    return parts[0], parts[1] if len(parts) > 1 else "begin", n


_TARGET = _target()
ARMED = _TARGET is not None


def reached(step: str, phase: str) -> None:
    """A journal row of `step` was committed (`phase`: begin or end)."""
    global _seen
    if _TARGET is None or (step, phase) != _TARGET[:2]:
        return
    with _lock:
        _seen += 1
        if _seen == _TARGET[2]:
            os.kill(os.getpid(), signal.SIGKILL)
