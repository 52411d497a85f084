"""The lab's ways in: a bastion that is the only route to its hosts, the non-root deploy user
with passwordless sudo, and a passphrase-protected key in an ssh-agent of our own."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from orchestrator.inventory import load_inventory
from orchestrator.lab import layout
from orchestrator.lab.build import ssh_banner
from orchestrator.lab.fleet import Fleet
from orchestrator.lab.sshagent import SSHAgent
from tests.fleet.fixtures import leftovers, machine_snapshot

pytestmark = pytest.mark.fleet


def _ssh(
    fleet: Fleet, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["ssh", "-F", str(fleet.ssh_config_path), *args],
        capture_output=True, text=True, timeout=30, env=env,
    )  # fmt: skip


def test_a_bastion_fleet_is_reached_only_through_its_bastion_and_leaves_nothing(tmp_path: Path):
    before = machine_snapshot()
    fleet = Fleet.up(tmp_path / "lab", 3, bastion=True)
    try:
        assert fleet.bastion and fleet.proxy_jump == f"root@{fleet.bastion}:22"
        for host in fleet.hosts:
            assert not ssh_banner(fleet.address(host), 22, timeout=0.5), host  # not from here
            assert fleet.ssh(host, "hostname").stdout.strip() == host  # through the bastion
        assert ssh_banner(fleet.bastion, 22, timeout=2.0)
        refused = _ssh(fleet, layout.BASTION, "hostname")  # it forwards, it runs nothing
        assert refused.returncode != 0 and "forwarding only" in refused.stderr
        assert load_inventory(fleet.inventory_path).ssh.proxy_jump == fleet.proxy_jump
        assert fleet.status()["bastion"] == fleet.bastion
        # a host behind the bastion restarts (its readiness is read in its own namespace)
        fleet.fault("h2", "kill")
        fleet.fault("h2", "restart")
        assert fleet.ssh("h2", "hostname").stdout.strip() == "h2"
    finally:
        fleet.down()
    assert leftovers(before, machine_snapshot(), fleet.state.id) == {}


def test_the_deploy_user_logs_in_as_itself_and_sudo_n_makes_it_root(small_fleet: Fleet):
    user = small_fleet.add_deploy_user()
    assert small_fleet.add_deploy_user() == user == small_fleet.deploy_user  # idempotent
    res = _ssh(small_fleet, "-l", user, "h3", "id -un; sudo -n id -u; hostname")
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == [user, "0", "h3"]
    assert res.stderr == ""  # sudo resolves the host's own name: no warning on every run


def test_a_protected_key_works_only_through_an_ssh_agent_that_ends_by_pid(small_fleet: Fleet):
    key, passphrase = small_fleet.protected_key()
    assert small_fleet.protected_key() == (key, passphrase)  # made once
    address = small_fleet.address("h4")
    argv = ["ssh", "-F", "/dev/null", "-i", str(key), "-o", "IdentitiesOnly=yes",
            "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
            "-o", f"UserKnownHostsFile={small_fleet.known_hosts_path}",
            "-l", "root", address, "hostname"]  # fmt: skip
    alone = subprocess.run([*argv[:1], "-o", "IdentityAgent=none", *argv[1:]],
                           capture_output=True, text=True, timeout=30)  # fmt: skip
    assert alone.returncode == 255 and "Permission denied" in alone.stderr
    with SSHAgent() as agent:
        agent.add(key, passphrase)
        assert len(agent.public_keys()) == 1
        env = {"PATH": "/usr/bin:/bin", **agent.env}
        held = subprocess.run(argv, capture_output=True, text=True, timeout=30, env=env)
        assert held.returncode == 0 and held.stdout.strip() == "h4", held.stderr
        pid, directory = agent.pid, agent.dir
    assert not Path(f"/proc/{pid}").exists() and not directory.exists()
