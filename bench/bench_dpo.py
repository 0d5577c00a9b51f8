"""Benchmark: DPO with the reference on the same base weights (persona-lora's way) against a second model copy.

    .venv/bin/python bench/bench_dpo.py [--base DIR] [--steps 6] [--rounds 2] [--threads 1] [--batch 8]

Why: TRL's DPOTrainer needs reference log-probabilities. persona-lora keeps one copy of the base: with an init
adapter the reference is TRL's frozen copy of that adapter ("ref", a second LoRA adapter on the same weights);
without one it is the base with the adapter disabled. The usual alternative passes `ref_model`, a second model
loaded from the same files (with the init adapter merged into it: TRL wants a plain model there). On the tiny
DeepSeek-V2 base (built into a temp dir unless --base), with the `all` preset (LoRA on the fused experts too) and
the pairs of examples/preferences/persona_pairs.jsonl through the one formatting path, for each of the four
set-ups:

- step time: the median optimizer step of TRL's own training loop after one warm-up step, best of --rounds;
- weight memory: the bytes of every distinct parameter and buffer tensor held by the policy and the reference.

Goal: the same time per step (the frozen adapter adds its LoRA to the reference pass, which a merged copy does
not), and about half the weight memory (exactly half less the LoRA, which is a large share of the tiny model only).
Prints one table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SYSTEM = "你是沈知微，宫中的微嫔。说话端庄温婉，自称本宫或臣妾。"


def weight_bytes(*models) -> int:
    """Bytes of the distinct tensors (parameters and buffers) the models hold: shared storage counted once."""
    seen, total = set(), 0
    for model in models:
        if model is None:
            continue
        for t in [*model.parameters(), *model.buffers()]:
            key = (t.device, t.untyped_storage().data_ptr())
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
    return total


def make_trainer(base: Path, init: Path | None, rows: list[dict], *, copy: bool, batch: int, steps: int, device: str,
                 out: Path):
    """A DPOTrainer as persona-lora builds it (copy=False) or with a second model copy as `ref_model`."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from persona_lora import presets
    from persona_lora.expert_lora import use_lora_aware_experts
    from persona_lora.model_loading import load_base_model, load_tokenizer
    from persona_lora.peft_compat import attach_new_adapter, load_adapter, native_targets

    def base_model():
        model = load_base_model(str(base), device=device, dtype="float32")
        model.config.use_cache = False
        return model

    model = base_model()
    if init is not None:
        policy = load_adapter(model, init, is_trainable=True)
    else:
        spec = presets.resolve(model, "all")
        policy, _ = attach_new_adapter(model, presets.lora_config_for(spec, r=16, alpha=32, dropout=0.0))
    ref_model = None
    if copy:
        ref_model = base_model()
        if init is not None:  # TRL's ref_model is a plain model: the init adapter merged into the copy
            ref_model = load_adapter(ref_model, init).merge_and_unload()
        ref_model.eval()
    args = DPOConfig(output_dir=str(out), per_device_train_batch_size=batch, max_steps=steps + 1, learning_rate=1e-4,
                     logging_steps=1000, save_strategy="no", report_to="none", use_cpu=device == "cpu",
                     max_length=None, remove_unused_columns=False, disable_tqdm=True)
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t)

    tok = load_tokenizer(str(base))
    answer = [{"role": "assistant", "content": "x"}]
    stub = Dataset.from_list([{"prompt": [{"role": "user", "content": "x"}], "chosen": answer, "rejected": answer}])
    with native_targets():
        trainer = DPOTrainer(model=policy, ref_model=ref_model, args=args, train_dataset=stub, processing_class=tok,
                             callbacks=[Clock()])
    if init is None and not copy and "ref" in policy.peft_config:
        policy.delete_adapter("ref")  # a fresh adapter's reference is the base: the adapter disabled
        policy.set_adapter("default")
    use_lora_aware_experts(policy)
    trainer.train_dataset = Dataset.from_dict({k: [r[k] for r in rows] for k in rows[0]})
    return trainer, times, weight_bytes(policy, ref_model)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", type=Path, help="a tiny base folder (default: build one in a temp dir)")
    ap.add_argument("--steps", type=int, default=6, help="timed optimizer steps per run (after 1 warm-up step)")
    ap.add_argument("--rounds", type=int, default=2, help="runs of each set-up; the best median counts")
    ap.add_argument("--batch", type=int, default=8, help="pairs per step (2x sequences through each model)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    args = ap.parse_args()

    import logging

    import torch

    logging.disable(logging.WARNING)
    torch.set_num_threads(args.threads)
    from persona_lora.model_loading import load_tokenizer
    from persona_lora.train.preference_data import encode_preferences, load_preferences
    from persona_lora.train.synthetic import make_random_adapter
    from persona_lora.train.tiny_base import TinySpec, build_tiny_base

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = args.base or build_tiny_base(tmp / "tiny-base", TinySpec())
        init = make_random_adapter(base, tmp / "init", "all", seed=1, r=16, alpha=32, system_prompt=SYSTEM)
        prefs = load_preferences(str(REPO / "examples" / "preferences" / "persona_pairs.jsonl"))
        rows = encode_preferences(load_tokenizer(str(base)), prefs.examples("dpo"), "dpo", system_prompt=SYSTEM,
                                  max_length=256).rows
        setups = {
            "frozen init adapter (ours)": (init, False),
            "second model copy + init adapter": (init, True),
            "disabled adapter (ours)": (None, False),
            "second model copy (base)": (None, True),
        }
        best: dict[str, float] = {}
        memory: dict[str, int] = {}
        for r in range(args.rounds):
            for name, (init_dir, copy) in setups.items():
                trainer, times, nbytes = make_trainer(base, init_dir, rows, copy=copy, batch=args.batch,
                                                      steps=args.steps, device=args.device, out=tmp / f"o{r}")
                trainer.train()
                median = statistics.median(times[1:])
                best[name] = min(best.get(name, float("inf")), median)
                memory[name] = nbytes
                del trainer
    print(f"DPO on the tiny DeepSeek-V2 base, `all` preset, {len(rows)} pairs, {args.batch} pairs per step, "
          f"{args.threads} torch thread(s), {args.device}; median of {args.steps} steps, best of {args.rounds} runs")
    print(f"{'reference':<36}{'step (s)':>10}{'vs ours':>9}{'weights (MB)':>14}{'vs ours':>9}")
    pairs = [("frozen init adapter (ours)", "second model copy + init adapter"),
             ("disabled adapter (ours)", "second model copy (base)")]
    for ours, theirs in pairs:
        for name in (ours, theirs):
            print(f"{name:<36}{best[name]:>10.3f}{best[name] / best[ours]:>8.2f}x{memory[name] / 2**20:>14.1f}"
                  f"{memory[name] / memory[ours]:>8.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
