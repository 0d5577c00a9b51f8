"""Training throughput against a tuned peer: ms-swift's `swift sft` vs `persona-lora train`, side by side in one run.

    make bench-peers        (builds ms-swift's environment once, outside the work tree, then runs this)
    .venv/bin/python bench/peers.py --swift-python ENV/bin/python [--examples 1024] [--repeats 2] [--base DIR]

    At the 16B model's real widths (a `tiny-base --preset lite-wide --layers 3` folder, a few steps):
    .venv/bin/python bench/peers.py --swift-python ENV/bin/python --base runs/lite-wide --examples 128 --repeats 1

The job: the tiny DeepSeek-V2 base, the same records (../shared/data/huanhuan.json when present, else our sample
data), one epoch, LoRA r 8 / alpha 32, batch 16, max length 384, fp32 on the CPU. ms-swift runs tuned the way that
made it fastest on this job: gradient checkpointing off and length grouping on (its defaults keep checkpointing on),
no eval split, no saves; both sides put the same system prompt before every record. Its LoRA covers what its
`all-linear` default gives on this base; ours is the `all` preset (attention, dense MLP, shared and routed experts), the
whole `persona-lora train` command with its eval passes, sample answers and card. ms-swift lives in its own
environment because it pins other transformers and PEFT versions than ours.

"loop" is each trainer's `train()` without eval passes; trained tokens are the non-padding tokens of the batches
(ms-swift's counted by transformers' own `include_num_input_tokens_seen="non_padding"`, set on its Trainer), so
each side is credited with its own prompt format. Rounds are interleaved and each recipe's best round counts.
Goals: ours >= 1.5x ms-swift's tokens/s in the loop on the tiny base; >= 2.5x on the lite-wide base, where
ms-swift's LoRA on the routed experts runs through PEFT's `ParamWrapper` (the expert weights rebuilt every forward).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.bench_train import TUTORIAL_SYSTEM, best_of, data_file, run_worker  # noqa: E402

PEERS_PYTHON_ENV = "PERSONA_LORA_PEERS_PYTHON"

# Runs inside ms-swift's environment: counts non-padding tokens with transformers' own counter and times train().
SWIFT_WORKER = r"""
import functools, json, sys, time
import transformers

result = {}
real_init, real_train = transformers.Trainer.__init__, transformers.Trainer.train

def init(self, *args, **kwargs):
    real_init(self, *args, **kwargs)
    self.args.include_num_input_tokens_seen = "non_padding"

def train(self, *args, **kwargs):
    started = time.time()
    out = real_train(self, *args, **kwargs)
    result.update(loop_s=time.time() - started, tokens=int(self.state.num_input_tokens_seen),
                  trainable=sum(p.numel() for p in self.model.parameters() if p.requires_grad))
    return out

# wraps: ms-swift inspects the Trainer's signature to decide which keyword arguments to pass
transformers.Trainer.__init__ = functools.wraps(real_init)(init)
transformers.Trainer.train = functools.wraps(real_train)(train)
from swift.pipelines import sft_main
sys.argv = ["swift-sft", *json.loads(sys.argv[1])]
sft_main()
print("RESULT " + json.dumps(result))
"""


def swift_args(base: Path, data: Path, out: Path, batch: int) -> list[str]:
    return ["--model", str(base), "--model_type", "deepseek_v2", "--template", "deepseek", "--dataset", str(data),
            "--system", TUTORIAL_SYSTEM, "--tuner_type", "lora", "--lora_rank", "8", "--lora_alpha", "32",
            "--lora_dropout", "0",
            "--per_device_train_batch_size", str(batch), "--num_train_epochs", "1", "--max_length", "384",
            "--gradient_checkpointing", "false", "--group_by_length", "true",
            "--train_sampling_strategy", "group_by_length", "--torch_dtype", "float32", "--learning_rate", "2e-4",
            "--split_dataset_ratio", "0", "--save_strategy", "no", "--report_to", "none",
            "--dataloader_num_workers", "0", "--logging_steps", "10", "--output_dir", str(out)]


def run_swift(python: str, base: Path, data: Path, batch: int) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MODELSCOPE_OFFLINE": "1", "PYTHONPATH": ""}
    with tempfile.TemporaryDirectory() as out:
        started = time.time()
        proc = subprocess.run([python, "-c", SWIFT_WORKER, json.dumps(swift_args(base, data, Path(out), batch))],
                              capture_output=True, text=True, env=env, cwd=out)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not line:
        raise RuntimeError(f"ms-swift failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return {**json.loads(line[0][7:]), "eval_s": 0.0, "command_s": time.time() - started}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--swift-python", default=os.environ.get(PEERS_PYTHON_ENV),
                    help=f"python of an environment with ms-swift installed (default: ${PEERS_PYTHON_ENV})")
    ap.add_argument("--examples", type=int, default=1024, help="records each recipe trains on (one epoch)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2, help="rounds of both recipes, interleaved; best of them each")
    ap.add_argument("--base", type=Path, help="base model folder (default: build the tiny base in a temp dir), e.g. "
                    "a lite-wide base for the real widths")
    args = ap.parse_args()
    if not args.swift_python:
        ap.error(f"no ms-swift environment: pass --swift-python or set {PEERS_PYTHON_ENV} (make bench-peers does)")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = args.base
        if base is None:
            from persona_lora.train.tiny_base import build_tiny_base

            base = build_tiny_base(tmp / "tiny-base")
        base_name = json.loads((Path(base) / "config.json").read_text())
        base_name = (f"DeepSeek-V2 base of {base_name['num_hidden_layers']} layers, hidden "
                     f"{base_name['hidden_size']}, {base_name['n_routed_experts']} experts of "
                     f"{base_name['moe_intermediate_size']}")
        data, source = data_file(args.examples, tmp)
        runs = {"ms-swift": [], "ours-all": []}
        for _ in range(max(1, args.repeats)):
            runs["ms-swift"].append(run_swift(args.swift_python, base, data, args.batch_size))
            runs["ours-all"].append(run_worker("ours-all", base, data, args.examples, args.batch_size))
    best = {name: best_of(r) for name, r in runs.items()}
    rate = {name: r["tokens"] / r["loop_s"] for name, r in best.items()}
    print(f"\ntraining loop throughput, {base_name}, {args.examples} records of {source}, one epoch, CPU "
          f"({os.cpu_count()} cores), batch {args.batch_size}, r 8, best of {max(1, args.repeats)} interleaved rounds")
    print(f"{'recipe':<12}{'tokens':>8}{'loop s':>8}{'tokens/s':>10}{'x ms-swift':>12}{'command s':>11}"
          f"{'LoRA params':>13}")
    for name, r in best.items():
        print(f"{name:<12}{r['tokens']:>8}{r['loop_s']:>8.1f}{rate[name]:>10.0f}{rate[name] / rate['ms-swift']:>11.2f}x"
              f"{r['command_s']:>11.1f}{r['trainable']:>13,}")
    spread = "; ".join(f"{n} {min(x['loop_s'] for x in r):.1f}-{max(x['loop_s'] for x in r):.1f}"
                       for n, r in runs.items())
    print(f"spread of the loop over the rounds, s: {spread}")
    print("ms-swift: its all-linear LoRA on this base, checkpointing off, length grouping on; ours-all: attention + "
          "dense MLP + shared + routed experts, the whole command (eval passes, samples, card).\n"
          "goals: ours-all >= 1.5x ms-swift in the loop on the tiny base, >= 2.5x at the real widths")
    return 0


if __name__ == "__main__":
    sys.exit(main())
