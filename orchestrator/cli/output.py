"""Output for every command: human text (rich) by default, one JSON object with `--output json`.

Results go to stdout; progress and warnings go to stderr, so `--output json` stays parseable.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from enum import StrEnum
from typing import Annotated, Any

import typer
from rich.console import Console


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
stdout = Console(soft_wrap=True)
stderr = Console(stderr=True, soft_wrap=True)


def use(mode: Format) -> None:
    """Called first by every command with its --output value."""
    global _mode
    _mode = mode


def mode() -> Format:
    return _mode


def progress(message: str) -> None:
    """A line telling what is happening now (stderr; shown in both modes)."""
    stderr.print(message, highlight=False)


def result(data: Any, text: str | Callable[[], None] | None = None) -> None:
    """Print a command's result: JSON object, or the text (or renderer) for people."""
    if _mode is Format.json:
        sys.stdout.write(json.dumps(data, indent=2, default=str, sort_keys=False) + "\n")
        sys.stdout.flush()
    elif callable(text):
        text()
    elif text is not None:
        stdout.print(text, highlight=False)
    else:
        stdout.print_json(json.dumps(data, default=str))


def error(payload: dict[str, Any], line: str) -> None:
    if _mode is Format.json:
        sys.stdout.write(json.dumps(payload, indent=2, default=str) + "\n")
        sys.stdout.flush()
    stderr.print(f"[bold red]error:[/] {line}", highlight=False)
