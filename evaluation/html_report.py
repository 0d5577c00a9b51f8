"""`report.html`: one self-contained page rendered from `report.json` alone.

Why self-contained and escaped: the page is opened from disk, mailed and attached to pull requests, often where
there is no network, and it shows model output and dataset text nobody vetted. So it loads nothing (inline CSS,
an inline SVG plot, no scripts, no links to fetch), and every text goes through Jinja's autoescaping: a prompt
or an answer holding `<script>` or `<img onerror=…>` is shown as text, never run.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from persona_lora.evaluation.table import judge_interval, loss_text, summary_table

TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"
COLOURS = ("#555555", "#c0392b", "#2471a3", "#1e8449", "#b9770e", "#7d3c98", "#17a589", "#a04000")
PLOT_W, PLOT_H, PAD = 760, 220, 36


@functools.lru_cache(maxsize=1)
def _environment():
    import jinja2

    return jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES_DIR), autoescape=True,
                              undefined=jinja2.StrictUndefined)


def loss_plot(report: dict) -> dict | None:
    """Per model, the points (x, y) of its per-prompt loss on the main set, scaled into the plot's box; None
    when no prompt has a loss. Numbers only: nothing of the data reaches the SVG but through escaping."""
    rows, models = report["rows"], report["models"]
    values = [r["loss"][m] for r in rows for m in models if isinstance(r["loss"].get(m), (int, float))]
    if not values:
        return None
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    step = (PLOT_W - 2 * PAD) / max(len(rows) - 1, 1)
    series = []
    for k, m in enumerate(models):
        points = [(round(PAD + i * step, 1), round(PLOT_H - PAD - (r["loss"][m] - low) / span * (PLOT_H - 2 * PAD), 1),
                   r["index"], loss_text(r["loss"][m]))
                  for i, r in enumerate(rows) if isinstance(r["loss"].get(m), (int, float))]
        series.append({"model": m, "colour": COLOURS[k % len(COLOURS)], "points": points,
                       "line": " ".join(f"{x},{y}" for x, y, _, _ in points)})
    return {"width": PLOT_W, "height": PLOT_H, "pad": PAD, "series": series, "low": loss_text(low),
            "high": loss_text(high), "prompts": len(rows)}


def render_html(report: dict) -> str:
    summary = report["summary"]
    return _environment().get_template("report.html").render(
        r=report, table=summary_table(report), plot=loss_plot(report), loss_text=loss_text,
        intervals={m: judge_interval(summary[m]) for m in report["models"]},
    )


def write_html(report: dict, path: Path) -> Path:
    tmp = Path(path).with_suffix(".html.tmp")
    tmp.write_text(render_html(report), encoding="utf-8")
    os.replace(tmp, path)
    return Path(path)
