"""`make demo`: Ferry's main job, end to end, on embedded defaults, told step by step.

A lab fleet of real sshd hosts, a release built into the DML, an RFC raised and approved,
a phased push, then a next release whose milestone fails and is backed out automatically.
Everything lives in `.ferry/demo/` (made afresh each run) and the fleet is taken down at the
end (`--keep` leaves it up to explore: `ssh -F .ferry/demo/lab/ssh_config h1`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HOME = ROOT / ".ferry" / "demo"
LAB = HOME / "lab"
FERRY = str(Path(sys.executable).with_name("ferry"))
HOSTS = 8


def say(text: str) -> None:
    print("\n\033[1m== " + text + "\033[0m", flush=True)


def ferry(*args: str, user: str = "alice", ok: tuple[int, ...] = (0,)) -> dict:
    env = {**os.environ, "FERRY_HOME": str(HOME), "FERRY_USER": user,
           "FERRY_INVENTORY": str(LAB / "inventory.yaml")}  # fmt: skip
    print("$ " + ("FERRY_USER=bob " if user != "alice" else "") + "ferry " + " ".join(args))
    proc = subprocess.run([FERRY, *args, "-o", "json"], cwd=ROOT, env=env, stdout=subprocess.PIPE)
    if proc.returncode not in ok:
        raise SystemExit(f"demo stopped: ferry {args[0]} exited {proc.returncode}")
    return json.loads(proc.stdout or b"{}")


def main() -> None:
    keep = "--keep" in sys.argv
    if (LAB / "fleet.json").exists():
        subprocess.run([FERRY, "lab", "down", "--dir", str(LAB)], cwd=ROOT, check=False)
    shutil.rmtree(HOME, ignore_errors=True)
    HOME.mkdir(parents=True)
    try:
        run_demo()
    finally:
        if not keep:
            say("Taking the lab fleet down, stopping the demo's warm Prefect server")
            subprocess.run([FERRY, "lab", "down", "--dir", str(LAB)], cwd=ROOT, check=False)
            from orchestrator.prefect_server import stop_server

            stop_server(HOME / "prefect")


def run_demo() -> None:
    say(f"1. A lab fleet: {HOSTS} real OpenSSH hosts, each in its own network namespace")
    lab = ferry("lab", "up", str(HOSTS), "--dir", str(LAB))
    print(f"   hosts {', '.join(lab['hosts'])}; strict host keys in {LAB / 'known_hosts'}")

    say("2. Build shop 1.4.0 into the DML (deterministic, checksummed, signed)")
    built = ferry("release", "build", "deploy_plans/releases/shop/release.yaml")
    print(f"   {built['release']} = {built['digest']} ({built['files']} files), registered")

    say("3. Raise an RFC (normal change) as alice; bob, a peer, approves it")
    rfc = ferry("rfc", "new", "--release", "shop@1.4.0", "--env", "dev", "--model", "normal",
                "--risk", "low", "--reason", "demo on a lab fleet",
                "--backout-plan", "automatic: prior baseline per host")  # fmt: skip
    ferry("rfc", "submit", str(rfc["id"]))
    approved = ferry("rfc", "approve", str(rfc["id"]), "--comment", "looks good", user="bob")
    print(f"   RFC-{rfc['id']} is {approved['status']}")

    say("4. The rollout Ferry will run (dry run: touches nothing)")
    plan = ferry("deploy", "deploy_plans/shop.yaml", "--release", "shop@1.4.0", "--dry-run")
    for i, wave in enumerate(plan["waves"], start=1):
        print(f"   wave {i}: {', '.join(wave)}")

    say("5. Phased push of shop 1.4.0: canary, a quarter, then all, a milestone after each")
    out = ferry("deploy", "deploy_plans/shop.yaml", "--release", "shop@1.4.0",
                "--rfc", str(rfc["id"]))  # fmt: skip
    print(f"   deployment {out['id']}: {out['status']}, {out['bytes_sent']} bytes sent")

    say("6. shop 1.5.0 has a bug its self-test catches; Ferry will back it out by itself")
    src = HOME / "shop-1.5.0"
    shutil.copytree(ROOT / "deploy_plans/releases/shop", src)
    init = src / "app/shop/__init__.py"
    init.write_text(init.read_text().replace('"1.4.0"', '"1.5.0"'))
    server = src / "app/shop/server.py"
    server.write_text(server.read_text().replace('{"ok": True,', '{"ok": VERSION != "1.5.0",'))
    ferry("release", "build", str(src / "release.yaml"), "--version", "1.5.0")
    rfc2 = ferry("rfc", "new", "--release", "shop@1.5.0", "--env", "dev", "--model", "normal",
                 "--risk", "low", "--reason", "demo")  # fmt: skip
    ferry("rfc", "submit", str(rfc2["id"]))
    ferry("rfc", "approve", str(rfc2["id"]), user="bob")
    bad = ferry("deploy", "deploy_plans/shop.yaml", "--release", "shop@1.5.0",
                "--rfc", str(rfc2["id"]), ok=(4,))  # fmt: skip
    failed = bad["milestones"][-1]
    print(f"   deployment {bad['id']}: {bad['status']} (exit 4, as documented)")
    print(f"   milestone {failed['wave']} failed: {failed['reason']}")
    back = {h: v["release"] for h, v in bad["hosts"].items()}
    print(f"   every host's release now: {sorted(set(back.values()))}")

    say("7. What the CMS says now")
    show = ferry("rfc", "show", str(rfc2["id"]))
    print(f"   RFC-{rfc2['id']} is {show['status']}, {len(show['history'])} events in its history")
    audit = ferry("cms", "verify-audit")
    print(f"   audit log: {audit['events']} events, chain intact: {audit['ok']}")
    print(
        textwrap.dedent(f"""
        Done. Explore: FERRY_HOME={HOME} .venv/bin/ferry status
                       FERRY_HOME={HOME} .venv/bin/ferry rfc list""")
    )


if __name__ == "__main__":
    main()
