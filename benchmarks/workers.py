"""Issue 14's benchmark: Ferry on Prefect workers, one worker vs two, against the local default.

Per repetition, three configurations in rotating order, each on a fresh Ferry home (its own
CMS database on a throwaway PostgreSQL, its own DML and object cache) over a wiped fleet:

- `local`: `ferry deploy` without --via (the flow runs in the command, on the standing server);
- `1 worker`: `--via prefect --pool P` with shard_size = the wave's size, so the wave runs
  whole in the deployment's own flow run on one worker;
- `2 workers`: the same with shard_size = half the wave: the deployment's flow run (on one
  worker) submits two `deploy_shard` flow runs, which two other workers run at once.

The Prefect configurations start three process workers (`prefect worker start --pool P
--limit 1`, in the home's environment) and wait until all three heartbeat before anything is
timed, in both configurations, so the idle workers' polling is the same in both; the workers
are ended by their process group's PID afterwards.

Each configuration times (wall clock of `ferry deploy`, the CMS record's start → finish):
a cold push of the 100 MB release to `cold` hosts (50), a fresh push of the tiny release to
`noop` hosts (200), and the no-op redeploy of that same tiny release to those hosts again.
Every host is verified after each push (sha256 of every file, `current`). The 1-minute load
average is recorded before each deploy, and /proc/loadavg at the start and end.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from benchmarks import content, verify
from benchmarks.common import FERRY_BIN, PREFECT_BIN, log, median, timed_rusage
from benchmarks.ferry_side import FerryHome, Package, write_plan

CONFIGS = ["local", "1 worker", "2 workers"]
TOOLS = {"local": "ferry local", "1 worker": "ferry prefect 1 worker",
         "2 workers": "ferry prefect 2 workers"}  # fmt: skip
SCENARIOS = ("workers-cold", "workers-tiny", "workers-noop")
N_WORKER_PROCS = 3  # one for the deployment's flow run, two for its shards


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().strip()


@dataclass
class Workers:
    """N process workers on `pool`, one flow run at a time each, in the home's environment."""

    fh: FerryHome
    pool: str
    url: str
    n: int = N_WORKER_PROCS
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self) -> None:
        env = {**self.fh.env, "PREFECT_WORKER_QUERY_SECONDS": "1",
               "PREFECT_WORKER_HEARTBEAT_SECONDS": "5"}  # fmt: skip
        for k in range(self.n):
            out = open(self.fh.dir / f"worker-{k}.log", "wb")  # noqa: SIM115
            self.procs.append(
                subprocess.Popen(
                    [str(PREFECT_BIN), "worker", "start", "--pool", self.pool, "--limit", "1"],
                    env=env,
                    cwd=self.fh.dir,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        deadline = time.monotonic() + 180
        while True:
            dead = [p.pid for p in self.procs if p.poll() is not None]
            if dead:
                raise RuntimeError(f"worker(s) {dead} exited; see {self.fh.dir}/worker-*.log")
            if len(self.online()) >= self.n:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.n} workers not online on {self.pool} within 180 s")
            time.sleep(1)

    def online(self) -> list[str]:
        req = urllib.request.Request(
            f"{self.url}/work_pools/{self.pool}/workers/filter", data=b"{}", method="POST",
            headers={"Content-Type": "application/json"},
        )  # fmt: skip
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                rows = json.loads(r.read())
        except OSError:
            return []
        return [w["name"] for w in rows if w.get("status") == "ONLINE"]

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def deploy(fh: FerryHome, plan: Path, release: str, extra: list[str]) -> tuple[float, dict]:
    rfc = fh.rfc(release)
    cmd = [str(FERRY_BIN), "deploy", str(plan), "--release", release, "--rfc", rfc, "-o", "json"]
    wall, proc, _, _ = timed_rusage([*cmd, *extra], env=fh.env, cwd=fh.dir, check=False)
    try:
        report = json.loads(proc.stdout)
    except ValueError:
        report = {}
    if proc.returncode != 0 or report.get("status") != "succeeded":
        raise RuntimeError(
            f"ferry deploy {release} {' '.join(extra)}: exit {proc.returncode}\n"
            + proc.stdout.decode(errors="replace")[-3000:]
            + proc.stderr.decode(errors="replace")[-3000:]
        )
    return wall, report


class Cms:
    """The home's CMS database on PostgreSQL, read back for the record's times and shards."""

    def __init__(self, url: str) -> None:
        import sqlalchemy as sa

        self.sa = sa
        self.engine = sa.create_engine(url)

    def deployment(self, dep: int) -> tuple[float, list[dict[str, Any]]]:
        with self.engine.connect() as c:
            a, b, ev = c.execute(
                self.sa.text("select started_at, finished_at, evidence from deployments "
                             "where id = :i"), {"i": dep},
            ).one()  # fmt: skip
        if isinstance(ev, str):
            ev = json.loads(ev)
        return (b - a).total_seconds(), list((ev or {}).get("shards", []))

    def close(self) -> None:
        self.engine.dispose()


def plan_with(path: Path, inventory: Path, n: int, shard_size: int | None) -> Path:
    write_plan(path, inventory, concurrency=n)
    if shard_size:
        doc = yaml.safe_load(path.read_text())
        doc["shard_size"] = shard_size
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def workers(bench: Any, pg: Any) -> None:
    """The scenario; `pg` is a running tests.pg.PostgresServer (each home a fresh database)."""
    s, fleet, res = bench.sizes, bench.fleet, bench.results
    n_cold, n_noop = s.backout_hosts, s.noop_hosts  # 50 and 200 (quick: 10 and 20)
    hosts_noop = fleet.hosts[:n_noop]
    hosts_cold = hosts_noop[:n_cold]
    inv_cold, inv_noop = bench.inventory(hosts_cold), bench.inventory(hosts_noop)
    spec_big = content.make_tree(bench.work / "src-w-1.0", "1.0", s.cold_bytes, s.cold_files)
    spec_tiny = content.make_tree(bench.work / "src-w-tiny", "0.1", s.tiny_bytes, s.tiny_files)
    shard = {"local": (None, None), "1 worker": (n_cold, n_noop),
             "2 workers": (-(-n_cold // 2), -(-n_noop // 2))}  # fmt: skip
    info: dict[str, Any] = {
        "loadavg_start": loadavg(), "reps": s.reps, "cms": "PostgreSQL (tests/pg.py server)",
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "cold_hosts": n_cold,
        "noop_hosts": n_noop, "cold_bytes": s.cold_bytes, "tiny_bytes": s.tiny_bytes,
        "shard_sizes": {c: shard[c] for c in CONFIGS}, "worker_processes": N_WORKER_PROCS,
    }  # fmt: skip
    res.note("workers", info)
    log(f"workers: load {info['loadavg_start']}")
    started = time.monotonic()
    from benchmarks.scenarios import rotate

    # FERRY_BENCH_WORKER_CONFIGS="2 workers" (comma-separated) measures only those configurations
    chosen = [c for c in os.environ.get("FERRY_BENCH_WORKER_CONFIGS", "").split(",") if c]
    configs = [c for c in CONFIGS if c in chosen] or list(CONFIGS)
    info["configs"] = configs
    for rep in range(s.reps):
        for config in rotate(configs, rep):
            one_config(bench, pg, config, rep, shard[config], spec_big, spec_tiny,
                       hosts_cold, hosts_noop, inv_cold, inv_noop)  # fmt: skip
    info["loadavg_end"] = loadavg()
    info["minutes"] = round((time.monotonic() - started) / 60, 1)
    res.note("workers", info)
    log(f"workers: done in {info['minutes']} min, load {info['loadavg_end']}")


def one_config(
    bench: Any, pg: Any, config: str, rep: int, shards: tuple[int | None, int | None],
    spec_big: Path, spec_tiny: Path, hosts_cold: list[str], hosts_noop: list[str],
    inv_cold: Path, inv_noop: Path,
) -> None:  # fmt: skip
    fleet, res = bench.fleet, bench.results
    tool = TOOLS[config]
    tag = f"w-{config.replace(' ', '')}-{rep}"
    db_url = pg.create_database()
    fh = bench.home(tag, FERRY_DATABASE_URL=db_url)
    pool = f"bench-{tag}"
    cms = Cms(db_url)
    crew: Workers | None = None
    try:
        big, tiny = fh.build(spec_big), fh.build(spec_tiny)
        plan_cold = plan_with(bench.work / f"plan-{tag}-cold.yaml", inv_cold, len(hosts_cold),
                              shards[0])  # fmt: skip
        plan_noop = plan_with(bench.work / f"plan-{tag}-noop.yaml", inv_noop, len(hosts_noop),
                              shards[1])  # fmt: skip
        extra: list[str] = []
        if config != "local":
            fh.cli("prefect", "register", "--pool", pool)
            crew = Workers(fh, pool, bench.prefect_url)
            crew.start()
            extra = ["--via", "prefect", "--pool", pool]
        fleet.wipe(hosts_noop)
        steps: list[tuple[str, Path, Package, list[str]]] = [
            ("workers-cold", plan_cold, big, hosts_cold),
            ("workers-tiny", plan_noop, tiny, hosts_noop),
            ("workers-noop", plan_noop, tiny, hosts_noop),
        ]
        for scenario, plan, pkg, hosts in steps:
            load1 = float(loadavg().split()[0])
            log(f"{scenario} {len(hosts)} hosts, rep {rep + 1}: {tool} (load {load1:.2f})")
            wall, report = deploy(fh, plan, pkg.release, extra)
            verify.release_on(fleet, hosts, pkg.rid, pkg.manifest)
            flow, events = cms.deployment(report["id"])
            started = [e for e in events if e.get("event") == "started"]
            runners = {json.dumps(e.get("runner"), sort_keys=True) for e in started}
            n = len(hosts)
            res.add(scenario, tool, n, "seconds", wall)
            res.add(scenario, tool, n, "flow_seconds", flow)
            res.add(scenario, tool, n, "bytes_sent", report.get("bytes_sent", 0))
            res.add(scenario, tool, n, "load1", load1)
            res.add(scenario, tool, n, "shards", len(started))
            res.add(scenario, tool, n, "shard_runners", len(runners))
            log(f"  {wall:.1f} s wall, record {flow:.1f} s, {len(started)} shard(s) on "
                f"{len(runners)} worker process(es), {report.get('bytes_sent', 0) / 1e6:.0f} MB "
                "sent (verified)")  # fmt: skip
            want = 2 if config == "2 workers" else 0
            if len(started) != want or len(runners) != want:
                raise RuntimeError(f"{tool}: expected {want} shards on {want} workers, got "
                                   f"{len(started)} on {len(runners)}: {events}")  # fmt: skip
    finally:
        if crew is not None:
            crew.stop()
        cms.close()
        try:
            pg.drop_database(db_url.rsplit("/", 1)[1])
        except Exception as e:  # noqa: BLE001
            log(f"  could not drop {db_url.rsplit('/', 1)[1]}: {e!r}")


def summary(res: Any) -> dict[str, dict[str, float]]:
    """Medians per scenario and configuration: {scenario: {config: seconds}}."""
    out: dict[str, dict[str, float]] = {}
    for key, cell in res.cells.items():
        if key.startswith("_") or cell.get("scenario") not in SCENARIOS:
            continue
        out.setdefault(cell["scenario"], {})[cell["tool"]] = median(cell.get("seconds", []))
    return out
