"""What Ferry does on one host, over one SSH connection (Act layer; thin and repeatable).

Every operation is idempotent: staging skips objects the host holds, verify is a no-op for
a published release, switch to the current release changes nothing. Failures raise
StepFailed (the host's step failed; the output is kept as evidence; `kind` is the agent's
error kind) or TransportError (the host cannot be reached). Hooks and checks arrive
rendered by the planner (orchestrator.context): this module renders nothing.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

from orchestrator import agent
from orchestrator.context import hook_env
from orchestrator.errors import StepFailed, TransportError
from orchestrator.rollout import RenderedCheck
from orchestrator.transport import openssh
from orchestrator.transport.openssh import OpenSSHStream
from orchestrator.transport.ssh import ChannelStream, SSHHost, Stream


class HostOps:
    """The agent's operations and the plan's hooks on one host."""

    def __init__(self, conn: SSHHost, deploy_root: str, timeout: float) -> None:
        self.conn = conn
        self.root = deploy_root.rstrip("/") or "/"
        self.timeout = timeout
        self.agent_path = agent.remote_path(self.root)
        self._agent_ready = False

    @property
    def name(self) -> str:
        return self.conn.name

    def _agent_cmd(self, op: str, *args: str) -> str:
        parts = ["python3", self.agent_path, op, "--root", self.root, *args]
        return " ".join(shlex.quote(p) for p in parts)

    def install_agent(self) -> None:
        ferry_dir = shlex.quote(f"{self.root}/.ferry")
        dest = shlex.quote(self.agent_path)
        up = self.conn.run(
            f"mkdir -p {ferry_dir} && cat > {dest}.tmp && mv {dest}.tmp {dest}",
            timeout=self.timeout,
            stdin=agent.source(),
        )
        if not up.ok:
            raise StepFailed(self.name, "stage", "cannot install the Ferry agent", up.output)

    def call(self, step: str, op: str, *args: str, stdin: bytes | None = None) -> dict[str, Any]:
        """Run an agent operation; a host without this agent version gets it, once."""
        res = self.conn.run(self._agent_cmd(op, *args), timeout=self.timeout, stdin=stdin)
        if res.rc == 2 and "can't open file" in res.output and not self._agent_ready:
            self.install_agent()
            res = self.conn.run(self._agent_cmd(op, *args), timeout=self.timeout, stdin=stdin)
        self._agent_ready = True
        return parse_result(self.name, step, res.rc, res.output)

    def state(self) -> dict[str, Any]:
        return self.call("stage", "state")

    def inspect(self, rid: str, key_hex: str, full: bool) -> dict[str, Any]:
        """Pin the DML key; does the host hold releases/<rid> intact? What runs now?"""
        args = ["--id", rid, "--key", key_hex] + (["--full"] if full else [])
        return self.call("stage", "inspect", *args)

    def stage(
        self,
        rid: str,
        manifest: bytes,
        signature: bytes,
        frames: Callable[[list[str]], Path],
    ) -> dict[str, Any]:
        """One session: send the signed manifest, learn what is missing, send only that.

        Call after `inspect` (which installs the agent and pins the key)."""
        command = self._agent_cmd("receive", "--id", rid)
        header = json.dumps({"manifest_len": len(manifest), "sig_len": len(signature)})
        first = header.encode() + b"\n" + manifest + signature
        if self.conn.ssh.bulk == "openssh" and openssh.available():
            stream: Stream = OpenSSHStream(
                self.conn.host,
                self.conn.ssh,
                command,
                connect_timeout=self.conn.connect_timeout,
                timeout=self.timeout,
            )
        else:
            stream = ChannelStream(self.conn, command, self.timeout)
        sent = 0
        try:
            stream.sendall(first)
            line = stream.read_line().decode(errors="replace")
            if line.startswith("NEED "):
                # the objects in frames, then END (bytes_sent counts the whole frames file)
                sent = stream.sendfile(frames(json.loads(line[5:])))
                line = ""
            rc, rest = stream.finish()
        except OSError as exc:
            raise StepFailed(self.name, "stage", f"transfer failed: {exc}") from None
        finally:
            stream.close()
        if rc == 255 and isinstance(stream, OpenSSHStream):
            raise TransportError(self.name, "ssh: " + rest.decode(errors="replace").strip()[-300:])
        result = parse_result(self.name, "stage", rc, line + rest.decode(errors="replace"))
        result["bytes_sent"] = sent
        return result

    def verify(self, rid: str) -> dict[str, Any]:
        return self.call("verify", "verify", "--id", rid)

    def write_config(self, rid: str, files: dict[str, str]) -> dict[str, Any]:
        return self.call("install", "config", "--id", rid, stdin=json.dumps(files).encode())

    def switch(self, rid: str | None, step: str = "activate") -> dict[str, Any]:
        return self.call(step, "switch", *(["--id", rid] if rid else ["--none"]))

    def readback(self, rid: str | None, full: bool) -> dict[str, Any]:
        args = (["--id", rid] if rid else []) + (["--full"] if full else [])
        return self.call("readback", "readback", *args)

    def prune(self, keep: int, protect: list[str]) -> dict[str, Any]:
        args = [f"--keep={keep}"] + [f"--protect={p}" for p in protect if p]
        return self.call("prune", "prune", *args)

    def hook(self, step: str, command: str, context: dict[str, str]) -> str:
        """Run a rendered plan hook in the release directory, with FERRY_* env."""
        cwd = context.get("release_path") or self.root
        script = f"cd {shlex.quote(str(cwd))} 2>/dev/null || cd {shlex.quote(self.root)}; {command}"
        res = self.conn.run(script, timeout=self.timeout, env=hook_env(context))
        if not res.ok:
            raise StepFailed(self.name, step, f"hook exited {res.rc}", res.output)
        return res.output

    def check(self, check: RenderedCheck) -> tuple[bool, str]:
        """Run one rendered health check on the host; (passed, evidence)."""
        if check.kind == "command":
            cmd = check.target
        elif check.kind == "http":
            cmd = _PY_HTTP.format(url=shlex.quote(check.target), t=check.timeout)
        else:
            cmd = _PY_TCP.format(addr=shlex.quote(check.target), port=check.port, t=check.timeout)
        res = self.conn.run(cmd, timeout=check.timeout + 5)
        if check.kind == "http":
            got = res.output.strip().splitlines()[-1:] or ["no answer"]
            ok = res.ok and got[0] == str(check.status)
            return ok, f"{check.label}: HTTP {got[0]}"
        return res.ok, f"{check.label}: exit {res.rc} {res.output.strip()[-500:]}"


_PY_HTTP = (
    "python3 -c 'import sys,urllib.request,urllib.error\n"
    "try:\n r=urllib.request.urlopen(sys.argv[1],timeout={t}); print(r.status)\n"
    "except urllib.error.HTTPError as e: print(e.code)\n"
    'except Exception as e: print("error", e); sys.exit(1)\' {url}'
)
_PY_TCP = (
    "python3 -c 'import socket,sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), "
    "timeout={t}).close()' {addr} {port}"
)


def parse_result(host: str, step: str, rc: int, output: str) -> dict[str, Any]:
    """The agent's last line is `RESULT {json}`; anything else is evidence of a failure."""
    line = next((ln for ln in reversed(output.splitlines()) if ln.startswith("RESULT ")), None)
    data: dict[str, Any] = {}
    if line is not None:
        try:
            data = json.loads(line[7:])
        except ValueError:
            data = {}
    if rc == 0 and line is not None:
        return data
    message = data.get("message") or f"agent exited {rc}"
    kind = data.get("error")
    if kind:
        message = f"{kind}: {message}"
    raise StepFailed(host, step, message, output, kind=kind)
