"""Prefect's environment: embedded, quiet and offline unless PREFECT_API_URL names a server.

Call `configure_prefect()` before the first `import prefect` (importing costs ~1.5 s, so the
CLI imports flows lazily). Facts behind these settings: ../shared/notes/prefect.md.
"""

from __future__ import annotations

import os

from orchestrator.settings import get_settings

_QUIET = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "PREFECT_LOGGING_LEVEL": "WARNING",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    "PREFECT_LOGGING_TO_API_ENABLED": "false",
    # a failing task's traceback belongs in Ferry's crash log, not on the operator's screen
    "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "CRITICAL",
}


def configure_prefect() -> str:
    """Set Prefect's environment; return 'server <url>' or 'embedded <home>'."""
    for key, value in _QUIET.items():
        os.environ.setdefault(key, value)
    if os.environ.get("PREFECT_API_URL"):
        return f"server {os.environ['PREFECT_API_URL']}"
    home = get_settings().prefect_home.resolve()
    home.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_HOME", str(home))
    return f"embedded {home}"
