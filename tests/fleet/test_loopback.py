"""The fallback without namespaces: sshd on 127.0.1.N, one port, per-host deploy roots."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.errors import BadInput
from orchestrator.inventory import load_inventory
from orchestrator.lab.fleet import Fleet
from tests.fleet.fixtures import leftovers, machine_snapshot

pytestmark = pytest.mark.fleet


def test_loopback_fleet_gives_each_host_an_address_and_root_and_strict_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FERRY_LAB_MODE", "loopback")
    before = machine_snapshot()
    fleet = Fleet.up(tmp_path / "lab", 3)
    try:
        assert fleet.mode == "loopback"
        assert [fleet.address(h) for h in fleet.hosts] == ["127.0.1.1", "127.0.1.2", "127.0.1.3"]
        inventory = load_inventory(fleet.inventory_path)
        for h in fleet.hosts:
            root = inventory.host(h).deploy_root
            assert root == str(fleet.root_dir(h)) == fleet.deploy_root(h)
            proc = fleet.ssh(h, f"echo $SSH_CONNECTION > {root}/who")
            assert proc.returncode == 0, proc.stderr
            assert fleet.address(h) in (fleet.root_dir(h) / "who").read_text()
        with fleet.faulted("h2", "kill"):
            assert fleet.ssh("h2", "true").returncode == 255
        assert fleet.ssh("h2", "true").returncode == 0
        with pytest.raises(BadInput, match="loopback"):
            fleet.fault("h1", "disk_full")
    finally:
        fleet.down()
    assert leftovers(before, machine_snapshot(), fleet.state.id) == {}
