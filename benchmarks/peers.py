"""The peers on the same job as Ferry: Ansible, pyinfra, and the physical limit (OpenSSH).

Raw OpenSSH has two jobs: the copy of the package (the cold push's floor) and a one-command
fan-out, `ssh host true` to every host with bounded parallelism (the no-op's floor: what a
login and one command per host cost this machine).

Ansible and pyinfra run from their own venv (benchmarks/.venv-peers, made here from
requirements-peers.txt) and do what Ferry does: copy the package (the very DML archive
Ferry deploys, tar + zstd), unpack it into releases/<v> (via a temporary name, so a
half-unpacked release is never at the final path), flip `current` atomically (temporary
symlink + `mv -T`). Their rollback flips `current` back and checks it, on every host.
"""

from __future__ import annotations

import shlex
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.common import BENCH, PEERS_VENV, clean_env, log, run, timed
from orchestrator.lab.fleet import Fleet

ROOT = "/srv/app"


def ensure_venv() -> Path:
    """benchmarks/.venv-peers with the pinned peers; made on first use, re-synced after."""
    py = PEERS_VENV / "bin" / "python"
    req = BENCH / "requirements-peers.txt"
    stamp = PEERS_VENV / ".requirements"
    if py.exists() and stamp.exists() and stamp.read_text() == req.read_text():
        return py
    log(f"making {PEERS_VENV} (ansible-core, pyinfra, matplotlib, py-spy)")
    if not py.exists():
        run(["python3", "-m", "venv", str(PEERS_VENV)])
    run([str(py), "-m", "pip", "install", "-q", "-r", str(req)], timeout=1800)
    stamp.write_text(req.read_text())
    return py


def versions() -> dict[str, str]:
    bin_ = PEERS_VENV / "bin"
    out = {}
    a = run([str(bin_ / "ansible"), "--version"], check=False).stdout.decode().splitlines()
    out["ansible-core"] = a[0].split("core")[-1].strip(" []") if a else "?"
    p = run([str(bin_ / "pyinfra"), "--version"], check=False).stdout.decode().strip()
    out["pyinfra"] = p.split()[-1] if p else "?"
    s = run(["ssh", "-V"], check=False).stderr.decode().strip()
    out["OpenSSH"] = s.split(",")[0]
    return out


def unpack_cmd(v: str) -> str:
    """Idempotent: an already unpacked release is left alone."""
    pkg, rel = f"{ROOT}/packages/{v}.tar.zst", f"{ROOT}/releases/{v}"
    tmp = f"{ROOT}/releases/.tmp-{v}"
    return (
        f"test -d {rel} || {{ rm -rf {tmp} && mkdir -p {tmp} && "
        f"tar --zstd -xf {pkg} -C {tmp} && mv -T {tmp} {rel}; }}"
    )


def flip_cmd(v: str) -> str:
    return (
        f"ln -sfn releases/{v} {ROOT}/current.tmp && mv -T {ROOT}/current.tmp {ROOT}/current"
        f' && test "$(readlink {ROOT}/current)" = releases/{v}'
        f" && test -f {ROOT}/current/app/VERSION"
    )


# -- Ansible ------------------------------------------------------------------------------
DEPLOY_YML = """\
- hosts: all
  gather_facts: false
  tasks:
    - name: packages directory
      ansible.builtin.file: {{path: {root}/packages, state: directory}}
    - name: copy the package
      ansible.builtin.copy:
        src: "{{{{ pkg }}}}"
        dest: "{root}/packages/{{{{ v }}}}.tar.zst"
        mode: "0644"
    - name: unpack into releases/<v>
      ansible.builtin.shell: "{unpack}"
    - name: flip current atomically
      ansible.builtin.shell: "{flip}"
"""
ROLLBACK_YML = """\
- hosts: all
  gather_facts: false
  tasks:
    - name: flip current back to the prior release and check it
      ansible.builtin.shell: "{flip}"
"""


class Ansible:
    name = "ansible"

    def __init__(self, fleet: Fleet, hosts: list[str], work: Path) -> None:
        self.fleet, self.hosts, self.work = fleet, hosts, work
        work.mkdir(parents=True, exist_ok=True)
        (work / "inventory.ini").write_text("[fleet]\n" + "\n".join(hosts) + "\n")
        (work / "deploy.yml").write_text(
            DEPLOY_YML.format(
                root=ROOT,
                unpack=unpack_cmd("{{ v }}").replace('"', '\\"'),
                flip=flip_cmd("{{ v }}").replace('"', '\\"'),
            )
        )
        (work / "rollback.yml").write_text(
            ROLLBACK_YML.format(flip=flip_cmd("{{ v }}").replace('"', '\\"'))
        )
        self.runs = 0
        self.last_cpu = 0.0

    def _cfg(self) -> Path:
        # a fresh ControlPath directory per run: every run pays its own logins, like a user's
        self.runs += 1
        cp = self.work / f"cp{self.runs}"
        cp.mkdir(exist_ok=True)
        cfg = self.work / "ansible.cfg"
        cfg.write_text(
            "[defaults]\n"
            f"forks = {len(self.hosts)}\n"
            "host_key_checking = True\n"
            "gathering = explicit\n"
            "interpreter_python = /usr/bin/python3\n"
            "retry_files_enabled = False\n"
            f"local_tmp = {self.work}/tmp\n"
            "[ssh_connection]\n"
            "pipelining = True\n"
            f"ssh_args = -F {self.fleet.ssh_config_path} -o ControlMaster=auto"
            " -o ControlPersist=20s\n"
            f"control_path_dir = {cp}\n"
        )
        return cfg

    def _play(self, yml: str, **extra: str) -> float:
        env = clean_env(
            ANSIBLE_CONFIG=str(self._cfg()), ANSIBLE_HOME=str(self.work / "home"),
            ANSIBLE_NOCOLOR="1",
        )  # fmt: skip
        cmd = [str(PEERS_VENV / "bin" / "ansible-playbook"), "-i", "inventory.ini", yml]
        for k, v in extra.items():
            cmd += ["-e", f"{k}={v}"]
        wall, _, self.last_cpu = timed(cmd, env=env, cwd=self.work)
        return wall

    def deploy(self, pkg: Path, v: str) -> float:
        return self._play("deploy.yml", pkg=str(pkg), v=v)

    def rollback(self, v: str) -> float:
        return self._play("rollback.yml", v=v)


# -- pyinfra ------------------------------------------------------------------------------
PYINFRA_DEPLOY = """\
from pyinfra import host
from pyinfra.operations import files, server

v, pkg = host.data.v, host.data.pkg
files.put(name="copy the package", src=pkg, dest=f"{root}/packages/{{v}}.tar.zst")
server.shell(name="unpack into releases/<v>", commands=[{unpack!r}.replace("VV", v)])
server.shell(name="flip current atomically", commands=[{flip!r}.replace("VV", v)])
"""
PYINFRA_ROLLBACK = """\
from pyinfra import host
from pyinfra.operations import server

server.shell(name="flip current back and check it", commands=[{flip!r}.replace("VV", host.data.v)])
"""


class Pyinfra:
    name = "pyinfra"

    def __init__(self, fleet: Fleet, hosts: list[str], work: Path) -> None:
        self.fleet, self.hosts, self.work = fleet, hosts, work
        work.mkdir(parents=True, exist_ok=True)
        common = {
            "ssh_user": "root",
            "ssh_key": str(fleet.client_key_path),
            "ssh_known_hosts_file": str(fleet.known_hosts_path),
            "ssh_strict_host_key_checking": "yes",
        }
        rows = ",\n".join(
            f"    ({h!r}, {{**COMMON, 'ssh_hostname': {fleet.address(h)!r}, "
            f"'ssh_port': {fleet.port(h)}}})"
            for h in hosts
        )
        (work / "inventory.py").write_text(f"COMMON = {common!r}\nfleet = [\n{rows},\n]\n")
        (work / "deploy.py").write_text(
            PYINFRA_DEPLOY.format(root=ROOT, unpack=unpack_cmd("VV"), flip=flip_cmd("VV"))
        )
        (work / "rollback.py").write_text(PYINFRA_ROLLBACK.format(flip=flip_cmd("VV")))
        self.last_cpu = 0.0

    def _run(self, script: str, **data: str) -> float:
        cmd = [
            str(PEERS_VENV / "bin" / "pyinfra"), "inventory.py", script, "-y",
            "--parallel", str(len(self.hosts)), "--no-wait",
        ]  # fmt: skip
        for k, v in data.items():
            cmd += ["--data", f"{k}={v}"]
        env = clean_env(PYINFRA_PROGRESS="off", HOME=str(self.work / "home"))
        wall, _, self.last_cpu = timed(cmd, env=env, cwd=self.work)
        return wall

    def deploy(self, pkg: Path, v: str) -> float:
        return self._run("deploy.py", pkg=str(pkg), v=v)

    def rollback(self, v: str) -> float:
        return self._run("rollback.py", v=v)


# -- raw OpenSSH: the physical limit ------------------------------------------------------
def raw_push(fleet: Fleet, hosts: list[str], src: Path, dest: str) -> float:
    """`ssh host 'cat > dest' < src` to every host at once (aes128-gcm), nothing else."""
    t = time.perf_counter()
    procs = []
    for h in hosts:
        f = open(src, "rb")  # noqa: SIM115
        p = subprocess.Popen(
            ["ssh", "-F", str(fleet.ssh_config_path), "-c", "aes128-gcm@openssh.com", h,
             f"cat > {shlex.quote(dest)}"],
            stdin=f, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        procs.append((h, p, f))
    errors = []
    for h, p, f in procs:
        _, err = p.communicate()
        f.close()
        if p.returncode != 0:
            errors.append(f"{h}: exit {p.returncode} {err.decode(errors='replace')[-300:]}")
    wall = time.perf_counter() - t
    if errors:
        raise RuntimeError("raw ssh push failed: " + "; ".join(errors[:5]))
    return wall


def raw_fanout(fleet: Fleet, hosts: list[str], parallel: int = 50, command: str = "true") -> float:
    """`ssh -F ssh_config host true` to every host, at most `parallel` at a time (a thread
    pool), with the fleet's ssh_config: its known_hosts, strict host key checking, batch mode,
    curve25519, a fresh login per host (no ControlMaster). Wall seconds; raises if any fails."""
    argv = ["ssh", "-F", str(fleet.ssh_config_path)]

    def one(h: str) -> str | None:
        p = subprocess.run([*argv, h, command], stdin=subprocess.DEVNULL,
                           capture_output=True, timeout=120)  # fmt: skip
        if p.returncode != 0:
            return f"{h}: exit {p.returncode} {p.stderr.decode(errors='replace')[-300:]}"
        return None

    t = time.perf_counter()
    with ThreadPoolExecutor(max_workers=min(parallel, len(hosts))) as pool:
        errors = [e for e in pool.map(one, hosts) if e]
    wall = time.perf_counter() - t
    if errors:
        raise RuntimeError(f"raw ssh fan-out: {len(errors)} of {len(hosts)} failed: "
                           + "; ".join(errors[:5]))  # fmt: skip
    return wall
