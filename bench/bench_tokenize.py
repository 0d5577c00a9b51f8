"""Benchmark: tokenising a whole persona dataset through the one formatting path.

    .venv/bin/python bench/bench_tokenize.py                       # ../shared/data/huanhuan.json, 3,729 records
    .venv/bin/python bench/bench_tokenize.py --data FILE --profile # + cProfile of the encode step

What is timed (best of --repeat runs each, with the tiny base's tokenizer, built into a temp dir unless --base):
  load+normalize   train.data.load_records (read, parse, validate, normalize to messages)
  system prompt    chat_format.conversation_for on every record
  render           the chat template, turn by turn (chat_format.segments)
  tokenize         one batched tokenizer call on the rendered segments
  encode_examples  the real path: render + tokenize + labels + EOS checks + max_length fitting
  total            load+normalize + system prompt + encode_examples (what training pays before step 1)
Goal: total < 2 s on 2 CPU cores. When huanhuan.json is missing, examples/data/persona_zh.json is repeated to
3,729 records instead (said in the output).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

DEFAULT_DATA = REPO / ".." / "shared" / "data" / "huanhuan.json"
FALLBACK_DATA = REPO / "examples" / "data" / "persona_zh.json"
N_RECORDS = 3729
TUTORIAL_SYSTEM = "假设你是皇帝身边的女人--甄嬛。"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--data", type=Path, default=DEFAULT_DATA, help="dataset file (default: ../shared/data/huanhuan.json)"
    )
    p.add_argument(
        "--base", type=Path, default=None,
        help="base model folder whose tokenizer to use (default: build the tiny base)",
    )
    p.add_argument("--max-length", type=int, default=384, help="max_length (the tutorial's 384)")
    p.add_argument("--system-prompt", default=TUTORIAL_SYSTEM, help="configured system prompt")
    p.add_argument("--train-on", default="all", choices=["all", "last"])
    p.add_argument("--repeat", type=int, default=3, help="runs per phase; the best is reported")
    p.add_argument("--goal", type=float, default=2.0, help="seconds the total must stay under")
    p.add_argument("--profile", action="store_true", help="print a cProfile of encode_examples")
    return p.parse_args(argv)


def dataset_file(requested: Path, tmp: Path) -> tuple[Path, str]:
    """The file to benchmark and a note on where it came from."""
    if requested.is_file():
        return requested, f"{requested.name}"
    items = json.loads(FALLBACK_DATA.read_text(encoding="utf-8"))
    repeated = [items[i % len(items)] for i in range(N_RECORDS)]
    out = tmp / "persona_zh_x.json"
    out.write_text(json.dumps(repeated, ensure_ascii=False), encoding="utf-8")
    return out, f"{requested} missing: {FALLBACK_DATA.name} repeated to {N_RECORDS} records"


def tiny_tokenizer(tmp: Path):
    """The tiny base's tokenizer. Its tokenizer depends only on the corpus and vocab size, so the weights are
    built small here to save time."""
    from persona_lora.train.tiny_base import TinySpec, build_tiny_base

    spec = TinySpec(layers=2, hidden=64, heads=2, experts=8, experts_per_token=2, moe_intermediate=32,
                    dense_intermediate=64, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8)
    return build_tiny_base(tmp / "tiny-base", spec)


def best(fn, repeat: int):
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def main(argv=None) -> int:
    args = parse_args(argv)
    from transformers import AutoTokenizer

    from persona_lora.chat_format import _tokenize, conversation_for, encode_examples, segments
    from persona_lora.dataset.reading import load_records

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        data, note = dataset_file(args.data.resolve(), tmp)
        base = args.base or tiny_tokenizer(tmp)
        tok = AutoTokenizer.from_pretrained(base)

        t_load, ds = best(lambda: load_records(str(data)), args.repeat)
        records = ds.records
        t_sys, convs = best(lambda: [conversation_for(r["messages"], args.system_prompt) for r in records], args.repeat)
        t_render, segs = best(lambda: [segments(tok, c) for c in convs], args.repeat)
        flat = [text for s in segs for text, _ in s]
        t_tok, ids = best(lambda: _tokenize(tok, flat), args.repeat)
        t_enc, encoded = best(lambda: encode_examples(tok, convs, max_length=args.max_length, train_on=args.train_on),
                              args.repeat)
        total = t_load + t_sys + t_enc

        kept = [e for e in encoded if e is not None]
        n_tokens = sum(len(e.input_ids) for e in kept)
        n_trained = sum(sum(lab != -100 for lab in e.labels) for e in kept)
        print(f"data: {note}  ({len(records)} records, {len(flat)} segments)")
        print(f"tokenizer: {'tiny base (built)' if args.base is None else args.base}; max_length {args.max_length}; "
              f"train_on {args.train_on}; CPU cores: {os.cpu_count()}; load average: "
              f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}")
        print(f"examples: {len(kept)} kept, {len(encoded) - len(kept)} dropped, "
              f"{sum(e.truncated for e in kept)} truncated; {n_tokens:,} tokens ({n_trained:,} trained)")
        print()
        rows = [
            ("load+normalize", t_load),
            ("system prompt", t_sys),
            ("render (template)", t_render),
            ("tokenize (batched)", t_tok),
            ("encode_examples", t_enc),
        ]
        print(f"{'phase':<22}{'seconds':>9}{'records/s':>12}")
        for name, t in rows:
            print(f"{name:<22}{t:>9.3f}{len(records) / t if t else float('inf'):>12,.0f}")
        print(f"{'total':<22}{total:>9.3f}{len(records) / total:>12,.0f}")
        verdict = "OK" if total < args.goal else "SLOWER THAN GOAL"
        print(f"{'goal':<22}{args.goal:>9.3f}   {verdict}")
        print(f"(best of {args.repeat}; encode_examples includes render + tokenize; "
              f"{'' if len(ids) == len(flat) else 'segment count mismatch! '}total = load + system prompt + encode)")

        if args.profile or total >= args.goal:
            prof = cProfile.Profile()
            prof.enable()
            encode_examples(tok, convs, max_length=args.max_length, train_on=args.train_on)
            prof.disable()
            out = io.StringIO()
            pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(20)
            print("\ncProfile of encode_examples (cumulative):")
            print(out.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
