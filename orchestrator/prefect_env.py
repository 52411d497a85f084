"""Prefect's environment: a warm embedded server, quiet and offline, unless told otherwise.

Call `configure_prefect()` before the first `import prefect` (importing costs ~1.5 s, so the
CLI imports flows lazily). Three modes, first match wins:

    PREFECT_API_URL=<url>     a standing Prefect server (workers, a team's UI): used as is
    FERRY_PREFECT=ephemeral   Prefect's ephemeral server, started afresh by every command
                              (~9–12 s each) and gone when it ends: for CI jobs that must
                              leave nothing running
    (neither: the default)    the warm server of `orchestrator.prefect_server`: started on
                              first use under the Ferry home, reused by later commands,
                              stopped by `ferry prefect stop` or after idling
                              (FERRY_PREFECT_IDLE seconds, default 900)

All three keep Prefect's home, and so its run history, in `.ferry/prefect` unless
PREFECT_HOME says otherwise. Facts behind these settings: ../shared/notes/prefect.md.
"""

from __future__ import annotations

import atexit
import gc
import os
import sys
from collections.abc import Callable
from pathlib import Path

from orchestrator.errors import BadInput

QUIET = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "PREFECT_LOGGING_LEVEL": "WARNING",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    # the run's log in Prefect holds Ferry's progress lines (flows.RunLog); Prefect's own
    # loggers stay at WARNING, so little else is sent
    "PREFECT_LOGGING_TO_API_ENABLED": "true",
    # a failing task's traceback belongs in Ferry's crash log, not on the operator's screen
    "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "CRITICAL",
}

MODES = ("warm", "ephemeral")


def prefect_home() -> Path:
    """Prefect's home for Ferry: PREFECT_HOME if set, else `<Ferry home>/prefect`."""
    from orchestrator.settings import get_settings  # settings cost ~0.1 s; the watchdog skips

    if os.environ.get("PREFECT_HOME"):
        return Path(os.environ["PREFECT_HOME"]).resolve()
    return get_settings().prefect_home.resolve()


def prefect_mode() -> str:
    """'server' (PREFECT_API_URL is set), else FERRY_PREFECT: 'warm' (default) or 'ephemeral'."""
    if os.environ.get("PREFECT_API_URL"):
        return "server"
    mode = os.environ.get("FERRY_PREFECT") or "warm"
    if mode not in MODES:
        raise BadInput(
            f"FERRY_PREFECT={mode!r}: expected 'warm' (the default: a server kept running "
            "between commands) or 'ephemeral' (one per command, nothing left running)"
        )
    return mode


def configure_prefect(progress: Callable[[str], None] | None = None) -> str:
    """Set Prefect's environment; return what the flow will talk to, for the progress line.

    'server <url>', 'embedded server <url> (kept warm; …)' or 'embedded <home>' (ephemeral).
    `progress` hears about a first start (~6–20 s); by default it goes to stderr.
    """
    said = _configure(progress)
    plain_http_trust(os.environ.get("PREFECT_API_URL", ""))  # none set: the ephemeral mode
    refresh_imported()
    return said


def refresh_imported() -> None:
    """Prefect already imported (a warm child, orchestrator/zygote.py): it built its settings
    and its logging at import from another environment; build both again from this one.

    The logging is built again only when what it is made of changed (~80 ms of CPU per
    command, most of it Prefect serializing every setting to fill in three): the warm
    process imported Prefect with Ferry's own defaults, which are most commands' too."""
    global _logging_made_from
    context = sys.modules.get("prefect.context")
    if context is None:
        return
    context.refresh_global_settings_context()
    logging_config = sys.modules.get("prefect.logging.configuration")
    if logging_config is not None and logging_config.PROCESS_LOGGING_CONFIG:
        inputs = logging_inputs()
        if inputs is None or inputs != _logging_made_from:
            logging_config.setup_logging(incremental=False)
            _logging_made_from = inputs


# the default logging.yml fills in these settings and nothing else (a test holds Prefect to it)
LOGGING_TEMPLATE_NAMES = frozenset(
    {"PREFECT_LOGGING_LEVEL", "PREFECT_SERVER_LOGGING_LEVEL", "PREFECT_INTERNAL_LOGGING_LEVEL"}
)


def logging_inputs() -> tuple[object, ...] | None:
    """Everything Prefect's default logging config is made of, from the current settings and
    environment; None when the user's own logging file replaces it (always built afresh)."""
    from prefect.settings import PREFECT_LOGGING_SETTINGS_PATH, get_current_settings

    if PREFECT_LOGGING_SETTINGS_PATH.value().exists():
        return None
    settings = get_current_settings()
    # any key of the config can be overridden by a PREFECT_LOGGING_<PATH> variable
    env = sorted((k, v) for k, v in os.environ.items() if k.startswith("PREFECT_LOGGING_"))
    # (where a user's file would be is not an input when there is none: it follows PREFECT_HOME)
    own = settings.logging.model_dump(exclude={"config_path"})
    return (own, settings.server.logging_level, settings.internal.logging_level, tuple(env))


def note_imported() -> None:
    """In the warm process, right after importing Prefect: what its logging was made of."""
    global _logging_made_from
    _logging_made_from = logging_inputs()


_logging_made_from: tuple[object, ...] | None = None


def quiet_defaults() -> None:
    """Ferry's Prefect settings (QUIET), where the environment does not set its own."""
    for key, value in QUIET.items():
        os.environ.setdefault(key, value)


def _configure(progress: Callable[[str], None] | None) -> str:
    quiet_defaults()
    _exit_quickly()
    mode = prefect_mode()
    if mode == "server":
        return f"server {os.environ['PREFECT_API_URL']}"
    home = prefect_home()
    home.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_HOME", str(home))
    if mode == "ephemeral":
        return f"embedded {home}"
    from orchestrator.prefect_server import ensure_server

    url = ensure_server(home, progress=progress or _to_stderr)
    os.environ["PREFECT_API_URL"] = url
    return f"embedded server {url} (kept warm; `ferry prefect stop` ends it)"


# Every Prefect client builds a TLS context from its CA file (certifi's, ~140 certificates)
# whatever the API's scheme: 34–44 ms of CPU here, and a deploy makes four clients. For an
# API on plain HTTP no TLS is ever spoken, so Prefect is given a CA file that trusts nothing
# instead: one self-signed certificate whose key was thrown away when it was made (~1 ms to
# load). Were a client ever to speak TLS with it, it would fail closed. An https API, a
# PREFECT_API_SSL_CERT_FILE of the user's, or a skipped verification are left as they are.
NO_TRUST_FILE = "trusts-nothing.pem"


def plain_http_trust(url: str) -> None:
    """For a plain-HTTP API URL, point Prefect's CA file at one that trusts nothing."""
    if not url.lower().startswith("http://") or os.environ.get("PREFECT_API_SSL_CERT_FILE"):
        return
    if os.environ.get("PREFECT_API_TLS_INSECURE_SKIP_VERIFY", "").lower() in ("1", "true"):
        return
    path = prefect_home() / NO_TRUST_FILE
    try:
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}")
            tmp.write_bytes(_keyless_certificate())
            os.replace(tmp, path)
    except OSError:
        return  # a home this user cannot write: Prefect's default bundle, slower
    os.environ["PREFECT_API_SSL_CERT_FILE"] = str(path)


def _keyless_certificate() -> bytes:
    """A self-signed certificate (PEM) whose private key is never kept: it vouches for
    nothing anyone can present."""
    from cryptography.hazmat.primitives import serialization

    from orchestrator.certificates import self_signed

    _, cert = self_signed("Ferry: trusts nothing (plain-HTTP Prefect API)", 1)
    return cert.public_bytes(serialization.Encoding.PEM)


def _exit_quickly() -> None:
    """Spare the exit ~1 s: collecting the objects Prefect's import made (measured here).

    Registered before `import prefect`, so it runs after Prefect's own exit handlers (they
    run last-in, first-out) have sent their events; the OS takes back the memory anyway.
    """
    global _exit_registered
    if not _exit_registered:
        atexit.register(gc.freeze)
        _exit_registered = True


_exit_registered = False


def _to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
