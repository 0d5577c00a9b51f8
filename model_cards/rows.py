"""Card tables as data: rows of (label, manifest path, formatter), evaluated against a manifest by `table`.

Every figure on a card must come from the run's manifest, and a figure the manifest does not have must not
appear at all (no "unknown", no "N/A"). Writing each table as a list of rows keeps both promises visible in one
place: the path names where a figure comes from (fields of the typed `Manifest`, so a path that names no field
fails at once instead of silently showing nothing), the formatter decides how it is written and returns None
when the value is not one worth showing, and `table` drops those rows. The formatters here are the common ones;
a section with a figure of its own kind defines its formatter beside its table.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from persona_lora.artifact import Manifest
from persona_lora.model_cards.markdown import code, duration, esc, is_num, loss, num, present

# Takes the manifest value (as typed there), returns its markdown or None when the value says nothing.
Formatter = Callable[[Any], str | None]
# (label, manifest path: dotted field names, or a tuple of them, formatter)
Row = tuple[str, str | tuple[str, ...], Formatter]


def lookup(m: Manifest, path: str | tuple[str, ...]) -> Any:
    """The value at a path of field names (`dataset.stats.records`), None where an optional section on the way is
    absent. A name that is not a field of its section raises AttributeError: a row must name a real field."""
    value: Any = m
    for name in path.split(".") if isinstance(path, str) else path:
        if value is None:
            return None
        value = getattr(value, name)
    return value


def table(m: Manifest, rows: list[Row]) -> list[tuple[str, str]]:
    """(label, formatted value) for each row whose value is present, in the rows' order."""
    cells = [(label, fmt(lookup(m, path))) for label, path, fmt in rows]
    return [(label, value) for label, value in cells if present(value)]


def as_number(v: Any) -> str | None:
    """Counts and sizes: a finite number with thousands separators."""
    return num(v) if is_num(v) else None


def as_loss(v: Any) -> str | None:
    """A loss, to the precision at which two runs are worth comparing."""
    return loss(v) if is_num(v) else None


def as_duration(v: Any) -> str | None:
    """Seconds, written as a wall time."""
    return duration(v) if is_num(v) else None


def as_yes_no(v: Any) -> str | None:
    """A flag the run recorded (absent stays absent: not recorded is not "no")."""
    return num(v) if isinstance(v, bool) else None


def as_code(v: Any) -> str | None:
    """Identifiers (ids, hashes, versions, dtypes) as code spans, so a reader can copy them exactly."""
    return code(v) if isinstance(v, str) and v else None


def as_code_list(v: Any) -> str | None:
    """A list of identifiers (e.g. architectures) as comma-separated code spans."""
    return ", ".join(code(a) for a in v) if isinstance(v, list) and v else None


def as_text(v: Any) -> str | None:
    """Free text, escaped so it cannot break the table it sits in."""
    return esc(v) if isinstance(v, str) and v else None


def as_setting(v: Any) -> str | None:
    """A setting exactly as the run had it (numbers, flags and names alike)."""
    if isinstance(v, str):
        return esc(v)
    return esc(num(v)) if isinstance(v, (int, float, bool)) else None


def spelled_out(meanings: dict[str, str]) -> Formatter:
    """A formatter writing a manifest keyword as the phrase it stands for (unknown keywords as they are)."""
    return lambda v: esc(meanings.get(v, v or "")) or None
