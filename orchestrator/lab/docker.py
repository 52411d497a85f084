"""A Docker engine per lab host (`ferry lab up N --docker`), and registry-less test images.

Each engine runs inside its host's own network and mount namespaces (entered through the
host's sshd PID with `nsenter`, not `ip netns exec`, which remounts /sys and hides the
cgroup mounts dockerd needs), with its own data-root, exec-root and socket, no bridge and
no iptables: containers use the host's network. The socket lives under a short path in
/run (unix socket paths are limited to 108 bytes), reachable from here as well, and the
host learns it from `<deploy root>/.ferry/docker-host` (the agent reads it).

DIR/docker.json records every engine's PID and start time *before* it is waited for, so
`stop` after a crash ends exactly those (by PID), and their directories are removed.

Test images are docker-save archives written here byte for byte, from Debian's
busybox-static (`/bin/busybox`): a base layer (busybox and its applet links) and an app
layer with the files `httpd` serves; the same inputs give the same archive.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import tarfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dml.image import image_config, write_archive
from orchestrator.errors import BadInput
from orchestrator.lab import procs

if TYPE_CHECKING:
    from orchestrator.lab.fleet import Fleet

DOCKERD = "/usr/sbin/dockerd"
BUSYBOX = "/bin/busybox"
RUN_DIR = Path("/run/ferry-docker")
HOST_FILE = ".ferry/docker-host"  # under the deploy root: where the agent finds its engine
APPLETS = ("sh", "httpd", "wget", "cat", "cp", "ls", "sleep", "echo", "test", "mkdir", "rm")


def _state_path(fleet: Fleet) -> Path:
    return fleet.dir / "docker.json"


def _read(fleet: Fleet) -> dict[str, Any]:
    try:
        return json.loads(_state_path(fleet).read_text())
    except (FileNotFoundError, ValueError):
        return {}


def _write(fleet: Fleet, state: dict[str, Any]) -> None:
    tmp = _state_path(fleet).with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, _state_path(fleet))


def run_dir(fleet: Fleet, host: str) -> Path:
    return RUN_DIR / f"{fleet.state.id}-{host}"


def socket(fleet: Fleet, host: str) -> str:
    return f"unix://{run_dir(fleet, host) / 'docker.sock'}"


def available() -> bool:
    return os.path.exists(DOCKERD) and shutil.which("docker") is not None


def start(fleet: Fleet, say: Any = None, timeout: float = 90.0) -> dict[str, Any]:
    """Start one engine per host; returns {host: seconds to ready}. Fails naming a host."""
    say = say or (lambda _m: None)
    if fleet.mode != "netns":
        raise BadInput("--docker needs network namespaces (run as root, netns mode)")
    if not available():
        raise BadInput(f"--docker needs {DOCKERD} and the docker CLI (apt-get install docker.io)")
    state = _read(fleet)
    started = time.monotonic()
    for host in fleet.hosts:
        pid = fleet.pid(host)
        if pid is None:
            raise BadInput(f"{host}: its sshd is not running")
        rdir = run_dir(fleet, host)
        data = fleet.dir / "docker" / host
        rdir.mkdir(parents=True, exist_ok=True)
        data.mkdir(parents=True, exist_ok=True)
        argv = [
            "nsenter", f"--target={pid}", "--mount", "--net", "--",
            DOCKERD, "--data-root", str(data), "--exec-root", str(rdir / "exec"),
            "--pidfile", str(rdir / "dockerd.pid"), "-H", socket(fleet, host),
            "--bridge=none", "--iptables=false", "--ip-forward=false", "--ip-masq=false",
            "--userland-proxy=false", "--storage-driver=overlay2",
        ]  # fmt: skip
        dpid, dstart = procs.spawn(argv, fleet.dir / "docker" / f"{host}.log")
        state[host] = {"pid": dpid, "start": dstart, "run_dir": str(rdir), "data": str(data)}
        _write(fleet, state)  # recorded before it is waited for
    ready: dict[str, float] = {}
    deadline = time.monotonic() + timeout
    for host in fleet.hosts:
        while True:
            if _answers(socket(fleet, host)):
                ready[host] = round(time.monotonic() - started, 2)
                break
            if not procs.is_ours(state[host]["pid"], state[host]["start"]):
                raise BadInput(f"{host}: dockerd exited (see {fleet.dir}/docker/{host}.log)")
            if time.monotonic() > deadline:
                raise BadInput(f"{host}: dockerd not ready in {timeout:.0f}s")
            time.sleep(0.2)
        point_host(fleet, host)
    say(f"{len(ready)} Docker engines ready in {time.monotonic() - started:.1f} s")
    return ready


def point_host(fleet: Fleet, host: str) -> None:
    """Tell the host's agent where its engine listens (again after a `wipe`)."""
    path = fleet.root_dir(host) / HOST_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(socket(fleet, host) + "\n")


def point_hosts(fleet: Fleet) -> None:
    for host in _read(fleet):
        point_host(fleet, host)


def _answers(sock: str) -> bool:
    try:
        res = subprocess.run(
            ["docker", "-H", sock, "version", "--format", "{{.Server.Version}}"],
            capture_output=True,
            timeout=10,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return False
    return res.returncode == 0


def docker(fleet: Fleet, host: str, *args: str, check: bool = True) -> str:
    """Run the docker CLI against one host's engine (tests look at it from here)."""
    res = subprocess.run(
        ["docker", "-H", socket(fleet, host), *args], capture_output=True, text=True, check=False
    )
    if check and res.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args)} on {host}: {res.stderr.strip()}")
    return res.stdout


def engines(fleet: Fleet) -> list[str]:
    return sorted(_read(fleet))


def stop(fleet: Fleet) -> None:
    """End every engine by PID (SIGTERM, then SIGKILL), its containers with it; remove its
    directories. Idempotent; a no-op for a fleet without engines."""
    state = _read(fleet)
    if not state:
        return
    pids = [s["pid"] for s in state.values() if procs.is_ours(s["pid"], s["start"])]
    for pid in pids:
        procs.signal_pid(pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(
        procs.is_ours(s["pid"], s["start"]) for s in state.values()
    ):
        for pid in pids:
            procs.exited(pid)
        time.sleep(0.1)
    left = [s["pid"] for s in state.values() if procs.is_ours(s["pid"], s["start"])]
    left_all = set(left) | procs.descendants(left)
    if left_all:
        procs.kill_and_reap(left_all)
    for pid in pids:
        procs.exited(pid)
    for s in state.values():
        shutil.rmtree(s["run_dir"], ignore_errors=True)
        shutil.rmtree(s["data"], ignore_errors=True)
    _state_path(fleet).unlink(missing_ok=True)
    try:
        RUN_DIR.rmdir()
    except OSError:
        pass


def memory_kib(fleet: Fleet) -> dict[str, int]:
    """PSS of each host's dockerd and what it started (containerd, shims), in KiB."""
    out = {}
    for host, s in _read(fleet).items():
        if procs.is_ours(s["pid"], s["start"]):
            pids = {s["pid"]} | procs.descendants([s["pid"]])
            out[host] = sum(procs.pss_kib(p) or 0 for p in pids)
    return out


# --- test images ------------------------------------------------------------------------


def _tar_bytes(entries: list[tuple[str, bytes | None, str | None, int]]) -> bytes:
    """A deterministic layer tar: (path, data or None, symlink target or None, mode)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for path, data, link, mode in entries:
            info = tarfile.TarInfo(path)
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            info.mode = mode
            if link is not None:
                info.type, info.linkname = tarfile.SYMTYPE, link
                tar.addfile(info)
            elif data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def base_layer(padding: int = 0) -> bytes:
    """busybox, its applets, the dirs a container needs; `padding` bytes of filler."""
    if not os.path.exists(BUSYBOX):
        raise BadInput(f"test images need {BUSYBOX} (apt-get install busybox-static)")
    entries: list[tuple[str, bytes | None, str | None, int]] = [
        ("bin", None, None, 0o755),
        ("bin/busybox", Path(BUSYBOX).read_bytes(), None, 0o755),
    ]
    entries += [(f"bin/{a}", None, "busybox", 0o777) for a in APPLETS]
    entries += [(d, None, None, 0o755) for d in ("data", "etc", "proc", "sys", "tmp", "www")]
    if padding:
        # incompressible but reproducible filler (a hash chain), for size benchmarks
        import hashlib

        chunks, seed = [], b"ferry"
        while sum(map(len, chunks)) < padding:
            seed = hashlib.sha512(seed).digest()
            chunks.append(seed * 64)
        entries.append(("opt/filler", b"".join(chunks)[:padding], None, 0o644))
    return _tar_bytes(entries)


def app_layer(version: str, healthy: bool = True) -> bytes:
    files: list[tuple[str, bytes | None, str | None, int]] = [
        ("www", None, None, 0o755),
        ("www/version", version.encode() + b"\n", None, 0o644),
    ]
    if healthy:
        files.append(("www/ok", b"ok\n", None, 0o644))
    return _tar_bytes(files)


def test_image(
    out: Path, version: str, *, healthy: bool = True, port: int = 8081, padding: int = 0
) -> Path:
    """A docker-save archive: busybox httpd serving /www on `port` (host network);
    /www/ok exists only when `healthy`; `data/` is where a volume goes."""
    out.parent.mkdir(parents=True, exist_ok=True)
    work = out.parent / f".{out.name}.layers"
    work.mkdir(exist_ok=True)
    try:
        import hashlib

        layers = []
        for i, data in enumerate((base_layer(padding), app_layer(version, healthy))):
            path = work / f"{i}.tar"
            path.write_bytes(data)
            layers.append((path, "sha256:" + hashlib.sha256(data).hexdigest()))
        # a shell that ends on SIGTERM, as a real service does: httpd as PID 1 ignores it,
        # so every `docker stop` of the old container waited out its whole grace (10 s)
        serve = f"/bin/httpd -f -p 127.0.0.1:{port} -h /www"
        cmd = ["/bin/sh", "-c", f"trap 'exit 0' TERM; {serve} & wait"]
        config = image_config([d for _, d in layers], cmd)
        with open(out, "wb") as fh:
            write_archive(fh, config, [p for p, _ in layers])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out
