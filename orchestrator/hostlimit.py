"""`ferry deploy --hosts PATTERN`: narrow a deployment to some of its plan's hosts (Decide).

Like Ansible's `--limit`, and like it only ever narrowing: the result is the plan's target
hosts that the pattern names, in the plan's order, never a host the plan does not target
(the RFC's `hosts:` are then checked by the change gate as for any deployment). The
pattern is comma-separated group names, host names or globs; `!part` takes hosts out.
A part that names none of the plan's hosts is a typo, not an empty wish: exit 2.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from fnmatch import fnmatchcase

from orchestrator.errors import BadInput


def narrow(targets: Sequence[str], pattern: str, groups: Mapping[str, Sequence[str]]) -> list[str]:
    """The hosts of `targets` (in order) that `pattern` names."""
    parts = [p.strip() for p in pattern.split(",") if p.strip()]
    if not parts:
        raise BadInput("--hosts: empty pattern (host names, groups or globs, comma-separated)")
    keep: set[str] | None = None
    drop: set[str] = set()
    for part in parts:
        negate = part.startswith("!")
        name = part[1:] if negate else part
        named = _named(targets, name, groups)
        if not named:
            raise BadInput(
                f"--hosts: {part!r} names none of the plan's {len(targets)} target host(s) "
                "(--hosts only narrows a deployment; it never adds hosts)",
                details={"field": "--hosts", "part": part},
            )
        if negate:
            drop |= named
        else:
            keep = named if keep is None else keep | named
    chosen = [h for h in targets if (keep is None or h in keep) and h not in drop]
    if not chosen:
        raise BadInput(f"--hosts: {pattern!r} leaves no host to deploy to")
    return chosen


def _named(targets: Sequence[str], name: str, groups: Mapping[str, Sequence[str]]) -> set[str]:
    if name in groups:
        return set(groups[name]) & set(targets)
    return {h for h in targets if fnmatchcase(h, name)}
