"""The planner (pure): plan + inventory hosts + CMS baselines → a Rollout.

The dry run prints this very object and the executor runs this very object, so what the
dry run shows is what happens. No I/O here (a test enforces the imports): the caller
reads the config templates and passes their text.

Every hook, config template and check is rendered here for every host, forward (the new
release) and backout (each host's own prior), so a typo is a PlanError (exit 2) before
anything is recorded or touched. The steps come from `orchestrator.steps`:

    stage → verify → snapshot → install → activate → check       (forward)
    revert → reactivate → restore → recheck                      (backout)

`snapshot`/`restore` appear only when the plan has those hooks, `install` when it has an
install hook or config templates, `check` when it has a check hook.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import replace
from fractions import Fraction
from typing import Any

from orchestrator import steps as step_table
from orchestrator.context import Renderer, host_context, scalars
from orchestrator.errors import PlanError
from orchestrator.inventory import Host, SSHSettings, is_address
from orchestrator.plan import ApprovedWave, Check, DeployPlan, is_http_url, wave_entry
from orchestrator.pullwindow import host_window
from orchestrator.rollout import (
    Baseline,
    HostAction,
    RenderedCheck,
    Rollout,
    StepCommand,
    WavePlan,
    release_id,
)

__all__ = ["Baseline", "HostAction", "Rollout", "WavePlan", "plan_rollout", "release_id"]
_PERCENT = re.compile(r"^(\d+(?:\.\d+)?)%$")


def forward_steps(plan: DeployPlan) -> tuple[str, ...]:
    hooks = plan.hooks
    return tuple(
        s.name
        for s in step_table.FORWARD
        if step_table.wanted(s, lambda h: getattr(hooks, h) is not None, bool(plan.config))
    )


def split_waves(
    plan: DeployPlan, names: Sequence[str], groups: Mapping[str, Sequence[str]]
) -> tuple[list[list[str]], list[str]]:
    """Target names → waves (cumulative entries); empty waves are dropped with a note."""
    waves, notes, _ = _split(plan, names, groups)
    return waves, notes


def _split(
    plan: DeployPlan, names: Sequence[str], groups: Mapping[str, Sequence[str]]
) -> tuple[list[list[str]], list[str], list[float | None]]:
    """split_waves, with each wave's manual-milestone timeout (None: no approval)."""
    n = len(names)
    waves: list[list[str]] = []
    approvals: list[float | None] = []
    notes: list[str] = []
    done: set[str] = set()
    if plan.pilot is not None:
        waves.append(pilot_wave(plan.pilot, names, groups))
        approvals.append(None)
        done.update(waves[0])
    if plan.strategy == "big-bang":
        rest = [h for h in names if h not in done]
        return [*waves, rest], notes, [*approvals, None]
    for step in plan.waves or ():
        entry = wave_entry(step)
        remaining = [h for h in names if h not in done]
        if isinstance(entry, int):
            wave = remaining[: max(0, min(entry, n) - len(done))]
        elif m := _PERCENT.match(entry):
            # exact arithmetic: 64.4% of 250 hosts is 161 hosts, not float's 161.00000000000003
            target = math.ceil(Fraction(m.group(1)) * n / 100)
            wave = remaining[: max(0, target - len(done))]
        elif entry in groups:
            members = set(groups[entry])
            wave = [h for h in remaining if h in members]
        else:
            raise PlanError(
                f"waves: {entry!r} is neither a host count, a percentage nor a group of the "
                f"inventory (groups: {', '.join(sorted(groups))})"
            )
        if not wave:
            notes.append(f"wave entry {entry!r} adds no host ({len(done)} of {n} already)")
            continue
        waves.append(wave)
        approvals.append(step.timeout if isinstance(step, ApprovedWave) and step.approve else None)
        done.update(wave)
    left = [h for h in names if h not in done]
    if left:
        raise PlanError(
            f"waves {[wave_entry(w) for w in plan.waves or []]} reach {len(done)} of {n} "
            "targets; the last wave must reach all of them (end with 100%), else "
            f"{', '.join(left[:5])} never deploy"
        )
    return waves, notes, approvals


def pilot_wave(pilot: str, names: Sequence[str], groups: Mapping[str, Sequence[str]]) -> list[str]:
    """The pilot group's targets: wave 1, whose milestone and acceptance tests are the
    evidence a promotion rule `after: [pilot]` asks for before the other waves."""
    if pilot not in groups:
        raise PlanError(
            f"pilot: {pilot!r} is not a group of the inventory "
            f"(groups: {', '.join(sorted(groups))})"
        )
    members = set(groups[pilot])
    wave = [h for h in names if h in members]
    if not wave:
        raise PlanError(f"pilot: group {pilot!r} has no host among the targets; pick another")
    if len(wave) == len(names):
        raise PlanError(
            f"pilot: group {pilot!r} holds every target; a pilot is a part of them "
            "(target more hosts, or remove pilot)"
        )
    return wave


def plan_rollout(
    plan: DeployPlan,
    hosts: Sequence[Host],
    groups: Mapping[str, Sequence[str]],
    baselines: Mapping[str, Baseline],
    release: str,
    digest: str,
    *,
    ssh: SSHSettings | None = None,
    templates: Mapping[str, str] | None = None,
    plan_file: str = "plan",
    plan_hash: str = "",
) -> Rollout:
    """Decide the whole rollout before touching anything; `templates`: dest → text."""
    if not hosts:
        raise PlanError(f"{plan_file}: targets select no host")
    by_name = {h.name: h for h in hosts}
    try:
        waves, notes, approvals = _split(plan, [h.name for h in hosts], groups)
    except PlanError as exc:  # the plan's waves or pilot: say which file
        raise PlanError(f"{plan_file}: {exc.message}") from None
    steps = forward_steps(plan)
    rid = release_id(release, digest)
    render = _HostRenderer(plan, templates or {}, plan_file, release, rid)
    wave_plans = []
    for i, wave in enumerate(waves, start=1):
        actions = tuple(
            render.host(
                by_name[name],
                (plan.deploy_root or by_name[name].deploy_root).rstrip("/") or "/",
                steps,
                baselines.get(name),
            )
            for name in wave
        )
        wave_plans.append(WavePlan(i, actions, approve=approvals[i - 1]))
    same = [h for h in hosts if (b := baselines.get(h.name)) and b.digest == digest]
    if same:
        notes.append(f"{len(same)} host(s) already run this package: nothing to transfer there")
    return Rollout(
        release=release,
        digest=digest,
        release_id=rid,
        environment=plan.environment,
        strategy=plan.strategy,
        method=plan.method,
        concurrency=plan.concurrency,
        shard_size=plan.shard_size,
        waves=tuple(wave_plans),
        notes=tuple(notes),
        ssh=ssh,
        milestone=plan.milestone,
        timeouts=plan.timeouts,
        retention=plan.retention,
        readback=plan.readback,
        plan_file=plan_file,
        plan_hash=plan_hash,
        pilot=plan.pilot,
        pull=plan.pull.model_dump(mode="json") if plan.pull else None,
    )


def rerender_backout(
    plan: DeployPlan,
    rollout: Rollout,
    *,
    templates: Mapping[str, str],
    plan_file: str,
    plan_hash: str,
) -> Rollout:
    """The recorded rollout with every host's backout commands rendered from `plan`
    (an on-call person's explicit `--plan FILE`); hosts, priors and steps stay recorded."""
    render = _HostRenderer(plan, templates, plan_file, rollout.release, rollout.release_id)
    waves = []
    for w in rollout.waves:
        hosts = []
        for a in w.hosts:
            fresh = render.host(a.as_host(), a.deploy_root, a.steps, a.prior)
            hosts.append(replace(a, backout=fresh.backout, backout_context=fresh.backout_context))
        waves.append(WavePlan(w.index, tuple(hosts)))
    return replace(rollout, waves=tuple(waves), plan_file=plan_file, plan_hash=plan_hash)


class _HostRenderer:
    """Renders one plan's hooks, templates and checks for each host (compiled once)."""

    def __init__(
        self,
        plan: DeployPlan,
        templates: Mapping[str, str],
        plan_file: str,
        release: str,
        rid: str,
    ) -> None:
        self.plan, self.templates = plan, templates
        self.r = Renderer(plan_file)
        self.release, self.rid = release, rid

    def context(self, host: Host, root: str, release: str, rid: str | None) -> dict[str, Any]:
        return host_context(
            plan_vars=dict(self.plan.vars),
            host=host.name,
            address=host.address,
            environment=self.plan.environment,
            release=release,
            release_id=rid,
            deploy_root=root,
        )

    def template(self, dest: str) -> str:
        if dest not in self.templates:
            raise PlanError(f"{self.r.where}: config {dest}: the template's text was not read")
        return self.templates[dest]

    def hook(self, name: str, ctx: dict[str, Any], host: str) -> str | None:
        template = getattr(self.plan.hooks, name)
        return None if template is None else self.r.render(template, ctx, f"hooks.{name}", host)

    def checks(self, ctx: dict[str, Any], host: str) -> tuple[RenderedCheck, ...]:
        return tuple(
            self.check(c, ctx, f"milestone.checks[{i}]", host)
            for i, c in enumerate(self.plan.milestone.checks)
        )

    def acceptance(self, ctx: dict[str, Any], host: str) -> tuple[RenderedCheck, ...]:
        return tuple(
            replace(self.check(t, ctx, f"acceptance[{i}]", host), type=t.type)
            for i, t in enumerate(self.plan.acceptance)
        )

    def check(self, c: Check, ctx: dict[str, Any], field: str, host: str) -> RenderedCheck:
        if c.command is not None:
            return RenderedCheck(
                c.label, "command", self.r.render(c.command, ctx, field, host), None,
                c.status, c.timeout,
            )  # fmt: skip
        if c.http is not None:
            url = self.r.render(c.http, ctx, field, host)
            if not is_http_url(url):
                raise PlanError(
                    f"{self.r.where}: {field}.http: {url!r} (host {host}) is not an http(s) "
                    "URL; give one like http://127.0.0.1:8080/health"
                )
            return RenderedCheck(c.label, "http", url, None, c.status, c.timeout)
        address = self.r.render(c.address, ctx, field, host)
        if not is_address(address):
            raise PlanError(
                f"{self.r.where}: {field}.address: {address!r} (host {host}) is not a host "
                "name or an IP address; the default 127.0.0.1 is the host itself"
            )
        return RenderedCheck(c.label, "tcp", address, c.tcp, c.status, c.timeout)

    def host(
        self, host: Host, root: str, steps: tuple[str, ...], prior: Baseline | None
    ) -> HostAction:
        name = host.name
        ctx = self.context(host, root, self.release, self.rid)
        forward: dict[str, StepCommand] = {}
        for step in steps:
            spec = step_table.STEPS[step]
            config: tuple[tuple[str, str], ...] = ()
            if spec.config:
                config = tuple(
                    (t.dest, self.r.render(self.template(t.dest), ctx, f"config {t.dest}", name))
                    for t in self.plan.config
                )
            command = self.hook(spec.hook, ctx, name) if spec.hook else None
            if step == "snapshot" and command is not None:
                command = f"mkdir -p {ctx['snapshot_dir']} && {command}"
            forward[step] = StepCommand(command, config)
        # backout: each host returns to ITS prior, so its commands see the prior release
        prior_rid = prior.release_id if prior else None
        bctx = self.context(host, root, prior.release if prior else self.release, prior_rid)
        backout: dict[str, StepCommand] = {}
        for spec in step_table.BACKOUT:
            if spec.needs_prior and prior is None:
                continue
            if spec.name == "restore" and self.plan.hooks.restore is None:
                continue  # nothing was snapshotted, nothing to put back
            command = self.hook(spec.hook, bctx, name) if spec.hook else None
            checks = self.checks(bctx, name) if spec.name == "recheck" else ()
            backout[spec.name] = StepCommand(command, (), checks)
        return HostAction(
            host=name,
            address=host.address,
            port=host.port,
            deploy_root=root,
            steps=steps,
            prior=prior,
            forward=forward,
            backout=backout,
            checks=self.checks(ctx, name),
            acceptance=self.acceptance(ctx, name),
            context=scalars(ctx),
            backout_context=scalars(bctx),
            window=host_window(self.plan, host),
        )
