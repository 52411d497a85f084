"""Backout decisions (pure): from what the journal says was done, what must be undone.

Each host returns to ITS OWN prior baseline as recorded in the CMS (fleets are uneven),
never to "the previous directory". What is undone depends on how far the host got:

    activate started  → revert `current`, reactivate the prior release, restore data
                        (when a snapshot was taken), recheck the prior release
    install started   → restore data (when snapshotted), recheck the prior release
    earlier steps     → nothing to undo: `current` never moved (staged files are harmless
                        and pruned later)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from orchestrator.planner import Baseline
from orchestrator.steps import STEPS, owed

DONE = ("succeeded", "started", "failed")  # a started or failed step may have had effects
REFUSED = "refused"  # the agent refused the step before it began (busy): it had none


@dataclass(frozen=True)
class BackoutAction:
    host: str
    prior: Baseline | None
    steps: tuple[str, ...]  # subset of planner.BACKOUT_STEPS, in order

    @property
    def needed(self) -> bool:
        return bool(self.steps)


def backout_actions(
    journal: Mapping[str, Mapping[str, str]],
    priors: Mapping[str, Baseline | None],
) -> list[BackoutAction]:
    """journal: host → {step: status}; priors: host → its prior baseline (None: nothing)."""
    actions = []
    for host, steps in journal.items():
        prior = priors.get(host)
        started = {name for name, status in steps.items() if status in DONE}
        snapshotted = steps.get("snapshot") == "succeeded"
        plan = [
            name
            for name in owed(started)
            if not (STEPS[name].needs_prior and prior is None)
            and not (STEPS[name].needs_snapshot and not snapshotted)
        ]
        actions.append(BackoutAction(host, prior, tuple(plan)))
    return actions
