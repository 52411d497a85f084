"""`ferry`: the entry point. Wires the command groups and keeps one table of exit codes.

Expected errors (FerryError) print one clear line and exit with their documented code;
anything unexpected writes its traceback to `.ferry/logs/` and exits 1, saying where.
"""

from __future__ import annotations

import sys

import typer
from typer._click.exceptions import ClickException  # typer vendors click

from orchestrator import crashlog
from orchestrator.cli import output
from orchestrator.errors import EXIT_CODE_TABLE, ExitCode, FerryError

EXIT_CODES_HELP = "\b\nExit codes (every command):\n" + "\n".join(
    f"  {int(code)}  {text}" for code, text in EXIT_CODE_TABLE.items()
)

app = typer.Typer(
    name="ferry",
    help="Ferry: build release packages into the DML, gate every change on an authorized RFC, "
    "deploy over SSH big-bang or in waves with milestones and automatic backout.\n\n"
    + EXIT_CODES_HELP,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,
)


def _register() -> None:
    from orchestrator.cli import cms

    groups = [
        ("release", "orchestrator.cli.release", "Build release packages from release specs."),
        ("dml", "orchestrator.cli.dml", "The Definitive Media Library: list, verify, gc."),
        ("rfc", "orchestrator.cli.rfc", "Requests for change: raise, approve, show."),
        ("calendar", "orchestrator.cli.calendar", "Change windows and blackouts."),
        ("remediate", "orchestrator.cli.remediate", "On-call: backout, recover, drift audit."),
        ("lab", "orchestrator.cli.lab", "A lab fleet of real sshd hosts on this machine."),
    ]
    for name, module, help_text in groups:
        try:
            mod = __import__(module, fromlist=["app"])
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            continue
        app.add_typer(mod.app, name=name, help=help_text)
    app.add_typer(cms.app, name="cms")
    for module in ("orchestrator.cli.deploy", "orchestrator.cli.status"):
        try:
            mod = __import__(module, fromlist=["register"])
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            continue
        mod.register(app)


_register()


def main(argv: list[str] | None = None) -> int:
    command = typer.main.get_command(app)
    try:
        rv = command.main(args=argv, prog_name="ferry", standalone_mode=False)
        code = rv if isinstance(rv, int) else 0
    except typer.Exit as exc:
        code = exc.exit_code
    except typer.Abort:
        output.stderr.print("aborted")
        code = 130
    except ClickException as exc:
        exc.show()
        code = ExitCode.BAD_INPUT
    except FerryError as exc:
        output.error(exc.to_dict(), exc.message)
        code = exc.exit_code
    except KeyboardInterrupt:
        output.stderr.print("interrupted")
        code = 130
    except Exception as exc:  # noqa: BLE001
        where = crashlog.write()
        output.error(
            {"error": type(exc).__name__, "message": str(exc), "exit_code": 1, "log": where},
            f"internal error: {type(exc).__name__}: {exc} (traceback: {where})",
        )
        code = ExitCode.INTERNAL
    sys.exit(int(code))


if __name__ == "__main__":
    main()
