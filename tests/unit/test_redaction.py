"""The audit log redacts secret-looking keys by their words: a milestone's `passed` is kept."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from orchestrator.cms import audit
from orchestrator.cms.db import session_scope
from orchestrator.cms.models import AuditEvent


@pytest.mark.parametrize(
    "key",
    ["password", "db_pass", "DB_PASSWORD", "apiKey", "api_key", "X-Auth-Token", "access_token",
     "private_key", "privateKey", "secret", "client_secret", "passphrase", "authorization",
     "cookie", "credentials"],
)  # fmt: skip
def test_secret_looking_keys_are_redacted(key):
    assert audit.secret_key(key)
    assert audit.redact({key: "s3cr3t"}) == {key: "***"}


@pytest.mark.parametrize(
    "key", ["passed", "bypass", "max_failed", "passes", "compass", "tokens_seen", "keyboard"]
)
def test_words_that_merely_contain_secret_letters_are_kept(key):
    assert not audit.secret_key(key)
    assert audit.redact({key: True}) == {key: True}


def test_a_milestone_verdict_keeps_passed_in_the_audit_log_and_a_password_does_not_survive(
    ferry_home,
):
    verdict = {"passed": True, "wave": 1, "failed": [], "reason": "0/1 failed"}
    with session_scope() as s:
        audit.append(
            s,
            actor="alice",
            action="deployment.wave",
            subject_type="deployment",
            subject_id=1,
            data={"verdict": verdict, "db": {"password": "hunter2"},
                  "url": "postgresql://u:hunter2@db/x"},
        )  # fmt: skip
    with session_scope() as s:
        data = s.scalars(select(AuditEvent)).one().data
    assert data["verdict"] == verdict  # "passed": true, not "***"
    assert data["db"] == {"password": "***"}
    assert data["url"] == "postgresql://u:***@db/x"
