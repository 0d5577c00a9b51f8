"""JSON <-> dataclasses, with every type problem of a document reported at once, and a schema table per dataclass.

The adapter folder's manifest is read by cards, hub tools, merge and the demo; each of them needs the same answer
to "is this manifest well formed?". This module gives that answer once, from the type annotations of the
dataclasses in `persona_lora.artifact`, so the types are the only place the schema is written down: the reader
checks against them, the writer serialises them, and `docs/ARCHITECTURE.md`'s schema section is generated from
them (`schema_markdown`).
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Any

_JSON_NAMES = {str: "string", int: "integer", float: "number", bool: "boolean (true or false)"}


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


def _unwrap_optional(tp) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return inner[0], type(None) in args
    return tp, False


def from_json(cls, data: Any, where: str, problems: list[str], unknown: list[str]):
    """Build dataclass `cls` from parsed JSON; type problems go to `problems`, unknown keys to `unknown`.

    Returns None (with a problem recorded) when `data` is not an object. Fields missing from `data` take their
    defaults; a required field (one without a default) that is missing is a problem."""
    if not isinstance(data, dict):
        problems.append(f'"{where}" must be an object, found {_describe(data)}' if where else "expected an object")
        return None
    hints = _hints(cls)
    kwargs = {}
    names = set()
    for f in dataclasses.fields(cls):
        names.add(f.name)
        key = f"{where}.{f.name}" if where else f.name
        if f.name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                problems.append(f'"{key}" is missing')
            continue
        kwargs[f.name] = _value(hints[f.name], data[f.name], key, problems, unknown)
    unknown.extend(f"{where}.{k}" if where else k for k in data if k not in names)
    try:
        return cls(**kwargs)
    except TypeError:  # a required field is missing: already recorded
        return None


def _value(tp, value: Any, key: str, problems: list[str], unknown: list[str]):
    if tp is typing.Any:  # any JSON value, null included
        return value
    tp, optional = _unwrap_optional(tp)
    if value is None:
        if not optional:
            problems.append(f'"{key}" is null, expected {_type_name(tp)}')
        return None
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_json(tp, value, key, problems, unknown)
    if origin is list:
        if not isinstance(value, list):
            problems.append(f'"{key}" must be a list, found {_describe(value)}')
            return None
        (item,) = typing.get_args(tp)
        return [_value(item, v, f"{key}[{i}]", problems, unknown) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(f'"{key}" must be an object, found {_describe(value)}')
            return None
        _, item = typing.get_args(tp)
        return {str(k): _value(item, v, f"{key}.{k}", problems, unknown) for k, v in value.items()}
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, tp)
    if not ok:
        problems.append(f'"{key}" is {_describe(value)}, expected {_type_name(tp)}')
        return None
    return float(value) if tp is float else value


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
                f.metadata.get("omit_none") or dataclasses.is_dataclass(_unwrap_optional(hints[f.name])[0])
            ):
                continue
            out[f.name] = to_json(v)
        return out
    if isinstance(obj, list):
        return [to_json(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_json(v) for k, v in obj.items()}
    return obj


@functools.cache
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _type_name(tp) -> str:
    tp, optional = _unwrap_optional(tp)
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        name = f"object ({tp.__name__})"
    elif origin is list:
        name = f"list of {_type_name(typing.get_args(tp)[0])}"
    elif origin is dict:
        name = f"object of {_type_name(typing.get_args(tp)[1])}"
    elif tp is typing.Any:
        name = "any JSON value"
    else:
        name = _JSON_NAMES.get(tp, getattr(tp, "__name__", str(tp)))
    return f"{name} or null" if optional else name


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
    tp, _ = _unwrap_optional(tp)
    if dataclasses.is_dataclass(tp):
        return [tp]
    return [n for a in typing.get_args(tp) for n in _nested(a)]
