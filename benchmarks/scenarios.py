"""The issues' scenarios, each tool on the same hosts in the same run (issues 7 and 11).

Cold push, incremental release and backout share their set-up: a repetition at 20 hosts
deploys v1 cold and then v2 (1% of files changed); one at 50 hosts deploys v1 cold and then
a v2 whose milestone fails on one host, so Ferry backs all 50 out. The peers' v2 for the
backout is laid down from the root namespace (exactly the files their own deploy leaves),
and what is timed is their rollback run. The order of the tools rotates per repetition.

The no-op at 200 hosts also times raw OpenSSH's one-command fan-out (`ssh host true`) at 1
and at 200 hosts, for the marginal cost per host; `noop_big` brings up a fleet of its own
(1000 hosts: its start-up time and memory per host are results too) for the same no-op and
fan-out at that size.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import content, peers, verify
from benchmarks.common import FERRY_BIN, MB, PEERS_VENV, log, median, timed
from benchmarks.ferry_side import FerryHome, Package, announce, write_plan
from orchestrator.errors import BadInput
from orchestrator.lab import procs
from orchestrator.lab.fleet import Fleet

BROKEN = {"command": "test ! -e {{ shared }}/broken-{{ version }}"}
HAS_VERSION = {"command": "test -f {{ release_path }}/app/VERSION"}


@dataclass
class Sizes:
    cold_bytes: int = 100 * MB
    cold_files: int = 1000
    cold_hosts: tuple[int, ...] = (20, 50)
    incremental_hosts: int = 20
    backout_hosts: int = 50
    noop_hosts: int = 200
    big_hosts: int = 1000  # noop1000: its own fleet, the no-op and the fan-out at this size
    fanout_parallel: int = 50  # raw OpenSSH's `ssh host true`, this many at a time
    help_runs: int = 10  # `ferry --help`, median of this many (after one warm-up)
    tiny_bytes: int = 200_000
    tiny_files: int = 20
    dml_gib: float = 1.0
    reps: int = 3
    # the peers' cold push at backout_hosts costs minutes per run on 2 shared cores: this
    # many repetitions of it; their rollback is timed every repetition all the same (on v1
    # and v2 laid down from the root namespace when their cold push did not run)
    big_peer_reps: int = 3
    peers: tuple[str, ...] = ("pyinfra", "ansible", "raw")  # the no-op's peers (--peers)

    @classmethod
    def quick(cls) -> Sizes:
        return cls(
            cold_bytes=10 * MB, cold_files=200, cold_hosts=(5, 10), incremental_hosts=5,
            backout_hosts=10, noop_hosts=20, big_hosts=50, dml_gib=0.1, reps=1,
            big_peer_reps=1,
        )  # fmt: skip


@dataclass
class Results:
    """cells[(scenario, tool, hosts)][metric] = [values]; saved after every value."""

    path: Path
    cells: dict[str, dict[str, Any]] = field(default_factory=dict)
    run: str = ""  # this invocation's start: stamped on the cells it makes (`run`)

    def add(self, scenario: str, tool: str, hosts: int, metric: str, value: Any) -> None:
        key = f"{scenario}|{tool}|{hosts}"
        cell = self.cells.setdefault(key, {"scenario": scenario, "tool": tool, "hosts": hosts})
        if self.run:
            cell.setdefault("run", self.run)
        cell.setdefault(metric, []).append(value)
        self.save()

    def note(self, key: str, value: Any) -> None:
        self.cells.setdefault("_notes", {})[key] = value
        self.save()

    def get(self, scenario: str, tool: str, hosts: int, metric: str) -> list[Any]:
        return self.cells.get(f"{scenario}|{tool}|{hosts}", {}).get(metric, [])

    def med(self, scenario: str, tool: str, hosts: int, metric: str = "seconds") -> float:
        return median(self.get(scenario, tool, hosts, metric))

    def save(self) -> None:
        self.path.write_text(json.dumps(self.cells, indent=1, sort_keys=True))

    @classmethod
    def load(cls, path: Path) -> Results:
        return cls(path, json.loads(path.read_text()) if path.exists() else {})


@dataclass
class Bench:
    fleet: Fleet
    work: Path
    prefect_url: str
    sizes: Sizes
    results: Results

    def home(self, tag: str, prefect: bool = True, **env: str) -> FerryHome:
        return FerryHome(self.work / "ferry" / tag, self.prefect_url if prefect else None, **env)

    def inventory(self, hosts: list[str]) -> Path:
        return self.fleet.write_inventory(self.work / f"inventory-{len(hosts)}.yaml", hosts)


def rotate(tools: list[str], rep: int) -> list[str]:
    k = rep % len(tools)
    return tools[k:] + tools[:k]


def seed_peer_release(
    bench: Bench, hosts: list[str], pkg: Package, version: str, flip: bool
) -> None:
    """Lay down exactly what the peers' deploy leaves (packages/, releases/<v>, current)
    straight through each host's deploy root; hard links from one unpacked template."""
    tpl = bench.work / "templates" / pkg.rid
    if not tpl.exists():
        tmp = tpl.with_suffix(".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        subprocess.run(["tar", "--zstd", "-xf", str(pkg.archive), "-C", str(tmp)], check=True)
        tmp.rename(tpl)
    for h in hosts:
        root = bench.fleet.root_dir(h)
        (root / "packages").mkdir(exist_ok=True)
        (root / "releases").mkdir(exist_ok=True)
        dest = root / "packages" / f"{version}.tar.zst"
        if not dest.exists():
            os.link(pkg.archive, dest)
        rel = root / "releases" / version
        if not rel.exists():
            subprocess.run(["cp", "-al", str(tpl), str(rel)], check=True)
        if flip:
            tmp_link = root / "current.tmp"
            tmp_link.unlink(missing_ok=True)
            tmp_link.symlink_to(f"releases/{version}")
            tmp_link.replace(root / "current")


# -- 1, 2, 4: cold push, incremental, backout ----------------------------------------------
def releases(bench: Bench) -> tuple[Path, Path, int]:
    """Source trees of v1 (cold) and v2 (1% of the files changed)."""
    s = bench.sizes
    spec1 = content.make_tree(bench.work / "src-1.0", "1.0", s.cold_bytes, s.cold_files)
    spec2, changed = content.next_version(spec1.parent, bench.work / "src-2.0", "2.0", 0.01)
    return spec1, spec2, changed


def push_scenarios(bench: Bench, n: int, spec1: Path, spec2: Path) -> None:
    """Cold push to n hosts; then at incremental_hosts the v2 release, at backout_hosts the
    failing v2 and its backout."""
    s, fleet, res = bench.sizes, bench.fleet, bench.results
    hosts = fleet.hosts[:n]
    incremental = n == s.incremental_hosts
    backout = n == s.backout_hosts
    inv = bench.inventory(hosts)
    plan = write_plan(
        bench.work / f"plan-{n}.yaml", inv, concurrency=n, checks=[HAS_VERSION, BROKEN]
    )
    # the packages both sides deploy (bit-identical archives from a deterministic build)
    ref = bench.home(f"ref-{n}")
    p1, p2 = ref.build(spec1), ref.build(spec2)
    res.note("package_bytes", p1.size)
    res.note("archive_bytes", p1.archive_size)
    res.note("package_files", len(p1.manifest))
    for rep in range(s.reps):
        for tool in rotate(["raw", "ferry", "pyinfra", "ansible"], rep):
            fleet.wipe(hosts)
            # every tool starts with nothing left to write back from the one before: the
            # lab's hosts share one disk (~200 MB/s here) and a push leaves 2-5 GB dirty
            os.sync()
            log(f"cold push {n} hosts, rep {rep + 1}/{s.reps}: {tool}")
            if tool == "raw":
                t = peers.raw_push(fleet, hosts, p1.archive, "/srv/app/package.tar.zst")
                verify.file_on(fleet, hosts, "package.tar.zst", verify.sha256_file(p1.archive))
                res.add("cold", "raw", n, "seconds", t)
                log(f"  raw ssh: {t:.1f} s (verified)")
            elif tool == "ferry":
                ferry_push(bench, n, hosts, plan, spec1, spec2, p1, p2, rep, incremental, backout)
            else:
                cold = not backout or rep < s.big_peer_reps
                peer_push(bench, tool, n, hosts, p1, p2, incremental, backout, cold)


def ferry_push(
    bench: Bench, n: int, hosts: list[str], plan: Path, spec1: Path, spec2: Path,
    p1: Package, p2: Package, rep: int, incremental: bool, backout: bool,
) -> None:  # fmt: skip
    res, fleet = bench.results, bench.fleet
    fh = bench.home(f"push-{n}-{rep}")
    assert fh.build(spec1).digest == p1.digest
    d = fh.deploy(plan, p1.release)
    announce(f"cold {n}", d)
    verify.release_on(fleet, hosts, p1.rid, p1.manifest)
    dep = d.report["id"]
    if incremental:
        note_timeline(res, f"timeline_cold_{n}", d.wall, fh, dep)
    res.add("cold", "ferry", n, "seconds", d.wall)
    res.add("cold", "ferry", n, "flow_seconds", fh.flow_seconds(dep))
    res.add("cold", "ferry", n, "steps_seconds", fh.steps_span(dep))
    res.add("cold", "ferry", n, "cpu_seconds", d.cpu)
    res.add("cold", "ferry", n, "bytes_sent", d.report["bytes_sent"])
    if not (incremental or backout):
        return
    assert fh.build(spec2).digest == p2.digest
    if incremental:
        d2 = fh.deploy(plan, p2.release)
        announce(f"incremental {n}", d2)
        verify.release_on(fleet, hosts, p2.rid, p2.manifest)
        dep2 = d2.report["id"]
        note_timeline(res, f"timeline_incremental_{n}", d2.wall, fh, dep2)
        res.add("incremental", "ferry", n, "seconds", d2.wall)
        res.add("incremental", "ferry", n, "flow_seconds", fh.flow_seconds(dep2))
        res.add("incremental", "ferry", n, "bytes_sent", d2.report["bytes_sent"])
        res.add("incremental", "ferry", n, "bytes_share", d2.report["bytes_sent"] / (n * p2.size))
    if backout:
        broken = fleet.root_dir(hosts[-1]) / "shared" / f"broken-{p2.release.split('@')[1]}"
        broken.parent.mkdir(parents=True, exist_ok=True)
        broken.write_text("x")
        try:
            d3 = fh.deploy(plan, p2.release, expect=4)
        finally:
            broken.unlink()
        announce(f"backout {n}", d3)
        assert d3.report["status"] == "backed-out", d3.report["status"]
        assert all(r["restored"] for r in d3.report["backout"]), d3.report["backout"]
        verify.release_on(fleet, hosts, p1.rid, p1.manifest)
        secs, count = fh.backout_seconds(d3.report["id"])
        assert count == n, f"{count} hosts backed out, expected {n}"
        log(f"  ferry backout: {secs:.2f} s from verdict to the last host restored")
        res.add("backout", "ferry", n, "seconds", secs)
        res.add("backout", "ferry", n, "deploy_wall", d3.wall)


_TIMELINES: dict[str, list[dict[str, float]]] = {}  # this invocation's runs, by note


def note_timeline(res: Results, key: str, wall: float, fh: FerryHome, dep: int) -> None:
    """Where a deployment's time went (the CLI's wall clock, the record, the journal's
    phases), as the median of this invocation's runs so far."""
    line = {"wall clock of `ferry deploy`": wall, "deployment record": fh.flow_seconds(dep)}
    runs = _TIMELINES.setdefault(key, [])
    runs.append(line | fh.timeline(dep))
    res.note(key, {k: median([r[k] for r in runs if k in r]) for k in runs[0]})


def peer_push(
    bench: Bench, tool: str, n: int, hosts: list[str], p1: Package, p2: Package,
    incremental: bool, backout: bool, cold: bool = True,
) -> None:  # fmt: skip
    res, fleet = bench.results, bench.fleet
    cls = peers.Ansible if tool == "ansible" else peers.Pyinfra
    peer = cls(fleet, hosts, bench.work / tool / str(n))
    if cold:
        t = peer.deploy(p1.archive, "bench-1.0")
        verify.release_on(fleet, hosts, "bench-1.0", p1.manifest)
        res.add("cold", tool, n, "seconds", t)
        log(f"  {tool}: {t:.1f} s (verified)")
    else:
        seed_peer_release(bench, hosts, p1, "bench-1.0", flip=True)
    if incremental:
        t2 = peer.deploy(p2.archive, "bench-2.0")
        verify.release_on(fleet, hosts, "bench-2.0", p2.manifest)
        res.add("incremental", tool, n, "seconds", t2)
        res.add("incremental", tool, n, "bytes_share", 1.0)
        log(f"  {tool} incremental: {t2:.1f} s (verified)")
    if backout:
        seed_peer_release(bench, hosts, p2, "bench-2.0", flip=True)
        verify.release_on(fleet, hosts, "bench-2.0", p2.manifest, files=False)
        t3 = peer.rollback("bench-1.0")
        verify.release_on(fleet, hosts, "bench-1.0", p1.manifest)
        res.add("backout", tool, n, "seconds", t3)
        log(f"  {tool} rollback: {t3:.1f} s (verified)")


# -- 3, 6: no-op redeploy and orchestration overhead ----------------------------------------
def noop_and_overhead(bench: Bench) -> None:
    """Per repetition, in rotating order: Ferry (its 1-host deploys, the fresh tiny package to
    all, then the no-op redeploy), pyinfra's no-op over the same release laid out its way,
    and raw OpenSSH's fan-out. The tools alternate within each repetition, so a drift in the
    machine's speed over the scenario's minutes falls on every tool alike."""
    s, fleet = bench.sizes, bench.fleet
    n = s.noop_hosts
    hosts = fleet.hosts[:n]
    spec = content.make_tree(bench.work / "src-tiny", "1.0", s.tiny_bytes, s.tiny_files)
    plan_all = write_plan(bench.work / f"plan-noop-{n}.yaml", bench.inventory(hosts), concurrency=n)
    plan_one = write_plan(bench.work / "plan-one.yaml", bench.inventory(hosts[:1]), concurrency=1)
    fh: FerryHome | None = None
    pkg: Package | None = None
    tools = ["ferry", *[t for t in ["pyinfra", "ansible", "raw"] if t in s.peers]]
    for rep in range(s.reps):
        for tool in rotate(tools, rep):
            log(f"no-op / overhead, {n} hosts, rep {rep + 1}/{s.reps}: {tool}")
            if tool == "ferry":
                fh = bench.home(f"noop-{rep}")
                pkg = fh.build(spec)
                _ferry_noop(bench, fh, pkg, hosts, plan_one, plan_all)
            elif tool == "raw":
                raw_fanout(bench, "fanout", hosts)
            else:
                if pkg is None:  # the peers redeploy the release Ferry built
                    pkg = bench.home("noop-package").build(spec)
                _peer_noop(bench, tool, pkg, hosts)
    assert fh is not None
    cli_help(bench, fh)


def _ferry_noop(
    bench: Bench, fh: FerryHome, pkg: Package, hosts: list[str], plan_one: Path, plan_all: Path
) -> None:
    """Ferry's cold and warm 1-host deploys (the fixed cost), the fresh tiny package to all
    `hosts`, then the no-op redeploy; each verified on every host."""
    fleet, res, n = bench.fleet, bench.results, len(hosts)
    fleet.wipe(hosts)
    cold = fh.deploy(plan_one, pkg.release, cold=True)
    announce("1 host, cold (FERRY_WARM=0: a fresh Python process)", cold)
    res.add("fixed-cold", "ferry", 1, "seconds", cold.wall)
    res.add("fixed-cold", "ferry", 1, "cpu_seconds", cold.cpu)
    fh.warm_up()
    one = fh.deploy(plan_one, pkg.release)
    announce("1 host (fixed cost, warm start)", one)
    res.add("fixed", "ferry", 1, "seconds", one.wall)
    res.add("fixed", "ferry", 1, "cpu_seconds", one.cpu)
    res.add("fixed", "ferry", 1, "flow_seconds", fh.flow_seconds(one.report["id"]))
    fresh = fh.deploy(plan_all, pkg.release)
    announce(f"fresh tiny package to {n}", fresh)
    verify.release_on(fleet, hosts, pkg.rid, pkg.manifest)
    res.add("tiny", "ferry", n, "seconds", fresh.wall)
    res.add("tiny", "ferry", n, "cpu_seconds", fresh.cpu)
    res.add("tiny", "ferry", n, "peak_rss_mib", fresh.peak_rss_kib / 1024)
    res.add("overhead", "ferry", n, "cpu_ms_per_host", 1000 * (fresh.cpu - one.cpu) / (n - 1))
    noop = fh.deploy(plan_all, pkg.release)
    announce(f"no-op redeploy to {n}", noop)
    verify.release_on(fleet, hosts, pkg.rid, pkg.manifest)
    res.add("noop", "ferry", n, "seconds", noop.wall)
    res.add("noop", "ferry", n, "cpu_seconds", noop.cpu)
    res.add("noop", "ferry", n, "bytes_sent", noop.report["bytes_sent"])
    res.add("noop", "ferry", n, "flow_seconds", fh.flow_seconds(noop.report["id"]))
    res.add("noop", "ferry", n, "cpu_ms_per_host", 1000 * (noop.cpu - one.cpu) / n)
    res.add("noop", "ferry", n, "peak_rss_mib", noop.peak_rss_kib / 1024)


def _peer_noop(bench: Bench, tool: str, pkg: Package, hosts: list[str]) -> None:
    """A peer's deploy again over hosts that already have the release, laid out its way."""
    fleet, res, n = bench.fleet, bench.results, len(hosts)
    fleet.wipe(hosts)
    seed_peer_release(bench, hosts, pkg, "bench-1.0", flip=True)
    verify.release_on(fleet, hosts, "bench-1.0", pkg.manifest)
    cls = peers.Ansible if tool == "ansible" else peers.Pyinfra
    peer = cls(fleet, hosts, bench.work / tool / f"noop-{n}")
    t = peer.deploy(pkg.archive, "bench-1.0")
    verify.release_on(fleet, hosts, "bench-1.0", pkg.manifest)
    res.add("noop", tool, n, "seconds", t)
    res.add("noop", tool, n, "cpu_seconds", peer.last_cpu)
    log(f"  {tool}: {t:.1f} s, {peer.last_cpu:.1f} s CPU (verified)")


def raw_fanout(bench: Bench, scenario: str, hosts: list[str]) -> None:
    """Raw OpenSSH's one-command fan-out at 1 host and at all `hosts`: T(1) and T(N), for
    the marginal cost per host (T(N) - T(1)) / (N - 1)."""
    par = bench.sizes.fanout_parallel
    t1 = peers.raw_fanout(bench.fleet, hosts[:1], par)
    tn = peers.raw_fanout(bench.fleet, hosts, par)
    bench.results.add(scenario, "raw", 1, "seconds", t1)
    bench.results.add(scenario, "raw", len(hosts), "seconds", tn)
    per = 1000 * (tn - t1) / max(1, len(hosts) - 1)
    log(f"  raw ssh fan-out ({par} at a time): 1 host {t1:.2f} s, {len(hosts)} hosts {tn:.1f} s, "
        f"{per:.1f} ms per further host")  # fmt: skip


def cli_help(bench: Bench, fh: FerryHome) -> None:
    """`ferry --help`'s wall clock (the CLI's start-up alone), one warm-up then help_runs."""
    fh.cli("--help")
    ts = [fh.cli("--help")[0] for _ in range(bench.sizes.help_runs)]
    for t in ts:
        bench.results.add("help", "ferry", 0, "seconds", t)
    log(f"  ferry --help: median {median(ts):.3f} s of {len(ts)}")


def embedded(bench: Bench) -> None:
    """`ferry deploy` to one host (wiped before each, as in the fixed-cost row) on the
    embedded default: no PREFECT_API_URL, no FERRY_PREFECT. The first command of a fresh
    home starts the warm Prefect server under it; the later ones (reps of them) reuse it.
    The server is stopped at the end, however the scenario ends."""
    hosts, res = bench.fleet.hosts[:1], bench.results
    spec = content.make_tree(bench.work / "src-tiny", "1.0", bench.sizes.tiny_bytes, 20)
    # an idle limit only as a safety net should this process die before it stops the server
    fh = bench.home("embedded", prefect=False, FERRY_PREFECT_IDLE="300")
    plan = write_plan(bench.work / "plan-one.yaml", bench.inventory(hosts), concurrency=1)
    try:
        pkg = fh.build(spec)
        bench.fleet.wipe(hosts)
        d = fh.deploy(plan, pkg.release)
        announce("1 host, embedded default, first command (starts the warm server)", d)
        verify.release_on(bench.fleet, hosts, pkg.rid, pkg.manifest)
        res.add("embedded", "ferry", 1, "seconds", d.wall)
        res.add("embedded", "ferry", 1, "cpu_seconds", d.cpu)
        for rep in range(bench.sizes.reps):
            bench.fleet.wipe(hosts)
            d = fh.deploy(plan, pkg.release)
            announce(f"1 host, embedded default, command {rep + 2} (warm server)", d)
            verify.release_on(bench.fleet, hosts, pkg.rid, pkg.manifest)
            res.add("embedded", "ferry-warm", 1, "seconds", d.wall)
            res.add("embedded", "ferry-warm", 1, "cpu_seconds", d.cpu)
            res.add("embedded", "ferry-warm", 1, "flow_seconds", fh.flow_seconds(d.report["id"]))
    finally:
        what = fh.stop_warm_prefect()
        log(f"  warm Prefect server: {what}")
        res.note("embedded_server_stop", what)


# -- noop1000: the no-op at 1000 hosts, on a fleet of its own --------------------------------
def noop_big(bench: Bench) -> None:
    """Bring up a fleet of big_hosts (start-up time, sshd memory per host), deploy the tiny
    release to one host and then to all (once), then per repetition Ferry's no-op redeploy
    (wall, CPU, peak RSS), its no-op to noop_hosts of the same fleet, and raw OpenSSH's
    fan-out at 1 and at all hosts. Run with no other fleet up; the fleet is taken down at
    the end. The no-op to noop_hosts is the linear bound's base: measured here, in rotation
    with the 1000-host one, the two share one invocation's machine state and one lab
    (docs/benchmarks.md)."""
    s, res = bench.sizes, bench.results
    n = s.big_hosts
    work = bench.work / "big"
    work.mkdir(parents=True, exist_ok=True)
    avail0 = _mem_available_kib()
    try:
        fleet = Fleet.up(work / "fleet", n)
    except BadInput as e:  # the lab cannot make a fleet this size: say so, measure the rest
        msg = f"no-op at {n} hosts not measured: Fleet.up({n}) refused: {e}"
        log(msg)
        res.note("noop_big_not_measured", msg)
        return
    try:
        avail1 = _mem_available_kib()
        pss = sshd_pss_kib(fleet)
        up = fleet.up_seconds or 0.0
        res.add("lab-up", "ferry lab", n, "seconds", up)
        per = sum(pss.values()) / max(1, len(pss))
        res.add("lab-up", "ferry lab", n, "pss_kib_per_host", per)
        res.add("lab-up", "ferry lab", n, "memavail_kib_per_host", (avail0 - avail1) / n)
        log(f"fleet of {n} hosts up in {up:.1f} s; sshd PSS {per:.0f} KiB per host; "
            f"MemAvailable fell {(avail0 - avail1) / n:.0f} KiB per host")  # fmt: skip
        big = Bench(fleet, work, bench.prefect_url, s, res)
        hosts = fleet.hosts[:n]
        spec = content.make_tree(work / "src-tiny", "1.0", s.tiny_bytes, s.tiny_files)
        plan_all = write_plan(work / f"plan-noop-{n}.yaml", big.inventory(hosts), concurrency=n)
        plan_one = write_plan(work / "plan-one.yaml", big.inventory(hosts[:1]), concurrency=1)
        base = min(s.noop_hosts, n)
        plan_base = write_plan(
            work / f"plan-noop-{base}.yaml", big.inventory(hosts[:base]), concurrency=base
        )
        fh = big.home("noop-big")
        pkg = fh.build(spec)
        one = fh.deploy(plan_one, pkg.release)
        announce("1 host (fixed cost, big fleet)", one)
        fresh = fh.deploy(plan_all, pkg.release)
        announce(f"fresh tiny package to {n}", fresh)
        verify.release_on(fleet, hosts, pkg.rid, pkg.manifest)
        res.add("noop-big", "ferry", n, "one_host_seconds", one.wall)
        res.add("noop-big", "ferry", n, "one_host_cpu_seconds", one.cpu)
        res.add("noop-big", "ferry", n, "fresh_seconds", fresh.wall)
        res.add("noop-big", "ferry", n, "fresh_cpu_seconds", fresh.cpu)
        res.add("noop-big", "ferry", n, "fresh_peak_rss_mib", fresh.peak_rss_kib / 1024)
        for rep in range(s.reps):
            for tool in rotate(["ferry", "raw", "ferry-base"], rep):
                log(f"no-op {n} hosts, rep {rep + 1}/{s.reps}: {tool}")
                if tool == "raw":
                    raw_fanout(big, "fanout-big", hosts)
                    continue
                if tool == "ferry-base":
                    small = fh.deploy(plan_base, pkg.release)
                    announce(f"no-op redeploy to {base} of the {n} hosts", small)
                    verify.release_on(fleet, hosts[:base], pkg.rid, pkg.manifest)
                    res.add("noop-base", "ferry", base, "seconds", small.wall)
                    res.add("noop-base", "ferry", base, "cpu_seconds", small.cpu)
                    continue
                noop = fh.deploy(plan_all, pkg.release)
                announce(f"no-op redeploy to {n}", noop)
                verify.release_on(fleet, hosts, pkg.rid, pkg.manifest)
                res.add("noop-big", "ferry", n, "seconds", noop.wall)
                res.add("noop-big", "ferry", n, "cpu_seconds", noop.cpu)
                res.add("noop-big", "ferry", n, "cpu_ms_per_host",
                        1000 * (noop.cpu - one.cpu) / n)  # fmt: skip
                res.add("noop-big", "ferry", n, "peak_rss_mib", noop.peak_rss_kib / 1024)
                res.add("noop-big", "ferry", n, "bytes_sent", noop.report["bytes_sent"])
                res.add("noop-big", "ferry", n, "flow_seconds", fh.flow_seconds(noop.report["id"]))
                log(f"  peak RSS of ferry deploy: {noop.peak_rss_kib / 1024:.0f} MiB")
    finally:
        fleet.down()


def _mem_available_kib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1])
    return 0


def sshd_pss_kib(fleet: Fleet) -> dict[str, int]:
    """PSS of each host's sshd and its children (what `ferry lab status` reports), with one
    scan of /proc for the whole fleet instead of one per host."""
    kids: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(entry.path, "stat").read_text()
                kids.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    out = {}
    for name in fleet.hosts:
        pid = fleet.pid(name)
        if not pid:
            continue
        todo, seen = [pid], {pid}
        while todo:
            for c in kids.get(todo.pop(), []):
                if c not in seen:
                    seen.add(c)
                    todo.append(c)
        out[name] = sum(procs.pss_kib(p) or 0 for p in seen)
    return out


# -- 5: DML ------------------------------------------------------------------------------
def dml(bench: Bench) -> None:
    """benchmarks/dml_bench.py's measurements, medians over reps, data deleted after."""
    from benchmarks import dml_bench

    s, res = bench.sizes, bench.results
    work = bench.work / "dml"
    shutil.rmtree(work, ignore_errors=True)
    src = work / "src"
    try:
        size = dml_bench.make_tree(src, int(s.dml_gib * (1 << 30)))
        res.note("dml_bytes", size)
        res.note("dml_files", sum(1 for p in (src / "app").rglob("*") if p.is_file()))
        subprocess.run(["sync"], check=True)
        subprocess.run(f"find {src} -type f -print0 | xargs -0 cat > /dev/null", shell=True)
        spec = src / "release.yaml"
        for rep in range(s.reps):
            log(f"DML {size / (1 << 30):.2f} GiB, rep {rep + 1}/{s.reps}")
            t, _, _ = timed(f"find {src}/app -type f -print0 | xargs -0 sha256sum", shell=True)
            res.add("dml", "sha256sum", 0, "seconds", t)
            t, _, _ = timed(f"tar -C {src} -cf - app | zstd -T0 -3 -q -c > /dev/null", shell=True)
            res.add("dml", "tar|zstd -T0", 0, "seconds", t)
            b, total, _ = dml_bench.ferry_cli(work, spec, f"cli{rep}")
            res.add("dml", "ferry build", 0, "seconds", b)
            res.add("dml", "ferry build+checkin", 0, "seconds", total)
            res.add(
                "dml",
                "ferry API build+checkin",
                0,
                "seconds",
                dml_bench.ferry_api(work, spec, f"api{rep}"),
            )
            log(
                f"  sha256sum {res.get('dml', 'sha256sum', 0, 'seconds')[-1]:.1f} s, "
                f"tar|zstd {res.get('dml', 'tar|zstd -T0', 0, 'seconds')[-1]:.1f} s, "
                f"ferry build {b:.1f} s, build+checkin {total:.1f} s"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


def profile_cold(bench: Bench, n: int, spec1: Path, out: Path) -> None:
    """Where Ferry's cold push spends its time: the journal's timeline of one plain run, the
    CLI's start-up, then py-spy (from the peers venv) over a second run."""
    hosts = bench.fleet.hosts[:n]
    plan = write_plan(bench.work / "plan-profile.yaml", bench.inventory(hosts), concurrency=n)
    res = bench.results
    bench.fleet.wipe(hosts)
    fh = bench.home("timeline")
    pkg = fh.build(spec1)
    d = fh.deploy(plan, pkg.release)
    announce(f"cold {n} (timeline)", d)
    verify.release_on(bench.fleet, hosts, pkg.rid, pkg.manifest)
    note_timeline(res, f"timeline_cold_{n}", d.wall, fh, d.report["id"])
    start = [timed([str(FERRY_BIN), "--help"], env=fh.env)[0] for _ in range(3)]
    imp = [
        timed([str(FERRY_BIN.with_name("python")), "-c", "import prefect"], env=fh.env)[0]
        for _ in range(3)
    ]
    res.note("cli_start_seconds", median(start))
    res.note("import_prefect_seconds", median(imp))
    bench.fleet.wipe(hosts)
    fh = bench.home("profile")
    pkg = fh.build(spec1)
    rfc = fh.rfc(pkg.release)
    cmd = [
        str(PEERS_VENV / "bin" / "py-spy"), "record", "-o", str(out), "-f", "raw", "-r", "100",
        "--threads", "--", str(FERRY_BIN),
        "deploy", str(plan), "--release", pkg.release, "--rfc", rfc, "-o", "json",
    ]  # fmt: skip
    timed(cmd, env=fh.env, cwd=fh.dir)
    res.note(f"profile_cold_{n}", summarize_profile(out))
    log(f"profile written to {out}")


def summarize_profile(path: Path) -> dict[str, float]:
    """Share of py-spy's (non-idle) samples in a few buckets that matter for the owner."""
    buckets = {
        "imports (CLI and Prefect start-up)": "_find_and_load",
        "Prefect flow engine": "prefect/flow_engine.py",
        "paramiko (commands, hooks, checks)": "paramiko/",
        "OpenSSH bulk stream (feeding ssh)": "transport/openssh.py",
        "object cache (extract from the DML archive)": "ObjectCache.ensure",
        "journal / CMS (SQLAlchemy)": "sqlalchemy/",
        "DML open + verify": "dml/store.py",
    }
    total = 0
    counts = dict.fromkeys(buckets, 0)
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        total += int(n)
        for name, needle in buckets.items():
            if needle in stack:
                counts[name] += int(n)
    return {k: v / total for k, v in counts.items()} | {"samples": total}
