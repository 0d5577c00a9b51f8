"""Benchmark: `persona-lora eval` throughput (prompts/s) with batched greedy generation against one prompt at a time.

Why: an evaluation runs every prompt through the base and every adapter, so its cost is prompts x models x
answer length; batching the prompts (left padding, one `generate` per batch) must make that affordable (goal:
>= 3x prompts/s over one prompt at a time on the CPU) without changing a single answer. Measured on the toy
DeepSeek-V2 (built here unless --base is given) with one `all` adapter made on the spot (random lora_B), on the
first --prompts records of the sample persona data: the same rows the command computes (loss on the reference
answer and a greedy answer, for the base and the adapter), timed from loaded model to last row written, best of
--repeats runs (the batch sizes taking turns) after one warm-up run, in one process. "same answers" compares
every answer with the first batch size's.

    .venv/bin/python bench/bench_eval.py [--prompts 16] [--new-tokens 32] [--batch-sizes 1,4,8,16] [--repeats 2]

Not a test: about three minutes on 2 CPU cores. The machine may be shared: run it twice and read both.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SYSTEM = "你是沈知微，宫中的微嫔。说话端庄温婉，自称本宫或臣妾。"


def run_rows(models, plan, batch_size: int, new_tokens: int, work: Path) -> tuple[float, dict]:
    """Seconds to compute every row of the plan's set for base and adapter, and the answers by (model, index)."""
    from persona_lora.evaluation.runner import Tally, run_set
    from persona_lora.evaluation.store import RowStore

    out = Path(tempfile.mkdtemp(dir=work))
    store = RowStore(out, {"bench": batch_size})
    with open(os.devnull, "w") as quiet:
        start = time.perf_counter()
        run_set(models, store, plan.main, plan.models, answers=True, batch_size=batch_size,
                 max_new_tokens=new_tokens, tally=Tally(), stream=quiet)
        seconds = time.perf_counter() - start
    answers = {(r["model"], r["index"]): r["answer"] for r in store.rows()}
    tokens = sum(r["answer_tokens"] for r in store.rows())
    return seconds, {"answers": answers, "tokens": tokens}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", type=Path, help="base model folder (default: build the toy DeepSeek-V2 in a temp dir)")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batch-sizes", default="1,4,8,16", help="comma-separated; the first is the reference")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1: steadier on shared 2-core machines)")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch

    from persona_lora.evaluation.plan import EvalOptions, make_plan
    from persona_lora.evaluation.scoring import Models
    from persona_lora.model_loading import load_tokenizer, resolve_base
    from persona_lora.train.synthetic import make_random_adapter

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    base = args.base
    if base is None:
        from persona_lora.train.tiny_base import TinySpec, build_tiny_base

        base = build_tiny_base(work / "tiny-base", TinySpec())
    adapter = make_random_adapter(base, work / "persona-all", "all", seed=2, r=16, alpha=32, system_prompt=SYSTEM)
    data = ROOT / "examples" / "data" / "persona_zh.json"
    records = json.loads(data.read_text(encoding="utf-8"))[: args.prompts]
    subset = work / "prompts.json"
    subset.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")

    options = EvalOptions(adapters=[str(adapter)], base=str(base), out=work / "unused", data=str(subset),
                          max_new_tokens=args.new_tokens, guard="off", device="cpu")
    rb = resolve_base(str(base))
    plan = make_plan(options, rb, load_tokenizer(rb).chat_template)
    models = Models(plan)
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    run_rows(models, plan, max(sizes), args.new_tokens, work)  # warm-up (allocator, kernels)
    runs: dict[int, list] = {size: [] for size in sizes}
    for _ in range(args.repeats):  # round-robin: a busy spell on a shared machine hits every batch size alike
        for size in sizes:
            runs[size].append(run_rows(models, plan, size, args.new_tokens, work))
    results = [(size, *min(runs[size], key=lambda t: t[0])) for size in sizes]

    n_rows = len(plan.main.items) * len(plan.models)
    reference = results[0][2]["answers"]
    print(f"\nbase {Path(base).name} + 1 adapter (`all`), {len(plan.main.items)} prompts x {len(plan.models)} models, "
          f"up to {args.new_tokens} new tokens, greedy, best of {args.repeats}, torch threads {args.threads}, "
          f"{os.cpu_count()} CPUs\n")
    print(f"{'batch size':<12}{'seconds':>9}{'prompts/s':>11}{'tokens/s':>10}{'speedup':>9}  same answers as batch "
          f"{sizes[0]}")
    first = results[0][1]
    for size, seconds, got in results:
        same = sum(got["answers"][k] == v for k, v in reference.items())
        print(f"{size:<12}{seconds:>8.2f}s{n_rows / seconds:>11.2f}{got['tokens'] / seconds:>10.1f}"
              f"{first / seconds:>8.2f}x  {same}/{len(reference)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
