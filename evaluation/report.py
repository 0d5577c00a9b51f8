"""`report.json`: the summary per model, the forgetting verdict and every row, rebuilt from the stored rows.

Why rebuilt from the rows and nothing else: a resumed run and an uninterrupted one must give the same report, and
the HTML page and the card are rendered from this JSON, so the three cannot disagree. Only `run` (time,
throughput, whether it resumed) differs between two runs of the same evaluation.

Shape (schema `persona-lora/eval@1`):
- `base`, `adapters` (name, folder, weights sha256, whether the prompts were held out from its training),
  `data` (name, sha256, split, seed, how many evaluated), `guard` (the forgetting-guard set), `settings`;
- `summary`: per model (`base` and each adapter by name): `loss`, `perplexity`, `answer_tokens`,
  `answer_chars` (mean/median/min/max), `distinct_1`, `distinct_2`, `marker_rate`, `guard` (its loss there) and,
  for adapters with a judge, `judge` (wins, losses, ties, invalid, win rate, Wilson 95% interval);
- `forgetting`: per adapter, its guard loss against the base's and whether `--fail-if-forgetting` tripped;
- `rows` (and `guard_rows`): per prompt its origin, prompt, reference, and per model the answer and the loss.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from persona_lora import __version__
from persona_lora.artifact import now_iso
from persona_lora.evaluation import metrics
from persona_lora.evaluation.plan import BASE, Plan, describe_settings
from persona_lora.evaluation.sets import EvalSet

SCHEMA = "persona-lora/eval@1"


def _r(x: float | None, digits: int = 6) -> float | None:
    return None if x is None else round(x, digits)


def answer_row(set_name: str, index: int, model: str, loss: tuple[float, int] | None, answer) -> dict:
    """One stored row: a model's loss on one reference and its answer (None when only the loss was asked)."""
    return {"kind": "answer", "set": set_name, "index": index, "model": model,
            "nll": None if loss is None else loss[0], "tokens": 0 if loss is None else loss[1],
            "answer": None if answer is None else answer.text,
            "answer_tokens": None if answer is None else answer.tokens}


def _by_key(rows: list[dict]) -> tuple[dict, dict]:
    answers, judgements = {}, {}
    for r in rows:
        if r.get("kind") == "judge":
            judgements[(r["index"], r["model"], r["order"], r["judge"])] = r
        else:
            answers[(r["set"], r["index"], r["model"])] = r
    return answers, judgements


def _model_summary(rows: list[dict], markers: list[str]) -> dict:
    scored = [r for r in rows if r.get("tokens")]
    loss = metrics.mean_loss([r["nll"] for r in scored], [r["tokens"] for r in scored])
    texts = [r["answer"] for r in rows if isinstance(r.get("answer"), str)]
    return {
        "prompts": len(rows), "scored": len(scored), "loss": _r(loss), "perplexity": _r(metrics.perplexity(loss), 4),
        "answer_tokens": metrics.length_stats([r["answer_tokens"] for r in rows
                                               if isinstance(r.get("answer_tokens"), int)]),
        "answer_chars": metrics.length_stats([len(t) for t in texts]),
        "distinct_1": metrics.distinct_n(texts, 1), "distinct_2": metrics.distinct_n(texts, 2),
        "marker_rate": metrics.marker_rate(texts, markers),
    }


def _set_rows(s: EvalSet, models: list[str], answers: dict) -> list[dict]:
    out = []
    for it in s.items:
        got = {m: answers.get((s.name, it.index, m)) or {} for m in models}
        out.append({
            "index": it.index, "origin": it.origin, "prompt": it.prompt, "reference": it.reference,
            "answers": {m: got[m].get("answer") for m in models},
            "loss": {m: _r(got[m]["nll"] / got[m]["tokens"]) if got[m].get("tokens") else None for m in models},
            "answer_tokens": {m: got[m].get("answer_tokens") for m in models},
        })
    return out


def build_report(plan: Plan, rows: list[dict], *, judge_id: str | None, run: dict) -> dict:
    """The whole report from the plan and the stored rows."""
    models = plan.models
    answers, judgements = _by_key(rows)
    report_rows = _set_rows(plan.main, models, answers)
    summary = {}
    for m in models:
        summary[m] = _model_summary([answers[k] for k in (("main", it.index, m) for it in plan.main.items)
                                     if k in answers], plan.markers)
        if plan.guard is not None:
            g = [answers[k] for k in (("guard", it.index, m) for it in plan.guard.items) if k in answers]
            scored = [r for r in g if r.get("tokens")]
            loss = metrics.mean_loss([r["nll"] for r in scored], [r["tokens"] for r in scored])
            summary[m]["guard"] = {"prompts": len(scored), "loss": _r(loss),
                                   "perplexity": _r(metrics.perplexity(loss), 4)}
    if judge_id:
        for a in plan.adapters:
            outcomes = []
            for row in report_rows:
                got = [judgements.get((row["index"], a.name, order, judge_id)) for order in ("base-first",
                                                                                         "adapter-first")]
                verdicts = [g.get("winner") if g else None for g in got]
                row.setdefault("judge", {})[a.name] = {"base_first": got[0] and got[0].get("verdict"),
                                                       "adapter_first": got[1] and got[1].get("verdict"),
                                                       "outcome": metrics.outcome(verdicts)}
                outcomes.append(metrics.outcome(verdicts))
            summary[a.name]["judge"] = {"judge": judge_id, **metrics.win_rate(outcomes)}
    report = {
        "schema": SCHEMA, "created_at": now_iso(), "persona_lora_version": __version__,
        "base": {"id": plan.base.id, "source": plan.base.source, "revision": plan.base.revision,
                 "config_sha256": plan.base.config_sha256},
        "adapters": [a.describe() for a in plan.adapters],
        "models": models,
        "data": plan.main.info,
        "guard": None if plan.guard is None else plan.guard.info,
        "settings": describe_settings(plan),
        "summary": summary,
        "forgetting": forgetting(summary, plan),
        "rows": report_rows,
        "guard_rows": [] if plan.guard is None else _set_rows(plan.guard, models, answers),
        "run": run,
    }
    return report


def forgetting(summary: dict, plan: Plan) -> dict | None:
    """Per adapter: its loss on the guard set against the base's, and whether it exceeds the allowed margin."""
    if plan.guard is None:
        return None
    threshold = plan.options.fail_if_forgetting
    base = summary[BASE]["guard"]["loss"]
    out = {"threshold": threshold, "base_loss": base, "adapters": {}}
    for a in plan.adapters:
        loss = summary[a.name]["guard"]["loss"]
        delta = None if loss is None or base is None else _r(loss - base)
        out["adapters"][a.name] = {"loss": loss, "delta": delta,
                                   "exceeded": None if threshold is None or delta is None else delta > threshold}
    return out


def write_json(report: dict, path: Path) -> Path:
    """Atomically: a reader (or a card) never sees half a report."""
    tmp = Path(path).with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return Path(path)
