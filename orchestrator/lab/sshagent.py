"""An ssh-agent of our own, by PID: tests and the demo load keys into it, sessions sign with it.

    with SSHAgent() as agent:
        agent.add(key, passphrase)          # ssh-add, the passphrase given by SSH_ASKPASS
        run_ferry(..., env=agent.env)       # SSH_AUTH_SOCK for `ssh.agent: true`

`ssh-agent -D` (foreground) is started with procs.spawn, so its PID is ours and it is
ended by that PID (never by name) when the block ends, however it ends; its socket lives in
a short temp dir (a socket path may have at most 108 bytes), removed with it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from orchestrator.lab import procs

_ASKPASS = '#!/bin/sh\nprintf "%s\\n" "$FERRY_LAB_PASSPHRASE"\n'


class SSHAgent:
    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="ferry-agent-"))
        self.socket = self.dir / "agent.sock"
        log = self.dir / "agent.log"
        self.pid, self._start = procs.spawn(["ssh-agent", "-D", "-a", str(self.socket)], log)
        deadline = time.monotonic() + 10
        while not self.socket.exists():
            if time.monotonic() > deadline or procs.exited(self.pid) is not None:
                self.stop()
                raise RuntimeError(f"ssh-agent did not start: {log.read_text().strip()}")
            time.sleep(0.01)

    @property
    def env(self) -> dict[str, str]:
        return {"SSH_AUTH_SOCK": str(self.socket)}

    def alive(self) -> bool:
        return procs.is_ours(self.pid, self._start)

    def add(self, key: Path, passphrase: str | None = None) -> None:
        """ssh-add `key`; a passphrase comes from SSH_ASKPASS, never a terminal."""
        askpass = self.dir / "askpass"
        if not askpass.exists():
            askpass.write_text(_ASKPASS)
            askpass.chmod(0o700)
        env = {
            **os.environ,
            **self.env,
            "SSH_ASKPASS": str(askpass),
            "SSH_ASKPASS_REQUIRE": "force",
            "FERRY_LAB_PASSPHRASE": passphrase or "",
        }
        proc = subprocess.run(
            ["ssh-add", "-q", str(key)],
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=30,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"ssh-add {key}: {proc.stderr.strip() or proc.returncode}")

    def public_keys(self) -> list[str]:
        """`ssh-add -L`: the keys the agent holds, one OpenSSH public-key line each."""
        proc = subprocess.run(
            ["ssh-add", "-L"], env={**os.environ, **self.env}, capture_output=True, text=True
        )
        return proc.stdout.splitlines() if proc.returncode == 0 else []

    def stop(self) -> None:
        if self.alive():
            procs.kill_and_reap([self.pid])
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> SSHAgent:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
