"""Include/exclude globs of a release unit, matched against unit-relative POSIX paths.

Rules (a small, documented subset of gitignore):
- `*` matches within one path component, `?` one character, `[abc]`/`[!abc]` a class;
  `**` matches any number of components (`**/*.py`, `static/**`).
- A pattern without `/` matches a name at any depth (`*.pyc`, `node_modules`).
- A pattern with `/` matches from the unit's root (`config/*.toml`); a trailing `/`
  means "this directory" (`logs/`).
- A pattern matching a directory matches everything below it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


class GlobError(ValueError):
    pass


@dataclass(frozen=True)
class Glob:
    pattern: str
    regex: re.Pattern[str]

    def matches(self, path: str) -> bool:
        """True when the pattern matches `path` or one of its parent directories."""
        parts = path.split("/")
        return any(self.regex.fullmatch("/".join(parts[:i])) for i in range(1, len(parts) + 1))


def compile_glob(pattern: str) -> Glob:
    if not pattern or not pattern.strip():
        raise GlobError("an empty pattern matches nothing")
    if pattern.startswith("/"):
        raise GlobError(f"{pattern!r} is absolute; patterns are relative to the unit's source")
    body = pattern.rstrip("/")
    if not body:
        raise GlobError(f"{pattern!r} names no file or directory")
    if ".." in body.split("/"):
        raise GlobError(f"{pattern!r} climbs out of the unit with '..'")
    anchored = "/" in body
    regex = _translate(body, pattern)
    if not anchored:
        regex = "(?:.*/)?" + regex
    return Glob(pattern, re.compile(regex, re.DOTALL))


def _translate(body: str, pattern: str) -> str:
    out: list[str] = []
    i, n = 0, len(body)
    while i < n:
        c = body[i]
        if c == "*":
            if body.startswith("**", i):
                at_start = i == 0 or body[i - 1] == "/"
                end = i + 2
                if at_start and (end == n or body[end] == "/"):
                    if end == n:
                        out.append(".*")
                        i = end
                    else:
                        out.append("(?:.*/)?")
                        i = end + 1
                    continue
                raise GlobError(f"{pattern!r}: '**' must be a whole path component")
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            close = body.find("]", i + 2 if body[i + 1 : i + 2] in ("!", "]") else i + 1)
            if close < 0:
                raise GlobError(f"{pattern!r}: '[' at position {i + 1} is never closed")
            inner = body[i + 1 : close]
            if inner.startswith("!"):
                inner = "^" + inner[1:]
            if "/" in inner:
                raise GlobError(f"{pattern!r}: a [class] cannot match '/'")
            out.append("[" + inner.replace("\\", "\\\\") + "]")
            i = close
        else:
            out.append(re.escape(c))
        i += 1
    regex = "".join(out)
    try:
        re.compile(regex)
    except re.error as exc:
        raise GlobError(f"{pattern!r}: {exc}") from None
    return regex


def selected(path: str, include: list[Glob], exclude: list[Glob]) -> bool:
    """A file is in the unit when some include matches (or there are none) and no exclude."""
    if include and not any(g.matches(path) for g in include):
        return False
    return not any(g.matches(path) for g in exclude)
