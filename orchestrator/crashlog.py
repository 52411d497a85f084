"""Crash logs: an unexpected error's traceback goes to a file under the Ferry home's logs/,
and the one line the user sees says where (exit 1)."""

from __future__ import annotations

import traceback
from datetime import UTC, datetime


def write(exc: BaseException | None = None) -> str:
    """Write the traceback of `exc` (or of the error being handled); returns the path."""
    from orchestrator.settings import get_settings

    text = "".join(traceback.format_exception(exc)) if exc is not None else traceback.format_exc()
    try:
        log_dir = get_settings().log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        path = log_dir / f"crash-{datetime.now(UTC):%Y%m%dT%H%M%S.%f}.log"
        path.write_text(text)
        return str(path)
    except Exception:  # noqa: BLE001 - the crash report must not crash
        return "(could not write a log; traceback follows)\n" + text
