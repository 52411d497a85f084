"""Bulk streams over the OpenSSH client, for package transfer.

On this machine the OpenSSH client moves ~270 MB/s (aes128-gcm) where paramiko moves ~100
(../shared/notes/fleet.md), so `stage` sends file objects through `ssh` when it is
installed (`ssh.bulk: openssh`, the default) and through paramiko otherwise. Same security:
StrictHostKeyChecking=yes against the inventory's known_hosts only, key auth only, batch
mode; curve25519 key exchange (OpenSSH's default sntrup761 costs ~190 ms CPU per login).
"""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import threading
import time
from pathlib import Path

from orchestrator.inventory import Host, SSHSettings
from orchestrator.transport.ssh import StepTimeout


def available() -> bool:
    return shutil.which("ssh") is not None


def argv(host: Host, ssh: SSHSettings, connect_timeout: float, command: str) -> list[str]:
    return [
        "ssh",
        "-F", "/dev/null",
        "-i", str(ssh.identity_file),
        "-p", str(host.port),
        "-l", ssh.user,
        "-o", "BatchMode=yes",
        "-o", "IdentitiesOnly=yes",
        "-o", "StrictHostKeyChecking=yes",
        "-o", f"UserKnownHostsFile={ssh.known_hosts}",
        "-o", "GlobalKnownHostsFile=/dev/null",
        "-o", "UpdateHostKeys=no",
        "-o", f"ConnectTimeout={max(1, int(connect_timeout))}",
        "-o", "ServerAliveInterval=5",
        "-o", "ServerAliveCountMax=3",
        "-o", "KexAlgorithms=curve25519-sha256,curve25519-sha256@libssh.org",
        "-o", "Ciphers=aes128-gcm@openssh.com,aes256-gcm@openssh.com,aes128-ctr",
        "-o", "Compression=no",
        "-o", "LogLevel=ERROR",
        host.address,
        command,
    ]  # fmt: skip


class OpenSSHStream:
    """A remote command's stdin/stdout over one `ssh` process, with a hard deadline."""

    def __init__(self, host: Host, ssh: SSHSettings, command: str, *, connect_timeout: float,
                 timeout: float) -> None:  # fmt: skip
        self.name = host.name
        self.deadline = time.monotonic() + timeout
        self.proc = subprocess.Popen(
            argv(host, ssh, connect_timeout, command),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self._buf = b""
        self._timer = threading.Timer(timeout, self._expire)
        self._timer.daemon = True
        self._timer.start()
        self.expired = False

    def _expire(self) -> None:
        self.expired = True
        if self.proc.poll() is None:
            self.proc.kill()

    def sendall(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(data)
        except BrokenPipeError:
            raise OSError(f"the remote side closed the stream: {self._stderr()}") from None

    def sendfile(self, path: Path) -> int:
        """The whole file into the remote stdin, by the kernel (no copy through Python)."""
        assert self.proc.stdin is not None
        self.proc.stdin.flush()
        out = self.proc.stdin.fileno()
        sent = 0
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            try:
                while sent < size:
                    n = os.sendfile(out, f.fileno(), sent, size - sent)
                    if n == 0:
                        break
                    sent += n
            except BrokenPipeError:
                raise OSError(f"the remote side closed the stream: {self._stderr()}") from None
        return sent

    def read_line(self) -> bytes:
        assert self.proc.stdout is not None
        self.proc.stdin.flush()  # type: ignore[union-attr]
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = self.deadline - time.monotonic()
            if left <= 0 or self.expired:
                raise StepTimeout(self.name, "timed out waiting for the agent")
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            self._buf += chunk
        line, sep, rest = self._buf.partition(b"\n")
        self._buf = rest
        return line + sep

    def finish(self) -> tuple[int, bytes]:
        """Close stdin, read the rest of stdout, wait for the exit status."""
        try:
            out, err = self.proc.communicate(timeout=max(0.1, self.deadline - time.monotonic()))
        except BrokenPipeError:
            out, err = b"", b""
            self.proc.wait()
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()
            raise StepTimeout(self.name, "timed out") from None
        finally:
            self._timer.cancel()
        if self.expired:
            raise StepTimeout(self.name, "timed out")
        rc = self.proc.returncode
        text = self._buf + (out or b"")
        if rc == 255:  # ssh itself failed: unreachable, host key, auth
            text += b"\n" + (err or b"")
        return rc, text

    def _stderr(self) -> str:
        if self.proc.poll() is None:
            return "(still running)"
        err = self.proc.stderr.read() if self.proc.stderr else b""
        return err.decode(errors="replace").strip()[-500:]

    def close(self) -> None:
        self._timer.cancel()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if f is not None:
                try:
                    f.close()
                except OSError:
                    pass
