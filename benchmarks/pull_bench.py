"""Pull deployment benchmarks (issue 12). NOT run by the test suite.

    .venv/bin/python -m benchmarks.pull_bench throughput --hosts 50 --mib 100
    .venv/bin/python -m benchmarks.pull_bench idle --agents 200 --polls 10000
    .venv/bin/python -m benchmarks.pull_bench answer-cost --polls 1000 --wait 5

throughput: one release of --mib MiB to --hosts fresh lab hosts, three ways, on the same
  fleet: Ferry push (`method: push`), Ferry pull (`method: pull`, agents installed by
  `ferry agent install`, the server `ferry dml serve` on the fleet's gateway), and raw HTTP:
  every host downloading the package's files from the same server at once (the ceiling pull
  is held to: pull ≥ 0.8× its throughput).
idle: --agents real agents idling on a fleet, plus --polls simulated long-polls from one
  asyncio load generator (hosts `sim-N`, each with its own token, re-polling on each "no
  change" as an agent does); the server's CPU and memory while they wait, the time from a
  wave's desired state to the last simulated agent's answer (when it would begin its
  download), and how many got it.
answer-cost: --polls simulated long-polls re-polling every ~--wait s, no fleet: the server's
  CPU per long-poll answered.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from benchmarks.common import FERRY_BIN, log
from benchmarks.content import make_tree
from benchmarks.ferry_side import FerryHome, PrefectServer, write_plan
from orchestrator.lab.fleet import Fleet


def _free_port(addr: str) -> int:
    with socket.socket() as s:
        s.bind((addr, 0))
        return int(s.getsockname()[1])


class DMLServer:
    def __init__(self, home: FerryHome, listen: str) -> None:
        self.home, self.listen, self.proc = home, listen, None

    def start(self) -> None:
        self.log = open(self.home.dir / "dmlserver.out", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [str(FERRY_BIN), "dml", "serve", "--listen", self.listen],
            # cold: the server is its own process, so usage() measures the server itself
            env={**self.home.env, "FERRY_WARM": "0"}, cwd=self.home.dir, stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        addr, port = self.listen.split(":")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                socket.create_connection((addr, int(port)), timeout=1).close()
                return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError("ferry dml serve did not listen within 60 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(30)

    def usage(self) -> dict[str, float]:
        """CPU seconds and RSS of the server process (from /proc)."""
        assert self.proc is not None
        stat = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        tick = os.sysconf("SC_CLK_TCK")
        rss = int(Path(f"/proc/{self.proc.pid}/statm").read_text().split()[1])
        return {
            "cpu_s": (int(stat[11]) + int(stat[12])) / tick,
            "rss_mib": rss * os.sysconf("SC_PAGE_SIZE") / 2**20,
        }


def pull_plan(path: Path, inventory: Path, server: str, hosts: int) -> Path:
    doc = {
        "environment": "dev", "inventory": str(inventory), "targets": "all",
        "strategy": "big-bang", "method": "pull", "concurrency": hosts,
        "pull": {"server": server, "poll": "30s", "heartbeat": "10s"},
        "hooks": {"activate": "true"},
        "milestone": {"max_failed": 0, "deadline": "900s",
                      "checks": [{"command": "test -f {{ release_path }}/app/VERSION"}]},
        "timeouts": {"step": "900s", "connect": "30s"},
    }  # fmt: skip
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def throughput(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="ferry-pullbench-"))
    fleet = Fleet.up(work / "lab", args.hosts)
    prefect = PrefectServer(work / "prefect")
    out: dict[str, Any] = {"hosts": args.hosts, "mib": args.mib}
    try:
        url = prefect.start()
        home = FerryHome(work / "home", url)
        pkg = home.build(make_tree(work / "src", "1.0", args.mib * 2**20, 200))
        total = pkg.size * args.hosts
        # push
        plan = write_plan(work / "push.yaml", fleet.inventory_path, concurrency=args.hosts)
        d = home.deploy(plan, pkg.release)
        out["push_s"] = d.wall
        fleet.wipe()
        # pull
        gateway = fleet.status()["gateway"]
        server = DMLServer(home, f"{gateway}:{_free_port(gateway)}")
        server.start()
        try:
            plan = pull_plan(work / "pull.yaml", fleet.inventory_path,
                             f"https://{server.listen}", args.hosts)  # fmt: skip
            home.cli("agent", "install", "--plan", str(plan))
            d = home.deploy(plan, pkg.release)
            out["pull_s"] = d.wall
            out["pull_server"] = server.usage()
            # raw HTTP: every host fetches every file of the package at once (no checks)
            ca = home.home / "pki" / "ca.pem"
            shas = sorted(set(pkg.manifest.values()))
            script = (
                "import ssl,urllib.request,sys;c=ssl.create_default_context(cafile=sys.argv[1])\n"
                "t=open(sys.argv[3]).read().strip()\n"
                "for s in sys.argv[4:]:\n"
                "  q=urllib.request.Request(sys.argv[2]+'/v1/objects/'+s)\n"
                "  q.add_header('Authorization','Bearer '+t)\n"
                "  r=urllib.request.urlopen(q,context=c)\n"
                "  while r.read(1<<20): pass\n"
            )
            for h in fleet.hosts:
                (fleet.root_dir(h) / "ca.pem").write_bytes(ca.read_bytes())
                (fleet.root_dir(h) / "get.py").write_text(script)
            t0 = time.perf_counter()
            threads = [
                threading.Thread(target=fleet.ssh, args=(h, " ".join([
                    "python3", f"{fleet.deploy_root(h)}/get.py", f"{fleet.deploy_root(h)}/ca.pem",
                    f"https://{server.listen}", f"{fleet.deploy_root(h)}/.ferry/pull/token",
                    *shas]),), kwargs={"timeout": 1800})
                for h in fleet.hosts
            ]  # fmt: skip
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            out["raw_http_s"] = time.perf_counter() - t0
        finally:
            server.stop()
        out["pull_mib_s"] = total / 2**20 / out["pull_s"]
        out["raw_http_mib_s"] = total / 2**20 / out["raw_http_s"]
        out["pull_vs_raw"] = out["pull_mib_s"] / out["raw_http_mib_s"]
        out["target_met"] = out["pull_vs_raw"] >= 0.8
    finally:
        prefect.stop()
        fleet.down()
    return out


class _Answered(Exception):
    """The server answered, but not 200."""


async def _long_polls(url: str, tokens: dict[str, str], ca: Path, ready: asyncio.Event,
                      answered: dict[str, float], counts: dict[str, int],
                      wait: float) -> None:  # fmt: skip
    """One long-poll per simulated host, as an agent polls: HTTP/1.1 by hand over one
    kept-alive TLS connection, its heartbeat in X-Ferry-Beat, re-polling on each "no
    change" until its state changes; a connection lost or refused is retried after the
    agent's backoff (1 s doubling to 30 s, jittered), and counted."""
    addr, port = url.removeprefix("https://").split(":")
    ctx = ssl.create_default_context(cafile=str(ca))
    beat = '{"current":null,"pending":null,"applying":null,"backed_out":0,"agent":"sim"}'

    async def session(host: str, token: str) -> bool:
        """One connection's polls: True once the host's state changed."""
        reader, writer = await asyncio.open_connection(addr, int(port), ssl=ctx)
        try:
            while True:
                writer.write(
                    f"GET /v1/hosts/{host}/desired?after=0&wait={wait:.0f} HTTP/1.1\r\n"
                    f"Host: {addr}\r\nAuthorization: Bearer {token}\r\n"
                    f"X-Ferry-Beat: {beat}\r\n\r\n".encode()
                )
                await writer.drain()
                status = await asyncio.wait_for(reader.readline(), wait + 30)
                length = 0
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                body = json.loads(await reader.readexactly(length)) if length else {}
                if not status.startswith(b"HTTP/1.1 200"):
                    counts["errors"] += 1  # counted here, retried below, not a reconnect
                    raise _Answered(status.decode(errors="replace").strip())
                if body.get("changed"):
                    answered[host] = time.monotonic()
                    return True
                counts["no_change"] += 1  # answered before the poll's length: poll again
        finally:
            writer.close()

    async def one(host: str, token: str) -> None:
        backoff = 1.0
        while True:
            try:
                if await session(host, token):
                    return
            except _Answered:
                pass
            except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError):
                counts["reconnects"] += 1
            await asyncio.sleep(backoff * random.uniform(0.5, 1.5))
            backoff = min(backoff * 2, 30.0)

    tasks = [asyncio.create_task(one(h, t)) for h, t in tokens.items()]
    ready.set()
    await asyncio.gather(*tasks, return_exceptions=True)


def idle(args: argparse.Namespace) -> dict[str, Any]:
    from orchestrator import pullstate
    from orchestrator.cms.models import utcnow

    work = Path(tempfile.mkdtemp(prefix="ferry-pullidle-"))
    fleet = Fleet.up(work / "lab", args.agents)
    out: dict[str, Any] = {"agents": args.agents, "polls": args.polls}
    try:
        home = FerryHome(work / "home", None)
        gateway = fleet.status()["gateway"]
        server = DMLServer(home, f"{gateway}:{_free_port(gateway)}")
        server.start()
        try:
            plan = pull_plan(work / "pull.yaml", fleet.inventory_path,
                             f"https://{server.listen}", args.agents)  # fmt: skip
            home.cli("agent", "install", "--plan", str(plan))
            url = f"sqlite:///{home.home / 'cms.db'}"
            tokens = pullstate.issue_tokens(url, [f"sim-{i}" for i in range(args.polls)])
            answered: dict[str, float] = {}
            counts = dict.fromkeys(("no_change", "errors", "reconnects"), 0)
            ready = asyncio.Event()

            def load() -> None:
                asyncio.run(_long_polls(f"https://{server.listen}", tokens,
                                        home.home / "pki" / "ca.pem", ready, answered,
                                        counts, args.wait))  # fmt: skip

            gen = threading.Thread(target=load, daemon=True)
            gen.start()
            time.sleep(args.settle)
            before = server.usage()
            time.sleep(args.idle)
            after = server.usage()
            out["idle_cpu_pct"] = 100 * (after["cpu_s"] - before["cpu_s"]) / args.idle
            out["idle_rss_mib"] = after["rss_mib"]
            real = [f"h{i}" for i in range(1, args.agents + 1)]
            t0, wall0 = time.monotonic(), utcnow()
            pullstate.set_desired(url, "dev", [
                {"host": h, "purpose": "deploy", "release": None, "release_id": None, "spec": {}}
                for h in [*real, *tokens]
            ])  # fmt: skip
            gen.join(timeout=600)
            # the real agents answer their new state with a report ("done": nothing to fetch)
            firsts: dict[str, float] = {}
            deadline = time.monotonic() + 120
            while len(firsts) < len(real) and time.monotonic() < deadline:
                for r in pullstate.reports(url, real):
                    if r.at >= wall0:
                        firsts.setdefault(r.host, (r.at - wall0).total_seconds())
                time.sleep(1)
            out["real_agents_reported"] = len(firsts)
            out["wave_start_to_last_real_agent_s"] = max(firsts.values(), default=None)
            took = sorted(t - t0 for t in answered.values())
            out["wave_start_to_last_answer_s"] = took[-1] if took else None
            out["wave_start_to_median_answer_s"] = took[len(took) // 2] if took else None
            out["answered"] = len(answered)
            out.update(counts)  # reconnects: connections lost or refused, retried as agents do
        finally:
            server.stop()
    finally:
        fleet.down()
    return out


def _load_process(
    url: str, tokens: dict[str, str], ca: Path, wait: float, seconds: float, marks: Any
) -> None:
    """The load generator in a process of its own: its counts at each mark (1, 2) on `marks`."""
    counts = dict.fromkeys(("no_change", "errors", "reconnects"), 0)

    async def run() -> None:
        load = asyncio.create_task(
            _long_polls(url, tokens, ca, asyncio.Event(), {}, counts, wait)
        )  # fmt: skip
        for mark in seconds:
            await asyncio.sleep(mark)
            marks.put(dict(counts))
        load.cancel()

    asyncio.run(run())


def answer_cost(args: argparse.Namespace) -> dict[str, Any]:
    """--polls simulated long-polls re-polling every ~--wait s against `ferry dml serve` on
    127.0.0.1 (no fleet), from a load generator in its own process: the server's CPU per
    long-poll answered."""
    import multiprocessing

    from orchestrator import pullstate

    work = Path(tempfile.mkdtemp(prefix="ferry-pollcost-"))
    home = FerryHome(work / "home", None)
    server = DMLServer(home, f"127.0.0.1:{_free_port('127.0.0.1')}")
    server.start()
    try:
        url = f"sqlite:///{home.home / 'cms.db'}"
        tokens = pullstate.issue_tokens(url, [f"sim-{i}" for i in range(args.polls)])
        ctx = multiprocessing.get_context("fork")
        marks = ctx.Queue()
        load = ctx.Process(target=_load_process, args=(
            f"https://{server.listen}", tokens, home.home / "pki" / "ca.pem", args.wait,
            (args.settle, args.idle), marks))  # fmt: skip
        load.start()
        first = marks.get(timeout=args.settle + 60)
        before = server.usage()
        second = marks.get(timeout=args.idle + 60)
        after = server.usage()
        load.join(timeout=30)
    finally:
        server.stop()
    cpu, answers = after["cpu_s"] - before["cpu_s"], second["no_change"] - first["no_change"]
    return {"polls": args.polls, "wait": args.wait, "answers": answers,
            "server_cpu_pct": 100 * cpu / args.idle, "rss_mib": after["rss_mib"],
            "ms_cpu_per_answer": 1000 * cpu / max(1, answers), "errors": second["errors"],
            "reconnects": second["reconnects"]}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(prog="benchmarks.pull_bench")
    sub = p.add_subparsers(dest="what", required=True)
    t = sub.add_parser("throughput")
    t.add_argument("--hosts", type=int, default=50)
    t.add_argument("--mib", type=int, default=100)
    i = sub.add_parser("idle")
    i.add_argument("--agents", type=int, default=200)
    i.add_argument("--polls", type=int, default=10000)
    i.add_argument("--settle", type=float, default=60.0)
    i.add_argument("--idle", type=float, default=60.0)
    i.add_argument("--wait", type=float, default=30.0, help="each long-poll's length (s)")
    c = sub.add_parser("answer-cost")
    c.add_argument("--polls", type=int, default=1000)
    c.add_argument("--wait", type=float, default=5.0)
    c.add_argument("--settle", type=float, default=20.0)
    c.add_argument("--idle", type=float, default=20.0)
    args = p.parse_args()
    run = {"throughput": throughput, "idle": idle, "answer-cost": answer_cost}[args.what]
    result = run(args)
    log(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
