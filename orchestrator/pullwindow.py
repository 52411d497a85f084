"""Each pull host's own maintenance window (Decide, pure): `apply: window`.

ITIL's pull method lets a host apply "at a time of its choosing". With `pull: {apply:
window}` that time is the host's maintenance window from the inventory (`hosts.h1.window:
"Sat,Sun 02:00-04:00 Europe/Berlin"`, the change calendar's grammar); the plan's
`pull.window` is only the default for hosts without one. The planner records each host's
window in its HostAction; the wave driver gives the agent the window in a plain form
(`agent_window`) that the stdlib-only agent evaluates against its own clock.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from orchestrator.change.calendar import RecurringWindow
from orchestrator.errors import SpecError
from orchestrator.inventory import Host
from orchestrator.plan import DeployPlan


def applies_in_window(plan: DeployPlan) -> bool:
    return plan.method == "pull" and plan.pull is not None and plan.pull.apply == "window"


def host_window(plan: DeployPlan, host: Host) -> str | None:
    """The window `host` applies in under `plan` (None: the plan does not wait for one)."""
    if not applies_in_window(plan):
        return None
    assert plan.pull is not None
    return host.window or plan.pull.default_window


def require_windows(
    plan: DeployPlan, hosts: Sequence[Host], inventory_file: str, plan_file: str
) -> None:
    """`apply: window` needs a window for every target: its own, or the plan's default.
    Checked before anything is recorded (exit 2, one line)."""
    if not applies_in_window(plan):
        return
    lacking = [h.name for h in hosts if host_window(plan, h) is None]
    if not lacking:
        return
    more = f" (and {len(lacking) - 1} more: {', '.join(lacking[1:4])})" if len(lacking) > 1 else ""
    raise SpecError(
        inventory_file,
        f"hosts.{lacking[0]}.window",
        f"{plan_file} has pull.apply: window, but host {lacking[0]} has no window{more}",
        f'give it one, e.g. window: "Sat 02:00-04:00 UTC", or set a default '
        f"pull.window in {plan_file}",
    )


def agent_window(spec: str) -> dict[str, Any]:
    """The window as the agent reads it: weekdays (Mon = 0), wall-clock start and end in
    `tz` (end ≤ start: it ends the next day). The same rule as `window_open`."""
    w = RecurringWindow.model_validate(spec)
    return {
        "days": sorted(w.days),
        "start": w.start.strftime("%H:%M"),
        "end": w.end.strftime("%H:%M"),
        "tz": w.tz,
        "spec": w.spec,
    }


def window_open(spec: str, at: datetime) -> bool:
    """Is the window open at `at` (aware)? The calendar's own answer, which the agent's
    `in_window` must agree with (tests/unit/test_pull_window.py)."""
    return RecurringWindow.model_validate(spec).occurrence_at(at) is not None
