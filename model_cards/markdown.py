"""Markdown text for model cards: escaping, code spans and blocks, numbers, and the final tidy-up.

Card values come from manifests, and manifests carry text nobody vetted for markdown: model answers with HTML
or links in them, prompts with pipes and newlines, chat templates full of backticks. Every value therefore goes
through one of these helpers before a template sees it, so the templates only lay text out and a sample answer
can never break a table, run a script or inject a link on the Hub page.
"""

from __future__ import annotations

import html
import math
import re
from typing import Any

# Values that say nothing: a card row showing one of them is dropped rather than published.
_FILLERS = {"unknown", "n/a", "na", "none", "null", "todo", "tbd", "-", "?", "more information needed"}


def esc(s: Any) -> str:
    """Text safe inside markdown prose or a table cell: HTML shown not run, no links/images, one line."""
    text = html.escape(str(s), quote=False)
    text = re.sub(r"([\\`*_\[\]~|#])", r"\\\1", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text.replace("\n", "<br>")


def code(s: Any) -> str:
    """An inline code span for `s` (one line; `|` escaped so it can sit in a table): ids, hashes, versions."""
    text = " ".join(str(s).split("\n"))
    ticks = "`" * (max((len(r) for r in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{ticks}{pad}{text}{pad}{ticks}".replace("|", "\\|")


def fenced(body: str, lang: str = "") -> str:
    """A fenced code block whose fence is longer than any backtick run inside `body` (chat templates, prompts)."""
    longest = max((len(r) for r in re.findall(r"`{3,}", body)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{lang}\n{body.rstrip(chr(10))}\n{fence}"


def is_num(x: Any) -> bool:
    """A finite int or float (not a bool): the only values a card shows as a figure."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def num(x: Any) -> str:
    """Integers with thousands separators, floats without noise, booleans as yes/no, everything else as text."""
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        if x.is_integer() and abs(x) < 1e15:
            return f"{int(x):,}"
        return f"{x:.6g}"
    return str(x)


def loss(x: Any) -> str:
    """A loss value to four decimals, the precision at which two runs of a persona are worth comparing."""
    return f"{x:.4f}" if is_num(x) else str(x)


def duration(seconds: float) -> str:
    """A wall time a reader takes in at a glance: `95.2 s`, `12 min 05 s`, `10 h 03 min`."""
    s = float(seconds)
    if s < 60:
        return f"{s:.1f} s"
    m, sec = divmod(int(round(s)), 60)
    if m < 60:
        return f"{m} min {sec:02d} s"
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min"


def present(x: Any) -> bool:
    """Something true to say: not None, not empty, not a filler such as "unknown" or "N/A"."""
    if x is None or x == "" or x == [] or x == {}:
        return False
    return not (isinstance(x, str) and x.strip("` ").lower() in _FILLERS)


def tidy(text: str) -> str:
    """Collapse runs of blank lines the templates' `if`s leave behind (outside code blocks); one final newline.

    Regeneration must be byte-identical, so the layout of a card depends only on which sections it has."""
    out: list[str] = []
    fence: str | None = None
    for line in text.replace("\r\n", "\n").split("\n"):
        stripped = line.strip()
        if fence is None:
            opening = re.match(r"^(`{3,}|~{3,})", stripped)
            if opening:
                fence = opening.group(1)
            line = line.rstrip()
            if not line and out and not out[-1]:
                continue
        elif stripped.startswith(fence[0] * len(fence)) and not stripped.strip(fence[0]):
            fence = None
        out.append(line)
    return "\n".join(out).strip("\n") + "\n"
