"""Output for every command: human text (rich) by default, one JSON object with `--output json`.

Results go to stdout; progress and warnings go to stderr, so `--output json` stays parseable.
`stdout` and `stderr` are rich Consoles made on first use: importing rich costs tens of
milliseconds that `--help` and a quiet `-o json` need not pay.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from enum import StrEnum
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer

if TYPE_CHECKING:
    from rich.console import Console

    stdout: Console
    stderr: Console


class Format(StrEnum):
    text = "text"
    json = "json"


OutputOpt = Annotated[
    Format,
    typer.Option(
        "--output", "-o", help="text for people, json for pipelines (one object on stdout)"
    ),
]

_mode: Format = Format.text


def _console(name: Literal["stdout", "stderr"]) -> Console:
    """The Console `stdout` or `stderr`, made on first use and kept as a module attribute."""
    made = globals().get(name)
    if made is None:
        from rich.console import Console

        # markup off: Ferry prints hosts' and agents' words, whose brackets are text (a
        # failure shown as `[check: …]` was taken for a style tag and vanished)
        made = globals()[name] = Console(stderr=name == "stderr", soft_wrap=True, markup=False)
        # rich ends the process itself, exit 1, when the reader goes away (`ferry status |
        # head -1`): leave it to the CLI's boundary, which knows it is no error
        made.on_broken_pipe = lambda: _reader_gone(made)  # type: ignore[method-assign]
    return made


class ReaderGone(Exception):  # noqa: N818 - an event, not an error: mapped in cli/main
    """The reader of Ferry's output went away (`ferry status | head -1`). Not an OSError:
    click would turn that into exit 1 on its own."""


def _reader_gone(console: Console | None = None) -> None:
    if console is not None:
        console.quiet = True  # as rich does: nothing more goes to a reader that left
    raise ReaderGone


def __getattr__(name: str) -> Console:  # `out.stdout` before it is made (PEP 562)
    if name == "stdout" or name == "stderr":
        return _console(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def use(mode: Format) -> None:
    """Called first by every command with its --output value."""
    global _mode
    _mode = mode


def mode() -> Format:
    return _mode


def progress(message: str) -> None:
    """A line telling what is happening now (stderr; shown in both modes)."""
    _console("stderr").print(message, highlight=False)


def result(data: Any, text: str | Callable[[], None] | None = None) -> None:
    """Print a command's result: JSON object, or the text (or renderer) for people."""
    if _mode is Format.json:
        try:
            sys.stdout.write(json.dumps(data, indent=2, default=str, sort_keys=False) + "\n")
            sys.stdout.flush()
        except BrokenPipeError:
            _reader_gone()
    elif callable(text):
        text()
    elif text is not None:
        _console("stdout").print(text, highlight=False)
    else:
        _console("stdout").print_json(json.dumps(data, default=str))


def error(payload: dict[str, Any], line: str) -> None:
    if _mode is Format.json:
        try:
            sys.stdout.write(json.dumps(payload, indent=2, default=str) + "\n")
            sys.stdout.flush()
        except BrokenPipeError:  # the reader left: the error line still goes to stderr
            pass
    from rich.markup import escape

    # escaped: a message's own brackets (`after: [qa]`, `[bold]`) are text, not markup
    _console("stderr").print(f"[bold red]error:[/] {escape(line)}", highlight=False, markup=True)
