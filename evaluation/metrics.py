"""The figures of an evaluation, as pure functions of the answers and losses (no model, no files).

Why pure: the report is rebuilt from the rows on disk every time (also after a resumed run), so every figure must
follow from the rows alone, and a test can check each figure by hand.

- loss: token-weighted mean negative log-likelihood of the reference answers (answer tokens and their EOS, as
  training's labels), so a long answer counts as much as its tokens; perplexity is its exponential;
- answer length: in generated tokens and in characters;
- distinct-1/2: unique n-grams over all n-grams of all answers of one model (how repetitive it is). The units
  are language-neutral: every CJK character is one unit, every run of letters or digits another, every other
  visible character another, so Chinese and English answers are measured alike and any base's tokenizer gives
  the same figure;
- marker rate: the share of answers that hold at least one persona marker (`data.markers` or `--markers`);
- judge win rate: a win is 1, a tie 1/2, with a Wilson interval (the demo's, `persona_lora.votes.wilson`).
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Iterable

from persona_lora.votes import wilson

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"
_UNITS = re.compile(rf"[{_CJK}]|[^\W{_CJK}]+|[^\w\s]", re.UNICODE)


def units(text: str) -> list[str]:
    """The units distinct-n counts (see the module docstring); case-folded."""
    return _UNITS.findall(text.casefold())


def distinct_n(answers: Iterable[str], n: int) -> float | None:
    """Unique n-grams / all n-grams over every answer (None when no answer has n units)."""
    grams: list[tuple[str, ...]] = []
    for answer in answers:
        u = units(answer)
        grams += [tuple(u[i:i + n]) for i in range(len(u) - n + 1)]
    return round(len(set(grams)) / len(grams), 4) if grams else None


def length_stats(values: list[int]) -> dict | None:
    """mean, median, min and max of answer lengths (None for no answers)."""
    if not values:
        return None
    return {"mean": round(statistics.fmean(values), 2), "median": statistics.median(values),
            "min": min(values), "max": max(values)}


def marker_rate(answers: list[str], markers: list[str]) -> float | None:
    """Share of answers holding a marker (None when there are no markers or no answers: nothing to say)."""
    if not markers or not answers:
        return None
    return round(sum(any(m in a for m in markers) for a in answers) / len(answers), 4)


def mean_loss(nll_sums: list[float], token_counts: list[int]) -> float | None:
    """Token-weighted mean NLL over rows (None without tokens)."""
    tokens = sum(token_counts)
    return sum(nll_sums) / tokens if tokens else None


def perplexity(loss: float | None) -> float | None:
    """exp(loss), None where it would overflow (a loss above ~700 says more than its perplexity)."""
    if loss is None:
        return None
    try:
        return math.exp(loss)
    except OverflowError:
        return None


def win_rate(outcomes: list[str]) -> dict:
    """Wins, losses, ties, invalid and the win rate (ties count 1/2) with its 95% Wilson interval."""
    wins, losses, ties = (outcomes.count(k) for k in ("win", "loss", "tie"))
    decided = wins + losses + ties
    score = wins + 0.5 * ties
    low, high = wilson(score, decided)
    return {"prompts": len(outcomes), "wins": wins, "losses": losses, "ties": ties,
            "invalid": outcomes.count("invalid"), "win_rate": round(score / decided, 4) if decided else None,
            "wilson_95": [round(low, 4), round(high, 4)] if decided else None}


def outcome(verdicts: list[str | None]) -> str:
    """One prompt's outcome for the adapter from its judgements (each 'adapter', 'base', 'tie' or None for an
    answer the judge gave that could not be read): the mean of the valid ones (1, 1/2, 0) decides."""
    valid = [{"adapter": 1.0, "tie": 0.5, "base": 0.0}[v] for v in verdicts if v is not None]
    if not valid:
        return "invalid"
    score = sum(valid) / len(valid)
    return "win" if score > 0.5 else "loss" if score < 0.5 else "tie"
