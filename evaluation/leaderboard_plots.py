"""The leaderboard's PNG plots: ratings with their 95% intervals, and the pairwise win-rate heatmap.

Drawn with matplotlib's Agg canvas on a private `Figure` (never `pyplot`), as the card's loss curve is, so they
work on headless machines and touch no global matplotlib state. Names are drawn as plain text (`usetex` off,
dollar signs escaped), so a folder called `$x$` is shown as it is.
"""

from __future__ import annotations

from pathlib import Path

_DPI = 100
_PNG_METADATA = {"Software": None}  # keep the bytes independent of matplotlib's version


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


LABEL_CHARS = 40  # longer names are cut in the plots (the page and the JSON keep them whole)


def _label(text: str) -> str:
    text = text if len(text) <= LABEL_CHARS else text[:LABEL_CHARS - 1] + "…"
    return text.replace("$", r"\$")  # no mathtext from a model's name


def ratings_png(report: dict, path: Path) -> Path:
    """Each model's rating (dot) and 95% interval (bar), best at the top."""
    models = [m for m in report["models"] if m["ci_low"] is not None]
    longest = max((len(_label(m["name"])) for m in models), default=0)
    fig = _figure(5.0 + 0.08 * longest, 1.2 + 0.4 * max(len(models), 1))
    ax = fig.add_subplot(1, 1, 1)
    ys = list(range(len(models)))[::-1]
    for y, m in zip(ys, models):
        ax.plot([m["ci_low"], m["ci_high"]], [y, y], color="#2471a3", linewidth=3, solid_capstyle="butt")
        ax.plot([m["rating"]], [y], "o", color="#c0392b")
    ax.set_yticks(ys, [_label(m["name"]) for m in models])
    ax.set_xlabel("rating (Bradley-Terry, Elo scale) with 95% bootstrap interval")
    ax.grid(axis="x", alpha=0.3)
    fig.savefig(path, format="png", metadata=_PNG_METADATA)
    return path


def win_rate_png(report: dict, path: Path) -> Path:
    """Observed share of the row model's wins over the column model (ties as halves); grey: never compared."""
    import numpy as np

    names = [_label(m["name"]) for m in report["models"]]
    k = len(names)
    values = np.array([[np.nan if x is None else x for x in row] for row in report["pairwise_win_rate"]], dtype=float)
    size = 1.6 + 0.55 * k
    longest = max((len(n) for n in names), default=0)  # room for the names beside and under the cells
    fig = _figure(size + 1.5 + 0.08 * longest, size + 0.06 * longest)
    ax = fig.add_subplot(1, 1, 1)
    ax.set_facecolor("#dddddd")
    image = ax.imshow(np.ma.masked_invalid(values), cmap="RdYlGn", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            if not np.isnan(values[i, j]):
                ax.text(j, i, f"{100 * values[i, j]:.0f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(k), names, rotation=45, ha="right")
    ax.set_yticks(range(k), names)
    ax.set_xlabel("against")
    fig.colorbar(image, ax=ax, label="row model's win rate")
    fig.savefig(path, format="png", metadata=_PNG_METADATA)
    return path
