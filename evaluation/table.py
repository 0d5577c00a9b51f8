"""The summary table of an evaluation, as data: which figures, under which labels, written how.

The HTML page and the model card's "Evaluation" section both show this table; defining it once keeps the two
(and the JSON they are rendered from) saying the same thing. A figure the report does not have is left out of a
cell (an empty cell), a metric no model has is left out of the table.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def _get(*path: str) -> Callable[[dict], Any]:
    def get(s: dict) -> Any:
        for key in path:
            s = s.get(key) if isinstance(s, dict) else None
        return s
    return get


def loss_text(v: float) -> str:
    return f"{v:.4f}"


def _ppl(v: float) -> str:
    return f"{v:,.2f}" if v < 1e6 else f"{v:.3g}"


def _percent(v: float) -> str:
    return f"{100 * v:.1f}%"


def _ratio(v: float) -> str:
    return f"{v:.3f}"


def _mean(v: float) -> str:
    return f"{v:,.1f}"


# (key, label, value from a model's summary, formatter)
METRICS: list[tuple[str, str, Callable[[dict], Any], Callable[[Any], str]]] = [
    ("loss", "Loss on the reference answers", _get("loss"), loss_text),
    ("perplexity", "Perplexity", _get("perplexity"), _ppl),
    ("guard_loss", "Forgetting guard: loss", _get("guard", "loss"), loss_text),
    ("marker_rate", "Answers with a persona marker", _get("marker_rate"), _percent),
    ("distinct_1", "Distinct-1", _get("distinct_1"), _ratio),
    ("distinct_2", "Distinct-2", _get("distinct_2"), _ratio),
    ("answer_tokens", "Mean answer length (tokens)", _get("answer_tokens", "mean"), _mean),
    ("answer_chars", "Mean answer length (characters)", _get("answer_chars", "mean"), _mean),
    ("judge_win_rate", "Judge: win rate against the base", _get("judge", "win_rate"), _percent),
]


def judge_interval(s: dict) -> str | None:
    """`[lo, hi]` of the judge's win rate, as percentages, or None."""
    interval = _get("judge", "wilson_95")(s)
    if not (isinstance(interval, list) and len(interval) == 2):
        return None
    return f"{_percent(interval[0])}–{_percent(interval[1])}"


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def summary_table(report: dict, models: list[str] | None = None) -> list[dict]:
    """Rows `{key, label, cells: [{model, value, text}]}` for the models (all of the report's by default)."""
    models = models or report["models"]
    summary = report["summary"]
    rows = []
    for key, label, get, fmt in METRICS:
        cells = []
        for m in models:
            value = get(summary.get(m) or {})
            text = fmt(value) if is_number(value) else ""
            if key == "judge_win_rate" and text and judge_interval(summary[m]):
                text += f" (95% CI {judge_interval(summary[m])})"
            cells.append({"model": m, "value": value if is_number(value) else None, "text": text})
        if any(c["text"] for c in cells):
            rows.append({"key": key, "label": label, "cells": cells})
    return rows
