"""The host agent: a stdlib-only Python script Ferry places on each host (see ferry_agent.py).

Ferry never trusts the wire: the agent checks the DML's signature with the key pinned on the
host, every file's sha256 against the signed manifest, and every path before it writes.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

SOURCE_PATH = Path(__file__).with_name("ferry_agent.py")


@lru_cache(maxsize=1)
def source() -> bytes:
    return SOURCE_PATH.read_bytes()


@lru_cache(maxsize=1)
def compiled() -> bytes:
    """The agent's code object, marshalled for this interpreter (sessions send it along)."""
    import marshal

    return marshal.dumps(compile(source(), "ferry-agent", "exec"))


@lru_cache(maxsize=1)
def version() -> str:
    """The agent's own content hash; a host runs exactly this agent or gets it re-sent."""
    return hashlib.sha256(source()).hexdigest()[:16]


def remote_path(deploy_root: str) -> str:
    return f"{deploy_root.rstrip('/')}/.ferry/agent-{version()}.py"
