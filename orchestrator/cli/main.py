"""`ferry`: the entry point. Names the commands and keeps one table of exit codes.

Start-up imports no command's module: `COMMANDS` lists each command with the module that
defines it and the one line `ferry --help` shows, and a module is imported only when its
command is used (`ferry rfc …` imports `orchestrator.cli.rfc`, nothing else; `ferry --help`
imports none, so none of SQLAlchemy, pydantic, paramiko, rich or Prefect). Each command
imports what it needs when it runs: `ferry --help` takes a fraction of a second, and only
`ferry deploy`'s flow imports Prefect.

Expected errors (FerryError) print one clear line and exit with their documented code;
anything unexpected writes its traceback to `.ferry/logs/` and exits 1, saying where.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass
from gettext import gettext as _
from typing import Any, Literal

import typer
from typer._click import Command, Context, HelpFormatter  # typer vendors click
from typer._click.exceptions import ClickException
from typer.core import TyperCommand, TyperGroup

from orchestrator import crashlog
from orchestrator.cli import output
from orchestrator.errors import EXIT_CODE_TABLE, ExitCode, FerryError

EXIT_CODES_HELP = "\b\nExit codes (every command):\n" + "\n".join(
    f"  {int(code)}  {text}" for code, text in EXIT_CODE_TABLE.items()
)

# What every Typer app of the command line shares: the root, and the one each command is
# built in when it is first used (so it is built exactly as `add_typer` on the root would).
TYPER_SETTINGS: dict[str, Any] = {
    "pretty_exceptions_enable": False,
    "add_completion": False,
    "rich_markup_mode": None,
}


@dataclass(frozen=True)
class CommandEntry:
    """A command of `ferry`, known without importing its module `orchestrator.cli.NAME`.

    `group`: the module's `app` (a Typer) is mounted as NAME with `summary` as its help.
    `app`: the module's `app` is mounted as NAME with its own help.
    `command`: the module's `register(app)` adds the command NAME with its own help.
    For `app` and `command`, `summary` repeats the first sentence of that help, for the
    `ferry --help` listing (tests/unit/test_cli_startup.py checks that they agree).
    """

    name: str
    summary: str
    kind: Literal["group", "app", "command"] = "group"

    @property
    def module(self) -> str:
        return f"orchestrator.cli.{self.name}"

    def load(self) -> Command:
        mod = importlib.import_module(self.module)
        host = typer.Typer(**TYPER_SETTINGS)
        if self.kind == "group":
            host.add_typer(mod.app, name=self.name, help=self.summary)
        elif self.kind == "app":
            host.add_typer(mod.app, name=self.name)
        else:
            mod.register(host)
        command = typer.main.get_group(host).commands.get(self.name)
        if command is None:  # not a KeyError: that would read as "no such command"
            raise RuntimeError(f"{self.module} defines no command {self.name!r}")
        name_values(command)
        return command


# what Typer shows for an option's value when nothing names it: its Python type
TYPE_METAVARS = ("<str>", "<list[str]>")


def name_values(command: Command) -> None:
    """An option's value is named after the option in help (`--release RELEASE`, as argparse
    and most tools do), not `<str>` or `<list[str]>` as Typer shows it; an option that names
    its value itself (`metavar=`) keeps that, and so do paths, numbers and choices. (An
    argument is listed as its name and its type: `spec <path>`, `release <str>`.)"""
    ctx = Context(command)
    for param in command.params:
        option = param.opts[0].startswith("-")  # an argument shows its name and its type
        if param.metavar or getattr(param, "is_flag", False) or not option:
            continue
        shown = getattr(param, "display_type", None)  # how this Typer names a value
        if shown is not None and shown(ctx) in TYPE_METAVARS:
            param.metavar = max(param.opts, key=len).lstrip("-").replace("-", "_").upper()
    for sub in getattr(command, "commands", {}).values():
        name_values(sub)


COMMANDS = (
    CommandEntry(
        "deploy",
        "Deploy RELEASE (name@version, from the DML) by the deploy PLAN, under an authorized RFC.",
        kind="command",
    ),
    CommandEntry(
        "approve",
        "Approve (or --reject) the manual milestone a running deployment waits at.",
        kind="command",
    ),
    CommandEntry(
        "status",
        "What the CMS knows now: environment and host baselines, recent deployments, and the "
        "hosts that need remediation.",
        kind="command",
    ),
    CommandEntry(
        "report",
        "ITIL change KPIs, release and deployment figures, and DORA's four keys, computed from "
        "the CMS (read-only).",
        kind="command",
    ),
    CommandEntry("release", "Release packages: build, checkin, list, show, accept, withdraw."),
    CommandEntry("dml", "The DML (media library): keygen, list, show, verify, gc, serve."),
    CommandEntry("rfc", "Requests for change: new, approve, reject, show, list, wait, …"),
    CommandEntry("calendar", "Change windows and blackouts."),
    CommandEntry("remediate", "On-call: backout, recover, drift audit."),
    CommandEntry("els", "Early life support: re-run deployments' ELS checks during their period."),
    CommandEntry("lab", "A lab fleet of real sshd hosts on this machine."),
    CommandEntry("agent", "Pull agents on hosts: install (over SSH), status, nudge, revoke."),
    CommandEntry("cms", "The CMS: apply migrations, verify the audit log.", kind="app"),
    CommandEntry(
        "prefect", "The Prefect server that runs Ferry's flows on the embedded default.", kind="app"
    ),
    CommandEntry(
        "warm", "The warm process: Ferry's modules imported once, a child forked per command."
    ),
)


class LazyCommands(MutableMapping[str, Command]):
    """name → click command, in `COMMANDS` order; a command is built (its module imported)
    the first time it is looked up. Names and summaries need no import."""

    def __init__(self, entries: tuple[CommandEntry, ...]) -> None:
        # a command whose module this installation lacks is not offered
        self._entries = {e.name: e for e in entries if importlib.util.find_spec(e.module)}
        self._built: dict[str, Command] = {}

    def __getitem__(self, name: str) -> Command:
        if name not in self._built:
            self._built[name] = self._entries[name].load()
        return self._built[name]

    def __setitem__(self, name: str, command: Command) -> None:
        self._built[name] = command

    def __delitem__(self, name: str) -> None:
        if name not in self:
            raise KeyError(name)
        self._entries.pop(name, None)
        self._built.pop(name, None)

    def __contains__(self, name: object) -> bool:  # Mapping's would build the command
        return name in self._entries or name in self._built

    def __iter__(self) -> Iterator[str]:
        return iter({**dict.fromkeys(self._entries), **dict.fromkeys(self._built)})

    def __len__(self) -> int:
        return len({*self._entries, *self._built})

    def listed(self, name: str) -> Command:
        """The command if it is built, else a stand-in carrying its summary (for --help)."""
        if name in self._built:
            return self._built[name]
        return TyperCommand(name=name, help=self._entries[name].summary)


class LazyGroup(TyperGroup):
    """The root group: every command of `COMMANDS`, each imported only when it is used."""

    commands: LazyCommands

    def __init__(self, **attrs: Any) -> None:
        super().__init__(**attrs)
        registered, self.commands = self.commands, LazyCommands(COMMANDS)
        self.commands.update(registered)  # any `app.command(...)` on the root, as built

    def list_commands(self, ctx: Context) -> list[str]:
        return list(self.commands)

    def format_commands(self, ctx: Context, formatter: HelpFormatter) -> None:
        """TyperGroup's `Commands:` section, from the summaries: it imports no command."""
        listed = [(n, self.commands.listed(n)) for n in self.list_commands(ctx)]
        visible = [(name, cmd) for name, cmd in listed if not cmd.hidden]
        if not visible:
            return
        limit = formatter.width - 6 - max(len(name) for name, _cmd in visible)
        with formatter.section(_("Commands")):
            formatter.write_dl([(name, cmd.get_short_help_str(limit)) for name, cmd in visible])


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            print(f"ferry {version('ferry')}")
        except PackageNotFoundError:  # run from a source tree that was never installed
            print("ferry (not installed)")
        raise typer.Exit(0)


app = typer.Typer(
    name="ferry",
    help="Ferry: build release packages into the DML, gate every change on an authorized RFC, "
    "deploy over SSH big-bang or in waves with milestones and automatic backout.\n\n"
    + EXIT_CODES_HELP,
    no_args_is_help=True,
    cls=LazyGroup,
    **{**TYPER_SETTINGS, "add_completion": True},  # `--install-completion` for the root only
)


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", help="Print Ferry's version and exit.", is_eager=True, callback=_version
    ),
) -> None:
    """The root's options; every command is LazyGroup's."""


def main(argv: list[str] | None = None, *, warm_tried: bool = False) -> int:
    # pydantic looks for plugins by scanning every installed distribution's entry points the
    # first time a model is built: ~0.3 s of every command's start-up here, for plugins Ferry
    # does not use. Set PYDANTIC_DISABLE_PLUGINS to anything else (even empty) to have them.
    os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")
    from orchestrator import zygote  # stdlib only

    args = sys.argv[1:] if argv is None else list(argv)
    warm = None if warm_tried else zygote.run_warm(args)
    if warm is not None:  # a warm process ran it (orchestrator/zygote.py)
        sys.exit(warm)
    try:
        code = _run(args)
    finally:
        if zygote.worth_starting(args):
            zygote.start_in_background()
    sys.exit(int(code))


def show_completion(argv: list[str]) -> int | None:
    """`ferry --show-completion` prints the script for the shell Typer finds among the
    caller's parent processes. Under make, a CI runner or a detached job there is none, and
    Typer answered "Shell  not supported.": the user's login shell ($SHELL) is used then.
    None: Typer answers as usual."""
    if argv != ["--show-completion"] or not os.environ.get("SHELL"):
        return None
    import shellingham

    try:
        shellingham.detect_shell()
        return None
    except shellingham.ShellDetectionFailure:
        from typer._completion_shared import get_completion_script  # Typer's own script

        shell = os.path.basename(os.environ["SHELL"])
        print(get_completion_script(prog_name="ferry", complete_var="_FERRY_COMPLETE", shell=shell))
        return 0


def _run(argv: list[str]) -> int:
    shown = show_completion(argv)
    if shown is not None:
        return shown
    # get_command (the root's callback makes it a group): it adds --install-completion
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
    except output.ReaderGone:  # `ferry status | head -1`: the reader has what it wanted
        _reader_gone()
        code = 128 + 13  # as a shell reports a command SIGPIPE ended
    except Exception as exc:  # noqa: BLE001
        where = crashlog.write()
        output.error(
            {"error": type(exc).__name__, "message": str(exc), "exit_code": 1, "log": where},
            f"internal error: {type(exc).__name__}: {exc} (traceback: {where})",
        )
        code = ExitCode.INTERNAL
    return int(code)


def _reader_gone() -> None:
    """Point stdout at /dev/null: what is still buffered for the reader that left would
    otherwise fail again when Python flushes it at exit."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    main()
