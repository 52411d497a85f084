"""One agent session per host: one SSH connection, one agent process, many requests (Act).

Ferry starts the host agent once per host and deployment — `python3 -I -S -c BOOT serve`
over a single SSH connection, the agent's source sent on stdin (so the code that runs on
the host is exactly the code Ferry holds; no file on the host is trusted, and the login's
environment does not reach the interpreter) — and then sends every step as a request on
the same stream: inspect, the package's objects, verify, config, switch, hooks and
checks (run by the agent as subprocesses with timeouts), read-back, prune. One login and
one interpreter start per host instead of one per step, the way Mitogen and pyinfra get
their speed.

The stream is the OpenSSH client when installed (fast ciphers, kernel sendfile for the
bulk bytes) and a paramiko channel otherwise; both are strict about host keys. Every
request has a deadline; a request that misses it, or a session whose agent dies, kills
the session: that host's step fails (StepTimeout / StepFailed) and its next request starts
a fresh session. Errors are translated here, once.
"""

from __future__ import annotations

import json
import os
import random
import select
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

from orchestrator import agent
from orchestrator.errors import StepFailed, TransportError
from orchestrator.inventory import Host, SSHSettings
from orchestrator.transport import openssh
from orchestrator.transport.pipes import BUDGET as WIDE_PIPES
from orchestrator.transport.ssh import SSHHost, StepTimeout

Tick = Callable[[int], None] | None  # told how many bytes a transfer just wrote

# the agent's LOCK_WAIT: the most a step's deadline moves while the agent waits for another
AGENT_LOCK_WAIT = 30.0
# logins in flight at once, whatever the concurrency: sshd's MaxStartups refuses a burst
# (10:30:100 by default), and Kamal caps its starts at 30 for the same reason
MAX_STARTS = int(os.environ.get("FERRY_SSH_STARTS", "24"))
_STARTS = threading.BoundedSemaphore(MAX_STARTS)

# what ssh says when the connection itself went away (vs. the agent dying on the host)
_CONNECTION_LOST = ("closed by remote host", "not responding", "Broken pipe", "reset by peer",
                    "Connection to", "timed out")  # fmt: skip

# reads `<n> <m> <tag>\n`, the agent's source (n bytes) and its compiled code (m bytes,
# marshal, for CPython `tag`), and runs the code when the host's Python is that one (it
# saves compiling 30 KB on every host), else compiles the source: same program either way
BOOT = (
    "import sys,marshal;b=sys.stdin.buffer;n,m,t=b.readline().split();s=b.read(int(n));"
    "c=b.read(int(m));exec(marshal.loads(c) if t.decode()==sys.implementation.cache_tag "
    "else compile(s,'ferry-agent','exec'),{'__name__':'__main__'})"
)


def agent_command(root: str) -> str:
    """The login's command: the host's python3 reading the agent from stdin (BOOT).
    -I: the login's PYTHON* variables and directories are not the agent's (a PYTHONPATH
    exported by a shell rc file would otherwise put its modules before the standard library
    the verified agent imports, and a PYTHONHOME would replace that library); -S: no
    site-packages either (the agent is stdlib-only, and finding them costs ~10 ms a host).
    The hooks and checks the agent runs still get the login's environment."""
    return f"python3 -I -S -c {shlex.quote(BOOT)} serve --root {shlex.quote(root)}"


@lru_cache(maxsize=1)
def boot_input() -> bytes:
    """What BOOT reads first: the agent's source and its compiled code, as Ferry holds them
    (~255 KB, joined once per command rather than for every host)."""
    source, code = agent.source(), agent.compiled()
    head = f"{len(source)} {len(code)} {sys.implementation.cache_tag}\n".encode()
    return head + source + code


class _Pipe(Protocol):
    def write(self, data: bytes, deadline: float) -> None: ...
    def sendfile(self, path: Path, deadline: float, tick: Tick = None) -> int: ...
    def read_some(self, deadline: float) -> bytes: ...
    def why_closed(self) -> tuple[bool, str]: ...  # (ssh itself failed?, its words)
    def skip_said(self) -> None: ...  # what ssh said so far is not why it will end
    def hang_up(self) -> None: ...  # EOF: the agent's serve loop ends by itself
    def ended(self) -> bool: ...  # the connection is gone (after hang_up: nothing to wait)
    def close(self, deadline: float | None = None) -> None: ...  # hang up, reap (kill)


class _OpenSSHPipe:
    def __init__(self, host: Host, ssh: SSHSettings, command: str, connect_timeout: float):
        self.proc = subprocess.Popen(
            openssh.argv(host, ssh, connect_timeout, command),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            bufsize=0,
        )
        assert self.proc.stdin and self.proc.stdout
        self.stdin, self.stdout = self.proc.stdin, self.proc.stdout
        # writes never block: a host that stops reading is waited for with poll up to the
        # request's deadline (no watchdog thread per request), then its ssh is killed
        os.set_blocking(self.stdin.fileno(), False)
        self._writable = select.poll()
        self._writable.register(self.stdin.fileno(), select.POLLOUT)
        # while it holds a bulk transfer's capacity: the capacity to give back after it
        self._narrow_to: int | None = None  # (transport/pipes.py)

    def _wait_writable(self, deadline: float) -> None:
        left = deadline - time.monotonic()
        if left <= 0 or not self._writable.poll(max(1, int(left * 1000))):
            if self.proc.poll() is None:
                self.proc.kill()
            raise TimeoutError("the host had not taken the bytes by the deadline")

    def write(self, data: bytes, deadline: float) -> None:
        view, fd = memoryview(data), self.stdin.fileno()
        # the transfer before this request was answered: the pipe is empty
        if self._narrow_to is not None and WIDE_PIPES.narrow(fd, self._narrow_to):
            self._narrow_to = None
        while view:
            try:
                view = view[os.write(fd, view) :]
            except BlockingIOError:
                self._wait_writable(deadline)

    def sendfile(self, path: Path, deadline: float, tick: Tick = None) -> int:
        sent, fd = 0, self.stdin.fileno()
        if self._narrow_to is None:
            self._narrow_to = WIDE_PIPES.widen(fd)
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            while sent < size:
                try:
                    n = os.sendfile(fd, f.fileno(), sent, size - sent)
                except BlockingIOError:
                    self._wait_writable(deadline)
                    continue
                if n == 0:
                    break
                sent += n
                if tick is not None:
                    tick(n)
        return sent

    def read_some(self, deadline: float) -> bytes:
        # poll, not select: a large fan-out holds far more than 1,024 descriptors
        fd = self.stdout.fileno()
        poller = select.poll()
        poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            if poller.poll(max(1, int(left * 1000))):
                return os.read(fd, 1 << 16)

    def skip_said(self) -> None:
        """Drop what ssh wrote to stderr so far (at LogLevel INFO, the host's pre-login
        Banner): once the agent has answered, only what follows can say why the session
        ended. One read of what is there, never a wait."""
        assert self.proc.stderr is not None
        fd = self.proc.stderr.fileno()
        try:
            os.set_blocking(fd, False)
            while len(os.read(fd, 1 << 16)) == 1 << 16:
                pass
        except (BlockingIOError, OSError):
            pass
        finally:
            os.set_blocking(fd, True)

    def why_closed(self) -> tuple[bool, str]:
        try:
            rc = self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            return False, "the agent stopped answering"
        err = self.proc.stderr.read() if self.proc.stderr else b""
        text = err.decode(errors="replace").strip()[-400:]
        return rc == 255, text or f"the agent exited {rc}"

    def hang_up(self) -> None:
        try:
            self.stdin.close()
        except OSError:
            pass
        if self._narrow_to is not None:
            self._narrow_to = None
            WIDE_PIPES.forget()

    def ended(self) -> bool:
        return self.proc.poll() is not None

    def close(self, deadline: float | None = None) -> None:
        self.hang_up()
        left = 2.0 if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            self.proc.wait(timeout=left)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for f in (self.stdout, self.proc.stderr):
            if f is not None:
                try:
                    f.close()
                except OSError:
                    pass


class _ChannelPipe:
    """The same over a paramiko channel (hosts where the OpenSSH client is missing)."""

    def __init__(self, host: Host, ssh: SSHSettings, command: str, connect_timeout: float):
        self.conn = SSHHost(host, ssh, connect_timeout=connect_timeout)
        self.chan = self.conn.open(command, connect_timeout)

    def write(self, data: bytes, deadline: float) -> None:
        self.chan.settimeout(max(0.01, deadline - time.monotonic()))
        self.chan.sendall(data)

    def sendfile(self, path: Path, deadline: float, tick: Tick = None) -> int:
        sent = 0
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                self.write(chunk, deadline)
                sent += len(chunk)
                if tick is not None:
                    tick(len(chunk))
        return sent

    def read_some(self, deadline: float) -> bytes:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        self.chan.settimeout(left)
        return self.chan.recv(1 << 16)

    def skip_said(self) -> None:
        pass  # paramiko shows no banner; the agent's stderr is not read

    def why_closed(self) -> tuple[bool, str]:
        rc = self.chan.recv_exit_status() if self.chan.exit_status_ready() else -1
        return False, f"the agent exited {rc}"

    def hang_up(self) -> None:
        try:
            self.chan.shutdown_write()
        except OSError:
            pass

    def ended(self) -> bool:
        return self.chan.exit_status_ready() or self.chan.closed

    def close(self, deadline: float | None = None) -> None:
        # past a deadline, nothing more is said: paramiko sends EOF and close as messages,
        # which may wait (up to 30 s in a key exchange) for a host that no longer reads
        if deadline is None or deadline > time.monotonic():
            self.hang_up()
            self.chan.close()
        self.conn.close()


class AgentSession:
    """Requests to one host's agent over one connection, opened on first use."""

    def __init__(
        self,
        host: Host,
        ssh: SSHSettings,
        root: str,
        *,
        connect_timeout: float,
        bulk: str | None = None,
    ) -> None:
        self.host, self.ssh, self.root = host, ssh, root.rstrip("/") or "/"
        self.connect_timeout = connect_timeout
        self.bulk = bulk or ssh.bulk
        self._pipe: _Pipe | None = None
        self._buf = b""
        self._answered = False  # has this session's agent answered a request yet?
        self._waited = False  # has the agent said WAIT for the request in flight?
        self._lock = threading.Lock()
        self.logins = 0
        self.on_sent: Tick = None  # told the bytes of each write of a transfer (progress)
        self._allowed = ""  # the request in flight's time, in words: see _overdue
        self._moved = 0  # bytes of its transfer sent so far
        self._knob = "`timeouts.step`"  # the plan's setting that gives it that time

    @property
    def name(self) -> str:
        return self.host.name

    # -- the session -----------------------------------------------------------------------
    @contextmanager
    def _session(self) -> Iterator[None]:
        """The session for one request; a new one holds a start slot until its agent has
        answered (the login is done), with a little jitter so starts do not come in step."""
        if self._pipe is not None:
            yield
            return
        with _STARTS:
            time.sleep(random.uniform(0, 0.01))
            self._open()
            yield

    def _open(self) -> _Pipe:
        if self._pipe is not None:
            return self._pipe
        command = agent_command(self.root)
        if self.ssh.become:  # root through `sudo -n`, which never prompts; sudo drops
            # SSH_CLIENT, so the login's shell hands its address to the agent for the lock's
            # note ("held by pid N, a Ferry session's stage from ADDRESS")
            command = openssh.become(f'{command} --from "${{SSH_CLIENT%% *}}"', self.ssh.user)
        kind = _OpenSSHPipe if self.bulk == "openssh" and openssh.available() else _ChannelPipe
        try:
            pipe: _Pipe = kind(self.host, self.ssh, command, self.connect_timeout)
        except OSError as exc:
            raise TransportError(self.name, f"cannot start ssh: {exc}") from None
        self.logins += 1
        self._pipe, self._buf, self._answered = pipe, b"", False
        deadline = time.monotonic() + self.connect_timeout + 10
        self._allow(f"the login's {self.connect_timeout + 10:g} s", "`timeouts.connect`")
        self._write(boot_input(), deadline, "stage")
        return pipe

    def close(self) -> None:
        with self._lock:
            self._drop()

    def hang_up(self) -> _Pipe | None:
        """End the session without waiting for its ssh to exit: the agent sees EOF and
        ends; the caller reaps the returned connection (close) when it is ready to. A later
        request opens a new session."""
        with self._lock:
            pipe = self._detach()
        if pipe is not None:
            pipe.hang_up()
        return pipe

    def _detach(self) -> _Pipe | None:
        """The session's connection, no longer the session's (the lock is held)."""
        pipe, self._pipe, self._buf = self._pipe, None, b""
        return pipe

    def _drop(self) -> None:
        pipe = self._detach()
        if pipe is not None:
            pipe.close()

    def _broken(self, step: str, what: str, timed_out: bool = False) -> Exception:
        """The session is over: say why (ssh could not connect, timeout, the agent died)."""
        if timed_out:  # past the deadline nothing ssh could still say changes the answer:
            pipe = self._detach()  # it is killed now, not after waiting 5 + 2 s for words
            if pipe is not None:
                pipe.close(deadline=time.monotonic())
            return StepTimeout(self.name, f"{what}: timed out{self._overdue()}")
        pipe = self._pipe
        ssh_failed, words = (False, "") if pipe is None else pipe.why_closed()
        answered = self._answered
        self._drop()
        # ssh exits 255 both when it fails and when the remote agent is killed by a signal:
        # once the agent has answered, only ssh's own words mean the connection went away
        if answered and not any(w in words for w in _CONNECTION_LOST):
            ssh_failed = False
            words = words or "the agent process died"
        if ssh_failed and "Host key verification failed" in words:
            return TransportError(
                self.name, "host key does not match known_hosts (refused; possible MITM)"
            )
        if ssh_failed:
            return TransportError(self.name, f"unreachable: {words}")
        return StepFailed(self.name, step, f"{what}: the agent session ended ({words})")

    def _overdue(self) -> str:
        """What a timed-out request had: its time, how much of its transfer went, the fix."""
        moved = f"; {self._moved / 1e6:.1f} MB of its transfer had gone" if self._moved else ""
        return (
            f" ({self._allowed}{moved}): a host that is only slow needs a longer"
            f" {self._knob} in the plan"
        )

    def _allow(self, words: str, knob: str = "") -> None:
        """A request begins: the time it has, in words, and the plan setting that gives it."""
        self._allowed, self._moved, self._knob = words, 0, knob or "`timeouts.step`"

    def _tick(self, n: int) -> None:
        self._moved += n
        if self.on_sent is not None:
            self.on_sent(n)

    def _write(self, data: bytes, deadline: float, step: str) -> None:
        assert self._pipe is not None
        try:
            self._pipe.write(data, deadline)
        except (OSError, ValueError) as exc:
            timed_out = time.monotonic() >= deadline
            raise self._broken(step, f"sending failed ({exc})", timed_out) from None

    def _line(self, deadline: float, step: str) -> bytes:
        assert self._pipe is not None
        while b"\n" not in self._buf:
            try:
                chunk = self._pipe.read_some(deadline)
            except (TimeoutError, OSError, ValueError) as exc:
                timed_out = isinstance(exc, TimeoutError) or time.monotonic() >= deadline
                raise self._broken(step, "waiting for the agent", timed_out) from None
            if not chunk:
                raise self._broken(step, "waiting for the agent")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line

    def _answer(self, deadline: float, step: str) -> tuple[bytes, float]:
        """The agent's next line but `WAIT <s>`: the agent waits up to that long for another
        agent process changing the host (the pull daemon, another Ferry's session) before
        it starts the step, so the step's deadline moves by as much; a busy host is then
        refused in its words, naming the holder, not as a timeout."""
        while True:
            line = self._line(deadline, step)
            if not line.startswith(b"WAIT "):
                return line, deadline
            try:
                seconds = float(line[5:])
            except ValueError:
                raise self._broken(step, f"unexpected answer {line[:80]!r}") from None
            if not self._waited:  # once a request: no host holds a step open for longer
                self._waited = True
                more = seconds if 0 <= seconds <= AGENT_LOCK_WAIT else AGENT_LOCK_WAIT
                deadline += more
                self._allowed += f" and {more:g} s for the host's lock, which it waited for"

    def _result(self, deadline: float, step: str) -> dict[str, Any]:
        while True:
            line, deadline = self._answer(deadline, step)
            if line.startswith(b"RESULT "):
                if not self._answered and self._pipe is not None:
                    self._pipe.skip_said()  # the login's words (a Banner): not the end's
                self._answered = True
                return json.loads(line[7:])

    def _refusal(self, exc: OSError, what: str, step: str, deadline: float) -> dict[str, Any]:
        """The answer of an agent that stopped reading in the middle of a transfer: it refuses
        (an object corrupted, the disk full, another agent busy), answers and ends, and the
        sender is left a broken pipe. Its answer, not the pipe, is the step's failure: an
        integrity refusal stays one (never tolerated), a full disk says so."""
        assert self._pipe is not None
        if exc.filename is not None:  # this side's own file (the frames gone): none to hear
            raise self._broken(step, what) from None
        buf, until = self._buf, min(deadline, time.monotonic() + 5)
        try:
            while b"\nRESULT " not in b"\n" + buf or not buf.endswith(b"\n"):
                chunk = self._pipe.read_some(until)
                if not chunk:
                    break
                buf += chunk
        except (TimeoutError, OSError, ValueError):
            pass
        for line in buf.split(b"\n"):
            if line.startswith(b"RESULT "):
                try:
                    said = json.loads(line[7:])
                except ValueError:
                    break
                if said.get("_code"):
                    self._answered = True
                    return dict(said)  # the caller drops the session: it is out of step
        raise self._broken(step, what, time.monotonic() >= deadline) from None

    # -- requests --------------------------------------------------------------------------
    def request(
        self,
        step: str,
        op: str,
        args: dict[str, Any] | None = None,
        *,
        timeout: float,
        payload: bytes | None = None,
    ) -> dict[str, Any]:
        """One agent operation; its failure is StepFailed (with the agent's error kind)."""
        with self._lock, self._session():
            deadline, self._waited = time.monotonic() + timeout, False
            self._allow(
                f"the step's {timeout:g} s",
                # a milestone's check, or a container's health command
                "check's `timeout` (a container's `health_timeout`)" if step == "milestone" else "",
            )
            head = {"op": op, "args": args or {}}
            if payload:
                head["payload"] = len(payload)
            self._write(json.dumps(head).encode() + b"\n" + (payload or b""), deadline, step)
            result = self._result(deadline, step)
        return _checked(self.name, step, result)

    def receive(
        self,
        rid: str,
        manifest: bytes,
        signature: bytes,
        frames: Any,
        *,
        timeout: float,
        known: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """`stage`: the signed manifest, the agent's NEED list, only those objects, the end.
        `known`: release id → digest of what the CMS records on the host (its prior)."""
        with self._lock, self._session():
            # the agent reads the manifest only once it holds the lock: its WAIT comes after
            # the manifest is written, so the wait is allowed for from the start (as stream)
            deadline = time.monotonic() + timeout + AGENT_LOCK_WAIT
            self._waited = True
            self._allow(_with_lock_wait(timeout))
            # the agent gives up on a read from here that waits this long: so would this side
            args = {"id": rid, "known": known, "stall": timeout + AGENT_LOCK_WAIT}
            head = json.dumps({"op": "receive", "args": args}).encode() + b"\n"
            sizes = json.dumps({"manifest_len": len(manifest), "sig_len": len(signature)})
            assert self._pipe is not None
            sent = 0
            try:  # an agent that refuses (busy, a bad signature) answers and stops reading
                self._pipe.write(head + sizes.encode() + b"\n" + manifest + signature, deadline)
                line, deadline = self._answer(deadline, "stage")
                if line.startswith(b"NEED "):
                    path = frames(json.loads(line[5:]))  # `<sha> <size>\n<bytes>` … END
                    sent = self._pipe.sendfile(path, deadline, self._tick)
                    result = self._result(deadline, "stage")
                elif line.startswith(b"RESULT "):
                    result = json.loads(line[7:])
                else:
                    raise self._broken("stage", f"unexpected answer {line[:80]!r}")
            except OSError as exc:
                result = self._refusal(exc, f"transfer failed ({exc})", "stage", deadline)
            except ValueError as exc:  # (not JSON, or an object the package lacks)
                raise self._broken("stage", f"unexpected answer ({exc})") from None
            if result.get("_code"):
                self._drop()  # the agent ends a failed receive: its stream is out of step
        out = _checked(self.name, "stage", result)
        out["bytes_sent"] = sent
        return out

    def stream(
        self, step: str, op: str, args: dict[str, Any], paths: list[Path], *, timeout: float
    ) -> dict[str, Any]:
        """One request whose bytes follow it on the stream: each file of `paths`, in order
        (the agent knows their sizes from the signed manifest); `bytes_sent` counts them."""
        with self._lock, self._session():
            # the bytes follow at once: an agent waiting for another's step (Host.hold) reads
            # none until it is done, and its WAIT line is read only after them
            deadline, self._waited = time.monotonic() + timeout + AGENT_LOCK_WAIT, True
            self._allow(_with_lock_wait(timeout))
            args = dict(args, stall=timeout + AGENT_LOCK_WAIT)  # (as receive)
            self._write(json.dumps({"op": op, "args": args}).encode() + b"\n", deadline, step)
            sent = 0
            assert self._pipe is not None
            try:
                for path in paths:
                    sent += self._pipe.sendfile(path, deadline, self._tick)
                result = self._result(deadline, step)
            except OSError as exc:
                result = self._refusal(exc, f"transfer failed ({exc})", step, deadline)
            if result.get("_code"):
                self._drop()  # the agent ends a failed stream: it is out of step
        out = _checked(self.name, step, result)
        out["bytes_sent"] = sent
        return out


def _with_lock_wait(timeout: float) -> str:
    return (
        f"{timeout + AGENT_LOCK_WAIT:g} s: the step's {timeout:g} s and the"
        f" {AGENT_LOCK_WAIT:g} s a busy host's lock may take"
    )


def _checked(host: str, step: str, result: dict[str, Any]) -> dict[str, Any]:
    code = result.pop("_code", 0)
    if not code:
        return result
    kind = result.get("error")
    message = result.get("message") or f"agent exited {code}"
    raise StepFailed(host, step, f"{kind}: {message}" if kind else message, "", kind=kind)
