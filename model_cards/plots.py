"""The loss curve PNG embedded in every card.

Drawn with matplotlib's Agg canvas on a private `Figure` (never `pyplot`), so it works on headless machines,
touches no global matplotlib state of the caller, and gives the same bytes for the same history: cards are
regenerated often and an unchanged run must not produce a changed file (or a needless hub commit).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from persona_lora.artifact import HistoryEntry

log = logging.getLogger(__name__)

# Small on purpose: it is a thumbnail in a model card, not a dashboard.
_FIGSIZE = (6.0, 3.4)
_DPI = 100
# PNG text chunks matplotlib would otherwise fill with its version: keep the file independent of it.
_PNG_METADATA = {"Software": None}

# `metrics.history` as the typed manifest holds it; an entry may also be its JSON object (`{"step": 1, "loss": 2.0}`).
History = Sequence[HistoryEntry | dict[str, Any]]


def _field(entry: HistoryEntry | dict[str, Any], name: str) -> Any:
    return entry.get(name) if isinstance(entry, dict) else getattr(entry, name, None)


def _points(history: History, key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the entries that carry a finite `key` and a numeric `step`, in step order."""
    pairs = []
    for entry in history or []:
        step, value = _field(entry, "step"), _field(entry, key)
        if isinstance(step, bool) or isinstance(value, bool):
            continue
        if not isinstance(step, (int, float)) or not isinstance(value, (int, float)):
            continue
        if not (math.isfinite(step) and math.isfinite(value)):
            continue
        pairs.append((float(step), float(value)))
    pairs.sort(key=lambda p: p[0])
    return [p[0] for p in pairs], [p[1] for p in pairs]


def has_loss_points(history: History | None) -> bool:
    """True when `history` holds at least one train or eval loss that a plot could show."""
    return bool(_points(history or [], "loss")[0] or _points(history or [], "eval_loss")[0])


def write_loss_curve(history: History, out_png: Path) -> Path | None:
    """Plot train loss and eval loss against step into `out_png`; None (and no file) when there is nothing to plot.

    `history` is the manifest's `metrics.history`: train entries carry `loss`, eval entries `eval_loss`.
    """
    train_x, train_y = _points(history, "loss")
    eval_x, eval_y = _points(history, "eval_loss")
    if not train_x and not eval_x:
        log.info("no loss values in the history: no loss curve written")
        return None

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=_FIGSIZE, dpi=_DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if train_x:
        ax.plot(train_x, train_y, label="train loss", color="#1f77b4", linewidth=1.5,
                marker="o" if len(train_x) == 1 else None)
    if eval_x:
        ax.plot(eval_x, eval_y, label="eval loss", color="#d62728", linewidth=1.5, marker="o", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper right", frameon=False)
    fig.tight_layout()

    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, format="png", dpi=_DPI, metadata=_PNG_METADATA)
    log.debug("wrote loss curve %s (%d train, %d eval points)", out_png.name, len(train_x), len(eval_x))
    return out_png
