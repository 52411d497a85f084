"""The deployment lifecycle (pure): statuses, the moves between them, each end's exit code.

    planned ─▶ running ─▶ succeeded                                    exit 0
       │          ├──────▶ halted      (the gate refused a later wave)  exit 3
       │          └──────▶ backing-out ─▶ backed-out                    exit 4
       │                                ├▶ failed   (hosts need remediation)  exit 5
       │                                ├▶ integrity-failed             exit 6
       │                                └▶ aborted  (an unexpected error)     exit 1
       ├─▶ refused   (the change gate said no at the start)             exit 3
       └─▶ aborted

A finished deployment may still be backed out by hand (`ferry remediate backout`), and an
interrupted one (planned, running or backing-out with its process gone) is finished by
`ferry remediate recover`: both end it as backed-out or failed. A manual backout is itself
recorded as a deployment (strategy `backout`): running → succeeded | failed | refused.
Bad input never gets here: it is refused (exit 2) before anything is recorded.
"""

from __future__ import annotations

from enum import StrEnum

from orchestrator.errors import (
    AuthorizationRefused,
    BackoutIncomplete,
    ExitCode,
    FerryError,
    IntegrityError,
    MilestoneFailed,
)


class Status(StrEnum):
    PLANNED = "planned"
    RUNNING = "running"
    BACKING_OUT = "backing-out"
    SUCCEEDED = "succeeded"
    HALTED = "halted"
    REFUSED = "refused"
    BACKED_OUT = "backed-out"
    FAILED = "failed"
    INTEGRITY_FAILED = "integrity-failed"
    ABORTED = "aborted"


class WaveStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    PASSED = "passed"
    FAILED = "failed"
    INTERRUPTED = "interrupted"


OPEN = frozenset({Status.PLANNED, Status.RUNNING, Status.BACKING_OUT})
_REMEDIATED = frozenset({Status.BACKED_OUT, Status.FAILED})
TRANSITIONS: dict[Status, frozenset[Status]] = {
    Status.PLANNED: frozenset({Status.RUNNING, Status.REFUSED, Status.ABORTED} | _REMEDIATED),
    Status.RUNNING: frozenset(
        {Status.SUCCEEDED, Status.HALTED, Status.BACKING_OUT, Status.ABORTED, Status.FAILED}
        | _REMEDIATED
    ),
    Status.BACKING_OUT: frozenset({Status.INTEGRITY_FAILED, Status.ABORTED} | _REMEDIATED),
    # finished: only a manual backout moves them on
    Status.SUCCEEDED: _REMEDIATED,
    Status.HALTED: _REMEDIATED,
    Status.BACKED_OUT: _REMEDIATED,
    Status.FAILED: _REMEDIATED,
    Status.INTEGRITY_FAILED: _REMEDIATED,
    Status.ABORTED: _REMEDIATED,
    Status.REFUSED: frozenset(),
}
# the error each final status stands for: its exit code is the status's (one table)
ENDED_BY: dict[Status, type[FerryError] | None] = {
    Status.SUCCEEDED: None,
    Status.HALTED: AuthorizationRefused,
    Status.REFUSED: AuthorizationRefused,
    Status.BACKED_OUT: MilestoneFailed,
    Status.FAILED: BackoutIncomplete,
    Status.INTEGRITY_FAILED: IntegrityError,
    Status.ABORTED: FerryError,
}
# what the RFC becomes when a deployment ends so (None: the RFC is left as it is)
RFC_AFTER: dict[Status, str | None] = {
    Status.SUCCEEDED: "implemented",
    Status.HALTED: "failed",  # not completed in its authorization: a new RFC continues it
    Status.REFUSED: None,
    Status.BACKED_OUT: "backed-out",
    Status.FAILED: "failed",
    Status.INTEGRITY_FAILED: "backed-out",
    Status.ABORTED: "failed",
}


class BadTransition(FerryError):
    """A deployment was asked to move where its lifecycle does not go (a bug, or a race)."""


def can_move(current: str, to: str) -> bool:
    return Status(to) in TRANSITIONS[Status(current)]


def check_move(deployment_id: int, current: str, to: str) -> Status:
    if not can_move(current, to):
        raise BadTransition(f"deployment {deployment_id}: cannot move from {current} to {to}")
    return Status(to)


def exit_code(status: str) -> ExitCode:
    """The exit code of a final status (an open one means someone must finish it: 5)."""
    st = Status(status)
    if st in OPEN:
        return BackoutIncomplete.exit_code
    error = ENDED_BY[st]
    return ExitCode.OK if error is None else error.exit_code


def outcome_error(status: str, message: str) -> FerryError | None:
    """The error to raise for a deployment that ended so (None: it succeeded)."""
    error = ENDED_BY.get(Status(status))
    return None if error is None else error(message)


def is_final(status: str) -> bool:
    return Status(status) not in OPEN
