"""Ferry under test: its own home per cell, the real `ferry` CLI, a standing Prefect server,
and the CMS journal read back for the timings the CLI does not print."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from benchmarks.common import FERRY_BIN, PREFECT_BIN, clean_env, log, timed, timed_rusage
from dml.store import DML
from orchestrator.planner import release_id

QUIET = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "PREFECT_LOGGING_LEVEL": "WARNING",
    "PREFECT_LOGGING_TO_API_ENABLED": "false",
    "PREFECT_UI_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
}


class PrefectServer:
    """`prefect server start` on a free port with its own home; stopped by its PID group."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self) -> str:
        shutil.rmtree(self.home, ignore_errors=True)
        self.home.mkdir(parents=True)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = clean_env(**QUIET, PREFECT_HOME=str(self.home))
        self.log = open(self.home / "server.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [str(PREFECT_BIN), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        self.url = f"http://127.0.0.1:{port}/api"
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    "prefect server exited: " + (self.home / "server.log").read_text()
                )
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return self.url
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("prefect server not healthy within 120 s")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self.proc is not None:
            self.log.close()


@dataclass
class Deployed:
    wall: float
    cpu: float  # user + system of `ferry deploy` and the children it reaped
    rc: int
    report: dict[str, Any]
    peak_rss_kib: int = 0  # ru_maxrss of `ferry deploy` (or of its largest reaped child)


@dataclass
class Package:
    release: str
    digest: str
    rid: str
    archive: Path
    manifest: dict[str, str]
    size: int  # sum of file sizes
    archive_size: int


# Every home's commands share one warm-start directory (orchestrator/zygote.py), so the
# run's warm processes are known and ended by their PIDs at its end (run.py).
WARM_DIR = Path(__file__).resolve().parent / "work" / "warm"


class FerryHome:
    """One FERRY_HOME (CMS, DML, object cache) in a fresh working directory. Commands run as
    a user's would: warm from the second on (the warm start, orchestrator/zygote.py)."""

    def __init__(self, path: Path, prefect_url: str | None, **env: str) -> None:
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        self.dir = path
        self.home = path / ".ferry"
        # Prefect's settings as Ferry sets them for its users (orchestrator.prefect_env):
        # QUIET is the standing server's, and would turn off the run logs Ferry sends
        extra = {
            "FERRY_HOME": str(self.home), "FERRY_USER": "alice", "FERRY_WARM_DIR": str(WARM_DIR),
            **env,
        }  # fmt: skip
        if prefect_url:
            extra["PREFECT_API_URL"] = prefect_url
        self.env = clean_env(**extra)

    def cli(
        self, *args: str, check: bool = True
    ) -> tuple[float, subprocess.CompletedProcess[bytes], float]:
        return timed([str(FERRY_BIN), *args], env=self.env, cwd=self.dir, check=check)

    def build(self, spec: Path) -> Package:
        _, proc, _ = self.cli("release", "build", str(spec), "-o", "json")
        release = json.loads(proc.stdout)["release"]
        return self.package(release)

    def package(self, release: str) -> Package:
        pkg = DML(self.home / "dml").open(release)
        return Package(
            release=release,
            digest=pkg.digest,
            rid=release_id(release, pkg.digest),
            archive=Path(pkg.archive_path),
            manifest={f.path: f.sha256 for f in pkg.files},
            size=sum(f.size for f in pkg.files),
            archive_size=Path(pkg.archive_path).stat().st_size,
        )

    def rfc(self, release: str) -> str:
        _, proc, _ = self.cli(
            "rfc", "new", "--release", release, "--env", "dev", "--model", "standard",
            "--template", "any-to-staging", "-o", "json",
        )  # fmt: skip
        data = json.loads(proc.stdout)
        assert data["status"] in ("authorized", "scheduled"), data
        return str(data["id"])

    def warm_up(self) -> bool:
        """Make sure a warm process answers (a cold command starts one); False when the warm
        start is off for this home's environment."""
        if self.env.get("FERRY_WARM") == "0":
            return False
        if not list(WARM_DIR.glob("warm-*.sock")):
            self.cli("status", "-o", "json")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if list(WARM_DIR.glob("warm-*.sock")):
                return True
            time.sleep(0.2)
        raise RuntimeError("no warm process: " + "\n".join(_warm_log()))

    def deploy(self, plan: Path, release: str, *, expect: int = 0, cold: bool = False) -> Deployed:
        rfc = self.rfc(release)
        env = {**self.env, "FERRY_WARM": "0"} if cold else self.env
        # the warm log's lines from here on are this deploy's (a PID seen before may be
        # this child's too: over a 1000-host run the kernel reuses PIDs)
        mark = len(_warm_log())
        wall, proc, cpu, rss = timed_rusage(
            [str(FERRY_BIN), "deploy", str(plan), "--release", release, "--rfc", rfc, "-o", "json"],
            env=env, cwd=self.dir, check=False,
        )  # fmt: skip
        child = _warm_children(since=mark)
        if child:  # it ran warm: its work is the child's, whose rusage the warm process logs
            used = _warm_rusage(child[-1], since=mark)
            cpu += used[0]
            rss = max(rss, used[1])
        try:
            report = json.loads(proc.stdout)
        except ValueError:
            report = {}
        if proc.returncode != expect:
            raise RuntimeError(
                f"ferry deploy {release}: exit {proc.returncode} (expected {expect})\n"
                + proc.stdout.decode(errors="replace")[-3000:]
                + proc.stderr.decode(errors="replace")[-3000:]
            )
        return Deployed(wall, cpu, proc.returncode, report, rss)

    def stop_warm_prefect(self) -> str:
        """Stop the warm Prefect server the embedded default started under this home:
        `ferry prefect stop`, else orchestrator.prefect_server.stop_server(); what happened."""
        try:
            _, proc, _ = self.cli("prefect", "stop", "--force", "-o", "json", check=False)
            if proc.returncode == 0:
                return "ferry prefect stop: " + proc.stdout.decode(errors="replace").strip()
            why = proc.stderr.decode(errors="replace").strip().splitlines()[-1:]
        except Exception as e:  # noqa: BLE001 - the CLI may not have the command yet
            why = [repr(e)]
        try:
            from orchestrator.prefect_server import stop_server

            return f"stop_server(): {stop_server(self.home / 'prefect', force=True)}"
        except Exception as e:  # noqa: BLE001
            return f"no warm server stopped (`ferry prefect stop`: {why}; stop_server: {e!r})"

    # -- the CMS journal -------------------------------------------------------------------
    def _db(self) -> sqlite3.Connection:
        return sqlite3.connect(self.home / "cms.db")

    def flow_seconds(self, deployment: int) -> float:
        """From the deployment record's start to its finish (inside the process)."""
        with self._db() as db:
            a, b = db.execute(
                "select started_at, finished_at from deployments where id = ?", (deployment,)
            ).fetchone()
        return (_ts(b) - _ts(a)).total_seconds()

    def steps_span(self, deployment: int) -> float:
        """From the first host step's start to the last one's finish."""
        with self._db() as db:
            a, b = db.execute(
                "select min(started_at), max(finished_at) from host_steps where deployment_id = ?",
                (deployment,),
            ).fetchone()
        return (_ts(b) - _ts(a)).total_seconds()

    def timeline(self, deployment: int) -> dict[str, float]:
        """Where a deployment's time went, from the journal: seconds per phase, and per step
        the median and the longest host."""
        with self._db() as db:
            d0, d1 = db.execute(
                "select started_at, finished_at from deployments where id = ?", (deployment,)
            ).fetchone()
            w = db.execute(
                "select min(started_at), max(finished_at) from waves where deployment_id = ?",
                (deployment,),
            ).fetchone()
            rows = db.execute(
                "select step, started_at, finished_at from host_steps "
                "where deployment_id = ? and wave_index >= 0",
                (deployment,),
            ).fetchall()
        out: dict[str, float] = {}
        first = min(_ts(r[1]) for r in rows)
        last = max(_ts(r[2]) for r in rows)
        out["before first step (gate, check-in, object cache)"] = (first - _ts(d0)).total_seconds()
        out["host steps, first start to last end"] = (last - first).total_seconds()
        out["after last step to verdict (read-back + checks)"] = (_ts(w[1]) - last).total_seconds()
        out["verdict to deployment finished"] = (_ts(d1) - _ts(w[1])).total_seconds()
        steps: dict[str, list[float]] = {}
        for step, a, b in rows:
            steps.setdefault(step, []).append((_ts(b) - _ts(a)).total_seconds())
        for step, ds in steps.items():
            ds.sort()
            out[f"step {step}: median host"] = ds[len(ds) // 2]
            out[f"step {step}: slowest host"] = ds[-1]
        return out

    def backout_seconds(self, deployment: int) -> tuple[float, int]:
        """(seconds from the failed milestone's verdict to the last host's backout step
        finished, hosts backed out)."""
        with self._db() as db:
            (verdict,) = db.execute(
                "select max(finished_at) from waves where deployment_id = ? and status = 'failed'",
                (deployment,),
            ).fetchone()
            last, hosts = db.execute(
                "select max(finished_at), count(distinct host) from host_steps "
                "where deployment_id = ? and wave_index = -1",
                (deployment,),
            ).fetchone()
        return (_ts(last) - _ts(verdict)).total_seconds(), hosts


def _warm_log() -> list[str]:
    path = WARM_DIR / "warm.log"
    return path.read_text().splitlines() if path.exists() else []


def _warm_children(since: int = 0) -> list[int]:
    """The PIDs of the children the warm processes forked (their log from line `since`), in
    order."""
    return [int(x.split(" child ", 1)[1].split(":", 1)[0]) for x in _warm_log()[since:]
            if " child " in x and " done: " not in x]  # fmt: skip


def _warm_rusage(pid: int, since: int = 0, timeout: float = 10.0) -> tuple[float, int]:
    """(CPU seconds, peak RSS KiB) of warm child `pid` with what it reaped, from wait4 in
    the warm process (logged within a second of its end; from line `since` of its log)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for x in _warm_log()[since:]:
            if f" child {pid} done: " in x:
                cpu = float(x.split(", cpu ", 1)[1].split(" s", 1)[0])
                rss = int(x.split(", maxrss ", 1)[1].split(" KiB", 1)[0])
                return cpu, rss
        time.sleep(0.1)
    raise RuntimeError(f"the warm process logged no end of child {pid}")


def _ts(value: str) -> datetime:
    return datetime.fromisoformat(value)


def write_plan(
    path: Path,
    inventory: Path,
    *,
    concurrency: int,
    checks: list[dict[str, str]] | None = None,
    readback: str = "full",
) -> Path:
    doc = {
        "environment": "dev",
        "inventory": str(inventory),
        "targets": "all",
        "strategy": "big-bang",
        "method": "push",
        "concurrency": concurrency,
        "hooks": {"activate": "true"},
        "milestone": {
            "max_failed": 0,
            "deadline": "900s",
            "soak": "0s",
            "checks": checks or [{"command": "test -f {{ release_path }}/app/VERSION"}],
        },
        "timeouts": {"step": "900s", "connect": "30s"},
        "readback": readback,
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def announce(what: str, d: Deployed) -> None:
    log(f"  ferry {what}: {d.wall:.1f} s wall, {d.cpu:.1f} s CPU, status {d.report.get('status')}")
