"""The warm start: one process per user with Ferry's modules imported, forking a child per
command, so a command costs its own work and not Python's imports.

Importing what `ferry deploy` needs (Prefect, SQLAlchemy, pydantic, the engine) takes
~4 s of CPU on a small machine, more than a 1-host deployment's own work; `ferry status`
is ~2 s of which nearly all is imports. Android starts its apps the same way (its
"zygote"), and Gradle's and Nailgun's daemons likewise keep a warm interpreter.

How a command runs warm:
- `ferry` (the entry point, before anything heavy is imported) connects to the warm
  process's Unix socket and sends the command line, the working directory, the environment,
  the umask and its own stdin/stdout/stderr (SCM_RIGHTS); the warm process forks; the child
  takes all of them on, runs the command exactly as a cold `ferry` would (the same
  `main()`), and sends back its exit code. Output goes straight to the caller's terminal
  or pipe; the caller forwards SIGINT/SIGTERM/SIGHUP to the child, and if the caller goes
  away the child gets SIGTERM (a deployment then stops at its next safe point and backs
  out, as on Ctrl-C).
- There is none yet (or it idled out): the command runs cold, as before, and afterwards
  starts one in the background for the next command.

Safety:
- The socket lives in a directory of this user alone (mode 0700, owned by the user,
  checked before use; FERRY_WARM_DIR, else $XDG_RUNTIME_DIR/ferry, else /tmp/ferry-<uid>);
  the warm process accepts only connections from its own uid (SO_PEERCRED).
- Its name carries a stamp of the code it imported (every module file's size and mtime,
  the interpreter, the installed packages' directory): after an upgrade or an edit no
  command runs on old code; the old process sees the change and leaves.
- It imports and does nothing else: it opens no CMS, reads no settings, starts no thread
  (it checks, and refuses to serve otherwise: forking a process with threads is unsafe);
  each child reads its own settings from its own environment, and Prefect's settings are
  rebuilt from it (`prefect.context.refresh_global_settings_context`).
- It leaves after FERRY_WARM_IDLE seconds without a command (default 600);
  `ferry warm stop` ends it at once. FERRY_WARM=0 turns the warm start off.
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

PACKAGES = ("orchestrator", "dml", "remediation")
MAX_REQUEST = 1 << 20  # a command line and an environment
IDLE_DEFAULT = 600.0
CHILD_MARK = "FERRY_WARM_CHILD"  # set in a child: a command it runs never goes warm again


# -- where ------------------------------------------------------------------------------
def warm_dir() -> Path:
    if os.environ.get("FERRY_WARM_DIR"):
        return Path(os.environ["FERRY_WARM_DIR"])
    if os.environ.get("XDG_RUNTIME_DIR"):
        return Path(os.environ["XDG_RUNTIME_DIR"]) / "ferry"
    return Path(f"/tmp/ferry-{os.getuid()}")


def private_dir(path: Path) -> bool:
    """Create `path` 0700 if missing; True only when it is a directory of this user alone
    (a socket in a directory others can write could be replaced by theirs)."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.lstat(path)
    except OSError:
        return False
    import stat

    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and st.st_mode & 0o077 == 0


def code_stamp(root: Path | None = None) -> str:
    """What the warm process imported: this interpreter, every module file of Ferry's
    packages (path, size, mtime) and the installed packages' directory (pip changes it).
    ~250 stat() calls, a few milliseconds."""
    h = hashlib.sha256(f"{sys.executable}\0{sys.version}".encode())
    root = root or Path(__file__).resolve().parent.parent
    for pkg in PACKAGES:
        for dirpath, dirnames, filenames in os.walk(root / pkg):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
            for name in sorted(filenames):
                if name.endswith(".py"):
                    st = os.stat(os.path.join(dirpath, name))
                    h.update(f"{dirpath}/{name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    import sysconfig

    try:
        st = os.stat(sysconfig.get_paths()["purelib"])
        h.update(f"{st.st_mtime_ns}".encode())
    except OSError:
        pass
    return h.hexdigest()[:20]


def socket_path(stamp: str | None = None) -> Path:
    return warm_dir() / f"warm-{stamp or code_stamp()}.sock"


def enabled(*, here: bool = True) -> bool:
    """FERRY_WARM=0 turns it off; so does FERRY_PREFECT=ephemeral unless FERRY_WARM=1 (the
    mode for CI jobs that must leave nothing running). Never `here` inside a warm child
    (what it runs starts no other)."""
    if here and CHILD_MARK in os.environ:
        return False
    flag = os.environ.get("FERRY_WARM", "").lower()
    if flag in ("0", "off", "no", "false"):
        return False
    if flag in ("1", "on", "yes", "true"):
        return True
    return os.environ.get("FERRY_PREFECT") != "ephemeral"


def worth_starting(argv: list[str]) -> bool:
    """After a cold command: start a warm process for the next one? Not for help alone, nor
    for `ferry warm` itself."""
    words = [a for a in argv if not a.startswith("-")]
    return bool(words) and words[0] != "warm" and "--help" not in argv


# -- the caller's side (stdlib only: runs before anything heavy is imported) --------------
def run_warm(argv: list[str]) -> int | None:
    """Run `ferry argv` in the warm process and return its exit code; None when there is
    no warm process to run it (the caller runs the command itself)."""
    if not enabled() or not private_dir(warm_dir()):
        return None
    path = socket_path()
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(str(path))
    except OSError:
        conn.close()
        return None
    try:
        cwd = os.getcwd()
    except OSError:  # the directory is gone: the command, run here, says so its own way
        conn.close()
        return None
    request = json.dumps(
        {"argv": argv, "cwd": cwd, "env": dict(os.environ), "umask": _umask()}
    ).encode()
    try:
        socket.send_fds(conn, [struct.pack("!I", len(request)) + request], [0, 1, 2])
        reader = conn.makefile("rb")
        first = reader.readline()
    except OSError:
        conn.close()
        return None
    if not first:  # it left between our connect and its accept: run cold
        conn.close()
        return None
    child = int(json.loads(first)["pid"])
    forwarded = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def forward(signum: int, _frame: object) -> None:
        try:
            os.kill(child, signum)
        except ProcessLookupError:
            pass

    for signum in forwarded:
        signal.signal(signum, forward)
    try:
        while True:
            try:
                line = reader.readline()
                break
            except InterruptedError:
                continue
    finally:
        conn.close()
    if not line:
        print(
            f"ferry: the warm process's child {child}, which ran this command, ended without "
            "an exit code (killed?). `ferry status` says whether it left a deployment or "
            "backout unfinished (then: `ferry remediate recover ID`); if it did not, run the "
            "command again, or with FERRY_WARM=0",
            file=sys.stderr,
        )
        return 1
    return int(json.loads(line)["exit"])


def _answers(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        probe.close()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def start_in_background() -> None:
    """Start a warm process for the next command, unless one answers already. Detached (its
    own session, no terminal), quiet; it stops by itself when idle."""
    if not enabled() or not private_dir(warm_dir()):
        return
    path = socket_path()
    if path.exists():
        if _answers(path):
            return
        # left by a warm process that was killed: nothing listens, so start another
        path.unlink(missing_ok=True)
        path.with_suffix(".pid").unlink(missing_ok=True)
    import subprocess

    env = {k: v for k, v in os.environ.items() if not k.startswith(("FERRY_", "PREFECT_"))}
    env["PYDANTIC_DISABLE_PLUGINS"] = os.environ.get("PYDANTIC_DISABLE_PLUGINS", "__all__")
    # Prefect makes its home on import: keep that out of ~/.prefect; a child's own
    # PREFECT_HOME is what its command uses (its settings are rebuilt from its environment)
    env["PREFECT_HOME"] = str(warm_dir() / "prefect-import")
    env["FERRY_WARM_DIR"] = str(warm_dir())
    for key in ("FERRY_WARM_IDLE",):
        if key in os.environ:
            env[key] = os.environ[key]
    log = open(warm_dir() / "warm.log", "ab")  # noqa: SIM115 - handed to the child
    with log:
        subprocess.Popen(
            [sys.executable, "-m", "orchestrator.zygote", str(path)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
            start_new_session=True, close_fds=True, cwd="/",
        )  # fmt: skip


# -- the warm process ---------------------------------------------------------------------
def preload() -> None:
    """Import what commands need, and nothing that starts work."""
    import importlib

    from orchestrator import prefect_env
    from orchestrator.cli import main as cli_main

    # Prefect builds its logging at import: with Ferry's defaults, as most commands run it,
    # a command's child need not build it again (prefect_env.refresh_imported)
    prefect_env.quiet_defaults()

    for entry in cli_main.COMMANDS:
        importlib.import_module(f"orchestrator.cli.{entry.name.replace('-', '_')}")
    for name in (
        "orchestrator.flows", "orchestrator.preparation", "orchestrator.deployment",
        "orchestrator.cms.deployments", "orchestrator.change.gate", "orchestrator.settings",
        "orchestrator.transport.session", "orchestrator.transport.openssh", "rich.console",
        "rich.progress", "sqlalchemy.dialects.sqlite", "prefect.client.orchestration",
        "fastapi.encoders",  # Prefect imports it to send a flow run's parameters (~0.5 s)
        # what every deployment imported on its way (~60 ms of CPU per command, py-spy):
        # the flow and task engines, the asyncio backend of httpx's pool, the run's tags
        "prefect.flow_engine", "prefect.task_engine", "prefect.runtime.flow_run",
        "prefect.utilities.visualization", "anyio._backends._asyncio",
        "orchestrator.prefect_deployments", "orchestrator.cms.locks", "orchestrator.ci",
        "rich._emoji_codes", "encodings.idna",
    ):  # fmt: skip
        importlib.import_module(name)
    prefect_env.note_imported()
    # Prefect's client schemas finish building on first use (~20 ms of CPU per command)
    from pydantic import BaseModel

    for name in ("actions", "objects", "responses"):
        module = importlib.import_module(f"prefect.client.schemas.{name}")
        for obj in vars(module).values():
            if isinstance(obj, type) and issubclass(obj, BaseModel) and obj is not BaseModel:
                if obj.__module__ == module.__name__ and not obj.__pydantic_complete__:
                    obj.model_rebuild(raise_errors=False)
    # the CMS's mappers are configured on the first query (~20 ms of CPU per command); it
    # is all in memory, no database is opened
    from sqlalchemy.orm import configure_mappers

    import orchestrator.cms.models  # noqa: F401 - the mappers to configure

    configure_mappers()
    from orchestrator import agent

    agent.compiled()  # every deployment's sessions send it: compile it once, here


def _started_work() -> str:
    """What the imports did beyond importing, that a child must not inherit ('' if none)."""
    from orchestrator import settings
    from orchestrator.cms import db

    if settings._cached.cache_info().currsize:
        return "read Ferry's settings"
    if db._engines:
        return "opened a CMS"
    if "orchestrator.cli.output" in sys.modules and any(
        name in vars(sys.modules["orchestrator.cli.output"]) for name in ("stdout", "stderr")
    ):
        return "made an output console"
    return ""


def serve(path: Path) -> int:
    # seen by `running` (and so `ferry warm stop`) from the start: the imports take seconds,
    # and a process stopped in them must not be missed and left to idle out
    starting = path.with_name(f"{path.stem}.{os.getpid()}.starting")
    signal.signal(signal.SIGTERM, lambda _s, _f: sys.exit(0))  # the marker goes with it
    starting.write_text(f"{os.getpid()}\n")
    try:
        return _serve(path, starting)
    finally:
        starting.unlink(missing_ok=True)


def _serve(path: Path, starting: Path) -> int:
    stamp = path.name.removeprefix("warm-").removesuffix(".sock")
    try:
        preload()
    except Exception as exc:  # noqa: BLE001 - a broken import: commands run cold, say why
        print(f"warm process not started: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    problem = _started_work()
    if problem:
        print(f"warm process not started: importing {problem}", file=sys.stderr)
        return 1
    if threading.active_count() != 1:
        names = [t.name for t in threading.enumerate()]
        print(f"warm process not started: importing started threads {names}", file=sys.stderr)
        return 1
    import gc

    gc.freeze()  # children share the imported objects' pages instead of copying them
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.unlink(missing_ok=True)
    listener.bind(str(tmp))
    os.chmod(tmp, 0o600)
    listener.listen(64)
    try:
        os.link(tmp, path)  # the first of two racing starts wins; the other leaves
    except FileExistsError:
        listener.close()
        tmp.unlink(missing_ok=True)
        return 0
    tmp.unlink()
    mine = os.stat(path).st_ino
    pidfile = path.with_suffix(".pid")
    pidfile.write_text(f"{os.getpid()}\n")
    starting.unlink(missing_ok=True)  # started: the PID file says so from here on
    idle = float(os.environ.get("FERRY_WARM_IDLE", IDLE_DEFAULT))
    children: set[int] = set()
    last = time.monotonic()
    stopping = False

    def stop(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        while not stopping:
            readable, _, _ = select.select([listener], [], [], 1.0)
            children -= _reaped(children)
            if readable:
                conn, _ = listener.accept()
                pid = _fork_child(conn, listener)
                if pid:
                    children.add(pid)
                last = time.monotonic()
                continue
            if children:
                last = time.monotonic()
            elif time.monotonic() - last > idle or not _still_ours(path, mine, stamp):
                break
    finally:
        if _still_ours(path, mine, None):
            path.unlink(missing_ok=True)
            pidfile.unlink(missing_ok=True)
        listener.close()
    return 0


def _still_ours(path: Path, inode: int, stamp: str | None) -> bool:
    """The socket is still this process's, and (with `stamp`) the code it imported is
    unchanged."""
    try:
        if os.stat(path).st_ino != inode:
            return False
    except OSError:
        return False
    return stamp is None or code_stamp() == stamp


def _reaped(children: set[int]) -> set[int]:
    """The children that ended; each logged with its exit code and its resource use (a
    warm command's CPU is its child's, not its caller's: benchmarks read it here)."""
    done = set()
    for pid in children:
        try:
            got, status, ru = os.wait4(pid, os.WNOHANG)
        except ChildProcessError:
            done.add(pid)
            continue
        if got:
            done.add(pid)
            code = os.waitstatus_to_exitcode(status)
            cpu = ru.ru_utime + ru.ru_stime
            print(f"{time.strftime('%H:%M:%S')} child {pid} done: exit {code}, "
                  f"cpu {cpu:.3f} s, maxrss {ru.ru_maxrss} KiB", flush=True)  # fmt: skip
    return done


def _fork_child(conn: socket.socket, listener: socket.socket) -> int:
    """Fork a child for the request on `conn`; its PID (0: the request was refused)."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    if uid != os.getuid():
        conn.close()
        return 0
    try:
        conn.settimeout(10)
        data, fds, _flags, _addr = socket.recv_fds(conn, MAX_REQUEST, 3)
        while len(data) >= 4 and len(data) < 4 + struct.unpack("!I", data[:4])[0]:
            more = conn.recv(MAX_REQUEST)
            if not more:
                break
            data += more
        size = struct.unpack("!I", data[:4])[0]
        request = json.loads(data[4 : 4 + size])
        conn.settimeout(None)
    except (OSError, ValueError, struct.error):
        conn.close()
        return 0
    if len(fds) != 3:
        for fd in fds:
            os.close(fd)
        conn.close()
        return 0
    pid = os.fork()
    if pid == 0:  # the child: never returns
        listener.close()
        _run_child(conn, fds, request)
    # which command, never its arguments (an option may carry a secret) nor its environment
    words = [str(a) for a in request.get("argv", []) if not str(a).startswith("-")][:1]
    print(f"{time.strftime('%H:%M:%S')} child {pid}: ferry {' '.join(words)}", flush=True)
    for fd in fds:
        os.close(fd)
    conn.close()
    return pid


# in a warm child: tells the caller its exit code (see abort)
_report_exit: Callable[[int], object] | None = None


def abort(code: int) -> None:
    """End this process at once with `code` (no thread joined, no teardown), a warm child
    telling its caller the code first, as its normal end does."""
    try:
        if _report_exit is not None:
            _report_exit(code)
    except OSError:
        pass
    os._exit(code)


def _run_child(conn: socket.socket, fds: list[int], request: dict[str, object]) -> None:
    global _report_exit
    code = 1
    finished: threading.Event | None = None
    try:
        # as Python starts a process: Ctrl-C raises KeyboardInterrupt, SIGTERM ends it
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(str(request["cwd"]))
        os.umask(int(request["umask"]))  # type: ignore[call-overload]
        os.environ.clear()
        os.environ.update(request["env"])  # type: ignore[arg-type]
        os.environ[CHILD_MARK] = "1"
        _reopen_stdio()
        import random

        random.seed()  # every child would otherwise draw the same numbers (jitter)
        # Prefect's settings and logging, made at import from this process's environment,
        # are made again from the command's by configure_prefect, which every command that
        # uses Prefect calls first (prefect_env.refresh_imported)
        conn.sendall(json.dumps({"pid": os.getpid()}).encode() + b"\n")
        finished = _hang_up_with(conn)
        _report_exit = lambda c: conn.sendall(json.dumps({"exit": c}).encode() + b"\n")  # noqa: E731
        if __name__ == "__main__":  # (run as -m: the commands import orchestrator.zygote)
            import orchestrator.zygote as imported

            imported._report_exit = _report_exit
        argv = [str(a) for a in request["argv"]]  # type: ignore[attr-defined]
        sys.argv = ["ferry", *argv]
        from orchestrator.cli.main import _run

        code = _run(argv)
        import atexit

        atexit._run_exitfuncs()  # what a cold `ferry` runs at exit (Prefect's event flush)
    except BaseException as exc:  # noqa: BLE001 - the child must report, then leave
        try:
            print(f"ferry (warm child): {type(exc).__name__}: {exc}", file=sys.stderr)
        except Exception:  # noqa: BLE001, S110
            pass
    finally:
        if finished is not None:
            finished.set()
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except Exception:  # noqa: BLE001, S110
            pass
        try:
            conn.sendall(json.dumps({"exit": code}).encode() + b"\n")
        except OSError:
            pass
        os._exit(code)


def _reopen_stdio() -> None:
    """sys.std* were made for the warm process's /dev/null: make them again for the caller's
    files, buffered as Python buffers them at start (line-buffered on a terminal)."""
    unbuffered = bool(os.environ.get("PYTHONUNBUFFERED"))
    for fd, name, mode in ((0, "stdin", "r"), (1, "stdout", "w"), (2, "stderr", "w")):
        tty = os.isatty(fd)
        if mode == "r":
            stream = open(fd, encoding="utf-8", errors="strict", closefd=False)  # noqa: SIM115
        else:
            line = tty or name == "stderr" or unbuffered
            stream = open(  # noqa: SIM115
                fd, "w", buffering=1 if line else -1, encoding="utf-8",
                errors="backslashreplace" if name == "stderr" else "strict", closefd=False,
            )  # fmt: skip
        setattr(sys, name, stream)
        setattr(sys, f"__{name}__", stream)


def _hang_up_with(conn: socket.socket) -> threading.Event:
    """The caller gone (its connection closed) before the returned event is set is a
    hang-up: SIGTERM to this child, so a deployment stops at its next safe point and backs
    out."""

    def watch() -> None:
        try:
            while conn.recv(1):
                pass
        except OSError:
            pass
        if not done.is_set():
            os.kill(os.getpid(), signal.SIGTERM)

    done = threading.Event()
    threading.Thread(target=watch, name="ferry-warm-hangup", daemon=True).start()
    return done


# -- `ferry warm` -------------------------------------------------------------------------
def running(base: Path | None = None) -> list[dict[str, object]]:
    """Every warm process of this user (in `base`, default warm_dir()): pid, socket,
    whether it runs the current code."""
    out: list[dict[str, object]] = []
    here = code_stamp()
    base = base or warm_dir()
    if not base.is_dir():
        return out
    seen = set()
    for pidfile in sorted(base.glob("warm-*.pid")) + sorted(base.glob("warm-*.starting")):
        try:
            pid = int(pidfile.read_text().strip())
        except (OSError, ValueError):
            continue
        stamp = pidfile.name.removeprefix("warm-").split(".", 1)[0]
        sock = pidfile.with_name(f"warm-{stamp}.sock")
        if pid in seen:
            continue
        if not _is_warm_process(pid, sock):
            if pidfile.suffix == ".starting":  # killed in its imports: nothing else removes it
                pidfile.unlink(missing_ok=True)
            continue
        seen.add(pid)
        entry = {"pid": pid, "socket": str(sock), "current": stamp == here}
        if pidfile.suffix == ".starting":
            entry["starting"] = True  # still importing (or lost the race for the socket)
        out.append(entry)
    return out


def _is_warm_process(pid: int, sock: Path | None = None) -> bool:
    """`pid` is a warm process (of `sock`, if given: a PID reused by another one is not)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"orchestrator.zygote" in cmdline and (sock is None or os.fsencode(sock) in cmdline)


def stop_all(base: Path | None = None, timeout: float = 10.0) -> list[int]:
    """SIGTERM every warm process of this user (by the PID it recorded); wait for them."""
    pids = [int(p["pid"]) for p in running(base)]  # type: ignore[call-overload]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_is_warm_process(p) for p in pids):
        time.sleep(0.05)
    return pids


if __name__ == "__main__":
    sys.exit(serve(Path(sys.argv[1])))
