"""Reading users' YAML files into pydantic models, with errors that name file and field."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from orchestrator.errors import SpecError

M = TypeVar("M", bound=BaseModel)
# libyaml's parser where PyYAML was built with it: a 1,000-host inventory parses ~10x faster
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

_FIXES = {
    "extra_forbidden": "remove it, or check its spelling",
    "missing": "add it",
    "date_type": "quote it: a bare date is read as a date, not text",
}


def pattern_words(err: Any) -> str | None:
    """What a name field takes, in words, for pydantic's 'should match pattern <regex>'."""
    if err.get("type") != "string_pattern_mismatch":
        return None
    pattern = str((err.get("ctx") or {}).get("pattern", ""))
    extra = ", '+', '~'" if "+~" in pattern else ""
    return (
        f"not a valid name: use letters, digits, '.', '_', '-'{extra} (a letter or digit "
        "first)" + (", at most 100" if "{0,99}" in pattern else "")
    )


def load_yaml(path: Path, text: str | None = None) -> Any:
    try:
        raw = path.read_text() if text is None else text
    except FileNotFoundError:
        raise SpecError(str(path), "", "file not found", "check the path") from None
    except OSError as exc:
        raise SpecError(str(path), "", f"cannot read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise SpecError(
            str(path), "", f"not UTF-8 text: {exc.reason} at byte {exc.start}"
        ) from None
    try:
        loader = _LOADER(raw)
        try:  # one parse: the node tree is checked for duplicate keys, then constructed
            node = loader.get_single_node()
            if node is None:
                return None
            if dup := duplicate_keys(node):
                raise SpecError(str(path), dup[0], dup[1], "give each key once, or rename one")
            return loader.construct_document(node)
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else ""
        raise SpecError(
            str(path), where, f"not valid YAML: {getattr(exc, 'problem', exc)}"
        ) from None
    except RecursionError:  # a nesting deeper than any user file needs
        raise SpecError(str(path), "", "not valid YAML: nested too deeply") from None


def duplicate_keys(node: yaml.Node, path: str = "") -> tuple[str, str] | None:
    """(dotted field, problem) of the first key given twice in one mapping, if any: YAML
    itself silently keeps the last of two equal keys (a host, a plan key, a unit)."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key, value in node.value:
            name = str(key.value)
            here = f"{path}.{name}" if path else name
            if name in seen and name != "<<":
                parent = path.rsplit(".", 1)[-1]
                what = {"units": "unit", "hosts": "host"}.get(parent, "key")
                return here, (
                    f"{what} '{name}' is given twice (lines {seen[name] + 1} and "
                    f"{key.start_mark.line + 1}); YAML would silently keep only the last"
                )
            seen[name] = key.start_mark.line
            if found := duplicate_keys(value, here):
                return found
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            if found := duplicate_keys(item, f"{path}.{i}"):
                return found
    return None


# what pydantic says of each member of a union the value is not (`waves: [{hosts: 1, …}]`
# is neither an int nor a str): the member the value does have the shape of says more
_NOT_THIS_SHAPE = frozenset(
    {"int_type", "int_parsing", "string_type", "float_type", "float_parsing", "bool_type",
     "bool_parsing", "model_type", "model_attributes_type", "dict_type", "list_type",
     "tuple_type"}
)  # fmt: skip


def _type_tag(part: Any) -> bool:
    return isinstance(part, str) and (
        part in ("int", "str", "float", "bool") or part.startswith(("list[", "tuple[", "dict["))
    )


def _member(part: Any) -> bool:
    """A union member's name as pydantic puts it in a location: a type or a model class."""
    return _type_tag(part) or (isinstance(part, str) and part[:1].isupper() and part.isidentifier())


def _field(loc: tuple[Any, ...], errors: list[Any]) -> str:
    """The dotted field path, without the union members pydantic names in it: a place
    where the errors name different members, all of them types or model classes and one a
    type (`int`, `str`, …), holds member names (`waves.0.ApprovedWave.timeout` is
    `waves.0.timeout`), not keys (a mapping with a key `int` keeps all of its keys)."""
    parts = []
    for k, part in enumerate(loc):
        here = {tuple(e["loc"][:k]) == tuple(loc[:k]) and e["loc"][k] for e in errors
                if len(e["loc"]) > k} - {False}  # fmt: skip
        members = len(here) > 1 and all(_member(p) for p in here)
        if not (members and any(_type_tag(p) for p in here)):
            parts.append(str(part))
    return ".".join(parts) or "(top level)"


def validation_error(path: Path | str, exc: ValidationError) -> SpecError:
    """The first problem, named by file and dotted field path, with a fix where we know one
    (of a union, the problem of the member the value has the shape of)."""
    errors = exc.errors()
    err = next((e for e in errors if e["type"] not in _NOT_THIS_SHAPE), errors[0])
    field = _field(err["loc"], errors)
    msg = pattern_words(err) or err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    fix = _FIXES.get(err["type"])
    # other fields, not this one's own union members (which name it or a field above it)
    others = {_field(e["loc"], errors) for e in errors}
    more = len({f for f in others if f != field and not field.startswith(f + ".")})
    if more:
        msg += f" (and {more} more problem{'s' if more > 1 else ''})"
    return SpecError(str(path), field, msg, fix)


def parse_model(model: type[M], path: Path, data: Any | None = None, **context: Any) -> M:
    """Validate `data` (or the YAML at `path`) as `model`; raise SpecError naming the field."""
    if data is None:
        data = load_yaml(path)
    if not isinstance(data, dict):
        raise SpecError(
            str(path),
            "(top level)",
            "expected a mapping of fields" + (", found an empty file" if data is None else ""),
            "write its fields as `key: value` lines; docs/ describes each file",
        )
    try:
        return model.model_validate(data, context={"base_dir": path.parent, **context})
    except ValidationError as exc:
        raise validation_error(path, exc) from None
