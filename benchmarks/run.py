"""Run Ferry's benchmarks against Ansible, pyinfra and raw OpenSSH; write results.md + PNG.

    .venv/bin/python -m benchmarks.run                 # everything (≈ 60–75 min on 2 cores)
    .venv/bin/python -m benchmarks.run --quick         # small sizes, 1 repetition
    .venv/bin/python -m benchmarks.run --only push     # re-measure some scenarios only

Scenarios (--only, comma-separated): push (cold push, incremental release, backout),
noop (no-op redeploy at 200 hosts with raw OpenSSH's fan-out, orchestration overhead,
fixed cost, `ferry --help`), workers (issue 14: cold push to 50 and no-op to 200 hosts on
Prefect workers, one worker vs two, against the local default; CMS on a throwaway
PostgreSQL), noop1000 (a 1000-host fleet of its own: start-up, memory,
no-op redeploy, fan-out), embedded (deploys on the embedded default's warm Prefect
server), dml (build + check-in of 1 GiB), profile (py-spy over one cold push).
A full run writes benchmarks/results.json, results.md and results.png; --only re-measures
its scenarios and keeps the other cells of results.json; --quick writes under
benchmarks/work/quick/ and leaves the committed results alone.
"""

from __future__ import annotations

import argparse
import shutil
import time

from benchmarks import peers, report, scenarios, workers
from benchmarks.common import BENCH, WORK, log
from benchmarks.ferry_side import PrefectServer
from orchestrator.lab.fleet import Fleet

ALL = ["push", "noop", "workers", "embedded", "dml", "noop1000", "images"]
# push at one size only (keeps the other size's cells): push20, push50 (quick: push5, push10)
ALIASES = {
    "cold": "push", "incremental": "push", "backout": "push", "overhead": "noop",
    "fixed": "noop", "fanout": "noop", "help": "noop", "lab": "noop1000",
}  # fmt: skip
CELLS = {  # which results.json scenarios each --only name re-measures
    "push": {"cold", "incremental", "backout"},
    "noop": {"noop", "tiny", "overhead", "fixed", "fixed-cold", "fanout", "help"},
    "noop1000": {"noop-big", "noop-base", "fanout-big", "lab-up"},
    "workers": set(workers.SCENARIOS),
    "embedded": {"embedded"},
    "dml": {"dml"},
    "profile": set(),
    "images": {"image", "image-cold", "image-layer"},
}


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.run", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--quick", action="store_true", help="small sizes, 1 repetition")
    ap.add_argument("--only", default="", help="comma-separated: " + ", ".join([*ALL, "profile"]))
    ap.add_argument("--reps", type=int, default=None, help="repetitions per cell (default 3)")
    ap.add_argument(
        "--big-peer-reps",
        type=int,
        default=None,
        help="repetitions of the peers' cold push at the backout size (default: --reps)",
    )
    ap.add_argument(
        "--peers",
        default="",
        help="the no-op's peers, comma-separated (default: pyinfra,ansible,raw)",
    )
    ap.add_argument(
        "--big-hosts",
        type=int,
        default=None,
        help="fleet size of noop1000 (default 1000; --quick: 50)",
    )
    return ap.parse_args()


def main() -> None:
    args = parse()
    chosen = [ALIASES.get(x, x) for x in args.only.split(",") if x] or ALL
    sizes_only = {int(x[4:]) for x in chosen if x.startswith("push") and x[4:].isdigit()}
    chosen = ["push" if x.startswith("push") else x for x in chosen]
    unknown = set(chosen) - set(CELLS)
    if unknown:
        raise SystemExit(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    sizes = scenarios.Sizes.quick() if args.quick else scenarios.Sizes()
    if args.reps:
        sizes.reps = args.reps
    if args.big_peer_reps is not None:
        sizes.big_peer_reps = args.big_peer_reps
    if args.big_hosts:
        sizes.big_hosts = args.big_hosts
    if args.peers:
        sizes.peers = tuple(x for x in args.peers.split(",") if x)
    if sizes_only:
        sizes.cold_hosts = tuple(n for n in sizes.cold_hosts if n in sizes_only)
    out_dir = WORK / "quick" if args.quick else BENCH
    out_dir.mkdir(parents=True, exist_ok=True)
    res_path = out_dir / "results.json"
    results = scenarios.Results.load(res_path) if args.only else scenarios.Results(res_path)
    if args.only:
        drop = set().union(*(CELLS[c] for c in chosen))
        push = CELLS["push"]
        for key in [k for k, v in results.cells.items() if v.get("scenario") in drop]:
            # pushN keeps the push cells of the other size; every other scenario is re-measured
            cell = results.cells[key]
            if not sizes_only or cell["scenario"] not in push or cell["hosts"] in sizes_only:
                del results.cells[key]
    results.run = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    # --only workers keeps the run-wide notes of the cells it leaves (its own go in "workers")
    scoped = set(chosen) == {"workers"}
    if not scoped:
        results.note("started", results.run)
        results.note("reps", sizes.reps)
        results.note("quick", args.quick)

    peers.ensure_venv()
    if not scoped:
        results.note("machine", report.machine_facts())
    else:
        results.note("workers_machine", report.machine_facts())
    work = WORK / "run"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    need = 1
    if "push" in chosen or "profile" in chosen:
        need = max(need, *sizes.cold_hosts)
    if "noop" in chosen or "workers" in chosen:
        need = max(need, sizes.noop_hosts)
    fleet: Fleet | None = None
    server = PrefectServer(work / "prefect")
    started = time.monotonic()
    if "noop1000" in chosen:
        results.cells.get("_notes", {}).pop("noop_big_not_measured", None)
    try:
        # the embedded scenario runs without it (its own warm server), dml needs no Prefect
        prefect = {"push", "noop", "workers", "noop1000", "profile", "images"}
        url = server.start() if set(chosen) & prefect else ""
        log(f"Prefect server at {url}" if url else "no Prefect server needed")
        if set(chosen) & {"push", "noop", "workers", "embedded", "profile"}:
            fleet = Fleet.up(work / "fleet", need)
            log(f"fleet of {need} hosts up in {fleet.up_seconds or 0:.1f} s")
        bench = scenarios.Bench(fleet, work, url, sizes, results)  # type: ignore[arg-type]
        if "push" in chosen or "profile" in chosen:
            spec1, spec2, changed = scenarios.releases(bench)
            results.note("incremental_files_changed", changed)
        if "push" in chosen:
            for n in sizes.cold_hosts:
                scenarios.push_scenarios(bench, n, spec1, spec2)
        if "noop" in chosen:
            scenarios.noop_and_overhead(bench)
        if "workers" in chosen:
            from tests.pg import start_server

            pg = start_server()
            try:
                workers.workers(bench, pg)
            finally:
                pg.stop()
        if "embedded" in chosen:
            scenarios.embedded(bench)
        if "dml" in chosen:
            scenarios.dml(bench)
        if "profile" in chosen:
            scenarios.profile_cold(bench, sizes.cold_hosts[0], spec1, out_dir / "profile-cold.txt")
        if "images" in chosen:  # a fleet of its own, each host its own Docker engine
            from benchmarks import images

            images.images(bench)
        if "noop1000" in chosen:  # last, on a fleet of its own, with no other fleet of ours up
            if fleet is not None:
                fleet.down()
                fleet = None
            scenarios.noop_big(bench)
    finally:
        if fleet is not None:
            fleet.down()
        server.stop()
        from benchmarks.ferry_side import WARM_DIR
        from orchestrator import zygote

        stopped = zygote.stop_all(WARM_DIR)  # the warm processes the run's commands started
        log(f"warm processes stopped: {stopped}")
        if not scoped:
            results.note("run_minutes", round((time.monotonic() - started) / 60, 1))
    report.write(results, out_dir)
    shutil.rmtree(work, ignore_errors=True)
    log(f"wrote {out_dir / 'results.md'} and {out_dir / 'results.png'}")


if __name__ == "__main__":
    main()
