"""Check-in is gated by an RFC; status accounting follows ITIL with an audit event each."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from orchestrator import catalog
from orchestrator.cms import audit, db
from orchestrator.errors import BadInput
from tests.dml.conftest import add_rfc


def test_checkin_without_an_authorizing_rfc_is_refused_with_exit_3(spec: Path, run_ferry) -> None:
    assert run_ferry("release", "build", str(spec)).returncode == 0
    draft = add_rfc("shop@1.4.0", status="draft")
    other = add_rfc("shop@9.9.9")
    deploy_only = add_rfc("shop@1.4.0", stages=["deploy"])
    for rfc, why in (
        (draft, "is draft, not authorized"),
        (other, "is for shop@9.9.9"),
        (deploy_only, "does not cover the checkin stage"),
        (999, "RFC-999 does not exist"),
    ):
        res = run_ferry("release", "checkin", "shop@1.4.0", "--rfc", str(rfc), "-o", "json")
        assert res.returncode == 3, res.stderr
        assert why in res.stderr
    with db.session_scope() as s:
        assert catalog.get(s, "shop@1.4.0").status == "registered"
        refusals = [e for e in audit.history(s, "rfc", draft) if e["action"] == "authorize.refused"]
        assert refusals  # the refusal itself is on record


def test_checkin_with_an_authorizing_rfc_then_again_is_a_no_op(spec: Path, run_ferry) -> None:
    assert run_ferry("release", "build", str(spec)).returncode == 0
    rfc = add_rfc("shop@1.4.0")
    res = run_ferry("release", "checkin", "shop@1.4.0", "--rfc", f"RFC-{rfc}", "-o", "json")
    assert res.returncode == 0, res.stderr
    assert res.json()["status"] == "checked-in" and res.json()["changed"] is True
    again = run_ferry("release", "checkin", "shop@1.4.0", "--rfc", str(rfc), "-o", "json")
    assert again.returncode == 0 and again.json()["changed"] is False
    shown = run_ferry("release", "show", "shop@1.4.0", "-o", "json").json()
    assert [e["action"] for e in shown["history"]] == ["release.registered", "release.checked-in"]
    assert shown["checked_in_rfc"] == rfc


def test_checkin_of_an_unknown_release_is_not_found(ferry_home: Path, run_ferry) -> None:
    res = run_ferry("release", "checkin", "shop@0.0.1", "--rfc", "1")
    assert res.returncode == 2 and "not registered" in res.stderr


def test_status_accounting_registered_checked_in_deployed_withdrawn(
    spec: Path, ferry_home: Path
) -> None:
    catalog.build_release(spec)
    rfc = add_rfc("shop@1.4.0")
    now = datetime.now(UTC)
    with db.session_scope() as s:
        with pytest.raises(BadInput, match="only a checked-in release can be deployed"):
            catalog.mark_deployed(s, "shop@1.4.0", "staging", "alice", now)
        catalog.checkin(s, "shop@1.4.0", rfc, "alice", now)
        catalog.mark_deployed(s, "shop@1.4.0", "staging", "alice", now)
        assert catalog.get(s, "shop@1.4.0").status == "deployed"
        catalog.withdraw(s, "shop@1.4.0", "alice", "CVE in a dependency", now)
        catalog.withdraw(s, "shop@1.4.0", "alice", "again", now)  # idempotent
        with pytest.raises(BadInput):
            catalog.mark_deployed(s, "shop@1.4.0", "staging", "alice", now)
        actions = [e["action"] for e in audit.history(s, "release", "shop@1.4.0")]
    assert actions == [
        "release.registered",
        "release.checked-in",
        "release.deployed",
        "release.withdrawn",
    ]
    with db.session_scope() as s:
        assert audit.verify_chain(s).ok


def test_checkin_refuses_a_tampered_package(spec: Path, run_ferry) -> None:
    from dml.store import DML

    assert run_ferry("release", "build", str(spec)).returncode == 0
    store = DML.from_settings()
    path = store.blob_path(store.index("shop@1.4.0")["archive"])
    data = bytearray(path.read_bytes())
    data[-5] ^= 1
    path.write_bytes(bytes(data))
    res = run_ferry("release", "checkin", "shop@1.4.0", "--rfc", str(add_rfc("shop@1.4.0")))
    assert res.returncode == 6 and "archive blob" in res.stderr


def test_release_list_and_dml_list(spec: Path, run_ferry) -> None:
    assert run_ferry("release", "build", str(spec)).returncode == 0
    rel = run_ferry("release", "list", "-o", "json").json()["releases"]
    assert [(r["release"], r["status"]) for r in rel] == [("shop@1.4.0", "registered")]
    d = run_ferry("dml", "list", "-o", "json").json()["releases"]
    assert d[0]["release"] == "shop@1.4.0" and d[0]["ok"]


def test_keygen_makes_a_key_once(ferry_home: Path, run_ferry) -> None:
    first = run_ferry("dml", "keygen", "-o", "json").json()
    second = run_ferry("dml", "keygen", "-o", "json").json()
    assert first["created"] and not second["created"]
    assert first["key_id"] == second["key_id"] and len(first["public_key_hex"]) == 64
    key = Path(first["public_key_file"]).with_name("dml.key")
    assert key.stat().st_mode & 0o777 == 0o600 and key.stat().st_size == 32
