"""Training throughput: persona-lora's trainer vs the tutorial's recipe, side by side in one run.

    .venv/bin/python bench/bench_train.py [--examples 256] [--base DIR]

Same tiny DeepSeek-V2 base, same records (../shared/data/huanhuan.json when present, else our sample data),
same number of training examples. Each recipe runs in its own process (so peak RSS is its own):

- tutorial (the widely copied recipe this project replaces): fp32; LoRA r=8, alpha 32 (dropout 0: 0.1 no longer runs) \
on its target list, given to
  plain PEFT (which on transformers 5 rewrites it to attention + routed experts); batch 1 x accumulation 8;
  gradient checkpointing; max length 384; DataCollatorForSeq2Seq; its hand-written prompt, EOS twice.
- ours: `persona-lora train` as configured for a CPU (fp32, length-grouped batches of 16, no checkpointing on
  CPU) at r=8, twice: preset `all` (more modules than the tutorial gets today: attention, dense MLP, shared
  experts, routed experts) and our default preset `attention+mlp` (no routed experts: PEFT's LoRA on the fused
  experts rebuilds every expert weight on each forward and backward, the most expensive part on a CPU).

Trained tokens/s = non-padding tokens of the examples processed / training wall time. Goal: ours >= 4x.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import peak_rss_mb  # noqa: E402

HUANHUAN = REPO.parent / "shared" / "data" / "huanhuan.json"
LEAF_TARGETS = ["q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TUTORIAL_SYSTEM = "假设你是皇帝身边的女人--甄嬛。"


def data_file(n: int, tmp: Path) -> tuple[Path, str]:
    src = HUANHUAN if HUANHUAN.is_file() else REPO / "examples" / "data" / "persona_zh.json"
    records = json.loads(src.read_text(encoding="utf-8"))
    while len(records) < n:
        records = records + records
    out = tmp / "records.json"
    out.write_text(json.dumps(records[:n], ensure_ascii=False), encoding="utf-8")
    return out, src.name


def worker_tutorial(base: Path, data: Path, n: int) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    tok = AutoTokenizer.from_pretrained(base)
    records = json.loads(data.read_text(encoding="utf-8"))

    def process(r):  # the tutorial's process_func, with our tiny tokenizer's special tokens
        prompt = f"{tok.bos_token}{TUTORIAL_SYSTEM}\nUser: {r['instruction'] + r['input']}\nAssistant: ".strip()
        instruction = tok(prompt, add_special_tokens=False)
        response = tok(f"{r['output']}{tok.eos_token}", add_special_tokens=False)
        ids = instruction["input_ids"] + response["input_ids"] + [tok.pad_token_id]
        labels = [-100] * len(instruction["input_ids"]) + response["input_ids"] + [tok.pad_token_id]
        return {"input_ids": ids[:384], "attention_mask": [1] * len(ids[:384]), "labels": labels[:384]}

    ds = Dataset.from_list([process(r) for r in records])
    tokens = sum(len(x) for x in ds["input_ids"])
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model.enable_input_require_grads()
    lora_config = LoraConfig(task_type="CAUSAL_LM", target_modules=LEAF_TARGETS, r=8, lora_alpha=32, lora_dropout=0.0)
    model = get_peft_model(model, lora_config)
    args = TrainingArguments(
        output_dir=str(data.parent / "tutorial-out"), per_device_train_batch_size=1, gradient_accumulation_steps=8,
        max_steps=n // 8, learning_rate=1e-5, gradient_checkpointing=True, save_strategy="no", report_to="none",
        logging_steps=10, use_cpu=True, disable_tqdm=True, seed=42,
    )
    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=DataCollatorForSeq2Seq(tok, padding=True))
    t0 = time.time()
    trainer.train()
    wall = time.time() - t0
    return {"wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall, "peak_rss_mb": peak_rss_mb(),
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def worker_ours(base: Path, data: Path, n: int, batch: int = 16, preset: str = "all") -> dict:
    from persona_lora.train.config import config_from_dict
    from persona_lora.train.trainer import run_training

    out = data.parent / f"ours-out-{preset}"
    cfg = config_from_dict({
        "base": {"model": str(base)},
        "data": {"path": str(data), "system_prompt": TUTORIAL_SYSTEM, "max_length": 384, "eval_fraction": 0},
        "lora": {"preset": preset, "r": 8, "alpha": 32, "dropout": 0.0},
        "training": {"output_dir": str(out), "batch_size": batch, "max_steps": n // batch, "learning_rate": 2e-4,
                     "save_steps": 10**6, "samples": 0, "report_to": ["none"], "logging_steps": 10},
    })
    run_training(cfg, print_fn=lambda *a, **k: None)
    m = json.loads((out / "persona_manifest.json").read_text())
    return {"wall_s": m["run"]["wall_time_s"], "tokens": m["run"]["trained_tokens"],
            "tokens_per_s": m["run"]["tokens_per_second"], "peak_rss_mb": peak_rss_mb(),
            "trainable": m["lora"]["trainable_params"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=256, help="training examples each recipe processes")
    ap.add_argument("--base", type=Path, help="base model folder (default: build the tiny base in a temp dir)")
    ap.add_argument("--batch-size", type=int, default=16, help="our per-step batch (length-grouped)")
    ap.add_argument("--worker", choices=["ours-all", "ours-attention+mlp", "tutorial"], help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        if args.worker.startswith("ours-"):
            preset = args.worker.removeprefix("ours-")
            result = worker_ours(args.base, args.data, args.examples, args.batch_size, preset)
        else:
            result = worker_tutorial(args.base, args.data, args.examples)
        print("RESULT " + json.dumps(result))
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = args.base
        if base is None:
            from persona_lora.train.tiny_base import build_tiny_base

            base = build_tiny_base(tmp / "tiny-base")
        data, source = data_file(args.examples, tmp)
        results = {}
        for name in ("tutorial", "ours-all", "ours-attention+mlp"):
            proc = subprocess.run(
                [sys.executable, __file__, "--worker", name, "--base", str(base), "--data", str(data),
                 "--examples", str(args.examples), "--batch-size", str(args.batch_size)],
                capture_output=True, text=True, cwd=REPO,
            )
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not line:
                print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
                return 1
            results[name] = json.loads(line[0][7:])
    t = results["tutorial"]
    print(f"\ntraining throughput, tiny DeepSeek-V2 base, {args.examples} examples of {source}, CPU, "
          f"our batch {args.batch_size}")
    print(f"{'recipe':<20}{'wall s':>9}{'tokens':>9}{'tokens/s':>10}{'vs tutorial':>13}{'peak RSS MB':>13}"
          f"{'RSS ratio':>11}{'LoRA params':>13}")
    for name, r in results.items():
        print(f"{name:<20}{r['wall_s']:>9.1f}{r['tokens']:>9}{r['tokens_per_s']:>10.0f}"
              f"{r['tokens_per_s'] / t['tokens_per_s']:>12.2f}x"
              f"{r['peak_rss_mb']:>13.0f}{r['peak_rss_mb'] / t['peak_rss_mb']:>10.2f}x{r['trainable']:>13,}")
    print("tutorial: attention + routed experts (its list, as PEFT 0.21 rewrites it); "
          "ours-all: attention + dense MLP + shared + routed experts; "
          "ours-attention+mlp (our default preset): attention + dense MLP + shared experts. Goal: >= 4x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
