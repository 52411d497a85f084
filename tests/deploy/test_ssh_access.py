"""Ways in to a host, for real: a key only the ssh-agent holds, a passphrase-protected key
(through the agent), a ProxyJump bastion, a non-root login with `become: true` (sudo -n),
the user's ssh_config, FIPS-style algorithm lists — and in every case a host whose key is
not the known one is refused and never written. Bad combinations are exit 2 before anything
is recorded. Each test ends every process it starts (the ssh-agent by PID) and leaves the
fleets as it found them.

Whole deployments (~20 s each here) cover each way in over OpenSSH, and `become` over
paramiko too; paramiko's other ways in are checked on one agent session each (~0.5 s)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from orchestrator.cms.models import Deployment
from orchestrator.errors import SpecError, TransportError
from orchestrator.inventory import Host, SSHSettings, require_files
from orchestrator.lab import procs
from orchestrator.lab.build import ssh_banner
from orchestrator.lab.fleet import Fleet
from orchestrator.lab.sshagent import SSHAgent
from orchestrator.transport import openssh
from orchestrator.transport.session import AgentSession
from orchestrator.transport.ssh import SSHHost
from tests.deploy.helpers import (
    HOOKS,
    build,
    cms,
    deploy,
    files_match,
    host_release,
    inventory_variant,
    plan,
    rfc,
    rid,
    shared_file,
)

pytestmark = pytest.mark.fleet

TARGETS = ["h1", "h2"]
# the install hook proves who runs hooks: it fails unless root, and says who it was
AS_ROOT = dict(
    HOOKS,
    install=HOOKS["install"] + ' && test "$(id -u)" = 0 && id -un > {{ shared }}/installed-by',
)
FIPS = {
    "kex": ["ecdh-sha2-nistp256"],
    "ciphers": ["aes256-gcm@openssh.com"],
    "macs": ["hmac-sha2-256"],
}


# -- the fleets and the agent -------------------------------------------------------------
@pytest.fixture(scope="module")
def bastion_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """Two hosts that only a bastion reaches (they never answer the root namespace)."""
    fleet = Fleet.up(tmp_path_factory.mktemp("bastion") / "lab", 2, bastion=True)
    try:
        yield fleet
    finally:
        fleet.down()
        shutil.rmtree(fleet.dir, ignore_errors=True)


@pytest.fixture
def clean_bastion(bastion_lab, prefect_api, ferry_home):
    bastion_lab.wipe()
    yield bastion_lab
    bastion_lab.wipe()


@pytest.fixture
def agent(monkeypatch: pytest.MonkeyPatch) -> Iterator[SSHAgent]:
    """An ssh-agent of the test's own; `ferry` (a child process) finds it at SSH_AUTH_SOCK."""
    started = SSHAgent()
    monkeypatch.setenv("SSH_AUTH_SOCK", str(started.socket))
    try:
        yield started
    finally:
        started.stop()
    assert not started.alive() and not started.dir.exists()


@dataclass
class Access:
    """One way in: the fleet, the inventory's ssh settings, the user that logs in."""

    name: str
    fleet: Fleet
    ssh: dict[str, Any]
    login: str = "root"

    def inventory(self, work: Path, **more: Any) -> Path:
        return inventory_variant(self.fleet, work, f"inv-{self.name}.yaml", **{**self.ssh, **more})


@pytest.fixture
def access(request) -> Access:
    """`agent`: the key only in the agent; `protected`: a passphrase-protected key that the
    agent holds decrypted; `bastion`: through the bastion; `become`: the non-root login
    with sudo -n. A `-paramiko` suffix: the same over paramiko."""
    name, _, transport = request.param.partition("-")
    bulk = {"bulk": transport} if transport else {}
    if name == "bastion":
        fleet = request.getfixturevalue("clean_bastion")
        return Access(request.param, fleet, {"proxy_jump": fleet.proxy_jump, **bulk})
    fleet = request.getfixturevalue("clean_small")
    if name == "agent":  # the fleet's key, but in the agent only: the inventory names none
        request.getfixturevalue("agent").add(fleet.client_key_path)
        return Access(request.param, fleet, {"identity_file": None, "agent": True, **bulk})
    if name == "protected":  # the agent holds nothing else
        key, passphrase = fleet.protected_key()
        request.getfixturevalue("agent").add(key, passphrase)
        return Access(request.param, fleet, {"identity_file": str(key), "agent": True, **bulk})
    assert name == "become"
    user = fleet.add_deploy_user()
    return Access(request.param, fleet, {"user": user, "become": True, **bulk}, login=user)


def _forged(fleet: Fleet, work: Path, victim: str = "h1", liar: str = "h2") -> Path:
    """known_hosts in which `victim`'s address (a host, or "bastion") carries `liar`'s key:
    a man in the middle, as SSH sees it."""
    lines = [ln.split(None, 1) for ln in fleet.known_hosts_path.read_text().splitlines() if ln]
    address = fleet.bastion if victim == "bastion" else fleet.address(victim)
    wrong = next(key for names, key in lines if fleet.address(liar) in names.split(","))
    forged = work / f"known_hosts.forged-{victim}"
    forged.write_text(
        "".join(
            f"{names} {wrong if address in names.split(',') else key}\n" for names, key in lines
        )
    )
    return forged


def _sshd_log(fleet: Fleet, host: str) -> str:
    return (fleet.dir / "hosts" / host / "sshd.log").read_text()


def _fingerprint(public_key: Path) -> str:
    out = subprocess.run(["ssh-keygen", "-lf", str(public_key)], capture_output=True, text=True)
    return out.stdout.split()[1]  # "256 SHA256:… comment (ED25519)"


def _deployments() -> int:
    return cms(lambda s: s.scalar(select(func.count()).select_from(Deployment)))


def _untouched(fleet: Fleet) -> bool:
    return all(list(fleet.root_dir(h).iterdir()) == [] for h in fleet.hosts)


# -- (a)–(d): a real deployment, and a changed host key refused ---------------------------
WAYS_IN = ["agent", "protected", "bastion", "become", "become-paramiko"]


@pytest.mark.parametrize("access", WAYS_IN, indirect=True)
def test_a_deployment_goes_through_each_way_in_with_hooks_run_as_root(access, run_ferry):
    fleet, work = access.fleet, Path.cwd()
    build(work, "1.0")
    logs_before = {h: len(_sshd_log(fleet, h)) for h in TARGETS}
    p = plan(work, fleet, inventory=str(access.inventory(work)), targets=",".join(TARGETS),
             waves=[1, "100%"], hooks=AS_ROOT)  # fmt: skip
    res = deploy(run_ferry, p, "shop@1.0", rfc(run_ferry, "shop@1.0"))
    assert res.returncode == 0, res.stdout + res.stderr
    protected = fleet.protected_key_path.with_name(fleet.protected_key_path.name + ".pub")
    for host in TARGETS:
        assert host_release(fleet, host) == rid("shop@1.0")
        assert files_match(fleet, host, "shop@1.0")
        assert shared_file(fleet, host, "installed-by") == "root"
        release = fleet.root_dir(host) / "releases" / rid("shop@1.0") / "app" / "VERSION"
        assert release.stat().st_uid == 0  # the agent wrote as root
        logins = _sshd_log(fleet, host)[logs_before[host] :]
        assert f"Accepted publickey for {access.login} from" in logins
        if access.name.startswith("protected"):  # signed by the agent's copy of that key
            assert _fingerprint(protected) in logins
    if access.name.startswith("bastion"):  # the route was needed, and taken
        assert not ssh_banner(fleet.address("h1"), 22, timeout=1.0)
        assert f"Accepted publickey for root from {fleet.state.bridge_cidr.split('/')[0]}" in (
            _sshd_log(fleet, "bastion")
        )


@pytest.mark.parametrize("access", ["agent", "protected", "bastion", "become"], indirect=True)
def test_a_host_whose_key_changed_is_refused_and_never_written_whatever_the_way_in(
    access, run_ferry
):
    fleet, work = access.fleet, Path.cwd()
    build(work, "1.0")
    inventory = access.inventory(work, known_hosts=str(_forged(fleet, work)))
    p = plan(work, fleet, inventory=str(inventory), targets=",".join(TARGETS))
    res = deploy(run_ferry, p, "shop@1.0", rfc(run_ferry, "shop@1.0"))
    assert res.returncode == 4, res.stdout + res.stderr
    assert "host key" in res.json()["hosts"]["h1"]["failure"]["reason"]
    assert _untouched(fleet)


def test_a_bastion_whose_key_changed_is_refused_and_no_host_is_written(clean_bastion, run_ferry):
    fleet, work = clean_bastion, Path.cwd()
    build(work, "1.0")
    forged = _forged(fleet, work, victim="bastion")
    inventory = inventory_variant(fleet, work, "inv.yaml", known_hosts=str(forged))
    p = plan(work, fleet, inventory=str(inventory), targets="all")
    res = deploy(run_ferry, p, "shop@1.0", rfc(run_ferry, "shop@1.0"))
    assert res.returncode == 4, res.stdout + res.stderr
    assert "host key" in res.json()["hosts"]["h1"]["failure"]["reason"]
    assert _untouched(fleet)


# -- passphrases, agents and sudo that cannot work: clear words ---------------------------
def test_a_passphrase_protected_key_without_the_agent_is_exit_2_saying_load_it_with_ssh_add(
    clean_small, run_ferry
):
    fleet, work = clean_small, Path.cwd()
    key, _ = fleet.protected_key()
    build(work, "1.0")
    inventory = inventory_variant(fleet, work, "inv.yaml", identity_file=str(key))
    res = deploy(run_ferry, plan(work, fleet, inventory=str(inventory)), "shop@1.0",
                 rfc(run_ferry, "shop@1.0"))  # fmt: skip
    assert res.returncode == 2, res.stdout + res.stderr
    assert "inv.yaml: ssh.identity_file" in res.stderr and "passphrase-protected" in res.stderr
    assert f"ssh-add {key}" in res.stderr and "ssh.agent: true" in res.stderr
    assert "Traceback" not in res.stderr
    assert _deployments() == 0 and _untouched(fleet)


def test_paramiko_says_the_same_when_it_meets_a_protected_key_itself(small_fleet):
    fleet = small_fleet
    key, _ = fleet.protected_key()
    ssh = SSHSettings(identity_file=key, known_hosts=fleet.known_hosts_path, connect_timeout=5)
    host = Host(name="h1", address=fleet.address("h1"), port=22, groups=(), deploy_root="/")
    with pytest.raises(TransportError, match=r"passphrase-protected: load it into ssh-agent"):
        SSHHost(host, ssh).client()


def test_agent_true_without_an_agent_is_exit_2_naming_the_field_and_the_fix(
    clean_small, run_ferry, monkeypatch
):
    fleet, work = clean_small, Path.cwd()
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    build(work, "1.0")
    inventory = inventory_variant(fleet, work, "inv.yaml", identity_file=None, agent=True)
    res = deploy(run_ferry, plan(work, fleet, inventory=str(inventory)), "shop@1.0",
                 rfc(run_ferry, "shop@1.0"))  # fmt: skip
    assert res.returncode == 2, res.stdout + res.stderr
    assert "inv.yaml: ssh.agent" in res.stderr and "SSH_AUTH_SOCK is not set" in res.stderr
    assert _deployments() == 0 and _untouched(fleet)


@pytest.fixture
def sudo_asks_for_a_password_on_h1(small_fleet: Fleet) -> Iterator[str]:
    """On h1 only (its own mount namespace), the deploy user's sudoers entry is empty."""
    user = small_fleet.add_deploy_user()
    pid = small_fleet.pid("h1")
    assert pid is not None
    empty = Path(tempfile.mkdtemp(prefix="ferry-sudoers-")) / "empty"
    empty.write_text("")
    empty.chmod(0o440)
    target = f"/etc/sudoers.d/{user}"
    procs.run(["nsenter", "-t", str(pid), "-m", "--", "mount", "--bind", str(empty), target])
    try:
        yield user
    finally:
        procs.run(["nsenter", "-t", str(pid), "-m", "--", "umount", target])
        shutil.rmtree(empty.parent)


def test_become_where_sudo_would_ask_for_a_password_fails_that_host_naming_sudo_n(
    clean_small, sudo_asks_for_a_password_on_h1, run_ferry
):
    fleet, work = clean_small, Path.cwd()
    build(work, "1.0")
    inventory = inventory_variant(fleet, work, "inv.yaml", user=sudo_asks_for_a_password_on_h1,
                                  become=True)  # fmt: skip
    p = plan(work, fleet, inventory=str(inventory), targets="h1,h2", waves=[1, "100%"])
    res = deploy(run_ferry, p, "shop@1.0", rfc(run_ferry, "shop@1.0"))
    assert res.returncode == 4, res.stdout + res.stderr
    reason = res.json()["hosts"]["h1"]["failure"]["reason"]
    assert "`sudo -n`" in reason and "a password is required" in reason, reason
    assert "NOPASSWD" in reason
    assert _untouched(fleet)


def test_paramiko_says_the_same_of_a_sudo_that_would_ask(
    small_fleet, sudo_asks_for_a_password_on_h1
):
    ssh = _lab_ssh(small_fleet, user=sudo_asks_for_a_password_on_h1, become=True, bulk="paramiko")
    with pytest.raises(TransportError, match=r"`sudo -n` as ferry-lab-deploy failed \(sudo: a pa"):
        _run_on(small_fleet, "h1", ssh, "true")


# -- paramiko's ways in, one agent session each -------------------------------------------
def _lab_ssh(fleet: Fleet, **fields: Any) -> SSHSettings:
    base = {"identity_file": fleet.client_key_path, "known_hosts": fleet.known_hosts_path,
            "connect_timeout": 5, "proxy_jump": fleet.proxy_jump}  # fmt: skip
    return SSHSettings.model_validate({**base, **fields})


def _run_on(fleet: Fleet, name: str, ssh: SSHSettings, command: str) -> str:
    """`command` through one agent session, as the deploy's hooks run; its output."""
    host = Host(name=name, address=fleet.address(name), port=22, groups=(), deploy_root="/srv/app")
    session = AgentSession(host, ssh, "/srv/app", connect_timeout=5)
    try:
        out = session.request("hook", "run", {"command": command, "timeout": 10}, timeout=20)
    finally:
        session.close()
    return str(out["output"])


def test_paramiko_through_the_bastion_with_only_the_agent_is_as_strict_as_openssh(
    bastion_lab, agent, tmp_path
):
    fleet = bastion_lab
    agent.add(fleet.client_key_path)
    ssh = _lab_ssh(fleet, identity_file=None, agent=True, bulk="paramiko")
    assert _run_on(fleet, "h1", ssh, "hostname; id -un").split() == ["h1", "root"]
    forged_host = ssh.model_copy(update={"known_hosts": _forged(fleet, tmp_path)})
    with pytest.raises(TransportError, match=r"^h1: host key does not match known_hosts"):
        _run_on(fleet, "h1", forged_host, "true")
    forged_bastion = ssh.model_copy(update={"known_hosts": _forged(fleet, tmp_path, "bastion")})
    with pytest.raises(TransportError, match=r"bastion .*: host key does not match known_hosts"):
        _run_on(fleet, "h1", forged_bastion, "true")


def test_paramiko_signs_with_the_agents_copy_of_a_protected_key_and_nothing_else(
    small_fleet, agent
):
    fleet = small_fleet
    key, passphrase = fleet.protected_key()
    ssh = _lab_ssh(fleet, identity_file=key, agent=True, bulk="paramiko")
    agent.add(fleet.client_key_path)  # authorized too, but not the inventory's key
    with pytest.raises(TransportError, match=r"passphrase-protected and the ssh-agent does not"):
        _run_on(fleet, "h1", ssh, "true")
    agent.add(key, passphrase)
    assert _run_on(fleet, "h1", ssh, "id -u").strip() == "0"


# -- algorithms and ssh_config: what the inventory says, host keys strict regardless ------
def test_fips_algorithm_lists_deploy_and_a_list_the_hosts_lack_is_refused(clean_small, run_ferry):
    fleet, work = clean_small, Path.cwd()
    build(work, "1.0")
    fips = inventory_variant(fleet, work, "fips.yaml", **FIPS)
    p = plan(work, fleet, inventory=str(fips), targets="h1", waves=["100%"])
    res = deploy(run_ferry, p, "shop@1.0", rfc(run_ferry, "shop@1.0"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert host_release(fleet, "h1") == rid("shop@1.0")
    # the lab's sshd has no finite-field DH: proof that the list is the one offered
    for bulk in ("openssh", "paramiko"):
        dh = _lab_ssh(fleet, kex=["diffie-hellman-group14-sha256"], bulk=bulk)
        with pytest.raises(TransportError, match=r"unreachable|no acceptable kex"):
            _run_on(fleet, "h2", dh, "true")


HOSTILE_CONFIG = """\
Host *
  StrictHostKeyChecking no
  UserKnownHostsFile /dev/null
  ProxyJump nobody@127.0.0.1:9
  ControlMaster auto
  ControlPath {work}/cm-%C
  ControlPersist 60
  RequestTTY force
  RemoteCommand echo hijacked
"""


def test_an_ssh_config_applies_but_cannot_loosen_host_keys_route_or_stream(clean_small, run_ferry):
    fleet, work = clean_small, Path.cwd()
    config = work / "ssh_config"
    config.write_text(HOSTILE_CONFIG.format(work=work))
    build(work, "1.0")
    inventory = inventory_variant(fleet, work, "inv.yaml", ssh_config=str(config))
    p = plan(work, fleet, inventory=str(inventory), targets="h1", waves=["100%"])
    res = deploy(run_ferry, p, "shop@1.0", rfc(run_ferry, "shop@1.0"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert host_release(fleet, "h1") == rid("shop@1.0")
    assert not list(work.glob("cm-*"))  # no multiplexing master was left behind
    forged = _lab_ssh(fleet, ssh_config=config, known_hosts=_forged(fleet, work, "h2", "h1"))
    with pytest.raises(TransportError, match=r"^h2: host key does not match known_hosts"):
        _run_on(fleet, "h2", forged, "true")


# -- the settings themselves (no host) ----------------------------------------------------
def _settings(tmp_path: Path, **fields: Any) -> SSHSettings:
    known = tmp_path / "known_hosts"
    known.touch()
    return SSHSettings.model_validate({"known_hosts": str(known), **fields})


@pytest.mark.parametrize(
    "fields, words",
    [
        ({}, "identity_file is required unless ssh.agent: true"),
        ({"agent": True, "proxy_jump": "a@b:1,c@d:2"}, "one bastion only"),
        ({"agent": True, "proxy_jump": "-oProxyCommand=x"}, "is not [user@]host[:port]"),
        ({"agent": True, "proxy_jump": "b:70000"}, "is not [user@]host[:port]"),
        ({"agent": True, "kex": ["+curve25519-sha256"]}, "an exact list"),
        ({"agent": True, "ciphers": []}, "an empty list allows nothing"),
    ],
)
def test_bad_ssh_settings_are_refused_with_what_to_write(tmp_path, fields, words):
    with pytest.raises(ValueError) as err:
        _settings(tmp_path, **fields)
    assert words in str(err.value)


def test_require_files_wants_the_ssh_config_and_no_identity_file_with_the_agent(
    tmp_path, monkeypatch
):
    sock = tmp_path / "agent.sock"
    monkeypatch.setenv("SSH_AUTH_SOCK", str(sock))
    with pytest.raises(
        SpecError, match=r"inv.yaml: ssh.agent: true, but SSH_AUTH_SOCK=.* no socket"
    ):
        require_files(_settings(tmp_path, agent=True), "inv.yaml")
    with SSHAgent() as running:
        monkeypatch.setenv("SSH_AUTH_SOCK", str(running.socket))
        require_files(_settings(tmp_path, agent=True), "inv.yaml")  # no identity_file: fine
        missing = _settings(tmp_path, agent=True, ssh_config=str(tmp_path / "nope"))
        with pytest.raises(SpecError, match=r"ssh.ssh_config: .*nope does not exist"):
            require_files(missing, "inv.yaml")
    config = tmp_path / "config"
    config.touch()
    paramiko_too = _settings(tmp_path, agent=True, ssh_config=str(config), bulk="paramiko")
    with pytest.raises(SpecError, match=r"ssh.ssh_config: is read by the OpenSSH client only"):
        require_files(paramiko_too, "inv.yaml")


def test_the_bastion_hop_is_as_strict_as_the_host_and_uses_the_same_known_hosts(tmp_path):
    ssh = _settings(tmp_path, identity_file=str(tmp_path / "k"), proxy_jump="jump@10.9.8.7:2200")
    host = Host(name="h1", address="10.1.2.3", port=22, groups=(), deploy_root="/srv/app")
    argv = openssh.argv(host, ssh, 5, "true")
    hop = next(a.split("=", 1)[1] for a in argv if a.startswith("ProxyCommand="))
    assert "-o StrictHostKeyChecking=yes" in hop and "-o BatchMode=yes" in hop
    assert f"-o UserKnownHostsFile={ssh.known_hosts}" in hop
    assert "-o GlobalKnownHostsFile=/dev/null" in hop and "-o ControlPath=none" in hop
    assert "-p 2200 -l jump" in hop and hop.endswith("-W '[%h]:%p' 10.9.8.7")
    assert "-J" not in argv and "ProxyJump=none" in argv
    assert argv[argv.index("-F") + 1] == "/dev/null"
