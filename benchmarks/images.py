"""Issue 13's benchmark: an image release of ~100 MB to 10 hosts, Ferry vs `docker save |
ssh host docker load` to every host in parallel, in the same run, on the same engines.

The scenario brings up a fleet of its own (`image_hosts`, each host its own dockerd, as
`ferry lab up N --docker`). Ferry: `ferry deploy` of web@1 (a ~100 MB base layer and a
small app layer) cold, then web@2 (only the app layer changed), timed end to end (build
not included). The peer: on the same hosts, after their engines were emptied, one
`docker save IMAGE` from the first host's engine (the "build machine") piped into `ssh
host docker load` per host, all in parallel, then `docker run` on each; and the same for
web@2 (docker save sends every layer again: no registry means no layer sharing).
"""

from __future__ import annotations

import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

from benchmarks.common import MB, log
from benchmarks.ferry_side import announce
from orchestrator.lab import docker as lab_docker
from orchestrator.lab.fleet import Fleet

IMAGE_HOSTS = 10
IMAGE_BYTES = 100 * MB


def _spec(work: Path, version: str, padding: int) -> Path:
    src = work / f"web-{version}"
    lab_docker.test_image(src / "web.tar", version, padding=padding)
    spec = {
        "name": "web",
        "version": version,
        "units": {"web": {"image": "docker-archive:web.tar"}},
    }
    (src / "release.yaml").write_text(yaml.safe_dump(spec))
    return src / "release.yaml"


def _plan(path: Path, inventory: Path, hosts: int) -> Path:
    doc: dict[str, Any] = {
        "environment": "dev",
        "inventory": str(inventory),
        "targets": "all",
        "strategy": "big-bang",
        "concurrency": hosts,
        "containers": {"web": {"health": "wget -qO- http://127.0.0.1:8081/ok"}},
        "milestone": {"max_failed": 0, "deadline": "900s"},
        "timeouts": {"step": "900s", "connect": "30s"},
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _save_load(fleet: Fleet, source: str, image: str, host: str) -> None:
    """`docker save IMAGE | ssh host docker load`, then run it as the plan would."""
    sock = lab_docker.socket(fleet, host)
    save = subprocess.Popen(
        ["docker", "-H", lab_docker.socket(fleet, source), "save", image], stdout=subprocess.PIPE
    )
    remote = f"DOCKER_HOST={sock} docker load -q && DOCKER_HOST={sock} docker rm -f peer-web"
    remote += f" >/dev/null 2>&1; DOCKER_HOST={sock} docker run -d --name peer-web"
    remote += f" --network host {image} >/dev/null"
    load = subprocess.run(
        ["ssh", "-F", str(fleet.ssh_config_path), host, remote],
        stdin=save.stdout,
        capture_output=True,
        check=False,
    )
    assert save.stdout is not None
    save.stdout.close()
    if save.wait() != 0 or load.returncode != 0:
        raise RuntimeError(f"docker save | ssh {host} docker load: {load.stderr[-500:]!r}")


def peer(fleet: Fleet, source: str, image: str, targets: list[str]) -> float:
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=len(targets)) as pool:
        list(pool.map(lambda h: _save_load(fleet, source, image, h), targets))
    return time.monotonic() - started


def images(bench: Any) -> None:
    """Ferry's image release (cold, then one changed layer) vs docker save | ssh load."""
    from dml.image import images_of
    from dml.store import DML

    res, n = bench.results, IMAGE_HOSTS
    work = bench.work / "images"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    fleet = Fleet.up(work / "fleet", n)
    try:
        ready = lab_docker.start(fleet, log)
        res.add("image", "lab", n, "engines_ready_seconds", max(ready.values()))
        res.add("image", "lab", n, "engine_pss_kib", sum(lab_docker.memory_kib(fleet).values()))
        fh = bench.home("images")
        inventory = fleet.write_inventory(work / "inventory.yaml")
        plan = _plan(work / "plan.yaml", inventory, n)
        ids = {}
        for version in ("1", "2"):
            fh.build(_spec(work, version, IMAGE_BYTES))
            ids[version] = images_of(DML(fh.home / "dml").open(f"web@{version}").content)[
                "web"
            ].image_id
        d1 = fh.deploy(plan, "web@1")
        announce(f"image cold {n}", d1)
        res.add("image-cold", "ferry", n, "seconds", d1.wall)
        res.add("image-cold", "ferry", n, "image_bytes_sent", d1.report["image_bytes_sent"])
        d2 = fh.deploy(plan, "web@2")
        announce(f"image one-layer {n}", d2)
        res.add("image-layer", "ferry", n, "seconds", d2.wall)
        res.add("image-layer", "ferry", n, "image_bytes_sent", d2.report["image_bytes_sent"])
        source = fleet.hosts[0]  # its engine holds both images: the peer's build machine
        for version, scenario in (("1", "image-cold"), ("2", "image-layer")):
            targets = fleet.hosts[1:]
            for host in targets:
                lab_docker.docker(fleet, host, "rm", "-f", "ferry-web", "peer-web", check=False)
                if version == "1":
                    _empty_engines_host(fleet, host)
            secs = peer(fleet, source, ids[version], targets)
            log(f"  docker save | ssh docker load, {len(targets)} hosts: {secs:.1f} s")
            res.add(scenario, "docker-save-ssh", len(targets), "seconds", secs)
    finally:
        fleet.down()
        shutil.rmtree(work, ignore_errors=True)


def _empty_engines_host(fleet: Fleet, host: str) -> None:
    images = sorted(set(lab_docker.docker(fleet, host, "images", "-aq", "--no-trunc").split()))
    if images:
        lab_docker.docker(fleet, host, "rmi", "-f", *images)
