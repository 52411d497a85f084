"""Ferry's one error tree, and the exit code each error maps to.

    FerryError                      exit 1  (internal; unexpected)
    ├── BadInput                    exit 2  bad file, field or argument; nothing was changed
    │   ├── SpecError               a release spec, deploy plan, inventory or change model
    │   └── PlanError               a rollout cannot be planned (before any host is touched)
    ├── NotFound                    exit 2  a named release, RFC, deployment or host is unknown
    ├── AuthorizationRefused        exit 3  the change gate said no (with every reason)
    │   └── LockHeld                another deployment, backout or recover holds the hosts
    ├── MilestoneFailed             exit 4  a milestone failed and every touched host was backed out
    ├── BackoutIncomplete           exit 5  some hosts could not be restored; they need remediation
    ├── IntegrityError              exit 6  a checksum or signature did not verify
    ├── TransportError              exit 1  SSH failure, translated from paramiko at the boundary
    └── StepFailed                  exit 1  a host step failed (inside a wave it becomes data);
                                            `kind` is the agent's: integrity, input, os, disk-full

Each class's `exit_code` is the one table: the CLI maps a raised error by it, and a
deployment's final status by the error class that ends it (`orchestrator.lifecycle`).
The table is documented in README.md and `ferry --help`; every command keeps it.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any


class ExitCode(IntEnum):
    OK = 0
    INTERNAL = 1
    BAD_INPUT = 2
    REFUSED = 3
    BACKED_OUT = 4
    BACKOUT_INCOMPLETE = 5
    INTEGRITY = 6


EXIT_CODE_TABLE = {
    ExitCode.OK: "success",
    ExitCode.INTERNAL: "internal error (traceback written to .ferry/logs/)",
    ExitCode.BAD_INPUT: "bad input: file, field or argument (nothing was changed)",
    ExitCode.REFUSED: "refused by the change gate (no authorizing RFC, window, approvals)",
    ExitCode.BACKED_OUT: "a milestone failed and every touched host was backed out",
    ExitCode.BACKOUT_INCOMPLETE: "backout incomplete: named hosts need remediation",
    ExitCode.INTEGRITY: "integrity failure: checksum or signature did not verify",
}


class FerryError(Exception):
    """Base of every error Ferry raises on purpose."""

    exit_code: ExitCode = ExitCode.INTERNAL

    def __init__(self, message: str, *, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or {}
        # for a line that names the place already: `reason` without the host, `problem`
        # without the host and the step (or the file and the field); subclasses narrow them
        self.reason = self.problem = message

    def to_dict(self) -> dict[str, Any]:
        return {
            "error": type(self).__name__,
            "message": self.message,
            "exit_code": int(self.exit_code),
            **({"details": self.details} if self.details else {}),
        }


class BadInput(FerryError):
    exit_code = ExitCode.BAD_INPUT


class SpecError(BadInput):
    """A user's file failed validation: names the file, the field and the fix."""

    def __init__(self, file: str, field: str, problem: str, fix: str | None = None) -> None:
        # one line, whatever a parser's message or a key in the file holds
        field = field.encode("unicode_escape").decode() if not field.isprintable() else field
        problem = " ".join(problem.split())
        where = f"{file}: {field}" if field else file
        text = f"{where}: {problem}" + (f" ({fix})" if fix else "")
        super().__init__(text, details={"file": file, "field": field, "problem": problem})
        self.file, self.field, self.problem, self.fix = file, field, problem, fix


class PlanError(BadInput):
    pass


class NotFound(FerryError):
    exit_code = ExitCode.BAD_INPUT


class AuthorizationRefused(FerryError):
    exit_code = ExitCode.REFUSED

    def __init__(self, message: str, reasons: list[str] | None = None, **kw: Any) -> None:
        details = {"reasons": list(reasons or [])}
        details.update(kw.pop("details", {}) or {})
        super().__init__(message, details=details)
        self.reasons = list(reasons or [])


class LockHeld(AuthorizationRefused):
    """Hosts are locked by another run (orchestrator/cms/locks.py): names the holder."""


class MilestoneFailed(FerryError):
    exit_code = ExitCode.BACKED_OUT


class BackoutIncomplete(FerryError):
    exit_code = ExitCode.BACKOUT_INCOMPLETE


class IntegrityError(FerryError):
    exit_code = ExitCode.INTEGRITY


class TransportError(FerryError):
    def __init__(self, host: str, message: str) -> None:
        super().__init__(f"{host}: {message}", details={"host": host})
        self.host, self.reason, self.problem = host, message, message


class StepFailed(FerryError):
    def __init__(
        self, host: str, step: str, message: str, output: str = "", kind: str | None = None
    ) -> None:
        super().__init__(
            f"{host}: step {step} failed: {message}",
            details={"host": host, "step": step, "kind": kind, "output": output[-2000:]},
        )
        self.host, self.step, self.output, self.kind = host, step, output, kind
        self.problem, self.reason = message, f"step {step} failed: {message}"

    @property
    def integrity(self) -> bool:
        """The host refused what it was sent (signature, checksum, pinned key)."""
        return self.kind == "integrity"
