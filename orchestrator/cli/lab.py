"""`ferry lab`: a fleet of real sshd hosts on this machine, for the demo, tests and benchmarks."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from orchestrator.cli import output as out
from orchestrator.cli.output import OutputOpt
from orchestrator.errors import NotFound

app = typer.Typer(
    help="A lab fleet of real sshd hosts on this machine (namespaces as root, else loopback).",
    no_args_is_help=True,
)

DirOpt = Annotated[
    Path, typer.Option("--dir", help="the fleet's directory (state, keys, inventory.yaml)")
]
DEFAULT_DIR = Path(".ferry/lab")


@app.command()
def up(
    n: Annotated[int, typer.Argument(help="how many hosts (h1 … hN)")],
    directory: DirOpt = DEFAULT_DIR,
    mode: Annotated[
        str, typer.Option(help="auto, netns (root) or loopback (127.0.1.x, any user)")
    ] = "auto",
    deploy_root: Annotated[str, typer.Option(help="the deploy root on every host")] = "/srv/app",
    docker: Annotated[
        bool, typer.Option("--docker", help="a Docker engine per host (own data-root, socket)")
    ] = False,
    fmt: OutputOpt = out.Format.text,
) -> None:
    """Start N hosts; write inventory.yaml, ssh_config, known_hosts and client_key in --dir."""
    out.use(fmt)
    from orchestrator.lab.fleet import Fleet

    fleet = Fleet.up(directory, n, mode=mode, deploy_root=deploy_root, progress=out.progress)
    engines: dict[str, float] = {}
    if docker:
        from orchestrator.lab import docker as lab_docker

        try:
            engines = lab_docker.start(fleet, out.progress)
        except BaseException:
            fleet.down()
            raise
    data = {
        "hosts": fleet.hosts,
        "inventory": str(fleet.inventory_path),
        "ssh_config": str(fleet.ssh_config_path),
        "dir": str(fleet.dir),
        "mode": fleet.mode,
        "up_seconds": fleet.up_seconds,
        **({"docker_ready_s": engines} if docker else {}),
    }
    note = "" if fleet.mode == "netns" else "\n(loopback mode: no namespaces; see docs/fleet.md)"
    out.result(
        data,
        "\n".join(fleet.hosts)
        + f"\ntry: ssh -F {fleet.ssh_config_path} h1 hostname"
        + f"\ninventory: {fleet.inventory_path}"
        + note,
    )


@app.command()
def down(directory: DirOpt = DEFAULT_DIR, fmt: OutputOpt = out.Format.text) -> None:
    """Stop every host and remove every namespace, link and mount the fleet made (idempotent)."""
    out.use(fmt)
    from orchestrator.lab.fleet import Fleet

    try:
        fleet = Fleet.load(directory)
    except NotFound:
        out.result(
            {"dir": str(directory.resolve()), "removed": 0},
            f"no lab fleet in {directory}: nothing to do",
        )
        return
    count = len(fleet.hosts)
    fleet.down()
    out.result({"dir": str(fleet.dir), "removed": count}, f"{count} hosts removed ({fleet.dir})")


@app.command()
def fault(
    host: Annotated[str, typer.Argument(help="host name, e.g. h3")],
    kind: Annotated[
        str,
        typer.Argument(help="down|up|kill|restart|hang|resume|disk-full|disk-ok|slow|fast|clear"),
    ],
    directory: DirOpt = DEFAULT_DIR,
    rate: Annotated[str | None, typer.Option(help="slow: tc rate, e.g. 8mbit")] = None,
    delay_ms: Annotated[
        int | None, typer.Option(help="slow: added round trip on port 2222, ms")
    ] = None,
    size_mib: Annotated[int | None, typer.Option(help="disk-full: tmpfs size, MiB")] = None,
    fmt: OutputOpt = out.Format.text,
) -> None:
    """Inject a fault on one host, or undo it (see docs/fleet.md for each kind)."""
    out.use(fmt)
    from orchestrator.lab.fleet import Fleet

    fleet = Fleet.load(directory)
    params: dict[str, Any] = {}
    if rate is not None:
        params["rate"] = rate
    if delay_ms is not None:
        params["delay_ms"] = delay_ms
    if size_mib is not None:
        params["size_mib"] = size_mib
    said = fleet.fault(host, kind, **params)
    out.result({"host": host, "fault": kind, "params": params, "result": said}, said)


@app.command()
def status(directory: DirOpt = DEFAULT_DIR, fmt: OutputOpt = out.Format.text) -> None:
    """Each host: address, sshd alive, faults in force, memory (PSS)."""
    out.use(fmt)
    from orchestrator.lab.fleet import Fleet

    report = Fleet.load(directory).status()

    def show() -> None:
        out.stdout.print(
            f"{report['dir']}  mode {report['mode']}  network {report['network'] or '127.0.1.x'}"
            f"  up in {report['up_seconds']} s",
            highlight=False,
        )
        for h in report["hosts"]:
            mem = f"{h['pss_kib'] / 1024:.1f} MiB" if h["pss_kib"] else "-"
            state = "up" if h["alive"] else "DEAD"
            faults = ",".join(h["faults"]) or "-"
            out.stdout.print(
                f"{h['name']:>5}  {h['address']}:{h['port']}  {state:4}  {mem:>9}  {faults}",
                highlight=False,
            )

    out.result(report, show)
