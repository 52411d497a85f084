"""Pull agents on hosts (Act): install over SSH, and the supervised daemon they run.

`install` reaches each host the way a push deployment does (the inventory's SSH settings,
strict host keys, the verified agent session), pins the DML key there, writes the agent,
its config, the CA that signed the DML server's certificate and a new token (0600, the
only copy outside the CMS's hash), and starts the daemon: `ferry-agent.service` where the
host runs systemd, else a supervised loop (`supervise.sh`); both check the agent file's
sha256 before every start and restart it when it ends (orchestrator/pulldaemon.py decides
which from facts probed on the host). Lab hosts run the loop; `ferry lab down` ends it
with every other process of the hosts' namespaces.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from orchestrator import pulldaemon, pullstate
from orchestrator.errors import FerryError
from orchestrator.inventory import Host, SSHSettings

AGENT_FILE = Path(__file__).parent / "agent" / "ferry_agent.py"
PULL_DIR = ".ferry/pull"

SUPERVISOR = """#!/bin/sh
# Ferry's pull agent, supervised (no systemd here): the agent file runs only while its
# sha256 is the one Ferry installed; when the agent ends it starts again.
d="$1"; root="$2"; want="$3"
while :; do
  got=$(sha256sum "$d/ferry_agent.py" | cut -d' ' -f1)
  if [ "$got" != "$want" ]; then
    echo "agent file $d/ferry_agent.py was modified (sha256 $got): not run"
    sleep 30
    continue
  fi
  python3 "$d/ferry_agent.py" pull --root "$root" &
  echo $! > "$d/agent.pid"
  wait $!
  sleep 1
done
"""

# before the new files are written: the old daemon ends (its supervisor's process group,
# or the unit an install on this root started)
HALT = r"""d="$FERRY_ROOT/.ferry/pull"
unit="$FERRY_UNIT_DIR/$FERRY_UNIT_NAME"
if [ -s "$d/daemon.pid" ]; then kill -TERM -- "-$(cat "$d/daemon.pid")" 2>/dev/null || true; fi
rm -f "$d/daemon.pid"
if [ -f "$unit" ] && grep -q -- "--root $FERRY_ROOT\$" "$unit" && command -v systemctl >/dev/null
then
  systemctl stop "$FERRY_UNIT_NAME" >/dev/null 2>&1 || true
fi
echo halted
"""

# after them (agent, supervise.sh, config.json, token, ca.pem: the agent's pull_files op
# wrote them from the session's own stream): the daemon starts
INSTALL = r"""set -e
d="$FERRY_ROOT/.ferry/pull"
unit="$FERRY_UNIT_DIR/$FERRY_UNIT_NAME"
if [ "$FERRY_SUPERVISE" = systemd ]; then
  (umask 022; printf %s "$FERRY_UNIT" > "$unit.tmp" && mv "$unit.tmp" "$unit")
  systemctl daemon-reload
  systemctl enable "$FERRY_UNIT_NAME" >/dev/null 2>&1
  systemctl restart "$FERRY_UNIT_NAME"
  echo "started $FERRY_UNIT_NAME"
  exit 0
fi
setsid sh "$d/supervise.sh" "$d" "$FERRY_ROOT" "$FERRY_AGENT_SHA" \
  >> "$d/agent.log" 2>&1 < /dev/null &
echo $! > "$d/daemon.pid"
echo "started $(cat "$d/daemon.pid")"
"""

STOP = r"""d="$FERRY_ROOT/.ferry/pull"
unit="$FERRY_UNIT_DIR/$FERRY_UNIT_NAME"
if [ -s "$d/daemon.pid" ]; then kill -TERM -- "-$(cat "$d/daemon.pid")" 2>/dev/null || true; fi
if [ -f "$unit" ] && grep -q -- "--root $FERRY_ROOT\$" "$unit" && command -v systemctl >/dev/null
then
  systemctl disable --now "$FERRY_UNIT_NAME" >/dev/null 2>&1 || true
  rm -f "$unit"
  systemctl daemon-reload || true
fi
rm -f "$d/daemon.pid" "$d/token"
echo stopped
"""

Progress = Callable[[str], None]
_UNIT_ENV = {"FERRY_UNIT_DIR": pulldaemon.UNIT_DIR, "FERRY_UNIT_NAME": pulldaemon.UNIT_NAME}


def agent_source() -> bytes:
    return AGENT_FILE.read_bytes()


def pull_files(
    source: bytes, config: dict[str, Any], token: str, ca_pem: str
) -> tuple[list[list[Any]], bytes]:
    """The daemon's files as the agent's pull_files op takes them: ([name, mode, size]
    each, their bytes in that order). Only the token is secret (0600); the directory is
    0700 in any case."""
    files = [
        ("ferry_agent.py", 0o600, source),
        ("supervise.sh", 0o600, SUPERVISOR.encode()),
        ("config.json", 0o600, json.dumps(config).encode()),
        ("token", 0o600, token.encode()),
        ("ca.pem", 0o600, ca_pem.encode()),
    ]
    return [[name, mode, len(data)] for name, mode, data in files], b"".join(
        data for _, _, data in files
    )


def install(
    url: str,
    hosts: list[Host],
    ssh: SSHSettings,
    roots: dict[str, str],
    *,
    pull: dict[str, Any],
    key_hex: str,
    rotations: list[dict[str, str]],
    ca_pem: str,
    progress: Progress,
    concurrency: int = 10,
) -> list[dict[str, Any]]:
    """Install and start the agent on every host; one result per host (error as data)."""
    from orchestrator.hostops import HostOps

    source = agent_source()
    sha = hashlib.sha256(source).hexdigest()
    insecure = str(pull["server"]).startswith("http://")

    def one(h: Host) -> dict[str, Any]:
        root = roots[h.name]
        try:
            ops = HostOps.open(h, ssh, root, timeout=60, connect_timeout=ssh.connect_timeout)
        except FerryError as exc:  # printed after the host's name
            return {"host": h.name, "installed": False, "error": exc.reason}
        try:
            probed = ops.run("install", pulldaemon.PROBE, {}, None, lock=False)
            facts = pulldaemon.HostFacts.parse(str(probed.get("output", "")))
            supervisor, why = pulldaemon.choose_supervisor(facts)
            unit = (
                pulldaemon.unit_text(root, sha, facts.python3 or "/usr/bin/python3")
                if supervisor == "systemd"
                else ""
            )
            ops.call("install", "pin", key=key_hex, rotations=rotations)
            token = pullstate.issue_token(url, h.name)
            config = {
                "server": pull["server"],
                "host": h.name,
                "poll": pull.get("poll", 30),
                "heartbeat": pull.get("heartbeat", 10),
                "insecure_http": insecure,
            }
            base = {"FERRY_ROOT": root, **_UNIT_ENV}
            ops.run("install", HALT, base, None, lock=False)  # ends the holder
            names, data = pull_files(source, config, token, "" if insecure else ca_pem)
            ops.call("install", "pull_files", files=names, payload=data)
            env = {
                **base,
                "FERRY_AGENT_SHA": sha,
                "FERRY_SUPERVISE": supervisor,
                "FERRY_UNIT": unit,
            }
            res = ops.run("install", INSTALL, env, None)
            if res["rc"] != 0:
                return {
                    "host": h.name,
                    "installed": False,
                    "error": f"install failed: {res['output'][-500:]}",
                }
            progress(f"  {h.name}: agent started by {supervisor} (pull from {pull['server']})")
            return {
                "host": h.name, "installed": True, "agent_sha256": sha, "root": root,
                "supervisor": supervisor, "supervisor_why": why,
            }  # fmt: skip
        except FerryError as exc:
            return {"host": h.name, "installed": False, "error": exc.reason}
        finally:
            ops.close()

    with ThreadPoolExecutor(max_workers=max(1, min(concurrency, len(hosts)))) as pool:
        return list(pool.map(one, hosts))


def stop(host: Host, ssh: SSHSettings, root: str) -> dict[str, Any]:
    """End the host's daemon and remove its token file (revoke does the CMS side)."""
    from orchestrator.hostops import HostOps

    ops = HostOps.open(host, ssh, root, timeout=30, connect_timeout=ssh.connect_timeout)
    try:
        res = ops.run("install", STOP, {"FERRY_ROOT": root, **_UNIT_ENV}, None, lock=False)
        return {"host": host.name, "stopped": res["rc"] == 0}
    finally:
        ops.close()
