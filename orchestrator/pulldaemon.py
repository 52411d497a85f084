"""How a host runs its pull agent as a daemon (Decide, pure): a systemd unit or a loop.

Where the host runs systemd (PID 1 is systemd, `systemctl` exists) and Ferry logs in as
root, `ferry agent install` writes `ferry-agent.service` and enables and starts it;
anywhere else (the lab's hosts, a container, a non-root login) it starts the supervised
loop (`supervise.sh`). Either way the agent file runs only while its sha256 is the one
Ferry installed — the unit checks it in `ExecStartPre` against the sha256 written into the
unit itself — and it starts again whenever it ends. The token is never on a command
line: the agent reads it from `.ferry/pull/token` (0600).

The facts come from one probe on the host (`PROBE`); what to do with them is decided here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

UNIT_NAME = "ferry-agent.service"
UNIT_DIR = "/etc/systemd/system"
Supervisor = Literal["systemd", "loop"]

# what the host says about itself: one `key=value` a line, nothing decided there
PROBE = r"""echo "pid1=$(cat /proc/1/comm 2>/dev/null)"
echo "systemctl=$(command -v systemctl 2>/dev/null)"
echo "uid=$(id -u)"
echo "python3=$(command -v python3 2>/dev/null)"
"""


@dataclass(frozen=True)
class HostFacts:
    pid1: str = ""  # the name of PID 1's command (/proc/1/comm)
    systemctl: str = ""  # its path, or "" when there is none
    uid: int = -1  # of the login that installs (a system unit needs root)
    python3: str = ""

    @classmethod
    def parse(cls, text: str) -> HostFacts:
        got: dict[str, str] = {}
        for line in text.splitlines():
            key, sep, value = line.partition("=")
            if sep and key in ("pid1", "systemctl", "uid", "python3"):
                got[key] = value.strip()
        uid = got.get("uid", "")
        return cls(
            pid1=got.get("pid1", ""),
            systemctl=got.get("systemctl", ""),
            uid=int(uid) if uid.isdigit() else -1,
            python3=got.get("python3", ""),
        )


def choose_supervisor(facts: HostFacts) -> tuple[Supervisor, str]:
    """(what runs the daemon, why): systemd only where it runs and Ferry may install units."""
    if facts.pid1 != "systemd":
        return "loop", f"PID 1 is {facts.pid1 or 'unknown'}, not systemd"
    if not facts.systemctl:
        return "loop", "systemd runs, but there is no systemctl"
    if facts.uid != 0:
        return "loop", f"a system unit needs root (the login is uid {facts.uid})"
    return "systemd", f"PID 1 is systemd ({facts.systemctl})"


def unit_text(root: str, agent_sha256: str, python3: str = "/usr/bin/python3") -> str:
    """`ferry-agent.service` for the agent under `root` (a deploy root Ferry checked: only
    letters, digits and . _ - + @ /, so nothing here needs quoting for systemd or the shell,
    and no `%` specifier or `$` variable can appear)."""
    if not _plain(root) or not _plain(python3) or not _hex64(agent_sha256):
        raise ValueError("unit_text: a checked deploy root, python3 path and sha256 only")
    d = f"{root.rstrip('/')}/.ferry/pull"
    check = f'echo "{agent_sha256}  {d}/ferry_agent.py" | sha256sum --quiet --check -'
    return f"""\
# Written by `ferry agent install`: Ferry's pull agent for the deploy root {root}.
[Unit]
Description=Ferry pull agent ({root})
Wants=network-online.target
After=network-online.target
# never give up restarting, as the supervised loop never does
StartLimitIntervalSec=0

[Service]
Type=simple
# the agent file runs only while its sha256 is the one Ferry installed
ExecStartPre=/bin/sh -c '{check}'
ExecStart={python3} {d}/ferry_agent.py pull --root {root}
Restart=always
RestartSec=5
UMask=0077
StandardOutput=append:{d}/agent.log
StandardError=inherit

[Install]
WantedBy=multi-user.target
"""


def _plain(path: str) -> bool:
    return bool(re.fullmatch(r"/[A-Za-z0-9_./@+-]*", path)) and ".." not in path.split("/")


def _hex64(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)
