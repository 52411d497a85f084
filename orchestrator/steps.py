"""The step table (pure): every host step declared once, with what undoes it.

    forward:  stage → verify → snapshot → install → activate → check
    backout:  revert → reactivate → restore → recheck

The planner picks the steps a plan needs from here, the backout decision reads each
forward step's `undo` from here, and the executor and the backout runner dispatch on the
names declared here; nothing else spells out the order. Two names are easy to confuse and
are kept apart on purpose: `verify` is the host agent's own signature and checksum check
of the staged release; the plan's health hook is `hooks.check`, run by the `check` step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

Phase = Literal["forward", "backout"]


@dataclass(frozen=True)
class Step:
    name: str
    phase: Phase
    doc: str
    hook: str | None = None  # the plan hook this step runs (hooks.<hook>), if any
    agent: str | None = None  # the host agent's operation it calls, if any
    required: bool = False  # in every rollout, whatever the plan says
    config: bool = False  # also writes the plan's config templates
    undo: tuple[str, ...] = ()  # backout steps owed once this step has started
    needs_prior: bool = False  # (backout) only when the host has a prior baseline
    needs_snapshot: bool = False  # (backout) only when a snapshot of the data was taken


FORWARD: tuple[Step, ...] = (
    Step("stage", "forward", "send the signed manifest and only the missing objects",
         agent="inspect+receive", required=True),
    Step("verify", "forward", "agent: signature against the pinned DML key, every sha256",
         agent="verify", required=True),
    Step("snapshot", "forward", "hooks.snapshot: copy data that outlives releases",
         hook="snapshot"),
    Step("install", "forward", "config templates, then hooks.install (may change data)",
         hook="install", agent="config", config=True, undo=("restore", "recheck")),
    Step("activate", "forward", "switch `current` atomically, then hooks.activate",
         hook="activate", agent="switch", required=True,
         undo=("revert", "reactivate", "restore", "recheck")),
    Step("check", "forward", "hooks.check: the plan's own health check of the new release",
         hook="check"),
)  # fmt: skip

BACKOUT: tuple[Step, ...] = (
    Step("revert", "backout", "switch `current` back to the host's prior (or to none)",
         agent="switch"),
    Step("reactivate", "backout", "hooks.activate of the prior release",
         hook="activate", needs_prior=True),
    Step("restore", "backout", "hooks.restore: put the snapshotted data back",
         hook="restore", needs_snapshot=True),
    Step("recheck", "backout", "hooks.check and the milestone checks of the prior release",
         hook="check", needs_prior=True),
)  # fmt: skip

STEPS: dict[str, Step] = {s.name: s for s in FORWARD + BACKOUT}
FORWARD_NAMES = tuple(s.name for s in FORWARD)
BACKOUT_NAMES = tuple(s.name for s in BACKOUT)


def wanted(step: Step, has_hook: Callable[[str], bool], has_config: bool) -> bool:
    """Does a plan (told by `has_hook(name)` and `has_config`) need this forward step?"""
    if step.required:
        return True
    return (step.hook is not None and has_hook(step.hook)) or (step.config and has_config)


def owed(started: set[str]) -> list[str]:
    """The backout steps owed by the forward steps that started, in backout order."""
    due = {u for name in started if name in STEPS for u in STEPS[name].undo}
    return [name for name in BACKOUT_NAMES if name in due]


def dispatch_table(handlers: dict[str, Callable[..., object]], phase: Phase) -> None:
    """Fail at import when a runner misses a step of its phase (or knows a stray one)."""
    names = FORWARD_NAMES if phase == "forward" else BACKOUT_NAMES
    if set(handlers) != set(names):
        raise RuntimeError(f"{phase} handlers {sorted(handlers)} differ from steps {names}")
