"""Paths, timing and process helpers shared by the benchmark modules."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
WORK = BENCH / "work"
PEERS_VENV = BENCH / ".venv-peers"
FERRY_BIN = Path(sys.executable).with_name("ferry")
PREFECT_BIN = Path(sys.executable).with_name("prefect")
MB = 1_000_000

_T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[{time.monotonic() - _T0:7.1f}s] {msg}", flush=True)


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def run(
    cmd: Sequence[str] | str,
    *,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    check: bool = True,
    timeout: float = 1800,
    stdin: bytes | None = None,
    shell: bool = False,
) -> subprocess.CompletedProcess[bytes]:
    """Run a command, capture its output; on failure raise with the output's tail."""
    proc = subprocess.run(
        cmd,
        env=env,
        cwd=cwd,
        input=stdin,
        capture_output=True,
        timeout=timeout,
        shell=shell,
    )
    if check and proc.returncode != 0:
        tail = (proc.stdout[-3000:] + b"\n" + proc.stderr[-3000:]).decode(errors="replace")
        raise RuntimeError(
            f"{cmd if shell else ' '.join(map(str, cmd))}: exit {proc.returncode}\n{tail}"
        )
    return proc


def timed(
    cmd: Sequence[str] | str, **kw: object
) -> tuple[float, subprocess.CompletedProcess[bytes], float]:
    """(wall seconds, result, CPU seconds of the command and its children)."""
    before = os.times()
    t = time.perf_counter()
    proc = run(cmd, **kw)  # type: ignore[arg-type]
    wall = time.perf_counter() - t
    after = os.times()
    cpu = (after.children_user - before.children_user) + (
        after.children_system - before.children_system
    )
    return wall, proc, cpu


def timed_rusage(
    cmd: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    check: bool = True,
    timeout: float = 3600,
) -> tuple[float, subprocess.CompletedProcess[bytes], float, int]:
    """(wall seconds, result, CPU seconds, peak RSS in KiB) of one command, from wait4():
    the rusage of that child alone (with the descendants it reaped), so a larger process
    run earlier by the benchmark cannot show through, as it would in RUSAGE_CHILDREN's
    ru_maxrss (a maximum over every child ever reaped)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                                stdout=out, stderr=err)  # fmt: skip
        killer = threading.Timer(timeout, proc.kill)
        killer.start()
        try:
            _, status, ru = os.wait4(proc.pid, 0)
        finally:
            killer.cancel()
        wall = time.perf_counter() - t
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        done = subprocess.CompletedProcess(list(cmd), proc.returncode, out.read(), err.read())
    if check and done.returncode != 0:
        tail = (done.stdout[-3000:] + b"\n" + done.stderr[-3000:]).decode(errors="replace")
        raise RuntimeError(f"{' '.join(map(str, cmd))}: exit {done.returncode}\n{tail}")
    return wall, done, ru.ru_utime + ru.ru_stime, ru.ru_maxrss


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without Ferry's or Prefect's settings, plus `extra`."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("FERRY_", "PREFECT_", "ANSIBLE_", "VIRTUAL_ENV"))
    }
    return env | extra
