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


def _pull_files_session(root: Path, files: list, data: bytes) -> dict:
    """One pull_files request to a serve session of the agent, as a host runs it."""
    import json
    import sys

    from orchestrator.transport.session import BOOT, boot_input

    head = {"op": "pull_files", "args": {"files": files}, "payload": len(data)}
    feed = boot_input() + json.dumps(head).encode() + b"\n" + data
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", BOOT, "serve", "--root", str(root)],
                          input=feed, capture_output=True, timeout=60)  # fmt: skip
    lines = [ln for ln in proc.stdout.decode().splitlines() if ln.startswith("RESULT ")]
    assert len(lines) == 1, proc.stderr
    return dict(json.loads(lines[0][7:]))


def test_the_install_writes_the_daemons_files_from_the_session_and_starts_the_unit(tmp_path):
    """`ferry agent install` on a host where systemd was chosen, its three steps run here:
    the agent's pull_files op writes the daemon's files from the session's own stream (the
    real agent, whose base64 would not fit one environment string: 128 KiB), then the
    install script runs with a `systemctl` shim that records its arguments (this machine
    has no systemd to start units). The unit is written world-readable where systemd reads
    units, the directory 0700 and every file 0600, no token in any command's environment,
    and no loop is started."""
    root, units, bin_dir = tmp_path / "app", tmp_path / "units", tmp_path / "bin"
    units.mkdir()
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    shim = bin_dir / "systemctl"
    shim.write_text(f'#!/bin/sh\necho "$*" >> {calls}\n')
    shim.chmod(0o755)
    unit = unit_text(str(root), SHA)
    source = pullagents.agent_source()
    assert len(source) * 4 / 3 > 128 * 1024
    names, data = pullagents.pull_files(source, {"host": "h1"}, "h1.secret", "CA")
    assert _pull_files_session(root, names, data) == {
        "written": ["ferry_agent.py", "supervise.sh", "config.json", "token", "ca.pem"],
        "_code": 0,
    }
    d = root / ".ferry" / "pull"
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    assert (d / "ferry_agent.py").read_bytes() == source
    assert (d / "supervise.sh").read_text() == pullagents.SUPERVISOR
    assert (d / "token").read_text() == "h1.secret" and (d / "ca.pem").read_text() == "CA"
    assert {stat.S_IMODE(p.stat().st_mode) for p in d.iterdir()} == {0o600}
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin", "FERRY_ROOT": str(root), "FERRY_AGENT_SHA": SHA,
        "FERRY_SUPERVISE": "systemd", "FERRY_UNIT": unit,
        "FERRY_UNIT_DIR": str(units), "FERRY_UNIT_NAME": UNIT_NAME,
    }  # fmt: skip
    for script, said in ((pullagents.HALT, "halted"), (pullagents.INSTALL, f"started {UNIT_NAME}")):
        res = subprocess.run(["/bin/sh", "-c", script], env=env, capture_output=True,
                             text=True, timeout=60)  # fmt: skip
        assert res.returncode == 0 and res.stdout.strip() == said, res.stderr
    written = units / UNIT_NAME
    assert written.read_text() == unit and stat.S_IMODE(written.stat().st_mode) == 0o644
    assert not (d / "daemon.pid").exists()  # no supervised loop beside the unit
    assert calls.read_text().splitlines() == [
        "daemon-reload", f"enable {UNIT_NAME}", f"restart {UNIT_NAME}",
    ]  # fmt: skip
    # installing again stops the unit before its files are replaced
    res = subprocess.run(["/bin/sh", "-c", pullagents.HALT], env=env, capture_output=True,
                         text=True, timeout=60)  # fmt: skip
    assert res.returncode == 0 and calls.read_text().splitlines()[3:] == [f"stop {UNIT_NAME}"]
    # and `ferry agent revoke`'s stop takes the unit away again
    res = subprocess.run(["/bin/sh", "-c", pullagents.STOP], env=env, capture_output=True,
                         text=True, timeout=60)  # fmt: skip
    assert res.returncode == 0 and not written.exists() and not (d / "token").exists()
    assert calls.read_text().splitlines()[4:] == [f"disable --now {UNIT_NAME}", "daemon-reload"]


@pytest.mark.parametrize(
    ("files", "data", "why"),
    [
        ([["../token", 0o600, 1]], b"x", "bad pull file name '../token'"),
        ([["a/b", 0o600, 1]], b"x", "bad pull file name 'a/b'"),
        ([[".ferry", 0o600, 1]], b"x", "bad pull file name '.ferry'"),
        ([["token", 0o4755, 1]], b"x", "bad pull file 'token'"),
        ([["token", 0o600, 5]], b"x", "bad pull file 'token'"),
        ([["token", 0o600, 1]], b"xy", "1 payload bytes name no file"),
    ],
)
def test_pull_files_refuses_a_name_outside_its_directory_a_mode_or_a_size_it_cannot_write(
    tmp_path, files, data, why
):
    res = _pull_files_session(tmp_path, files, data)
    assert res["_code"] == 11 and res["error"] == "input" and why in res["message"]
    assert not (tmp_path / "token").exists() and not (tmp_path.parent / "token").exists()
