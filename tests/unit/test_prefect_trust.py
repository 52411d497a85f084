"""What Prefect's clients trust when the API is plain HTTP (orchestrator/prefect_env.py)."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from orchestrator.prefect_env import NO_TRUST_FILE, plain_http_trust


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for key in ("PREFECT_API_SSL_CERT_FILE", "PREFECT_API_TLS_INSECURE_SKIP_VERIFY"):
        monkeypatch.setenv(key, "")  # recorded, so what the code sets is undone
        monkeypatch.delenv(key)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    return tmp_path


def test_a_plain_http_api_gets_a_ca_file_of_one_certificate_that_loads_in_a_millisecond(env):
    import os
    import time

    plain_http_trust("http://127.0.0.1:4200/api")
    path = Path(os.environ["PREFECT_API_SSL_CERT_FILE"])
    assert path == env / NO_TRUST_FILE
    started = time.perf_counter()
    ctx = ssl.create_default_context(cafile=str(path))
    assert time.perf_counter() - started < 0.02  # certifi's bundle: 34–44 ms here
    assert ctx.cert_store_stats()["x509"] == 1
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(path.read_bytes())
    assert cert.subject == cert.issuer  # self-signed, by a key that was never stored
    assert "trusts nothing" in cert.subject.rfc4514_string()
    made = path.read_bytes()
    plain_http_trust("http://127.0.0.1:4200/api")
    assert path.read_bytes() == made  # made once per Prefect home


@pytest.mark.parametrize(
    ("url", "env_set", "kept"),
    [
        ("https://prefect.example.com/api", {}, None),  # TLS: Prefect's own CA bundle
        ("http://127.0.0.1:4200/api", {"PREFECT_API_SSL_CERT_FILE": "/etc/mine.pem"},
         "/etc/mine.pem"),  # the user's choice
        ("http://127.0.0.1:4200/api", {"PREFECT_API_TLS_INSECURE_SKIP_VERIFY": "true"}, None),
    ],
)  # fmt: skip
def test_anything_but_a_plain_http_api_keeps_its_trust(env, monkeypatch, url, env_set, kept):
    import os

    for key, value in env_set.items():
        monkeypatch.setenv(key, value)
    plain_http_trust(url)
    assert os.environ.get("PREFECT_API_SSL_CERT_FILE") == kept
    assert not (env / NO_TRUST_FILE).exists()
