"""A fleet of real sshd hosts: identity, strict host keys, inventory, scale and clean teardown."""

from __future__ import annotations

import json
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import paramiko
import pytest

from orchestrator.errors import BadInput
from orchestrator.inventory import load_inventory
from orchestrator.lab.fleet import Fleet
from tests.conftest import FERRY_BIN
from tests.fleet.fixtures import leftovers, machine_snapshot

pytestmark = pytest.mark.fleet


def _on_every_host(fleet: Fleet, command: str) -> dict[str, subprocess.CompletedProcess[str]]:
    with ThreadPoolExecutor(16) as pool:
        results = pool.map(lambda h: fleet.ssh(h, command), fleet.hosts)
        return dict(zip(fleet.hosts, results, strict=True))


def test_twenty_hosts_each_answer_with_their_own_name_address_and_deploy_root(
    tmp_path: Path,
) -> None:
    before = machine_snapshot()
    fleet = Fleet.up(tmp_path / "lab", 20)
    try:
        results = _on_every_host(
            fleet,
            "hostname; hostname -I; echo $(hostname) > /srv/app/who; stat -c %i /srv/app",
        )
        assert all(r.returncode == 0 for r in results.values()), results
        names = {r.stdout.split()[0] for r in results.values()}
        addresses = {r.stdout.split()[1] for r in results.values()}
        assert names == set(fleet.hosts) and len(names) == 20
        assert addresses == {fleet.address(h) for h in fleet.hosts} and len(addresses) == 20
        for h in fleet.hosts:  # each host wrote into its own directory, seen from here
            assert (fleet.root_dir(h) / "who").read_text() == f"{h}\n"
        assert len({fleet.root_dir(h) for h in fleet.hosts}) == 20
    finally:
        fleet.down()
    assert leftovers(before, machine_snapshot(), fleet.state.id) == {}


def test_every_host_of_the_fifty_accepts_a_login_and_they_came_up_fast(fleet: Fleet) -> None:
    started = time.monotonic()
    results = _on_every_host(fleet, "hostname")
    logins = time.monotonic() - started
    print(f"\n50 hosts up in {fleet.up_seconds} s; a login on each took {logins:.1f} s")
    assert {r.stdout.strip() for r in results.values()} == set(fleet.hosts)
    assert fleet.up_seconds is not None and fleet.up_seconds < 30


def test_inventory_is_one_ferry_reads_with_canary_web_and_racks(fleet: Fleet) -> None:
    inventory = load_inventory(fleet.inventory_path)
    groups = inventory.groups()
    assert list(inventory.hosts) == fleet.hosts
    assert groups["canary"] == ["h1"]
    assert groups["web"] == fleet.hosts
    assert groups["rack-a"] == [f"h{i}" for i in range(1, 51, 2)]
    assert groups["rack-b"] == [f"h{i}" for i in range(2, 51, 2)]
    h7 = inventory.host("h7")
    assert (h7.address, h7.port, h7.deploy_root) == (fleet.address("h7"), 22, "/srv/app")
    assert inventory.ssh.identity_file == fleet.client_key_path
    assert inventory.ssh.known_hosts == fleet.known_hosts_path


def test_paramiko_connects_with_strict_host_keys(fleet: Fleet) -> None:
    client = paramiko.SSHClient()
    client.load_host_keys(str(fleet.known_hosts_path))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.connect(
        fleet.address("h3"),
        username="root",
        key_filename=str(fleet.client_key_path),
        look_for_keys=False,
        allow_agent=False,
        timeout=5,
    )
    try:
        _, stdout, _ = client.exec_command("hostname")
        assert stdout.read().decode().strip() == "h3"
    finally:
        client.close()


def test_a_host_whose_key_is_not_in_known_hosts_is_refused(fleet: Fleet, tmp_path: Path) -> None:
    # known_hosts that names h2's address with h1's key: the key h2 shows is not the one known
    h1_key = " ".join((fleet.dir / "hosts/h1/ssh_host_ed25519_key.pub").read_text().split()[:2])
    wrong = tmp_path / "known_hosts"
    wrong.write_text(f"{fleet.address('h2')},h2 {h1_key}\n")
    proc = fleet.ssh("h2", "true", options=("-o", f"UserKnownHostsFile={wrong}"))
    assert proc.returncode == 255
    assert "HOST IDENTIFICATION HAS CHANGED" in proc.stderr

    client = paramiko.SSHClient()
    client.load_host_keys(str(wrong))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    with pytest.raises(paramiko.BadHostKeyException):
        client.connect(
            fleet.address("h2"),
            username="root",
            key_filename=str(fleet.client_key_path),
            look_for_keys=False,
            allow_agent=False,
            timeout=5,
        )
    client.close()

    unknown = tmp_path / "empty_known_hosts"
    unknown.write_text("")
    proc = fleet.ssh("h2", "true", options=("-o", f"UserKnownHostsFile={unknown}"))
    assert proc.returncode == 255 and "Host key verification failed" in proc.stderr


def test_plain_openssh_works_with_the_generated_ssh_config(fleet: Fleet) -> None:
    proc = subprocess.run(
        ["ssh", "-F", str(fleet.ssh_config_path), "h9", "hostname; echo $HOME; ls -A ~"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["h9", "/root"]  # a clean home: no start-up files


def test_up_on_a_directory_with_a_running_fleet_says_so(fleet: Fleet) -> None:
    with pytest.raises(BadInput, match="already running"):
        Fleet.up(fleet.dir, 2)
    assert fleet.live_hosts() == fleet.hosts


def test_down_after_a_crash_during_up_removes_everything(tmp_path: Path, run_ferry) -> None:
    before = machine_snapshot()
    lab = tmp_path / "lab"
    proc = subprocess.Popen(
        [str(FERRY_BIN), "lab", "up", "40", "--dir", str(lab)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not _some_pid_recorded(lab / "fleet.json"):
        time.sleep(0.01)  # until the network exists and sshd PIDs are being recorded
    proc.kill()
    proc.wait()
    crashed = Fleet.load(lab)
    assert run_ferry("lab", "down", "--dir", str(lab)).returncode == 0
    again = run_ferry("lab", "down", "--dir", str(lab))
    assert again.returncode == 0 and "nothing to do" in again.stdout
    assert leftovers(before, machine_snapshot(), crashed.state.id) == {}


def _some_pid_recorded(path: Path) -> bool:
    try:
        hosts = json.loads(path.read_text())["hosts"].values()
    except (OSError, ValueError):
        return False
    return any(h["pid"] for h in hosts)
