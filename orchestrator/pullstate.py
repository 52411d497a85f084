"""The pull method's records in the CMS (Act): agents and their tokens, desired state, reports.

One source of truth: the orchestrator writes a host's desired release here, `ferry dml
serve` reads it for the host's agent and writes what the agent reports back here, and the
wave driver (orchestrator.pull) reads the reports. Nothing of it lives only in a process.

Tokens: one per host, issued at agent install, `<host>.<secret>`; the CMS keeps only a salt
and the scrypt hash of the secret, so a copy of the CMS lets nobody act as a host. A token
answers only for its own host; a revoked one never again.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, select, update

from orchestrator.cms.db import session_scope
from orchestrator.cms.models import PullAgent, PullDesired, PullReport, utcnow
from orchestrator.errors import NotFound

# A token's secret is 256 random bits, so the hash need not slow a guesser down; scrypt
# still keeps a stolen CMS from being a list of tokens, at ~2 ms a verification (the server
# verifies a token once, then remembers it), so 10,000 agents connecting cost seconds.
SCRYPT = {"n": 2**11, "r": 8, "p": 1, "dklen": 32}
PURPOSES = ("deploy", "backout")


def hash_secret(secret: str, salt: str, params: dict[str, int] | None = None) -> str:
    """`scrypt:N:r:p:<hex>`: the parameters travel with the hash, so they can change."""
    p = params or SCRYPT
    key = hashlib.scrypt(
        secret.encode(), salt=bytes.fromhex(salt), n=p["n"], r=p["r"], p=p["p"], dklen=32
    )
    return f"scrypt:{p['n']}:{p['r']}:{p['p']}:{key.hex()}"


def split_token(token: str) -> tuple[str, str] | None:
    host, sep, secret = token.strip().rpartition(".")
    return (host, secret) if sep and host and secret else None


def token_matches(token: str, host: str, salt: str, digest: str) -> bool:
    """Does `token` belong to `host`, whose stored salt and hash these are?"""
    parts = split_token(token)
    if parts is None or parts[0] != host:
        return False
    try:
        _, n, r, p, _hex = digest.split(":")
        params = {"n": int(n), "r": int(r), "p": int(p)}
    except ValueError:
        return False
    return hmac.compare_digest(hash_secret(parts[1], salt, params), digest)


def issue_token(url: str, host: str) -> str:
    """A new token for `host` (any earlier one stops working); returned once, never stored."""
    return issue_tokens(url, [host])[host]


def issue_tokens(url: str, hosts: list[str]) -> dict[str, str]:
    """New tokens for many hosts in one transaction (an install of a whole fleet)."""
    tokens: dict[str, str] = {}
    with session_scope(url) as s:
        for host in hosts:
            secret, salt = secrets.token_urlsafe(32), secrets.token_hex(16)
            row = s.get(PullAgent, host)
            if row is None:
                row = PullAgent(host=host, heartbeat={}, nudge=0)
                s.add(row)
            row.token_salt, row.token_hash = salt, hash_secret(secret, salt)
            row.issued_at, row.revoked_at = utcnow(), None
            tokens[host] = f"{host}.{secret}"
    return tokens


def revoke(url: str, host: str) -> None:
    with session_scope(url) as s:
        row = s.get(PullAgent, host)
        if row is None:
            raise NotFound(f"host {host} has no pull agent installed (`ferry agent install`)")
        row.revoked_at = utcnow()


def nudge(url: str, host: str) -> int:
    """Ask the host's agent to look at its desired state now (its long-poll answers)."""
    with session_scope(url) as s:
        row = s.get(PullAgent, host)
        if row is None or row.revoked_at is not None:
            raise NotFound(f"host {host} has no active pull agent (`ferry agent install`)")
        row.nudge += 1
        return row.nudge


@dataclass(frozen=True)
class AgentRow:
    host: str
    salt: str
    digest: str
    revoked: bool
    nudge: int


def _row(r: PullAgent) -> AgentRow:
    return AgentRow(r.host, r.token_salt, r.token_hash, r.revoked_at is not None, r.nudge)


def agents(url: str) -> dict[str, AgentRow]:
    with session_scope(url) as s:
        return {r.host: _row(r) for r in s.scalars(select(PullAgent))}


def agent(url: str, host: str) -> AgentRow | None:
    """One host's agent row: what the server reads for every request it authorizes."""
    with session_scope(url) as s:
        r = s.get(PullAgent, host)
        return None if r is None else _row(r)


def heartbeat(url: str, host: str, data: dict[str, Any]) -> None:
    heartbeats(url, {host: (utcnow(), data)})


def heartbeats(url: str, beats: dict[str, tuple[datetime, dict[str, Any]]]) -> None:
    """Many hosts' heartbeats (host → (when it arrived, what it said)) in one transaction:
    the server gathers a tick's worth, so 10,000 agents are not 10,000 transactions."""
    if not beats:
        return
    with session_scope(url) as s:
        known = set(s.scalars(select(PullAgent.host).where(PullAgent.host.in_(list(beats)))))
        rows = [
            {"host": h, "heartbeat_at": at, "heartbeat": data}
            for h, (at, data) in beats.items()
            if h in known
        ]
        if rows:
            s.execute(update(PullAgent), rows)  # ORM bulk UPDATE by primary key


def seen(url: str, hosts: list[str], at: datetime) -> None:
    """Stamp these hosts alive at `at` (their long-poll waits on an open connection),
    keeping what their last heartbeat said: one UPDATE per 500 hosts."""
    with session_scope(url) as s:
        for i in range(0, len(hosts), 500):
            s.execute(
                update(PullAgent)
                .where(PullAgent.host.in_(hosts[i : i + 500]))
                .values(heartbeat_at=at)
                .execution_options(synchronize_session=False)
            )


def agent_signature(url: str) -> tuple[Any, ...]:
    """Changes whenever any agent is installed, re-issued, revoked or nudged (nudges only
    grow; issue and revoke stamp times), so the server re-reads the agents only then."""
    with session_scope(url) as s:
        return tuple(
            s.execute(
                select(
                    func.count(), func.coalesce(func.sum(PullAgent.nudge), 0),
                    func.max(PullAgent.issued_at), func.max(PullAgent.revoked_at),
                    func.count(PullAgent.revoked_at),
                )
            ).one()
        )  # fmt: skip


def agent_rows(url: str) -> dict[str, AgentRow]:
    """Every agent's token hash, revocation and nudge (no heartbeat: the columns only)."""
    cols = (PullAgent.host, PullAgent.token_salt, PullAgent.token_hash, PullAgent.revoked_at,
            PullAgent.nudge)  # fmt: skip
    with session_scope(url) as s:
        return {
            h: AgentRow(h, salt, digest, revoked is not None, nudge)
            for h, salt, digest, revoked, nudge in s.execute(select(*cols))
        }


# -- desired state ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Desired:
    host: str
    generation: int
    environment: str
    deployment_id: int | None
    purpose: str
    release: str | None
    digest: str | None
    release_id: str | None
    apply: str
    spec: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "generation": self.generation,
            "environment": self.environment,
            "deployment": self.deployment_id,
            "purpose": self.purpose,
            "release": self.release,
            "digest": self.digest,
            "release_id": self.release_id,
            "apply": self.apply,
            "spec": self.spec,
        }


def _desired(r: PullDesired) -> Desired:
    return Desired(
        r.host, r.generation, r.environment, r.deployment_id, r.purpose, r.release, r.digest,
        r.release_id, r.apply, dict(r.spec or {}),
    )  # fmt: skip


def set_desired(url: str, environment: str, rows: list[dict[str, Any]]) -> dict[str, int]:
    """Point each host at a release (or at none); every host gets a new generation."""
    out: dict[str, int] = {}
    with session_scope(url) as s:
        top = s.scalar(select(func.max(PullDesired.generation))) or 0
        for i, d in enumerate(rows, start=1):
            if d["purpose"] not in PURPOSES:
                raise ValueError(f"desired state purpose {d['purpose']!r}")
            row = s.get(PullDesired, d["host"])
            if row is None:
                row = PullDesired(host=d["host"])
                s.add(row)
            row.generation = top + i
            row.environment = environment
            row.deployment_id = d.get("deployment_id")
            row.purpose = d["purpose"]
            row.release, row.digest = d.get("release"), d.get("digest")
            row.release_id = d.get("release_id")
            row.apply = d.get("apply") or "now"
            row.spec = d.get("spec") or {}
            row.set_at = utcnow()
            out[d["host"]] = top + i
    return out


def desired(url: str, host: str) -> Desired | None:
    with session_scope(url) as s:
        row = s.get(PullDesired, host)
        return None if row is None else _desired(row)


def desired_all(url: str, hosts: list[str] | None = None) -> dict[str, Desired]:
    with session_scope(url) as s:
        q = select(PullDesired)
        if hosts is not None:
            q = q.where(PullDesired.host.in_(hosts))
        return {r.host: _desired(r) for r in s.scalars(q)}


def desired_since(url: str, generation: int) -> list[Desired]:
    """Desired states set after `generation` (generations only grow across all hosts): what
    changed since the server last looked, read in one query however many hosts wait."""
    with session_scope(url) as s:
        q = select(PullDesired).where(PullDesired.generation > generation)
        return [_desired(r) for r in s.scalars(q.order_by(PullDesired.generation))]


def generations(url: str) -> dict[str, int]:
    """host → generation of its desired state: the server's cheap change detector."""
    with session_scope(url) as s:
        return dict(s.execute(select(PullDesired.host, PullDesired.generation)).all())


# -- reports ---------------------------------------------------------------------------------
def add_report(url: str, host: str, report: dict[str, Any]) -> None:
    with session_scope(url) as s:
        s.add(
            PullReport(
                host=host,
                generation=int(report["generation"]),
                deployment_id=report.get("deployment"),
                release_id=report.get("release_id"),
                step=str(report["step"])[:40],
                ok=bool(report["ok"]),
                detail=dict(report.get("detail") or {}),
                at=utcnow(),
            )
        )


@dataclass(frozen=True)
class Report:
    id: int
    host: str
    generation: int
    release_id: str | None
    step: str
    ok: bool
    detail: dict[str, Any]
    at: datetime


def reports(url: str, hosts: list[str], after_id: int = 0) -> list[Report]:
    with session_scope(url) as s:
        q = (
            select(PullReport)
            .where(PullReport.host.in_(hosts), PullReport.id > after_id)
            .order_by(PullReport.id)
        )
        return [
            Report(r.id, r.host, r.generation, r.release_id, r.step, r.ok, dict(r.detail), r.at)
            for r in s.scalars(q)
        ]


def status(url: str, hosts: list[str] | None = None) -> list[dict[str, Any]]:
    """Per host: last heartbeat, what it runs, what it should run, its last report."""
    now = utcnow()
    with session_scope(url) as s:
        rows = {r.host: r for r in s.scalars(select(PullAgent))}
        wanted = {r.host: r for r in s.scalars(select(PullDesired))}
        names = sorted(set(rows) | set(wanted)) if hosts is None else hosts
        out = []
        for name in names:
            agent, want = rows.get(name), wanted.get(name)
            last = s.scalars(
                select(PullReport).where(PullReport.host == name).order_by(PullReport.id.desc())
            ).first()
            beat = agent.heartbeat_at if agent else None
            out.append(
                {
                    "host": name,
                    "installed": agent is not None,
                    "revoked": bool(agent and agent.revoked_at),
                    "last_heartbeat": beat.isoformat() if beat else None,
                    "heartbeat_age_s": round((now - beat).total_seconds(), 1) if beat else None,
                    "running": (agent.heartbeat or {}).get("current") if agent else None,
                    "pending": (agent.heartbeat or {}).get("pending") if agent else None,
                    "desired": want.release_id if want else None,
                    "desired_generation": want.generation if want else None,
                    "last_report": None
                    if last is None
                    else {
                        "step": last.step,
                        "ok": last.ok,
                        "generation": last.generation,
                        "release_id": last.release_id,
                        "at": last.at.isoformat(),
                    },
                }
            )
        return out


def forget(url: str, host: str) -> None:
    """Remove a host's desired state (its agent then keeps what it runs)."""
    with session_scope(url) as s:
        s.execute(delete(PullDesired).where(PullDesired.host == host))


def pending(url: str, environment: str | None = None) -> list[dict[str, Any]]:
    """Hosts whose agent holds a desired release until its own time (apply: boot/window):
    the last report for their current desired generation says `pending`."""
    out = []
    with session_scope(url) as s:
        q = select(PullDesired).where(PullDesired.purpose == "deploy")
        if environment is not None:
            q = q.where(PullDesired.environment == environment)
        for d in s.scalars(q):
            last = s.scalars(
                select(PullReport)
                .where(PullReport.host == d.host, PullReport.generation == d.generation)
                .order_by(PullReport.id.desc())
            ).first()
            if last is not None and last.step == "pending":
                out.append(
                    {"host": d.host, "release_id": d.release_id, "apply": d.apply,
                     "deployment": d.deployment_id, "environment": d.environment}
                )  # fmt: skip
    return sorted(out, key=lambda p: p["host"])
