"""`ferry rfc wait`: a pipeline's deploy job waits for the change authority."""

from __future__ import annotations

import subprocess
import time

import pytest

from tests.conftest import FERRY_BIN

BOB = {"FERRY_USER": "carol"}  # cab and change-manager: her approval authorizes


@pytest.fixture
def ferry(run_ferry, change_files):
    return run_ferry


def _normal(ferry) -> str:
    r = ferry(
        "rfc", "new", "--release", "web@1.0", "--env", "dev", "--model", "normal", "-o", "json"
    )
    assert r.returncode == 0, r.stderr
    rid = str(r.json()["id"])
    assert ferry("rfc", "submit", rid).returncode == 0
    return rid


def test_wait_returns_0_once_the_rfc_is_approved_while_it_waits(ferry):
    rid = _normal(ferry)
    import os

    waiter = subprocess.Popen(
        [str(FERRY_BIN), "rfc", "wait", rid, "--timeout", "60", "--interval", "0.5", "-o", "json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ),
    )
    try:
        time.sleep(2)
        assert waiter.poll() is None  # still assessed: it waits
        assert ferry("rfc", "approve", rid, env=BOB).returncode == 0
        out, err = waiter.communicate(timeout=90)
    finally:
        if waiter.poll() is None:
            waiter.kill()
    assert waiter.returncode == 0, err
    assert '"status": "authorized"' in out
    assert f"RFC-{rid} is assessed: waiting" in err and "Traceback" not in err


def test_wait_is_exit_3_with_the_reason_when_the_rfc_is_rejected(ferry):
    rid = _normal(ferry)
    assert ferry("rfc", "reject", rid, "-m", "no rollback tested", env=BOB).returncode == 0
    r = ferry("rfc", "wait", rid, "--timeout", "5", "-o", "json")
    assert r.returncode == 3, r.stderr
    assert "rejected by carol: no rollback tested" in r.stderr
    assert r.json()["details"]["status"] == "rejected" and "Traceback" not in r.stderr


def test_wait_times_out_with_exit_3_and_an_unknown_rfc_is_exit_2(ferry):
    rid = _normal(ferry)
    r = ferry("rfc", "wait", rid, "--timeout", "1", "--interval", "0.2")
    assert r.returncode == 3 and f"RFC-{rid} is still assessed after 1 s" in r.stderr
    r = ferry("rfc", "wait", "999", "--timeout", "1")
    assert r.returncode == 2 and "RFC-999 does not exist" in r.stderr
    assert "Traceback" not in r.stderr
