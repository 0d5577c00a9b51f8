"""`persona-lora leaderboard`: Bradley–Terry ratings of every model the votes compared, with bootstrap 95%
intervals, written as `leaderboard.json`, a self-contained `leaderboard.html` and two PNG plots.

Why from votes and not from a run: arena and blind A/B votes (`persona_lora.votes`) are the one judgement of
"which adapter is better" a person made; this page puts all of them, from any number of stores, exports and hub
datasets (`persona_lora.vote_sources`: each vote counted once, models by content), into one table. The fit is
`persona_lora.ratings` (ties as half wins; a one-game prior keeps ratings finite), the same the demo's live table
shows, so the page and the demo never disagree on the same votes.

The page is opened from disk and shows names nobody vetted (folder names, hub ids), so like the eval report it
loads nothing (inline CSS and SVG, no scripts) and every text is escaped by Jinja's autoescaping.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np

from persona_lora.ratings import PRIOR_GAMES, Ratings, bradley_terry, tally
from persona_lora.vote_sources import VoteSet

SCHEMA = "persona-lora/leaderboard@1"
FILES = ("leaderboard.json", "leaderboard.html", "ratings.png", "win_rates.png")
TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"


def rate(votes: VoteSet, *, rounds: int, seed: int) -> tuple[dict, Ratings]:
    """The leaderboard's JSON object (models best first) and the ratings it was built from."""
    r = bradley_terry(tally(votes.battles()), rounds=rounds, seed=seed)
    order = r.order()
    win_rate = r.win_rate()
    models = []
    for rank, i in enumerate(order, 1):
        key = r.models[i]
        models.append({
            "rank": rank, "name": votes.names.get(key, key), "key": key, "aliases": votes.aliases.get(key, []),
            "rating": _num(r.rating[i]), "ci_low": _num(r.ci_low[i]), "ci_high": _num(r.ci_high[i]),
            "votes": int(r.votes[i]), "wins": int(r.decisive[i].sum()), "losses": int(r.decisive[:, i].sum()),
            "ties": int(r.ties[i].sum()), "win_rate": _num(win_rate[i]),
        })
    pick = np.ix_(order, order)
    report = {
        "schema": SCHEMA,
        "sources": votes.sources,
        "votes": len(votes.votes),
        "read": votes.read,
        "duplicates_left_out": votes.duplicates,
        "method": {
            "model": "Bradley-Terry, P(i beats j) = 1 / (1 + 10^((R_j - R_i) / 400))",
            "ties": "a tie or 'both bad' is half a win for each side",
            "prior": f"each model plays {PRIOR_GAMES:g} virtual tie against a reference at the mean (keeps every "
                     "rating finite)",
            "intervals": f"95% percentile bootstrap over {rounds} resamples of the votes (seed {seed})",
        },
        "models": models,
        "pairwise_votes": _matrix(r.games[pick]),
        "pairwise_win_rate": _matrix(r.pairwise_win_rate()[pick]),
        "predicted_win_probability": _matrix(r.predicted()[pick]),
        "groups": [[votes.names.get(k, k) for k in g] for g in r.groups] if len(r.groups) > 1 else [],
    }
    return report, r


def _num(x: float) -> float | None:
    return None if x is None or not math.isfinite(float(x)) else round(float(x), 4)


def _matrix(m: np.ndarray) -> list[list[float | None]]:
    return [[_num(x) for x in row] for row in m]


def table_lines(report: dict) -> list[str]:
    """The ranking as plain text, for the terminal."""
    width = max([len(m["name"]) for m in report["models"]] + [5])
    lines = [f"{'rank':>4}  {'model':<{width}}  {'rating':>6}  {'95% CI':>15}  {'votes':>5}  win rate"]
    for m in report["models"]:
        ci = "n/a" if m["ci_low"] is None else f"{m['ci_low']:.0f} to {m['ci_high']:.0f}"
        rate_text = "n/a" if m["win_rate"] is None else f"{100 * m['win_rate']:.0f}%"
        lines.append(f"{m['rank']:>4}  {m['name']:<{width}}  {m['rating']:>6.0f}  {ci:>15}  {m['votes']:>5}  "
                     f"{rate_text}")
    return lines


# ------------------------------------------------------------------------------------------------- writing


def write(report: dict, folder: Path) -> list[Path]:
    """Every file of FILES into `folder` (the command stages it and renames it into place)."""
    import json

    from persona_lora.evaluation.leaderboard_plots import ratings_png, win_rate_png

    (folder / "leaderboard.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n",
                                             encoding="utf-8")
    (folder / "leaderboard.html").write_text(render_html(report), encoding="utf-8")
    ratings_png(report, folder / "ratings.png")
    win_rate_png(report, folder / "win_rates.png")
    return [folder / f for f in FILES]


@functools.lru_cache(maxsize=1)
def _environment():
    import jinja2

    return jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES_DIR), autoescape=True,
                              undefined=jinja2.StrictUndefined)


def render_html(report: dict) -> str:
    return _environment().get_template("leaderboard.html").render(
        r=report, plot=interval_plot(report), cell=_cell, pct=_pct)


def interval_plot(report: dict, width: int = 640, row: int = 26, pad: int = 150) -> dict:
    """Numbers for the inline SVG: one row per model, its interval as a bar and its rating as a dot."""
    models = [m for m in report["models"] if m["ci_low"] is not None]
    values = [v for m in models for v in (m["ci_low"], m["ci_high"], m["rating"])] or [1000.0]
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    inner = width - pad - 20

    def x(v: float) -> float:
        return round(pad + (v - low) / span * inner, 1)

    rows = [{"y": 20 + n * row, "name": m["name"], "x0": x(m["ci_low"]), "x1": x(m["ci_high"]), "dot": x(m["rating"]),
             "rating": f"{m['rating']:.0f}"} for n, m in enumerate(models)]
    return {"width": width, "height": 30 + len(rows) * row, "rows": rows, "low": f"{low:.0f}", "high": f"{high:.0f}",
            "pad": pad, "right": pad + inner}


def _cell(x: float | None) -> str:
    """A heatmap cell's background: red below 50%, green above, white at 50% or unknown."""
    if x is None:
        return "background:#eeeeee"
    d = max(-1.0, min(1.0, (x - 0.5) * 2))
    r, g, b = (255, int(255 * (1 + d)), int(255 * (1 + d))) if d < 0 else (int(255 * (1 - d)), 255, int(255 * (1 - d)))
    return f"background:rgb({(r + 255) // 2},{(g + 255) // 2},{(b + 255) // 2})"


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.0f}%"
