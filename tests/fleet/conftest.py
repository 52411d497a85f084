"""The fleet area's fixtures: the shared fleets, and a guard that leaves their hosts healthy."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from orchestrator.lab.fleet import Fleet
from tests.fleet.fixtures import fleet, small_fleet  # noqa: F401


@pytest.fixture
def host(small_fleet: Fleet) -> Iterator[str]:  # noqa: F811
    """A host of the small fleet that a test may fault; anything left in force is cleared."""
    name = "h5"
    yield name
    small_fleet.refresh()
    if small_fleet.state.hosts[name].faults or small_fleet.pid(name) is None:
        small_fleet.fault(name, "clear")
