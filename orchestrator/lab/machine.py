"""The few machine-wide things that all namespace fleets share, and putting them back.

Making namespaced hosts changes the root namespace in three ways no single fleet owns:
`ip netns add` turns /run/netns into a mount point, sshd needs /run/sshd, and the deploy
root (/srv/app) must exist as a mount point even though each host binds its own dir over
it. The first fleet records what the machine looked like (/run/ferry-lab/baseline.json);
the last fleet to go down restores exactly that. Removing /srv/app while another fleet's
hosts have mounts on it would detach them, which is why this bookkeeping exists.

A fleet may also add the lab's non-root login, `ferry-lab-deploy` (`add_deploy_user`): a
system user with passwordless sudo (/etc/sudoers.d/ferry-lab-deploy). Hosts share this
machine's /etc/passwd, so it exists on every host of every fleet at once. The baseline
records that the lab made it, and the last fleet down removes user, home and sudoers file;
one left by a crash is recognised by its GECOS mark and removed the same way.

All of it, and the choice of a free /22 slot, happens under one flock.
"""

from __future__ import annotations

import fcntl
import json
import os
import pwd
import shutil
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from orchestrator.errors import BadInput
from orchestrator.lab import layout
from orchestrator.lab.procs import run

REGISTRY = Path("/run/ferry-lab")
LOCK = Path("/run/ferry-lab.lock")
RUN_NETNS = Path("/run/netns")
RUN_SSHD = Path("/run/sshd")
SUDOERS = Path("/etc/sudoers.d") / layout.DEPLOY_USER
DEPLOY_HOME = Path("/var/lib") / layout.DEPLOY_USER
DEPLOY_MARK = "Ferry lab deploy user"  # its GECOS: how the lab knows a user is its own


@contextmanager
def locked() -> Iterator[None]:
    """An exclusive lock; robust to the last fleet deleting the lock file under waiters."""
    while True:
        fd = os.open(LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            same = os.fstat(fd).st_ino == os.stat(LOCK).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        yield
    finally:
        os.close(fd)


def _is_mountpoint(path: Path) -> bool:
    target = str(path)
    with open("/proc/self/mountinfo") as fh:
        return any(line.split()[4] == target for line in fh)


def _missing_dirs(path: Path) -> list[Path]:
    """`path` and its missing ancestors, outermost first."""
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    return list(reversed(missing))


def enter(fleet_id: str, fleet_dir: Path, deploy_root: str) -> None:
    """Register a fleet; make /run/sshd and the deploy root exist, remembering what was new."""
    REGISTRY.mkdir(exist_ok=True)
    base_file = REGISTRY / "baseline.json"
    if base_file.exists():
        baseline = json.loads(base_file.read_text())
    else:
        baseline = {
            "run_netns": "mount"
            if _is_mountpoint(RUN_NETNS)
            else ("dir" if RUN_NETNS.exists() else "absent"),
            "created_dirs": [],
        }
    for wanted in (RUN_SSHD, Path(deploy_root)):
        for new in _missing_dirs(wanted):
            new.mkdir(mode=0o755)
            baseline["created_dirs"].append(str(new))
    base_file.write_text(json.dumps(baseline, indent=2))
    (REGISTRY / f"{fleet_id}.json").write_text(json.dumps({"dir": str(fleet_dir)}))


def leave(fleet_id: str) -> None:
    """Unregister a fleet; if it was the last one, restore the machine's baseline."""
    if not REGISTRY.exists():
        return
    (REGISTRY / f"{fleet_id}.json").unlink(missing_ok=True)
    for entry in REGISTRY.glob("*.json"):
        if entry.name == "baseline.json":
            continue
        other_dir = Path(json.loads(entry.read_text())["dir"])
        if (other_dir / "fleet.json").exists():
            return  # another fleet still lives (or awaits its own `down`)
        entry.unlink()
    base_file = REGISTRY / "baseline.json"
    baseline = json.loads(base_file.read_text()) if base_file.exists() else {}
    state = baseline.get("run_netns", "mount")
    if state != "mount" and _is_mountpoint(RUN_NETNS) and not any(RUN_NETNS.iterdir()):
        run(["umount", str(RUN_NETNS)], check=False)
        if state == "absent":
            _rmdir(RUN_NETNS)
    for created in reversed(baseline.get("created_dirs", [])):
        _rmdir(Path(created))
    if baseline.get("deploy_user"):
        _remove_deploy_user()
    base_file.unlink(missing_ok=True)
    _rmdir(REGISTRY)
    LOCK.unlink(missing_ok=True)


def add_deploy_user() -> str:
    """The non-root lab login with passwordless sudo, made once (idempotent); under `locked()`
    and after `enter`, so that the last fleet's `leave` removes it."""
    user = layout.DEPLOY_USER
    if shutil.which("sudo") is None or not SUDOERS.parent.is_dir():
        raise BadInput(
            f"the lab's {user} needs sudo, which is not installed (apt-get install sudo)"
        )
    try:
        if pwd.getpwnam(user).pw_gecos != DEPLOY_MARK:
            raise BadInput(f"a user {user} exists that the lab did not make: remove or rename it")
    except KeyError:
        run(["useradd", "--system", "--user-group", "--home-dir", str(DEPLOY_HOME),
             "--shell", "/bin/sh", "--password", "*",  # "*": no password, yet not locked
             "--comment", DEPLOY_MARK, user])  # fmt: skip
    entry = pwd.getpwnam(user)
    DEPLOY_HOME.mkdir(mode=0o755, exist_ok=True)
    os.chown(DEPLOY_HOME, entry.pw_uid, entry.pw_gid)
    if not SUDOERS.exists():
        fd, tmp = tempfile.mkstemp(dir=SUDOERS.parent, prefix=".ferry-lab-")
        with os.fdopen(fd, "w") as fh:
            fh.write(f"# orchestrator/lab/machine.py: gone when the last lab fleet is\n"
                     f"{user} ALL=(root) NOPASSWD: ALL\n")  # fmt: skip
        os.chmod(tmp, 0o440)
        run(["visudo", "-cqf", tmp])
        os.replace(tmp, SUDOERS)
    base_file = REGISTRY / "baseline.json"
    baseline = json.loads(base_file.read_text())
    baseline["deploy_user"] = True
    base_file.write_text(json.dumps(baseline, indent=2))
    return user


def _remove_deploy_user() -> None:
    SUDOERS.unlink(missing_ok=True)
    try:
        if pwd.getpwnam(layout.DEPLOY_USER).pw_gecos == DEPLOY_MARK:
            run(["userdel", layout.DEPLOY_USER], check=False)
    except KeyError:
        pass
    shutil.rmtree(DEPLOY_HOME, ignore_errors=True)


def _rmdir(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass  # not empty, already gone, or still a mount point elsewhere: leave it


def used_networks() -> list[object]:
    """Every IPv4 network configured on any interface of the root namespace."""
    import ipaddress

    nets = []
    for iface in json.loads(run(["ip", "-j", "-4", "addr"]) or "[]"):
        for info in iface.get("addr_info", []):
            nets.append(ipaddress.IPv4Network(f"{info['local']}/{info['prefixlen']}", False))
    return nets


def free_slot(fleet_id: str) -> int:
    """The first /22 slot, from one derived from the fleet id, that no interface uses."""
    used = used_networks()
    start = zlib.crc32(fleet_id.encode()) % layout.SLOTS
    for k in range(layout.SLOTS):
        slot = (start + k) % layout.SLOTS
        net = layout.slot_network(slot)
        if not any(net.overlaps(u) for u in used):  # type: ignore[arg-type]
            return slot
    raise RuntimeError("every /22 of 198.18.0.0/15 is in use: take some fleets down")
