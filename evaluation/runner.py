"""`evaluate`: plan → rows (loss and greedy answers per model, batch by batch) → judge → report.json + HTML.

Why in this order: every row is written the moment its batch finishes (`store.RowStore`), so a run that is
killed keeps everything it finished, and a rerun with the same `--out` computes only what is missing; the report
is rebuilt from all rows at the end. Models are loaded only if some row is missing, and the judge is called only
when asked.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from persona_lora.evaluation.plan import BASE, EvalOptions, Plan, make_plan
from persona_lora.evaluation.report import answer_row, build_report, write_json
from persona_lora.evaluation.sets import EvalSet
from persona_lora.evaluation.store import REPORT_HTML, REPORT_JSON, RowStore
from persona_lora.progress import ProgressLine

log = logging.getLogger(__name__)


class Tally:
    """Generated tokens and the seconds spent on them, for the progress lines and the report's throughput."""

    def __init__(self):
        self.tokens, self.seconds = 0, 0.0


def _pending(store: RowStore, s: EvalSet | None, models: list[str]) -> bool:
    return s is not None and any(not store.has({"kind": "answer", "set": s.name, "index": it.index, "model": m})
                                 for m in models for it in s.items)


def run_set(models, store: RowStore, s: EvalSet, names: list[str], *, answers: bool, batch_size: int,
             max_new_tokens: int, tally: Tally, stream) -> None:
    """Loss (and, with `answers`, greedy answers) of every model on every item not done yet, batch by batch,
    longest prompts first (less padding per batch, and a batch that does not fit memory fails early)."""
    ids = {it.index: models.prompt_ids(it.prompt_messages) for it in s.items}
    order = sorted(s.items, key=lambda it: (-len(ids[it.index]), it.index))
    for name in names:
        todo = [it for it in order if not store.has({"kind": "answer", "set": s.name, "index": it.index,
                                                     "model": name})]
        if not todo:
            continue
        done, tokens, start = len(s.items) - len(todo), 0, time.perf_counter()
        line = ProgressLine(f"eval {s.name} set, {name}, prompts", len(s.items), stream=stream)
        with models.use(name):
            for k in range(0, len(todo), batch_size):
                batch = todo[k:k + batch_size]
                losses = models.losses([it.conversation for it in batch])
                t0 = time.perf_counter()
                got = (models.generate([ids[it.index] for it in batch], max_new_tokens) if answers
                       else [None] * len(batch))
                tally.seconds += time.perf_counter() - t0
                new = sum(a.tokens for a in got if a is not None)
                tally.tokens += new
                tokens += new
                store.append([answer_row(s.name, it.index, name, loss, a) for it, loss, a in zip(batch, losses, got)])
                done += len(batch)
                rate = f"{tokens / max(time.perf_counter() - start, 1e-9):,.1f} tokens/s" if answers else ""
                line.update(done, [rate], force=done >= len(s.items))
        line.close()


def _run_judge(plan: Plan, store: RowStore, judge, stream) -> None:
    from persona_lora.evaluation.judge import ORDERS

    total = len(plan.adapters) * len(plan.main.items) * len(ORDERS)
    done = 0
    for a in plan.adapters:
        for it in plan.main.items:
            base = store.get(kind="answer", set="main", index=it.index, model=BASE) or {}
            tuned = store.get(kind="answer", set="main", index=it.index, model=a.name) or {}
            for order in ORDERS:
                done += 1
                key = {"kind": "judge", "index": it.index, "model": a.name, "order": order, "judge": judge.id}
                if store.has(key):
                    continue
                result = judge.judge(system_prompt=plan.system_prompt, prompt=it.prompt, reference=it.reference,
                                     base=base.get("answer") or "", adapter=tuned.get("answer") or "", order=order)
                store.append([{**key, **result}])
                if done % 10 == 0 or done == total:
                    print(f"eval judge {judge.model}: {done}/{total} judgements", file=stream, flush=True)


def interrupted_message(store: RowStore) -> str:
    """What an interrupted evaluation kept, as it is on disk: the rows file only exists once a row finished."""
    if not store.rows_path.is_file():
        return f"interrupted before any row finished; nothing was written to {store.out}"
    done = len(store.rows())
    return (f"interrupted; {done} finished row{'s' if done != 1 else ''} kept in {store.rows_path}: rerun the same "
            "command to continue")


def evaluate(o: EvalOptions, stream=None) -> dict:
    """Run (or continue) the evaluation `o` describes; returns the report (also written under `o.out`)."""
    from persona_lora.evaluation.html_report import write_html
    from persona_lora.evaluation.judge import Judge
    from persona_lora.model_loading import load_tokenizer, resolve_base
    from persona_lora.output_folder import FilesTogether

    stream = stream or sys.stderr
    started = time.perf_counter()
    base = resolve_base(o.base, revision=o.base_revision, source=o.source)
    plan = make_plan(o, base, load_tokenizer(base).chat_template)
    judge = Judge(o.judge_endpoint, o.judge_model, o.judge_key_env, o.judge_rubric) if o.judge_endpoint else None
    store = RowStore(o.out, plan.fingerprint(), overwrite=o.overwrite)
    if store.resumed:
        print(f"eval: continuing the evaluation in {o.out} ({len(store.rows())} rows done)", file=stream, flush=True)
    tally = Tally()
    names = plan.models
    models = None
    try:
        if _pending(store, plan.main, names) or _pending(store, plan.guard, names):
            from persona_lora.evaluation.scoring import Models

            models = Models(plan)
            common = {"batch_size": o.batch_size, "max_new_tokens": o.max_new_tokens, "tally": tally,
                      "stream": stream}
            run_set(models, store, plan.main, names, answers=True, **common)
            if plan.guard is not None:
                run_set(models, store, plan.guard, names, answers=o.guard == "full", **common)
        if judge is not None:
            _run_judge(plan, store, judge, stream)
    except KeyboardInterrupt:
        print(f"eval: {interrupted_message(store)}", file=stream, flush=True)
        raise
    run = {"created_at": None, "seconds": round(time.perf_counter() - started, 2), "resumed": store.resumed,
           "generated_tokens": tally.tokens,
           "tokens_per_second": round(tally.tokens / tally.seconds, 1) if tally.seconds else None,
           "device": str(models.device) if models is not None else None}
    report = build_report(plan, store.rows(), judge_id=judge.id if judge else None, run=run)
    run["created_at"] = report["created_at"]
    store.claim()  # the folder exists once there is a report to write
    with FilesTogether() as files:  # report.json and report.html always describe the same rows
        write_json(report, files.temp(Path(o.out) / REPORT_JSON))
        write_html(report, files.temp(Path(o.out) / REPORT_HTML))
    return report
