"""The Rollout (Model): waves × hosts × rendered steps, and its round trip through the CMS.

The planner makes it, the dry run prints it, the deployment record stores it
(`to_record`), and the engine, a manual backout and `recover` run what the record holds
(`from_record`): hosts with address, port and deploy root, how to reach them (user,
identity file, known_hosts), every host's rendered commands forward and backout, its
prior baseline with digest, and the plan's hash. Nothing there needs the plan file or
the inventory again, so a backout dials the very hosts the deploy did and runs the very
hooks, even after the plan was edited.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal

from dml.ref import ReleaseRef
from orchestrator.context import PLACEHOLDER
from orchestrator.errors import BadInput
from orchestrator.inventory import Host, SSHSettings
from orchestrator.plan import Milestone, Timeouts

RECORD_FORMAT = 2
SECRET_WORDS = ("password", "passwd", "secret", "token", "api_key", "apikey", "private_key")


def release_id(release: str, digest: str) -> str:
    """The directory name of a release on a host: name-version-<12 hex of the digest>."""
    ref = ReleaseRef.parse(release)
    return f"{ref.name}-{ref.version}-{digest.removeprefix('sha256:')[:12]}"


@dataclass(frozen=True)
class Baseline:
    """What the CMS records a host (or environment) as running."""

    release: str
    digest: str

    @property
    def release_id(self) -> str:
        return release_id(self.release, self.digest)

    def to_dict(self) -> dict[str, str]:
        return {"release": self.release, "digest": self.digest}


@dataclass(frozen=True)
class RenderedCheck:
    """One milestone check for one host, rendered: a command, an HTTP status or a port."""

    label: str
    kind: Literal["command", "http", "tcp"]
    target: str  # the command, the URL or the address
    port: int | None = None
    status: int = 200
    timeout: float = 10.0
    type: str | None = None  # an acceptance test's: functional, performance, …


@dataclass(frozen=True)
class StepCommand:
    """What one step runs on one host beyond the agent's own operation, rendered."""

    command: str | None = None  # the plan hook (None: the step runs no hook)
    config: tuple[tuple[str, str], ...] = ()  # (dest, rendered text) of config templates
    checks: tuple[RenderedCheck, ...] = ()  # recheck: the milestone checks of the prior


@dataclass(frozen=True)
class HostAction:
    host: str
    address: str
    port: int
    deploy_root: str
    steps: tuple[str, ...]
    prior: Baseline | None
    forward: dict[str, StepCommand] = field(default_factory=dict, hash=False)
    backout: dict[str, StepCommand] = field(default_factory=dict, hash=False)
    checks: tuple[RenderedCheck, ...] = ()  # the milestone checks of the new release
    acceptance: tuple[RenderedCheck, ...] = ()  # the plan's acceptance tests, rendered
    context: dict[str, str] = field(default_factory=dict, hash=False)  # forward hooks' env
    backout_context: dict[str, str] = field(default_factory=dict, hash=False)
    window: str | None = None  # pull `apply: window`: the host's own (orchestrator.pullwindow)

    def as_host(self) -> Host:
        return Host(
            name=self.host,
            address=self.address,
            port=self.port,
            groups=(),
            deploy_root=self.deploy_root,
        )


@dataclass(frozen=True)
class WavePlan:
    index: int
    hosts: tuple[HostAction, ...]
    approve: float | None = None  # a manual milestone after it: seconds to wait for a person

    @property
    def names(self) -> list[str]:
        return [h.host for h in self.hosts]


@dataclass(frozen=True)
class Rollout:
    release: str
    digest: str
    release_id: str
    environment: str
    strategy: str
    method: str
    concurrency: int
    waves: tuple[WavePlan, ...]
    notes: tuple[str, ...] = ()
    ssh: SSHSettings | None = None
    milestone: Milestone = Milestone()
    timeouts: Timeouts = Timeouts()
    retention: int = 3
    readback: str = "full"
    plan_file: str = ""
    plan_hash: str = ""
    shard_size: int | None = None  # on a Prefect work pool: hosts per shard flow run
    pilot: str | None = None  # the inventory group of wave 1, a pilot (evidence of its own)
    # image unit → its container's run spec, by image ID (orchestrator/containers.py)
    containers: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    # method pull: server, poll, apply, window (plan.Pull)
    pull: dict[str, Any] | None = field(default=None, hash=False, compare=False)

    def hosts(self) -> list[HostAction]:
        return [h for w in self.waves for h in w.hosts]

    def host(self, name: str) -> HostAction:
        for h in self.hosts():
            if h.host == name:
                return h
        raise KeyError(name)

    @cached_property
    def secrets(self) -> tuple[str, ...]:
        """Values of secret-looking plan vars (password, token, …): never printed."""
        found = {
            str(v) for h in self.hosts() for k, v in h.context.items() if looks_secret(k) and str(v)
        }
        found |= {
            str(v)
            for c in self.containers.values()
            for k, v in (c.get("env") or {}).items()
            if looks_secret(k) and str(v)
        }
        return tuple(sorted(found, key=len, reverse=True))

    @property
    def full_readback(self) -> bool:
        return self.readback == "full"

    # -- the record ------------------------------------------------------------------------
    def to_record(self) -> dict[str, Any]:
        """Plain JSON values: everything a run, a backout or a recover needs."""
        return {
            "format": RECORD_FORMAT,
            "release": self.release,
            "digest": self.digest,
            "release_id": self.release_id,
            "environment": self.environment,
            "strategy": self.strategy,
            "method": self.method,
            "concurrency": self.concurrency,
            "shard_size": self.shard_size,
            "plan_file": self.plan_file,
            "plan_hash": self.plan_hash,
            "ssh": self.ssh.model_dump(mode="json") if self.ssh else None,
            "milestone": self.milestone.model_dump(mode="json", exclude={"checks"}),
            "timeouts": self.timeouts.model_dump(mode="json"),
            "retention": self.retention,
            "readback": self.readback,
            "waves": [w.names for w in self.waves],
            "approve": {str(w.index): w.approve for w in self.waves if w.approve is not None},
            "hosts": {h.host: _host_record(h) for h in self.hosts()},
            "notes": list(self.notes),
            "pilot": self.pilot,
            **({"containers": self.containers} if self.containers else {}),
            **({"pull": self.pull} if self.pull else {}),
        }

    @classmethod
    def from_record(cls, data: dict[str, Any], *, where: str = "the record") -> Rollout:
        if data.get("format") != RECORD_FORMAT:
            raise BadInput(
                f"{where}: its rollout was recorded by an older Ferry (format "
                f"{data.get('format', 1)}); finish it with that version, or back the hosts "
                "out by deploying their prior release under a new RFC"
            )
        hosts = data["hosts"]
        approve = data.get("approve", {})
        waves = tuple(
            WavePlan(i, tuple(_host_from(name, hosts[name]) for name in names), approve.get(str(i)))
            for i, names in enumerate(data["waves"], start=1)
        )
        return cls(
            release=data["release"],
            digest=data["digest"],
            release_id=data["release_id"],
            environment=data["environment"],
            strategy=data["strategy"],
            method=data["method"],
            concurrency=int(data["concurrency"]),
            waves=waves,
            notes=tuple(data.get("notes", ())),
            ssh=SSHSettings.model_validate(data["ssh"]) if data.get("ssh") else None,
            milestone=Milestone.model_validate(data["milestone"]),
            timeouts=Timeouts.model_validate(data["timeouts"]),
            retention=int(data["retention"]),
            readback=data["readback"],
            plan_file=data.get("plan_file", ""),
            plan_hash=data.get("plan_hash", ""),
            shard_size=data.get("shard_size"),
            pilot=data.get("pilot"),
            containers=dict(data.get("containers") or {}),
            pull=data.get("pull"),
        )

    def bind(self, deployment_id: int) -> Rollout:
        """The same rollout with the deployment id in place of the placeholder."""
        text = json.dumps(self.to_record()).replace(PLACEHOLDER, str(int(deployment_id)))
        return Rollout.from_record(json.loads(text))

    # -- what people see -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The dry run's object: the record with secret-looking var values redacted."""
        return redact(self.to_record(), self.secrets)


def _check_record(c: RenderedCheck) -> dict[str, Any]:
    return {
        "label": c.label,
        "kind": c.kind,
        "target": c.target,
        "port": c.port,
        "status": c.status,
        "timeout": c.timeout,
        **({"type": c.type} if c.type else {}),
    }


def _check_from(d: dict[str, Any]) -> RenderedCheck:
    return RenderedCheck(
        d["label"], d["kind"], d["target"], d.get("port"), int(d["status"]), d["timeout"],
        d.get("type"),
    )  # fmt: skip


def _command_record(c: StepCommand) -> dict[str, Any]:
    out: dict[str, Any] = {"command": c.command}
    if c.config:
        out["config"] = dict(c.config)
    if c.checks:
        out["checks"] = [_check_record(x) for x in c.checks]
    return out


def _command_from(d: dict[str, Any]) -> StepCommand:
    return StepCommand(
        d.get("command"),
        tuple((d.get("config") or {}).items()),
        tuple(_check_from(x) for x in d.get("checks", ())),
    )


def _host_record(h: HostAction) -> dict[str, Any]:
    return {
        "address": h.address,
        "port": h.port,
        "deploy_root": h.deploy_root,
        "prior": h.prior.to_dict() if h.prior else None,
        "steps": list(h.steps),
        "forward": {k: _command_record(v) for k, v in h.forward.items()},
        "checks": [_check_record(c) for c in h.checks],
        **({"acceptance": [_check_record(c) for c in h.acceptance]} if h.acceptance else {}),
        "backout": {k: _command_record(v) for k, v in h.backout.items()},
        "context": dict(h.context),
        "backout_context": dict(h.backout_context),
        **({"window": h.window} if h.window else {}),
    }


def _host_from(name: str, d: dict[str, Any]) -> HostAction:
    prior = d.get("prior")
    return HostAction(
        host=name,
        address=d["address"],
        port=int(d["port"]),
        deploy_root=d["deploy_root"],
        steps=tuple(d["steps"]),
        prior=Baseline(prior["release"], prior["digest"]) if prior else None,
        forward={k: _command_from(v) for k, v in d.get("forward", {}).items()},
        backout={k: _command_from(v) for k, v in d.get("backout", {}).items()},
        checks=tuple(_check_from(c) for c in d.get("checks", ())),
        acceptance=tuple(_check_from(c) for c in d.get("acceptance", ())),
        context=dict(d.get("context", {})),
        backout_context=dict(d.get("backout_context", {})),
        window=d.get("window"),
    )


def looks_secret(name: str) -> bool:
    low = name.lower()
    return any(word in low for word in SECRET_WORDS)


def redact(value: Any, secrets: tuple[str, ...]) -> Any:
    """Every occurrence of a secret value in strings (keys and values) becomes ***."""
    if not secrets:
        return value
    if isinstance(value, str):
        for s in secrets:
            value = value.replace(s, "***")
        return value
    if isinstance(value, dict):
        return {redact(k, secrets): redact(v, secrets) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v, secrets) for v in value]
    return value
