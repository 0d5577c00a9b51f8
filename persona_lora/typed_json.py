"""JSON (or YAML) <-> dataclasses, with every problem of a document reported at once, and a schema table per
dataclass.

Three documents of this project are typed dataclasses read from text: the adapter folder's manifest (read by cards,
hub tools, merge and the demo), the Space's settings, and the training config a person writes in YAML and
overrides on the command line. Each needs the same answer to "is this well formed?", so this module gives it once,
from the type annotations (and the `choices`/`min`/`max` of a field's metadata): the types are the only place a
schema is written down, the reader checks against them, the writer serialises them, and `docs/ARCHITECTURE.md`'s
schema section is generated from them (`schema_markdown`).

What differs between the documents is how a value is read, not what is valid, so a `Reading` says it: a manifest
is JSON this project wrote (strict: a number is a number), a config is text a person typed (`"1e-4"` is a number,
`yes` a flag, `a, b` a list), and each words its problems the way its readers look for them.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import types
import typing
from collections.abc import Callable
from typing import Any

_JSON_NAMES = {str: "string", int: "integer", float: "number", bool: "boolean (true or false)"}
_TEXT_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}
_FLAG_WORDS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
_INVALID = object()  # a value that failed its check (its problem is recorded): the field keeps its default


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, (int, float)):
        return f"a number ({value})"
    if isinstance(value, str):
        return f"a string ({value[:30]!r})"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def unwrap_optional(tp) -> tuple[Any, bool]:
    """(`X`, True) for `X | None`, (`tp`, False) otherwise."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return inner[0], type(None) in args
    return tp, False


def _is_enum(tp) -> bool:
    return isinstance(tp, type) and issubclass(tp, enum.Enum)


@dataclasses.dataclass(frozen=True)
class Wording:
    """How a document's problems are written (`str.format` templates over key, found, expected, value, choices,
    limit). Each reader keeps the wording its users and tests know; the checks behind them are the same."""

    missing: str
    null: str
    wrong: str
    not_list: str
    not_object: str
    not_choice: str
    below: str
    above: str
    found: Callable[[Any], str]  # how an offending value is shown
    names: dict  # type -> its name in "expected ..."

    def expected(self, tp) -> str:
        return _type_name(tp, self.names)


JSON_WORDING = Wording(
    missing='"{key}" is missing', null='"{key}" is null, expected {expected}',
    wrong='"{key}" is {found}, expected {expected}', not_list='"{key}" must be a list, found {found}',
    not_object='"{key}" must be an object, found {found}', not_choice='"{key}" is {found}, expected one of {choices}',
    below='"{key}" is {value}, expected at least {limit}', above='"{key}" is {value}, expected at most {limit}',
    found=_describe, names=_JSON_NAMES,
)
TEXT_WORDING = Wording(
    missing="{key}: is missing", null="{key}: expected {expected}, got None", wrong="{key}: expected {expected}, got "
    "{found}", not_list="{key}: expected {expected}, got {found}", not_object="{key}: must be a mapping of keys, got "
    "{found}", not_choice="{key}: {value!r} is not one of {choices}", below="{key}: must be >= {limit}, got {value}",
    above="{key}: must be <= {limit}, got {value}", found=repr, names=_TEXT_NAMES,
)


@dataclasses.dataclass(frozen=True)
class Reading:
    """How a document is read.

    `from_text`: the values were typed by a person (YAML, `--set`): a string that spells a number, a flag or an
    enum member is read as one, a flag as its word where a string is wanted (`resume: true`), `a, b` as a list of
    names, and an empty section (`base:`) as one with every default. Otherwise values must have their JSON type
    (an integer is a number, nothing else converts). `unknown(where, key, known_names)`: the problem an unknown key
    is; None lists it in `unknown` instead (a manifest of a newer writer is still read, with a warning)."""

    wording: Wording = JSON_WORDING
    from_text: bool = False
    unknown: Callable[[str, str, list[str]], str] | None = None


JSON = Reading()


def from_json(cls, data: Any, where: str, problems: list[str], unknown: list[str], reading: Reading = JSON):
    """Build dataclass `cls` from parsed JSON (or YAML); problems go to `problems`, unknown keys to `unknown` (or,
    as the `reading` says, to `problems`).

    Returns None (with a problem recorded) when `data` is not an object or a required field is missing. Fields
    missing from `data` take their defaults, as do fields whose value has a problem, so the object is still built
    and later checks can run on it: every problem of the document is found in one pass."""
    out = _object(cls, data, where, problems, unknown, reading)
    return None if out is _INVALID else out


def _object(cls, data: Any, where: str, problems: list[str], unknown: list[str], reading: Reading):
    w = reading.wording
    if not isinstance(data, dict):
        problems.append(w.not_object.format(key=where, found=w.found(data)) if where else "expected an object")
        return _INVALID
    hints = _hints(cls)
    by_name = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, raw in data.items():
        key = f"{where}.{name}" if where else str(name)
        f = by_name.get(name)
        if f is None:
            if reading.unknown is None:
                unknown.append(key)
            else:
                problems.append(reading.unknown(where, str(name), list(by_name)))
            continue
        value = _value(hints[name], raw, key, problems, unknown, reading)
        if value is not _INVALID and _within(f.metadata, value, key, problems, w):
            kwargs[name] = value
    for f in by_name.values():
        if f.name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            problems.append(w.missing.format(key=f"{where}.{f.name}" if where else f.name))
    try:
        return cls(**kwargs)
    except TypeError:  # a required field is missing or invalid: already recorded
        return _INVALID


def _within(meta, value: Any, key: str, problems: list[str], w: Wording) -> bool:
    """The field's own limits (`choices`, `min`, `max` in its metadata) on an already well-typed value."""
    if value is None:
        return True
    if "choices" in meta and value not in meta["choices"]:
        problems.append(w.not_choice.format(key=key, value=value, found=w.found(value),
                                            choices=", ".join(map(str, meta["choices"]))))
        return False
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "min" in meta and value < meta["min"]:
            problems.append(w.below.format(key=key, value=value, limit=meta["min"]))
            return False
        if "max" in meta and value > meta["max"]:
            problems.append(w.above.format(key=key, value=value, limit=meta["max"]))
            return False
    return True


def _value(tp, value: Any, key: str, problems: list[str], unknown: list[str], reading: Reading):
    if tp is typing.Any:  # any JSON value, null included
        return value
    w = reading.wording
    tp, optional = unwrap_optional(tp)
    if value is None:
        if dataclasses.is_dataclass(tp) and reading.from_text and not optional:
            value = {}  # `section:` with nothing under it: every default
        else:
            if not optional:
                problems.append(w.null.format(key=key, expected=w.expected(tp)))
                return _INVALID
            return None
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _object(tp, value, key, problems, unknown, reading)
    if origin is list:
        if reading.from_text and isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            problems.append(w.not_list.format(key=key, found=w.found(value), expected=w.expected(tp)))
            return _INVALID
        (item,) = typing.get_args(tp)
        items = [_value(item, v, f"{key}[{i}]", problems, unknown, dataclasses.replace(reading, from_text=False))
                 for i, v in enumerate(value)]
        return _INVALID if any(v is _INVALID for v in items) else items
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(w.not_object.format(key=key, found=w.found(value), expected=w.expected(tp)))
            return _INVALID
        _, item = typing.get_args(tp)
        items = {str(k): _value(item, v, f"{key}.{k}", problems, unknown, reading) for k, v in value.items()}
        return _INVALID if any(v is _INVALID for v in items.values()) else items
    if _is_enum(tp):
        text = _scalar(str, value, reading.from_text)
        try:
            return tp(text)
        except ValueError:
            if text is _INVALID:
                problems.append(w.wrong.format(key=key, found=w.found(value), expected=w.expected(tp)))
            else:
                problems.append(w.not_choice.format(key=key, value=text, found=w.found(value),
                                                    choices=", ".join(m.value for m in tp)))
            return _INVALID
    converted = _scalar(tp, value, reading.from_text)
    if converted is _INVALID:
        problems.append(w.wrong.format(key=key, found=w.found(value), expected=w.expected(tp)))
    return converted


def _scalar(tp, value: Any, from_text: bool):
    """`value` as `tp` (a JSON scalar type), or _INVALID. JSON: only an integer converts (to a number); text also
    gives numbers and flags from their spelling and strings from numbers and flags."""
    if tp is bool:
        if isinstance(value, bool):
            return value
        if from_text and isinstance(value, str) and value.lower() in _FLAG_WORDS:
            return _FLAG_WORDS[value.lower()]
        return _INVALID
    if isinstance(value, bool):  # a flag is no number, and spells a string only when typed as text
        return ("true" if value else "false") if tp is str and from_text else _INVALID
    if tp is int:
        if isinstance(value, int):
            return value
        if from_text and isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                return _INVALID
        return _INVALID
    if tp is float:
        if isinstance(value, (int, float)):
            return float(value)
        if from_text and isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                return _INVALID
        return _INVALID
    if tp is str:
        if isinstance(value, str):
            return value
        return str(value) if from_text and isinstance(value, (int, float)) else _INVALID
    return value if isinstance(value, tp) else _INVALID


def to_json(obj) -> Any:
    """A dataclass tree as plain JSON values, in field order. A section (a nested dataclass) that is None is left
    out, as is a scalar field marked `omit_none`; other None values stay `null`, so every manifest lists the same
    keys."""
    if dataclasses.is_dataclass(obj):
        hints = _hints(type(obj))
        out = {}
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if v is None and (
                f.metadata.get("omit_none") or dataclasses.is_dataclass(unwrap_optional(hints[f.name])[0])
            ):
                continue
            out[f.name] = to_json(v)
        return out
    if isinstance(obj, list):
        return [to_json(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_json(v) for k, v in obj.items()}
    if isinstance(obj, enum.Enum):  # written as its value: the document reads the same as with a plain string
        return obj.value
    return obj


@functools.cache
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def field_types(cls) -> dict[str, Any]:
    """The resolved type of each field of dataclass `cls` (annotations are strings under `from __future__`)."""
    return dict(_hints(cls))


def _type_name(tp, names: dict = _JSON_NAMES) -> str:
    tp, optional = unwrap_optional(tp)
    origin = typing.get_origin(tp)
    text = names is _TEXT_NAMES
    if dataclasses.is_dataclass(tp):
        name = "a mapping of keys" if text else f"object ({tp.__name__})"
    elif origin is list:
        item = _type_name(typing.get_args(tp)[0], names)
        name = f"a list of {item.removeprefix('a ').removeprefix('an ')}s" if text else f"list of {item}"
    elif origin is dict:
        name = f"object of {_type_name(typing.get_args(tp)[1], names)}"
    elif tp is typing.Any:
        name = "any JSON value"
    elif _is_enum(tp):
        name = f"one of {', '.join(m.value for m in tp)}" if text else " | ".join(repr(m.value) for m in tp)
    else:
        name = names.get(tp, getattr(tp, "__name__", str(tp)))
    if not optional:
        return name
    return name if text else f"{name} or null"


def schema_markdown(cls, title: str) -> str:
    """One markdown table per dataclass reachable from `cls`: field, JSON type, required, meaning."""
    seen: list = []

    def walk(c) -> None:
        if c in seen:
            return
        seen.append(c)
        for f in dataclasses.fields(c):
            for t in _nested(typing.get_type_hints(c)[f.name]):
                walk(t)

    walk(cls)
    parts = [title]
    for c in seen:
        parts.append(f"\n### `{c.__name__}`\n\n{(c.__doc__ or '').strip()}\n")
        parts.append("| field | type | required | meaning |\n|---|---|---|---|")
        hints = typing.get_type_hints(c)
        for f in dataclasses.fields(c):
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            help_text = f.metadata.get("help", "").replace("|", "\\|")
            parts.append(f"| `{f.name}` | {_type_name(hints[f.name])} | {'yes' if required else ''} | {help_text} |")
    return "\n".join(parts) + "\n"


def _nested(tp) -> list:
    tp, _ = unwrap_optional(tp)
    if dataclasses.is_dataclass(tp):
        return [tp]
    return [n for a in typing.get_args(tp) for n in _nested(a)]
