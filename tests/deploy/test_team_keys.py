"""Team signing keys on the real fleet: two homes (a release engineer's and a CI runner's)
share one DML key file and deploy to the same hosts; after `ferry dml key rotate` the hosts
move to the new key on their next contact; a host pinning an unrelated key is exit 6, names
the fix, and leaves the RFC usable."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from orchestrator.settings import reset_settings
from tests.deploy.helpers import build, cms, deploy, host_release, plan, rfc, rid

pytestmark = pytest.mark.fleet

HOSTS = ["h1", "h2"]


def _spec(work: Path, version: str) -> Path:
    src = work / f"ci-src-{version}"
    (src / "app").mkdir(parents=True)
    (src / "app" / "VERSION").write_text(version + "\n")
    (src / "app" / "health.ok").write_text("ok\n")
    spec = src / "release.yaml"
    spec.write_text(
        yaml.safe_dump({"name": "shop", "version": version, "units": {"app": {"source": "app"}}})
    )
    return spec


def _pin(fleet, host: str) -> str:
    return (fleet.root_dir(host) / ".ferry" / "dml.pub").read_text().strip()


def test_two_homes_share_a_key_file_rotate_it_and_a_host_pinning_another_key_is_exit_6(
    clean_small, run_ferry, tmp_path, monkeypatch
):
    fleet, work = clean_small, Path.cwd()
    # the release engineer's home makes the team key and exports it once
    assert run_ferry("dml", "keygen").returncode == 0
    team_key = tmp_path / "team.key"
    assert run_ferry("dml", "key", "export", str(team_key)).returncode == 0
    assert oct(team_key.stat().st_mode & 0o777) == "0o600"
    monkeypatch.setenv("FERRY_DML_KEY_FILE", str(team_key))
    reset_settings()
    ci_home = tmp_path / "runner" / ".ferry"
    as_ci = {"FERRY_HOME": str(ci_home), "FERRY_USER": "gitlab:rel"}

    def ci(*args: str):
        return run_ferry(*args, env=as_ci)

    two = plan(work, fleet, "two.yaml", targets=",".join(HOSTS), waves=[1, "100%"])
    build(work, "1.0")
    res = deploy(run_ferry, two, "shop@1.0", rfc(run_ferry, "shop@1.0"))
    assert res.returncode == 0, res.stderr
    first_key = _pin(fleet, "h1")

    # the CI runner's home: its own CMS and DML, the same key file: the hosts accept it
    built = ci("release", "build", str(_spec(work, "2.0")), "-o", "json")
    assert built.returncode == 0, built.stderr
    assert not (ci_home / "dml" / "keys" / "dml.key").exists()  # it made no key of its own
    res = ci("deploy", str(two), "-r", "shop@2.0", "--rfc", rfc(ci, "shop@2.0"), "-o", "json")
    assert res.returncode == 0, res.stderr
    assert all(host_release(fleet, h) == _rid_in(ci_home, "shop@2.0") for h in HOSTS)
    assert _pin(fleet, "h1") == first_key

    # rotate: the key file now holds a new key, its public half signed by the old one
    rotated = run_ferry("dml", "key", "rotate", "-o", "json")
    assert rotated.returncode == 0, rotated.stderr
    new_key = rotated.json()["public_key_hex"]
    assert new_key != first_key and rotated.json()["rotations"] == 1
    # the hosts still pin the old key until their next contact
    assert _pin(fleet, "h2") == first_key
    built = ci("release", "build", str(_spec(work, "3.0")), "-o", "json")
    assert built.returncode == 0, built.stderr
    res = ci("deploy", str(two), "-r", "shop@3.0", "--rfc", rfc(ci, "shop@3.0"), "-o", "json")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "now pins DML key" in res.stderr
    assert all(_pin(fleet, h) == new_key for h in HOSTS)
    retired = (fleet.root_dir("h1") / ".ferry" / "dml.retired").read_text().split()
    assert retired == [first_key]
    # a release signed before the rotation still deploys (re-signed for the hosts)
    reset_settings()
    res = deploy(run_ferry, two, "shop@1.0", rfc(run_ferry, "shop@1.0"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert all(host_release(fleet, h) == rid("shop@1.0") for h in HOSTS)

    # a host pinning an unrelated key: exit 6, the fix named, the RFC still usable
    stranger = fleet.root_dir("h3") / ".ferry"
    stranger.mkdir(parents=True)
    (stranger / "dml.pub").write_text("ab" * 32 + "\n")
    three = plan(work, fleet, "three.yaml", targets="h3", waves=["100%"])
    rfc_id = rfc(run_ferry, "shop@1.0")
    res = deploy(run_ferry, three, "shop@1.0", rfc_id)
    assert res.returncode == 6, res.stdout + res.stderr
    reason = res.json()["hosts"]["h3"]["failure"]["reason"]
    assert "pins DML key" in reason and "ferry dml key import" in reason
    assert "Traceback" not in res.stderr
    assert cms(lambda s: _rfc_status(s, rfc_id)) == "implementing"
    (stranger / "dml.pub").unlink()  # the fix the message names, done deliberately
    again = deploy(run_ferry, three, "shop@1.0", rfc_id)
    assert again.returncode == 0, again.stdout + again.stderr
    assert _pin(fleet, "h3") == new_key


def _rid_in(home: Path, release: str) -> str:
    from dml.store import DML
    from orchestrator.planner import release_id

    return release_id(
        release, DML(home / "dml", Path(os.environ["FERRY_DML_KEY_FILE"])).open(release).digest
    )


def _rfc_status(session, rfc_id: str) -> str:
    from orchestrator.cms.models import RFC

    return session.get(RFC, int(rfc_id)).status
