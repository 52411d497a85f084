"""The host agent: a stdlib-only Python script Ferry places on each host (see ferry_agent.py).

Ferry never trusts the wire: the agent checks the DML's signature with the key pinned on the
host, every file's sha256 against the signed manifest, and every path before it writes.
"""

from __future__ import annotations

import hashlib
import threading
from functools import lru_cache
from pathlib import Path

SOURCE_PATH = Path(__file__).with_name("ferry_agent.py")


@lru_cache(maxsize=1)
def source() -> bytes:
    return SOURCE_PATH.read_bytes()


_compiling = threading.Lock()
_compiled: list[bytes] = []


def compiled() -> bytes:
    """The agent's code object, marshalled for this interpreter (sessions send it along).

    Made once, under a lock: a wave opens up to FERRY_SSH_STARTS sessions at the same
    moment, and each compile holds the GIL for ~15 ms (lru_cache alone let every one of
    them compile it)."""
    if not _compiled:
        with _compiling:
            if not _compiled:
                import marshal

                _compiled.append(marshal.dumps(compile(source(), "ferry-agent", "exec")))
    return _compiled[0]


@lru_cache(maxsize=1)
def version() -> str:
    """The agent's own content hash; a host runs exactly this agent or gets it re-sent."""
    return hashlib.sha256(source()).hexdigest()[:16]


def remote_path(deploy_root: str) -> str:
    return f"{deploy_root.rstrip('/')}/.ferry/agent-{version()}.py"
