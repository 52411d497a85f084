"""The deployment journal: a CMS row for every host step, written before the step and after.

A crash at any point leaves rows with status `started` and no end: `ferry remediate recover`
reads them (with `backout.backout_actions`) and asks the hosts what is true.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from typing import Any

from sqlalchemy import select

from orchestrator.cms.db import session_scope
from orchestrator.cms.models import HostStep, utcnow


class Journal:
    def __init__(self, url: str, deployment_id: int) -> None:
        self.url = url
        self.deployment_id = deployment_id
        self._lock = threading.Lock()  # SQLite serialises writers anyway; this keeps it orderly

    def begin(self, wave: int, host: str, step: str, detail: dict[str, Any] | None = None) -> int:
        with self._lock, session_scope(self.url) as s:
            row = HostStep(
                deployment_id=self.deployment_id,
                wave_index=wave,
                host=host,
                step=step,
                status="started",
                detail=detail or {},
            )
            s.add(row)
            s.flush()
            return row.id

    def end(self, step_id: int, status: str, detail: dict[str, Any] | None = None) -> None:
        with self._lock, session_scope(self.url) as s:
            row = s.get(HostStep, step_id)
            assert row is not None
            row.status = status
            row.finished_at = utcnow()
            if detail:
                row.detail = {**(row.detail or {}), **detail}


def steps_by_host(url: str, deployment_id: int) -> dict[str, dict[str, str]]:
    """host → {step: last status} for a deployment (`started` means it may have run)."""
    out: dict[str, dict[str, str]] = defaultdict(dict)
    with session_scope(url) as s:
        rows = s.scalars(
            select(HostStep).where(HostStep.deployment_id == deployment_id).order_by(HostStep.id)
        )
        for row in rows:
            out[row.host][row.step] = row.status
    return dict(out)
