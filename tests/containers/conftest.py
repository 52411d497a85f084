"""A fleet of 4 real sshd hosts, each with its own Docker engine (module-scoped: engines
take seconds to start and ~120 MiB each)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.lab import docker as lab_docker
from orchestrator.lab.fleet import Fleet
from tests.prefect_server import prefect_api  # noqa: F401

DOCKER_HOSTS = 4


@pytest.fixture(scope="module")
def docker_fleet() -> Iterator[Fleet]:
    if not lab_docker.available():
        pytest.fail("these tests need dockerd and the docker CLI (.ci/bootstrap installs them)")
    directory = Path(tempfile.mkdtemp(prefix="ferry-docker-"))
    fleet = Fleet.up(directory, DOCKER_HOSTS)
    try:
        lab_docker.start(fleet)
        yield fleet
    finally:
        fleet.down()
        shutil.rmtree(directory, ignore_errors=True)


def reset_engines(fleet: Fleet) -> None:
    """Every host: no containers, no images, an empty deploy root (pointing at its engine)."""
    for host in fleet.hosts:
        ids = lab_docker.docker(fleet, host, "ps", "-aq").split()
        if ids:
            lab_docker.docker(fleet, host, "rm", "-f", *ids)
        images = lab_docker.docker(fleet, host, "images", "-aq", "--no-trunc").split()
        if images:
            lab_docker.docker(fleet, host, "rmi", "-f", *sorted(set(images)))
    fleet.wipe()
    lab_docker.point_hosts(fleet)


@pytest.fixture
def bare_docker(docker_fleet):
    """The docker fleet with empty engines and deploy roots (no Prefect, no Ferry home)."""
    reset_engines(docker_fleet)
    yield docker_fleet
    reset_engines(docker_fleet)


@pytest.fixture
def clean_docker(bare_docker, prefect_api, ferry_home):  # noqa: F811
    return bare_docker
