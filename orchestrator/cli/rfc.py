"""`ferry rfc`: raise, submit, approve, reject, cancel, close, show and list RFCs.

A thin layer over `orchestrator.change.rfcs`: it validates the arguments (exit 2 naming the
option), runs one action in one CMS transaction, and prints the result. Refusals exit 3
with every reason; the acting person is `get_settings().actor` (FERRY_USER first).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any

import typer

from orchestrator.cli import output as out
from orchestrator.cli.output import OutputOpt
from orchestrator.errors import BadInput

if TYPE_CHECKING:
    from orchestrator.change.models import RfcRequest

app = typer.Typer(
    help="Requests for change: raise, submit, approve, reject, cancel, close, show, list, wait.",
    no_args_is_help=True,
)

_OPTION = {"environment": "--env", "windows": "--window", "backout_plan": "--backout-plan"}
IdArg = Annotated[str, typer.Argument(help="RFC id: 12 or RFC-12")]
CommentOpt = Annotated[str, typer.Option("--comment", "-m", help="why (kept on record)")]
RoleOpt = Annotated[
    str | None,
    typer.Option(help="cab, ecab, change-manager or peer (default: your highest role)"),
]


def _now() -> datetime:
    return datetime.now(UTC)


def _request(fields: dict[str, Any]) -> RfcRequest:
    from pydantic import ValidationError

    from orchestrator.change.models import RfcRequest
    from orchestrator.yamlfile import pattern_words

    try:
        return RfcRequest.model_validate(fields)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = [str(p) for p in err["loc"] if not str(p).isdigit()]
        msg = pattern_words(err) or str(err["msg"]).removeprefix("Value error, ")
        if not loc and ": " in msg:  # whole-request rules name their field first
            head, msg = msg.split(": ", 1)
            loc = [head]
        option = _OPTION.get(loc[0], "--" + loc[0].replace("_", "-")) if loc else "(request)"
        raise BadInput(f"rfc new: {option}: {msg}", details={"field": option}) from None


def _summary(data: dict[str, Any]) -> str:
    risk = data["risk"]
    lines = [
        f"RFC-{data['id']} {data['status']}: {data['release']} to {data['environment']} "
        f"({data['model']}{', template ' + data['template'] if data['template'] else ''})",
        f"  risk {risk['level']} (score {risk['score']}"
        + (f"; overridden: {risk['override_reason']}" if risk["overridden"] else "")
        + ")",
    ]
    for w in data["windows"]:
        lines.append(f"  window {w['start']} → {w['end']}")
    if data["hosts"]:
        lines.append(f"  hosts {', '.join(data['hosts'])}")
    if data.get("needs_review"):
        lines.append(f"  needs review by {data['review_due']}")
    for m in data.get("missing") or []:
        lines.append(f"  missing: {m}")
    for w in data.get("warnings") or []:
        lines.append(f"  warning: {w}")
    review = data.get("review")
    if review:
        f = review["figures"]
        lines.append(
            f"  post-implementation review by {review['by']}: {review['comment'] or '(no comment)'}"
        )
        lines.append(
            f"    outcome {f['outcome']}: {len(f['deployments'])} deployment(s), {f['hosts']} "
            f"host(s), {f['waves']} wave(s), {f['failed_milestones']} failed milestone(s), "
            f"backed out: {'yes' if f['backed_out'] else 'no'}, ELS: {f['els'] or 'none'}"
        )
    return "\n".join(lines)


def _show_one(rfc_id: int, extra: dict[str, Any] | None = None) -> None:
    from orchestrator.change import config, rfcs
    from orchestrator.cms import db

    models = config.load_change_models()
    with db.session_scope() as session:
        data = {**rfcs.show(session, rfc_id, models), **(extra or {})}
    out.result(data, _summary(data))


@app.command()
def new(
    release: Annotated[str, typer.Option(metavar="NAME@VERSION", help="the release to change to")],
    env: Annotated[str, typer.Option(help="the environment to change")],
    model: Annotated[str, typer.Option(help="standard, normal or emergency")],
    template: Annotated[str | None, typer.Option(help="standard change template")] = None,
    window: Annotated[
        list[str] | None,
        typer.Option(metavar="START/END", help="ISO 8601 (repeatable; no offset = UTC)"),
    ] = None,
    hosts: Annotated[
        str | None, typer.Option(help="host names or patterns, comma-separated")
    ] = None,
    stages: Annotated[str, typer.Option(help="plan, checkin, deploy")] = "checkin,deploy",
    risk: Annotated[str | None, typer.Option(help="override: low, medium, high")] = None,
    reason: Annotated[str | None, typer.Option(help="why the risk is overridden")] = None,
    title: Annotated[str, typer.Option(help="a short title")] = "",
    backout_plan: Annotated[str, typer.Option(help="the remediation plan")] = "",
    fmt: OutputOpt = out.Format.text,
) -> None:
    """Raise an RFC (a draft; a standard change fitting its template is authorized at once)."""
    out.use(fmt)
    from orchestrator import ci
    from orchestrator.change import config, rfcs
    from orchestrator.cms import db
    from orchestrator.settings import get_settings

    req = _request(
        {
            "release": release,
            "environment": env,
            "model": model,
            "template": template,
            "windows": list(window or []),
            "hosts": hosts or [],
            "stages": stages,
            "risk": risk,
            "reason": reason,
            "title": title,
            "backout_plan": backout_plan,
        }
    )
    models, calendar = config.load_change_models(), config.load_calendar()
    with db.session_scope() as session:
        rfc, warnings = rfcs.create(
            session, req, actor=get_settings().actor, now=_now(), models=models, calendar=calendar
        )
        rfc.ci = ci.provenance()
        rfc_id, status = rfc.id, rfc.status
    ci.publish({"rfc": rfc_id, "rfc_status": status, "release": release})
    _show_one(rfc_id, {"warnings": warnings})


@app.command()
def submit(rfc_id: IdArg, fmt: OutputOpt = out.Format.text) -> None:
    """Submit a draft for assessment: risk, calendar checks and conflicts are reported."""
    out.use(fmt)
    from orchestrator.change import config, rfcs
    from orchestrator.change.gate import parse_rfc_id
    from orchestrator.cms import db
    from orchestrator.settings import get_settings

    rid = parse_rfc_id(rfc_id)
    models, calendar = config.load_change_models(), config.load_calendar()
    with db.session_scope() as session:
        warnings = rfcs.submit(
            session, rid, actor=get_settings().actor, now=_now(), models=models, calendar=calendar
        )
    _show_one(rid, {"warnings": warnings})


@app.command()
def approve(
    rfc_id: IdArg,
    comment: CommentOpt = "",
    role: RoleOpt = None,
    stage: Annotated[
        str | None,
        typer.Option(help="checkin or deploy: the stage approved (models approving each stage)"),
    ] = None,
    fmt: OutputOpt = out.Format.text,
) -> None:
    """Approve an assessed RFC (never your own); authorized once the model's approvals are in."""
    out.use(fmt)
    from orchestrator.change import config, rfcs
    from orchestrator.change.gate import parse_rfc_id
    from orchestrator.cms import db
    from orchestrator.settings import get_settings

    rid = parse_rfc_id(rfc_id)
    models = config.load_change_models()
    with db.session_scope() as session:
        notes = rfcs.approve(
            session,
            rid,
            actor=get_settings().actor,
            role=role,
            comment=comment,
            now=_now(),
            models=models,
            stage=stage,
        )
    _show_one(rid, {"warnings": notes})


@app.command()
def reject(
    rfc_id: IdArg, comment: CommentOpt = "", role: RoleOpt = None, fmt: OutputOpt = out.Format.text
) -> None:
    """Reject an RFC under assessment; no approval can follow."""
    out.use(fmt)
    from orchestrator.change import config, rfcs
    from orchestrator.change.gate import parse_rfc_id
    from orchestrator.cms import db
    from orchestrator.settings import get_settings

    rid = parse_rfc_id(rfc_id)
    models = config.load_change_models()
    with db.session_scope() as session:
        rfcs.reject(
            session,
            rid,
            actor=get_settings().actor,
            role=role,
            comment=comment,
            now=_now(),
            models=models,
        )
    _show_one(rid)


@app.command()
def cancel(rfc_id: IdArg, comment: CommentOpt = "", fmt: OutputOpt = out.Format.text) -> None:
    """Cancel an RFC that has not started (draft … scheduled)."""
    out.use(fmt)
    from orchestrator.change import rfcs
    from orchestrator.change.gate import parse_rfc_id
    from orchestrator.cms import db
    from orchestrator.settings import get_settings

    rid = parse_rfc_id(rfc_id)
    with db.session_scope() as session:
        rfcs.cancel(session, rid, actor=get_settings().actor, comment=comment, now=_now())
    _show_one(rid)


@app.command()
def close(rfc_id: IdArg, comment: CommentOpt = "", fmt: OutputOpt = out.Format.text) -> None:
    """Close a finished or rejected RFC, recording its post-implementation review (--comment
    and the change's own figures); an emergency change needs --comment with its review."""
    out.use(fmt)
    from orchestrator.change import config, rfcs
    from orchestrator.change.gate import parse_rfc_id
    from orchestrator.cms import db
    from orchestrator.settings import get_settings

    rid = parse_rfc_id(rfc_id)
    models = config.load_change_models()
    with db.session_scope() as session:
        review = rfcs.close(
            session, rid, actor=get_settings().actor, comment=comment, now=_now(), models=models
        )
    _show_one(rid, {"review": review} if review else None)


@app.command()
def show(rfc_id: IdArg, fmt: OutputOpt = out.Format.text) -> None:
    """An RFC with its approvals, what is missing, and its full audit history."""
    out.use(fmt)
    from orchestrator.change import config, rfcs
    from orchestrator.change.gate import parse_rfc_id
    from orchestrator.cms import db

    rid = parse_rfc_id(rfc_id)
    models = config.load_change_models()
    with db.session_scope() as session:
        data = rfcs.show(session, rid, models)

    def render() -> None:
        out.stdout.print(_summary(data), highlight=False)
        for a in data["approvals"]:
            out.stdout.print(
                f"  {a['decision']} by {a['approver']} as {a['role']} at {a['at']}"
                + (f": {a['comment']}" if a["comment"] else ""),
                highlight=False,
            )
        out.stdout.print("  history:", highlight=False)
        for ev in data["history"]:
            detail = ev["data"].get("reasons") or ev["data"].get("note") or ""
            if isinstance(detail, list):
                detail = "; ".join(detail)
            out.stdout.print(
                f"    #{ev['id']} {ev['at']} {ev['actor']} {ev['action']}"
                + (f" — {detail}" if detail else ""),
                highlight=False,
            )

    out.result(data, render)


# an RFC in one of these may be deployed under (implemented: a re-run of the same release)
USABLE = ("authorized", "scheduled", "implementing", "implemented")
ENDED = ("rejected", "cancelled", "closed", "backed-out", "failed")


@app.command()
def wait(
    rfc_id: IdArg,
    timeout: Annotated[
        float, typer.Option("--timeout", min=0, help="seconds to wait (0: look once)")
    ] = 3600,
    interval: Annotated[
        float, typer.Option("--interval", min=0.1, help="seconds between looks")
    ] = 5,
    fmt: OutputOpt = out.Format.text,
) -> None:
    """Wait until an RFC is authorized (exit 0) or rejected, cancelled or ended (exit 3, with
    the reason); still waiting at --timeout is exit 3 too. For pipelines: a deploy job that
    waits for the change authority's approval."""
    out.use(fmt)
    import time

    from orchestrator.change.gate import parse_rfc_id
    from orchestrator.cms import db
    from orchestrator.cms.models import RFC
    from orchestrator.errors import AuthorizationRefused, NotFound

    rid = parse_rfc_id(rfc_id)
    deadline = time.monotonic() + timeout
    told = None
    while True:
        with db.session_scope() as session:
            rfc = session.get(RFC, rid)
            if rfc is None:
                raise NotFound(f"RFC-{rid} does not exist (ferry rfc list shows the RFCs)")
            status = rfc.status
            reason = next(
                (
                    f"{a.decision} by {a.approver}" + (f": {a.comment}" if a.comment else "")
                    for a in reversed(rfc.approvals)
                    if a.decision == "rejected"
                ),
                "",
            )
        data = {"id": rid, "ref": f"RFC-{rid}", "status": status}
        if status in USABLE:
            out.result(data, f"RFC-{rid} is {status}")
            return
        if status in ENDED:
            raise AuthorizationRefused(
                f"RFC-{rid} is {status}" + (f" ({reason})" if reason else ""),
                reasons=[reason or status],
                details={"status": status},
            )
        if time.monotonic() >= deadline:
            raise AuthorizationRefused(
                f"RFC-{rid} is still {status} after {timeout:g} s (not authorized yet)",
                reasons=[f"still {status}"],
                details={"status": status},
            )
        if status != told:
            out.progress(f"RFC-{rid} is {status}: waiting for its authorization")
            told = status
        time.sleep(min(interval, max(0.0, deadline - time.monotonic())))


@app.command("list")
def list_(
    needs_review: Annotated[
        bool, typer.Option("--needs-review", help="emergency changes awaiting review")
    ] = False,
    status: Annotated[str | None, typer.Option(help="only RFCs in this status")] = None,
    env: Annotated[str | None, typer.Option(help="only RFCs for this environment")] = None,
    fmt: OutputOpt = out.Format.text,
) -> None:
    """RFCs, oldest first."""
    out.use(fmt)
    from orchestrator.change import rfcs
    from orchestrator.change.lifecycle import STATUSES
    from orchestrator.cms import db

    if status is not None and status not in STATUSES:
        raise BadInput(f"--status: {status!r} is not an RFC status ({', '.join(STATUSES)})")
    with db.session_scope() as session:
        items = rfcs.list_rfcs(session, status=status, needs_review=needs_review, environment=env)
    lines = [
        f"RFC-{r['id']:<5} {r['status']:<12} {r['model']:<9} {r['risk']['level']:<6} "
        f"{r['environment']:<12} {r['release']}"
        + (f"  review due {r['review_due']}" if r["needs_review"] else "")
        for r in items
    ]
    out.result({"rfcs": items}, "\n".join(lines) or "no RFCs")
