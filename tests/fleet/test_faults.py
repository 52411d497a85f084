"""Each fault does what it says on a real host, and its undo brings the host back."""

from __future__ import annotations

import statistics
import time

import paramiko
import pytest

from orchestrator.errors import BadInput, NotFound
from orchestrator.lab.fleet import Fleet
from orchestrator.lab.layout import PROXY_PORT

pytestmark = pytest.mark.fleet

FAST_TIMEOUT = ("-o", "ConnectTimeout=2")


def _timed_ssh(fleet: Fleet, host: str, command: str, **kw) -> tuple[float, object]:
    started = time.monotonic()
    proc = fleet.ssh(host, command, **kw)
    return time.monotonic() - started, proc


def _healthy(fleet: Fleet, host: str) -> bool:
    proc = fleet.ssh(host, "hostname", timeout=20)
    return proc.returncode == 0 and proc.stdout.strip() == host


def test_down_makes_the_host_unreachable_within_the_timeout_and_up_restores_it(
    small_fleet: Fleet, host: str
) -> None:
    with small_fleet.faulted(host, "down"):
        took, proc = _timed_ssh(small_fleet, host, "true", options=FAST_TIMEOUT)
        assert proc.returncode == 255 and "timed out" in proc.stderr
        assert 1.5 < took < 4
        assert _healthy(small_fleet, "h6")  # only that host is cut
    assert _healthy(small_fleet, host)


def test_kill_refuses_connections_and_restart_brings_back_sshd_and_its_deploy_root(
    small_fleet: Fleet, host: str
) -> None:
    assert small_fleet.ssh(host, "echo kept > /srv/app/kept").returncode == 0
    with small_fleet.faulted(host, "kill"):
        took, proc = _timed_ssh(small_fleet, host, "true", options=FAST_TIMEOUT)
        assert proc.returncode == 255 and "refused" in proc.stderr and took < 2
        assert small_fleet.pid(host) is None
    proc = small_fleet.ssh(host, "hostname; cat /srv/app/kept")
    assert proc.stdout.split() == [host, "kept"]


def test_hang_accepts_tcp_but_never_answers_and_resume_recovers(
    small_fleet: Fleet, host: str
) -> None:
    with small_fleet.faulted(host, "hang"):
        took, proc = _timed_ssh(small_fleet, host, "true", options=FAST_TIMEOUT)
        assert proc.returncode == 255 and "banner exchange" in proc.stderr
        assert 1.5 < took < 4
    assert _healthy(small_fleet, host)


def test_disk_full_makes_writes_fail_with_enospc_and_disk_ok_restores_the_root(
    small_fleet: Fleet, host: str
) -> None:
    assert small_fleet.ssh(host, "echo before > /srv/app/before").returncode == 0
    with small_fleet.faulted(host, "disk_full"):
        proc = small_fleet.ssh(host, "echo data > /srv/app/new")
        assert proc.returncode != 0 and "No space left on device" in proc.stderr
        listing = small_fleet.ssh(host, "ls -A /srv/app").stdout.split()
        assert "before" not in listing  # the tmpfs hides the deploy root (documented)
    proc = small_fleet.ssh(host, "cat /srv/app/before && echo data > /srv/app/new && echo ok")
    assert proc.stdout.split() == ["before", "ok"]


def _keepalive_rtt(fleet: Fleet, host: str, port: int) -> float:
    """Median time of one SSH request/reply (a global request the server answers at once)."""
    client = paramiko.SSHClient()
    client.load_host_keys(str(fleet.known_hosts_path))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.connect(
        fleet.address(host),
        port=port,
        username="root",
        key_filename=str(fleet.client_key_path),
        look_for_keys=False,
        allow_agent=False,
        timeout=10,
    )
    try:
        transport = client.get_transport()
        assert transport is not None
        samples = []
        for _ in range(7):
            started = time.monotonic()
            transport.global_request("keepalive@openssh.com", wait=True)
            samples.append(time.monotonic() - started)
        return statistics.median(samples)
    finally:
        client.close()


def test_slow_with_a_delay_adds_that_round_trip_time_on_the_proxy_port(
    small_fleet: Fleet, host: str
) -> None:
    with small_fleet.faulted(host, "slow", delay_ms=150):
        direct = _keepalive_rtt(small_fleet, host, 22)
        delayed = _keepalive_rtt(small_fleet, host, PROXY_PORT)
        print(f"\nround trip: direct {direct * 1000:.1f} ms, via proxy {delayed * 1000:.1f} ms")
        assert direct < 0.02
        assert 0.15 <= delayed - direct < 0.19
        proc = small_fleet.ssh(host, "hostname", port=PROXY_PORT)  # strict keys hold there too
        assert proc.stdout.strip() == host
    took, proc = _timed_ssh(small_fleet, host, "true", port=PROXY_PORT, options=FAST_TIMEOUT)
    assert proc.returncode == 255 and "refused" in proc.stderr  # fast stops the proxy


def test_slow_with_a_rate_limits_bandwidth_to_that_rate(small_fleet: Fleet, host: str) -> None:
    payload = "x" * 2_000_000
    # the unthrottled cost (login + 2 MB) is the best of three: on a loaded machine one run
    # can take several times as long, and subtracting that would hide the throttle's second
    runs = [_timed_ssh(small_fleet, host, "cat > /dev/null", input=payload) for _ in range(3)]
    assert all(p.returncode == 0 for _, p in runs)
    base = min(t for t, _ in runs)
    with small_fleet.faulted(host, "slow", rate="16mbit"):
        took, proc = _timed_ssh(small_fleet, host, "cat > /dev/null", input=payload)
        assert proc.returncode == 0
    expected = len(payload) * 8 / 16e6  # 1.0 s
    print(f"\n2 MB push: {base:.2f} s unthrottled, {took:.2f} s at 16mbit (expect {expected:.1f})")
    assert 0.9 * expected < took - base < 1.5 * expected
    again, _ = _timed_ssh(small_fleet, host, "cat > /dev/null", input=payload)
    assert again < 0.5 * expected  # `fast` removed the limit


def test_faulted_undoes_the_fault_when_the_block_raises(small_fleet: Fleet, host: str) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with small_fleet.faulted(host, "hang"):
            raise RuntimeError("boom")
    assert small_fleet.state.hosts[host].faults == []
    assert _healthy(small_fleet, host)


def test_unknown_hosts_and_kinds_are_bad_input(small_fleet: Fleet) -> None:
    with pytest.raises(NotFound):
        small_fleet.fault("h99", "down")
    with pytest.raises(BadInput, match="use one of"):
        small_fleet.fault("h1", "explode")


def test_the_cli_injects_and_undoes_faults_and_reports_them(
    small_fleet: Fleet, host: str, run_ferry
) -> None:
    lab = str(small_fleet.dir)
    killed = run_ferry("lab", "fault", host, "kill", "--dir", lab, "--output", "json")
    assert killed.returncode == 0, killed.stderr
    assert killed.json()["result"] == f"{host}: sshd killed"
    status = run_ferry("lab", "status", "--dir", lab, "--output", "json").json()
    entry = next(h for h in status["hosts"] if h["name"] == host)
    assert entry["alive"] is False and entry["faults"] == ["kill"]
    assert run_ferry("lab", "fault", host, "restart", "--dir", lab).returncode == 0
    assert _healthy(small_fleet, host)
    assert small_fleet.status()["hosts"][4]["faults"] == []  # re-read what the CLI wrote
