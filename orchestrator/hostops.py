"""What Ferry does on one host, as requests to its agent session (Act layer; thin, repeatable).

Every operation is idempotent: staging skips objects the host holds, verify is a no-op for
a published release, switch to the current release changes nothing. Failures raise
StepFailed (the host's step failed; the output is kept as evidence; `kind` is the agent's
error kind) or TransportError (the host cannot be reached). Hooks and checks arrive
rendered by the planner (orchestrator.context): this module renders nothing, and the agent
runs them as subprocesses with the step's timeout.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from orchestrator.context import hook_env
from orchestrator.errors import StepFailed
from orchestrator.inventory import Host, SSHSettings
from orchestrator.rollout import RenderedCheck
from orchestrator.transport.session import AgentSession

_MARGIN = 10.0  # a request outlives the command it runs by this much (the agent kills it)


class HostOps:
    """The agent's operations and the plan's hooks on one host, over one session."""

    def __init__(self, session: AgentSession, timeout: float) -> None:
        self.session = session
        self.root = session.root
        self.timeout = timeout

    @classmethod
    def open(
        cls, host: Host, ssh: SSHSettings, root: str, *, timeout: float, connect_timeout: float
    ) -> HostOps:
        return cls(AgentSession(host, ssh, root, connect_timeout=connect_timeout), timeout)

    @property
    def name(self) -> str:
        return self.session.name

    def close(self) -> None:
        self.session.close()

    def hang_up(self) -> Any:
        """The session ends without waiting (AgentSession.hang_up): its connection to reap."""
        return self.session.hang_up()

    def call(
        self, step: str, op: str, *, payload: bytes | None = None, **args: Any
    ) -> dict[str, Any]:
        return self.session.request(step, op, args, timeout=self.timeout, payload=payload)

    def state(self) -> dict[str, Any]:
        return self.call("stage", "state")

    def inspect(
        self,
        rid: str,
        key_hex: str,
        full: bool,
        digest: str,
        rotations: list[dict[str, str]] | None = None,
    ) -> dict[str, Any]:
        """Pin the DML key (moving a host that pins an older key along its signed
        `rotations`); does the host hold releases/<rid> intact? What runs now?
        (`digest`: the verified package's, which the host's copy must match)"""
        args: dict[str, Any] = {"id": rid, "key": key_hex, "full": full, "digest": digest}
        if rotations:
            args["rotations"] = rotations
        return self.call("stage", "inspect", **args)

    def stage(
        self,
        rid: str,
        manifest: bytes,
        signature: bytes,
        frames: Callable[[list[str]], Path],
        known: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """Send the signed manifest, learn what is missing, send only that (same session).
        `known`: release id → digest, of releases the CMS records on this host: the agent
        checks their stored manifests by digest (the pure-Python ed25519 costs ~10 ms each)."""
        return self.session.receive(
            rid, manifest, signature, frames, timeout=self.timeout, known=known
        )

    def verify(self, rid: str, known: dict[str, str] | None = None) -> dict[str, Any]:
        return self.call("verify", "verify", id=rid, known=known)

    def write_config(self, rid: str, files: dict[str, str]) -> dict[str, Any]:
        return self.call("install", "config", id=rid, payload=json.dumps(files).encode())

    def switch(self, rid: str | None, step: str = "activate") -> dict[str, Any]:
        return self.call(step, "switch", id=rid, none=rid is None)

    def readback(
        self, rid: str | None, full: bool, *, rehash: bool = False, digest: str | None = None
    ) -> dict[str, Any]:
        """`current` and the files: sizes; with `full`, the sha256 of every file whose
        identity changed since it was verified; with `rehash`, of every file (drift)."""
        return self.call("readback", "readback", id=rid, full=full, rehash=rehash, digest=digest)

    def prune(self, keep: int, protect: list[str]) -> dict[str, Any]:
        return self.call("prune", "prune", keep=keep, protect=[p for p in protect if p])

    def run(
        self, step: str, command: str, env: dict[str, str], cwd: str | None, *, lock: bool = True
    ) -> dict[str, Any]:
        """A command on the host; `lock=False`: it only reads the host, or ends the agent
        that holds it (the agent lock, docs/deploy.md), so it never waits for that."""
        args = {"command": command, "env": env, "cwd": cwd, "timeout": self.timeout}
        if not lock:
            args["lock"] = False
        return self.session.request(step, "run", args, timeout=self.timeout + _MARGIN)

    def hook(self, step: str, command: str, context: dict[str, str]) -> str:
        """Run a rendered plan hook in the release directory, with FERRY_* env."""
        res = self.run(step, command, hook_env(context), context.get("release_path") or self.root)
        if res["rc"] != 0:
            why = (
                f"timed out after {self.timeout:g} s (`timeouts.step` in the plan), its process "
                "group killed"
                if res.get("timed_out")
                else f"hook exited {res['rc']}"
            )
            raise StepFailed(self.name, step, why, res["output"])
        return str(res["output"])

    def check(self, check: RenderedCheck) -> tuple[bool, str]:
        """Run one rendered health check on the host; (passed, evidence)."""
        if check.kind == "command":
            res = self.session.request(
                "milestone",
                "run",
                {"command": check.target, "cwd": None, "timeout": check.timeout, "lock": False},
                timeout=check.timeout + _MARGIN,
            )
            return res["rc"] == 0, f"{check.label}: exit {res['rc']} {res['output'].strip()[-500:]}"
        args = {
            "kind": check.kind,
            "target": check.target,
            "port": check.port,
            "status": check.status,
            "timeout": check.timeout,
        }
        res = self.session.request("milestone", "probe", args, timeout=check.timeout + _MARGIN)
        label = f"HTTP {res['got']}" if check.kind == "http" else res["got"]
        return bool(res["ok"]), f"{check.label}: {label}"
