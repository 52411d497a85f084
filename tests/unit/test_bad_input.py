"""Every bad input of a user's file is refused when the file is read: one line naming the
file, the field and the fix (SpecError, exit 2), before anything is recorded or touched.
Each case is one the hardening issue found accepted (or failing only at run time)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from dml.spec import load_spec
from orchestrator.addresses import require_resolvable
from orchestrator.change.config import load_calendar, load_change_models
from orchestrator.errors import ExitCode, SpecError
from orchestrator.inventory import load_inventory
from orchestrator.plan import load_plan

PLAN = """\
environment: dev
strategy: big-bang
"""

INVENTORY = """\
ssh: {user: root, identity_file: key, known_hosts: known_hosts}
hosts:
  h1: {address: 198.18.0.11, groups: [web]}
  h2: {address: 198.18.0.12, groups: [web]}
"""


@pytest.fixture
def files(tmp_path: Path) -> Path:
    # a private key file that require_files accepts (unencrypted OpenSSH format)
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    (tmp_path / "key").write_bytes(key)
    (tmp_path / "key").chmod(0o600)
    (tmp_path / "known_hosts").write_text("")
    (tmp_path / "src").mkdir()
    return tmp_path


def refused(load, path: Path, text: str) -> SpecError:
    path.write_text(textwrap.dedent(text))
    with pytest.raises(SpecError) as caught:
        load(path)
    err = caught.value
    assert err.exit_code == ExitCode.BAD_INPUT
    assert str(path) in err.message
    assert "\n" not in err.message
    return err


def test_the_good_files_load(files: Path) -> None:
    (files / "plan.yaml").write_text(PLAN)
    (files / "inv.yaml").write_text(INVENTORY)
    assert load_plan(files / "plan.yaml").environment == "dev"
    assert [h.name for h in load_inventory(files / "inv.yaml").all_hosts()] == ["h1", "h2"]


@pytest.mark.parametrize(
    ("extra", "field", "says"),
    [
        ("vars: {'x; touch /tmp/pwned': 1}", "vars", "a var name is letters, digits"),
        ("vars: {release_path: 1}", "vars", "is a name Ferry sets"),
        ("deploy_root: relative/path", "deploy_root", "is relative"),
        ("deploy_root: /", "deploy_root", "is a system directory"),
        ("deploy_root: /etc", "deploy_root", "is a system directory"),
        ("deploy_root: /usr/", "deploy_root", "is a system directory"),
        ("deploy_root: /srv/../etc", "deploy_root", "plain absolute path"),
        ("deploy_root: '/srv/a b'", "deploy_root", "may use letters"),
        ("timeouts: {step: 0s}", "timeouts.step", "above zero"),
        ("timeouts: {step: 99999999999h}", "timeouts.step", "longer than a week"),
        ("timeouts: {connect: 0}", "timeouts.connect", "above zero"),
        ("timeouts: {step: .inf}", "timeouts.step", "longer than a week"),
        ("milestone: {deadline: 0s}", "milestone.deadline", "above zero"),
        ("milestone: {soak: 8d}", "milestone.soak", "not a duration"),
        ("milestone: {soak: 200h}", "milestone.soak", "longer than a week"),
        ("environment: prod", "environment", "given twice"),
        ("strategy: phased", "strategy", "given twice"),
    ],
)
def test_a_bad_plan_is_refused_naming_the_field(files: Path, extra, field, says) -> None:
    err = refused(load_plan, files / "plan.yaml", PLAN + extra + "\n")
    assert f"plan.yaml: {field}" in err.message, err.message
    assert says in err.message


@pytest.mark.parametrize(
    ("text", "field", "says"),
    [
        (INVENTORY + "  h1: {address: 198.18.0.13}\n", "hosts.h1", "host 'h1' is given twice"),
        (
            INVENTORY + "  h3: {address: 198.18.0.12, port: 22}\n",
            "(top level)",
            "hosts h2 and h3 are both 198.18.0.12:22",
        ),
        (INVENTORY + "  h3: {address: 198.18.0.13, groups: [all]}\n", "hosts", "group 'all'"),
        (INVENTORY + "  h3: {address: 198.18.0.13, groups: [h1]}\n", "hosts", "also a host"),
        (
            INVENTORY + "  h3: {address: 198.18.0.13, deploy_root: app}\n",
            "hosts.h3.deploy_root",
            "relative",
        ),
        (INVENTORY + "deploy_root: /\n", "deploy_root", "system directory"),
        (INVENTORY + "  h3: {address: -oProxyCommand=sh}\n", "hosts.h3.address", "not a host"),
        (INVENTORY.replace("user: root,", "user: root, connect_timeout: 1e12,"), "ssh", "3600"),
        (INVENTORY.replace("key,", "gone,"), "ssh.identity_file", "gone"),
    ],
)
def test_a_bad_inventory_is_refused_naming_the_field(files: Path, text, field, says) -> None:
    err = refused(load_inventory, files / "inv.yaml", text)
    assert f"inv.yaml: {field}" in err.message, err.message
    assert says in err.message


def test_an_unresolvable_address_is_refused_naming_the_host(files: Path) -> None:
    path = files / "inv.yaml"
    path.write_text(INVENTORY + "  h3: {address: nohost.invalid}\n")
    inv = load_inventory(path)
    with pytest.raises(SpecError) as caught:
        require_resolvable(inv.all_hosts(), inv.ssh, path)
    assert "inv.yaml: hosts.h3.address: 'nohost.invalid' does not resolve" in caught.value.message
    require_resolvable(inv.all_hosts()[:2], inv.ssh, path)  # IP literals: nothing to ask


SPEC = """\
name: app
units:
  app: {source: src}
"""


@pytest.mark.parametrize(
    ("text", "field", "says"),
    [
        ("version: 1.10\n" + SPEC, "version", 'quote it, e.g. version: "1.1"'),
        ("version: '1.0'\n" + SPEC.replace("src", "/etc/ssh"), "units.app.source", "outside"),
        ("version: '1.0'\n" + SPEC.replace("src", "../"), "units.app.source", "outside"),
        ("version: '1.0'\n" + SPEC + "  app: {source: src}\n", "units.app", "unit 'app' is"),
        ("version: '1.0'\nversion: '1.1'\n" + SPEC, "version", "given twice"),
    ],
)
def test_a_bad_release_spec_is_refused_naming_the_field(files: Path, text, field, says) -> None:
    err = refused(load_spec, files / "release.yaml", text)
    assert f"release.yaml: {field}" in err.message, err.message
    assert says in err.message


def test_versions_are_kept_as_written_and_an_outside_source_needs_saying_so(files: Path) -> None:
    path = files / "release.yaml"
    path.write_text("version: '1.10'\n" + SPEC)
    assert load_spec(path).version == "1.10"
    path.write_text("version: 2\n" + SPEC)
    assert load_spec(path).version == "2"
    (files.parent / "elsewhere").mkdir(exist_ok=True)
    path.write_text(
        "version: '1'\n"
        + SPEC.replace("{source: src}", "{outside_spec_dir: true, source: ../elsewhere}")
    )
    assert load_spec(path).units["app"].source == "../elsewhere"


def test_change_models_and_calendars_refuse_a_key_given_twice(files: Path) -> None:
    cal = refused(load_calendar, files / "calendar.yaml", "environments:\n  dev: {}\n  dev: {}\n")
    assert "calendar.yaml: environments.dev: key 'dev' is given twice" in cal.message
    models = refused(
        load_change_models,
        files / "change_models.yaml",
        "roles:\n  bob: [peer]\n  bob: [cab]\n",
    )
    assert "change_models.yaml: roles.bob: key 'bob' is given twice" in models.message
