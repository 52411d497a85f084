"""What remediation does to each host (pure): journal + prior + what the host says now.

The journal tells what a deployment may have done; the host's own `current` tells what is
true now. Together they decide, per host:

    unreachable   the host did not answer: nothing done, it needs remediation
    at-prior      `current` is its prior baseline and no data is left to restore: done
    data-only     `current` is its prior, but its data was touched and never restored:
                  restore (the plan's hook, from this deployment's snapshot) and recheck
    back-out      `current` is this deployment's release: revert → reactivate → restore
                  → recheck, as `orchestrator.backout.backout_actions` decides
    elsewhere     `current` is neither (a later deployment, or a hand): left alone, named

Running it again after it finished finds every host `at-prior`: remediation is idempotent.

A drift audit's findings stay a host's until something supersedes them (`drift_found`), and
each state says what on-call does next (`drift_next_step`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from orchestrator.backout import BackoutAction, backout_actions
from orchestrator.planner import Baseline

NEEDS_WORK = ("back-out", "data-only")


@dataclass(frozen=True)
class HostPlan:
    host: str
    prior: Baseline | None
    current: str | None
    verdict: str
    steps: tuple[str, ...] = ()
    note: str = ""

    @property
    def prior_id(self) -> str | None:
        return self.prior.release_id if self.prior else None

    def action(self) -> BackoutAction:
        return BackoutAction(self.host, self.prior, self.steps)


def plan_host(
    host: str,
    journal: Mapping[str, str],
    prior: Baseline | None,
    current: str | None | Exception,
    release_id: str,
    *,
    keep_data: bool = False,
) -> HostPlan:
    if isinstance(current, Exception):
        return HostPlan(host, prior, None, "unreachable", note=str(current))
    prior_id = prior.release_id if prior else None
    steps = backout_actions({host: journal}, {host: prior})[0].steps
    if keep_data:
        steps = tuple(s for s in steps if s != "restore")
    if current == prior_id:
        owed = "restore" in steps and journal.get("restore") != "succeeded"
        if owed:
            data = ("restore", "recheck") if prior is not None else ("restore",)
            return HostPlan(host, prior, current, "data-only", data)
        return HostPlan(host, prior, current, "at-prior")
    if current == release_id:
        if "revert" not in steps:  # on this release although the journal never saw a switch
            forced = {**journal, "activate": "succeeded"}
            steps = backout_actions({host: forced}, {host: prior})[0].steps
            if keep_data:
                steps = tuple(s for s in steps if s != "restore")
        return HostPlan(host, prior, current, "back-out", steps)
    shown = current or "no release"
    return HostPlan(
        host,
        prior,
        current,
        "elsewhere",
        note=f"runs {shown}, neither this deployment's release nor its prior "
        f"{prior_id or '(none)'}: left alone",
    )


def plan_hosts(
    journal: Mapping[str, Mapping[str, str]],
    priors: Mapping[str, Baseline | None],
    currents: Mapping[str, str | None | Exception],
    release_id: str,
    *,
    keep_data: bool = False,
) -> list[HostPlan]:
    return [
        plan_host(h, steps, priors.get(h), currents.get(h), release_id, keep_data=keep_data)
        for h, steps in journal.items()
    ]


@dataclass(frozen=True)
class BaselineOwner:
    """The deployment that last recorded a host's baseline (CMS `host_baselines`)."""

    id: int
    strategy: str  # "backout" for a manual backout
    status: str
    release: str
    backs_out: int | None = None  # a manual backout: the deployment it backed out


def supersession(
    deployment: int, owners: Mapping[str, BaselineOwner | None]
) -> dict[str, BaselineOwner]:
    """The hosts a manual backout of `deployment` must not touch, each with the later
    deployment that left it running its release since: one that succeeded, halted after
    some waves, or failed with some hosts its backout could not restore (whatever it is
    now, that host runs what the later one put there). Backing out `deployment` would put
    such a host under the later release to this one's prior: the later one is what to back
    out. A later backout (automatic: `backed-out`; by hand: strategy `backout`) left its
    hosts where this one put them. {} when the backout applies."""
    return {
        h: o
        for h, o in owners.items()
        if o is not None and o.id > deployment and o.strategy != "backout"
        and o.status != "backed-out"
    }  # fmt: skip


@dataclass(frozen=True)
class DriftAudit:
    """One `ferry remediate drift` as the audit log keeps it."""

    id: int
    at: datetime
    environment: str | None  # None: it audited every environment
    not_ok: Mapping[str, str]  # host → drifted | tampered | unreachable
    unlisted: frozenset[str] = frozenset()  # of those unreachable: not in its inventory


def drift_found(
    baselines: Mapping[str, tuple[str, datetime]], audits: Sequence[DriftAudit]
) -> dict[str, DriftAudit]:
    """The hosts (name → (environment, baseline recorded at)) whose newest drift audit
    (`audits`, newest first) found them not ok, each with that audit. A later audit that
    covered the host (its environment, or all) and found it ok supersedes it, and so does a
    baseline recorded after it (a deployment or backout that verified the host since)."""
    found = {}
    for host, (environment, recorded_at) in baselines.items():
        for audit in audits:
            if audit.environment not in (None, environment):
                continue
            if audit.at > recorded_at and host in audit.not_ok:
                found[host] = audit
            break
    return found


def drift_next_step(state: str, release: str | None, listed: bool = True) -> str | None:
    """What on-call does about a host a drift audit found in `state` (docs/remediation.md);
    `listed`: the host was in the inventory the audit was given (else it was not asked)."""
    again = f"ferry deploy PLAN --release {release or 'RELEASE'} --rfc ID"
    if state == "drifted":
        return (
            "find who switched it (.ferry/state.json on the host), then deploy the baseline "
            f"again: {again}"
        )
    if state == "tampered":
        return (
            "a security incident first; then deploy the baseline again, which sets the "
            f"altered copy aside: {again}"
        )
    if state == "unreachable" and not listed:
        return (
            "audit again with an inventory that lists it (--inventory FILE), or add it to "
            "this one; a host retired for good keeps its baseline until it is replaced"
        )
    if state == "unreachable":
        return "check the host and its sshd, then audit again"
    return None


def backout_next_step(deployment: int | str, release: str, stuck: Sequence[Mapping]) -> str:
    """The command that backs out `deployment` (of `release`) once the cause is fixed, and
    the RFCs it needs: one for each stuck host's prior release, or for `release` itself where
    a host had none (the backout removes it). Records written before the prior was kept in
    `stuck` say "the prior release"."""
    wanted = sorted({i["prior"] or release for i in stuck if "prior" in i})
    if len(wanted) > 1:
        what = "one RFC for each of " + ", ".join(wanted)
    else:
        what = f"an RFC for {wanted[0] if wanted else 'the prior release'}"
    return f"ferry remediate backout {deployment} --rfc ID ({what})"
