"""The pull agent's daemon (issue 12): `ferry-agent.service` where the host runs systemd,
the supervised loop elsewhere. The choice is a pure decision from facts probed on the host;
the unit's text is rendered purely and checked by systemd's own verifier; its sha256 check
is run for real. (The lab hosts have no systemd: the fleet tests run the loop.)"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from orchestrator import pullagents
from orchestrator.pulldaemon import PROBE, UNIT_NAME, HostFacts, choose_supervisor, unit_text

SHA = "ab" * 32
SYSTEMCTL = "/usr/bin/systemctl"


@pytest.mark.parametrize(
    ("facts", "supervisor", "why"),
    [
        (HostFacts("systemd", SYSTEMCTL, 0, "/usr/bin/python3"), "systemd", "PID 1 is systemd"),
        (HostFacts("systemd", "/bin/systemctl", 0), "systemd", "/bin/systemctl"),
        (HostFacts("sh", "/usr/bin/systemctl", 0), "loop", "PID 1 is sh, not systemd"),  # lab host
        (HostFacts("init", "", 0), "loop", "not systemd"),
        (HostFacts("systemd", "", 0), "loop", "there is no systemctl"),
        (HostFacts("systemd", SYSTEMCTL, 1000), "loop", "needs root (the login is uid 1000)"),
        (HostFacts(), "loop", "PID 1 is unknown"),  # the probe said nothing
    ],
)  # fmt: skip
def test_the_supervisor_is_chosen_from_the_hosts_facts(facts, supervisor, why) -> None:  # type: ignore[no-untyped-def]
    got, reason = choose_supervisor(facts)
    assert got == supervisor and why in reason


def test_the_probes_answer_is_parsed_and_this_machine_runs_the_loop() -> None:
    text = "pid1=systemd\nsystemctl=/usr/bin/systemctl\nuid=0\npython3=/usr/bin/python3\nnoise\n"
    assert HostFacts.parse(text) == HostFacts(
        "systemd", "/usr/bin/systemctl", 0, "/usr/bin/python3"
    )
    assert HostFacts.parse("uid=\npid1=\n") == HostFacts("", "", -1, "")
    # the probe itself, run here: this machine's PID 1 is not systemd
    out = subprocess.run(["/bin/sh", "-c", PROBE], capture_output=True, text=True, check=True)
    facts = HostFacts.parse(out.stdout)
    assert facts.pid1 == Path("/proc/1/comm").read_text().strip() and facts.uid == os.getuid()
    assert choose_supervisor(facts)[0] == ("systemd" if facts.pid1 == "systemd" else "loop")


def test_the_unit_restarts_always_checks_the_agent_file_and_carries_no_token() -> None:
    text = unit_text("/srv/app", SHA)
    lines = text.splitlines()
    assert "Restart=always" in lines and "StartLimitIntervalSec=0" in lines
    assert (
        "ExecStart=/usr/bin/python3 /srv/app/.ferry/pull/ferry_agent.py pull --root /srv/app"
        in lines
    )
    pre = [ln for ln in lines if ln.startswith("ExecStartPre=")]
    assert len(pre) == 1 and SHA in pre[0] and "/srv/app/.ferry/pull/ferry_agent.py" in pre[0]
    assert "token" not in text.lower()  # the agent reads its token file (0600)
    assert "$" not in text and "%" not in text  # no systemd variable or specifier to expand
    for bad in ("srv/app", "/srv/a b", "/srv/$(id)", "/srv/%h", "/srv/../etc"):
        with pytest.raises(ValueError):
            unit_text(bad, SHA)
    with pytest.raises(ValueError):
        unit_text("/srv/app", "not-a-sha")


def _check_command(unit: str) -> str:
    m = re.search(r"^ExecStartPre=/bin/sh -c '(.*)'$", unit, re.M)
    assert m, unit
    return m.group(1)


def test_the_units_start_check_refuses_a_modified_agent_file(tmp_path: Path) -> None:
    import hashlib

    root = tmp_path / "app"
    (root / ".ferry" / "pull").mkdir(parents=True)
    agent = root / ".ferry" / "pull" / "ferry_agent.py"
    agent.write_bytes(pullagents.agent_source())
    sha = hashlib.sha256(agent.read_bytes()).hexdigest()
    check = _check_command(unit_text(str(root), sha))
    assert subprocess.run(["/bin/sh", "-c", check], capture_output=True).returncode == 0
    agent.write_bytes(agent.read_bytes() + b"\nimport os; os.system('id')\n")
    assert subprocess.run(["/bin/sh", "-c", check], capture_output=True).returncode != 0


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_systemd_accepts_the_unit_without_a_warning(tmp_path: Path) -> None:
    path = tmp_path / UNIT_NAME
    path.write_text(unit_text("/srv/app", SHA))
    res = subprocess.run(
        ["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0 and res.stderr.strip() == "", res.stderr


def test_the_install_script_writes_and_starts_the_unit_where_systemd_was_chosen(tmp_path: Path):
    """The install script's systemd branch, run here with a `systemctl` shim that records
    its arguments (this machine has no systemd to start units): the unit is written
    world-readable where systemd reads units, the token 0600, and no loop is started."""
    root, units, bin_dir = tmp_path / "app", tmp_path / "units", tmp_path / "bin"
    units.mkdir()
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    shim = bin_dir / "systemctl"
    shim.write_text(f'#!/bin/sh\necho "$*" >> {calls}\n')
    shim.chmod(0o755)
    unit = unit_text(str(root), SHA)
    # the real agent: its base64 is longer than one environment string may be (128 KiB)
    source = pullagents.agent_source()
    parts = pullagents.agent_parts(source)
    assert len(parts) > 1 and sum(map(len, parts.values())) > 128 * 1024
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin", "FERRY_ROOT": str(root), **parts,
        "FERRY_AGENT_SHA": SHA, "FERRY_SUPERVISOR": "",
        "FERRY_CONFIG": "{}", "FERRY_TOKEN": "h1.secret", "FERRY_CA": "",
        "FERRY_SUPERVISE": "systemd", "FERRY_UNIT": unit,
        "FERRY_UNIT_DIR": str(units), "FERRY_UNIT_NAME": UNIT_NAME,
    }  # fmt: skip
    script = pullagents.install_script(parts)
    res = subprocess.run(["/bin/sh", "-c", script], env=env, capture_output=True,
                         text=True, timeout=60)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"started {UNIT_NAME}"
    assert (root / ".ferry" / "pull" / "ferry_agent.py").read_bytes() == source
    written = units / UNIT_NAME
    assert written.read_text() == unit and stat.S_IMODE(written.stat().st_mode) == 0o644
    d = root / ".ferry" / "pull"
    assert stat.S_IMODE((d / "token").stat().st_mode) == 0o600
    assert not (d / "daemon.pid").exists()  # no supervised loop beside the unit
    assert calls.read_text().splitlines() == [
        "daemon-reload", f"enable {UNIT_NAME}", f"restart {UNIT_NAME}",
    ]  # fmt: skip
    # and `ferry agent revoke`'s stop takes the unit away again
    res = subprocess.run(["/bin/sh", "-c", pullagents.STOP], env=env, capture_output=True,
                         text=True, timeout=60)  # fmt: skip
    assert res.returncode == 0 and not written.exists() and not (d / "token").exists()
    assert calls.read_text().splitlines()[3:] == [f"disable --now {UNIT_NAME}", "daemon-reload"]
