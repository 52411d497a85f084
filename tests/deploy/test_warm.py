"""The warm start (orchestrator/zygote.py): a command run by the warm process's child is the
same command as a cold one (output, exit code, records, the Prefect server it reports to),
signals reach it, and a warm process leaves when idle or when its code changed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from orchestrator import zygote
from orchestrator.prefect_deployments import cms_tag
from orchestrator.settings import get_settings
from tests.conftest import FERRY_BIN
from tests.deploy.helpers import build, host_release, plan, rid


def _warm_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    warm = tmp_path / "warm"
    return {**os.environ, "FERRY_WARM": "1", "FERRY_WARM_DIR": str(warm), **extra}


def _ferry(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(FERRY_BIN), *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def _wait_warm(env: dict[str, str], timeout: float = 120) -> int:
    """The PID of the warm process the last cold command started, once it accepts."""
    warm = Path(env["FERRY_WARM_DIR"])
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = list(warm.glob("warm-*.pid"))
        if pids and pids[0].with_suffix(".sock").exists():
            return int(pids[0].read_text())
        time.sleep(0.2)
    log = warm / "warm.log"
    raise AssertionError("no warm process: " + (log.read_text() if log.exists() else "no log"))


def _served(env: dict[str, str]) -> list[str]:
    """The commands the warm process forked a child for (its log: the command word only)."""
    log = Path(env["FERRY_WARM_DIR"]) / "warm.log"
    lines = log.read_text().splitlines()
    return [x.split(": ", 1)[1] for x in lines if " child " in x and " done: " not in x]


def _stop(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
        time.sleep(0.1)


@pytest.mark.fleet
def test_a_warm_child_deploys_as_a_cold_command_does(clean_small, prefect_api, tmp_path):
    fleet, work = clean_small, Path.cwd()
    env = _warm_env(tmp_path)
    build(work, "1.0")
    first = _ferry(env, "rfc", "list", "-o", "json")  # cold: starts the warm process
    assert first.returncode == 0, first.stderr
    pid = _wait_warm(env)
    try:
        # bad input: the same one line and exit 2 as a cold command, nothing recorded
        cold = _ferry({**env, "FERRY_WARM": "0"}, "deploy", "nope.yaml", "--release", "x@1")
        warm = _ferry(env, "deploy", "nope.yaml", "--release", "x@1")
        assert (warm.returncode, warm.stdout, warm.stderr) == (
            cold.returncode, cold.stdout, cold.stderr,
        )  # fmt: skip
        assert warm.returncode == 2 and "nope.yaml" in warm.stderr
        # a deployment, run by the child: on the hosts, in the CMS, and on the Prefect server
        # of this command's environment (the warm process was started without one)
        p = plan(work, fleet, targets="h1,h2", waves=["100%"])
        rfc_id = _ferry(env, "rfc", "new", "--release", "shop@1.0", "--env", "dev", "--model",
                        "standard", "--template", "any-to-staging", "-o", "json")  # fmt: skip
        assert rfc_id.returncode == 0, rfc_id.stderr
        rfc_ref = str(json.loads(rfc_id.stdout)["id"])
        res = _ferry(env, "deploy", str(p), "--release", "shop@1.0", "--rfc", rfc_ref, "-o", "json")
        assert res.returncode == 0, res.stdout + res.stderr
        report = json.loads(res.stdout)
        assert report["status"] == "succeeded"
        assert [host_release(fleet, h) for h in ("h1", "h2")] == [rid("shop@1.0")] * 2
        assert f"Prefect server {prefect_api}" in res.stderr
        # other tests' Ferry homes share this Prefect server, each with its own deployment #1:
        # this home's runs carry its CMS's tag
        mine = {"name": {"like_": f"#{report['id']}"}, "tags": {"all_": [cms_tag(_cms_url())]}}
        query = {"flow_runs": mine}
        req = urllib.request.Request(
            f"{prefect_api}/flow_runs/filter", data=json.dumps(query).encode(),
            headers={"Content-Type": "application/json"},
        )  # fmt: skip
        with urllib.request.urlopen(req, timeout=30) as r:
            runs = [x for x in json.loads(r.read()) if x["name"].endswith(f" #{report['id']}")]
        assert [x["state_type"] for x in runs] == ["COMPLETED"]
        # status read warm equals status read cold
        warm_status = _ferry(env, "status", "-o", "json")
        cold_status = _ferry({**env, "FERRY_WARM": "0"}, "status", "-o", "json")
        assert warm_status.returncode == 0 and warm_status.stdout == cold_status.stdout
        assert _served(env) == ["ferry deploy", "ferry rfc", "ferry deploy", "ferry status"]
    finally:
        _stop(pid)
    assert not Path(env["FERRY_WARM_DIR"], f"warm-{zygote.code_stamp()}.sock").exists()


def test_signals_reach_the_warm_child_and_an_idle_warm_process_leaves(
    ferry_home, run_ferry, tmp_path
):
    env = _warm_env(tmp_path, FERRY_WARM_IDLE="4")
    build(ferry_home, "1.0")
    draft = run_ferry("rfc", "new", "--release", "shop@1.0", "--env", "dev", "--model", "normal",
                      "-o", "json")  # fmt: skip
    assert draft.returncode == 0, draft.stderr
    rfc_id = str(draft.json()["id"])  # a normal change, a draft: never authorized here
    assert _ferry(env, "rfc", "list").returncode == 0
    pid = _wait_warm(env)
    try:
        waiting = subprocess.Popen(
            [str(FERRY_BIN), "rfc", "wait", rfc_id, "--interval", "0.2"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and _served(env) != ["ferry rfc"]:
            time.sleep(0.1)
        assert _served(env) == ["ferry rfc"]
        children = _children(pid)
        assert len(children) == 1
        time.sleep(0.5)
        waiting.send_signal(signal.SIGINT)  # Ctrl-C on the caller: the child is interrupted
        _, err = waiting.communicate(timeout=30)
        assert waiting.returncode == 130, err  # as a cold `ferry rfc wait` on Ctrl-C
        assert "warm process" not in err and "Traceback" not in err
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and Path(f"/proc/{children[0]}").exists():
            time.sleep(0.1)
        assert not _alive(children[0])
        # idle for FERRY_WARM_IDLE seconds: it leaves and takes its socket and PID file along
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.2)
        assert not _alive(pid)
        assert list(Path(env["FERRY_WARM_DIR"]).glob("warm-*")) == []
    finally:
        _stop(pid)


def test_a_killed_warm_process_is_replaced_by_the_next_command(ferry_home, tmp_path):
    env = _warm_env(tmp_path)
    assert _ferry(env, "rfc", "list").returncode == 0
    first = _wait_warm(env)
    os.kill(first, signal.SIGKILL)  # its socket file stays behind, nothing listens on it
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _alive(first):
        time.sleep(0.1)
    assert list(Path(env["FERRY_WARM_DIR"]).glob("warm-*.sock"))
    again = _ferry(env, "rfc", "list")  # runs cold (nothing answers), then starts another
    assert again.returncode == 0, again.stderr
    deadline = time.monotonic() + 120
    second = first
    while time.monotonic() < deadline and second == first:
        pids = list(Path(env["FERRY_WARM_DIR"]).glob("warm-*.pid"))
        if pids and pids[0].read_text().strip() != str(first):
            second = int(pids[0].read_text())
        time.sleep(0.2)
    try:
        assert second != first and _alive(second)
    finally:
        _stop(second)


def test_warm_stop_ends_a_warm_process_still_importing_and_leaves_nothing(ferry_home, tmp_path):
    """A command starts the next warm process as it ends; it imports for seconds before it
    listens. `ferry warm stop` then must not miss it (it once left it to idle out)."""
    env = _warm_env(tmp_path)
    warm = Path(env["FERRY_WARM_DIR"])
    assert _ferry(env, "rfc", "list").returncode == 0  # cold: starts one in the background
    starting = list(warm.glob("warm-*.starting"))
    assert len(starting) == 1 and not list(warm.glob("warm-*.pid")), sorted(warm.iterdir())
    pid = int(starting[0].read_text())
    try:
        status = _ferry(env, "warm", "status", "-o", "json")
        assert [p["starting"] for p in json.loads(status.stdout)["processes"]] == [True]
        stopped = _ferry(env, "warm", "stop", "-o", "json")
        assert json.loads(stopped.stdout)["stopped"] == [pid], stopped.stdout + stopped.stderr
        assert not _alive(pid)
        assert list(warm.glob("warm-*")) == []  # no marker, socket or PID file left
    finally:
        _stop(pid)


def test_the_code_stamp_follows_every_module_file(tmp_path):
    root = tmp_path / "src"
    (root / "orchestrator" / "cli").mkdir(parents=True)
    (root / "dml").mkdir()
    mod = root / "orchestrator" / "cli" / "x.py"
    mod.write_text("A = 1\n")
    (root / "dml" / "store.py").write_text("")
    first = zygote.code_stamp(root)
    assert zygote.code_stamp(root) == first
    os.utime(mod, ns=(time.time_ns(), time.time_ns() + 10**9))  # an edit: a new mtime
    assert zygote.code_stamp(root) != first
    second = zygote.code_stamp(root)
    (root / "dml" / "new.py").write_text("")
    assert zygote.code_stamp(root) != second


def test_a_warm_directory_others_can_write_is_not_used(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    os.chmod(shared, 0o777)
    assert not zygote.private_dir(shared)
    mine = tmp_path / "mine"
    assert zygote.private_dir(mine)
    assert mine.stat().st_mode & 0o777 == 0o700


@pytest.mark.parametrize(
    ("env", "on"),
    [
        ({}, True),
        ({"FERRY_WARM": "0"}, False),
        ({"FERRY_PREFECT": "ephemeral"}, False),
        ({"FERRY_PREFECT": "ephemeral", "FERRY_WARM": "1"}, True),
        ({"FERRY_WARM": "1", zygote.CHILD_MARK: "1"}, False),
    ],
)
def test_when_the_warm_start_is_on(monkeypatch, env, on):
    for key in ("FERRY_WARM", "FERRY_PREFECT", zygote.CHILD_MARK):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert zygote.enabled() is on


@pytest.mark.parametrize(
    ("argv", "start"),
    [(["status"], True), (["--help"], False), ([], False), (["warm", "stop"], False),
     (["deploy", "--help"], False), (["-o", "json", "rfc", "list"], True)],
)  # fmt: skip
def test_which_cold_commands_start_a_warm_process(argv, start):
    assert zygote.worth_starting(argv) is start


def _cms_url() -> str:
    return get_settings().cms_url


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return [int(x) for x in out.stdout.split()]


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
