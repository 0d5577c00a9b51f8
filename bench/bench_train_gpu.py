"""LoRA training throughput and peak GPU memory on the FULL-SIZE DeepSeek-Coder-V2-Lite architecture.

    python bench/bench_train_gpu.py                 # on a CUDA GPU (H100: < 8 minutes)
    python bench/bench_train_gpu.py --scale tiny    # CPU smoke test of the same code path (toy sizes)

No download: the real config (train.tiny_base.real_config: 27 layers, hidden 2048, 64 routed + 2 shared
experts, vocab 102,400) is built with random bf16 weights directly on the GPU; throughput does not depend on the
weight values. Records are random token sequences with the length distribution of the huanhuan set under the
DeepSeek tokenizer (~40–160 tokens). Two recipes, each for a fixed number of optimizer steps after warm-up:

- tutorial: its LoRA (r=8, alpha 32, its target list through plain PEFT), batch 1 x accumulation 8,
  gradient checkpointing, DataCollatorForSeq2Seq — in bf16, since fp32 does not fit one card;
- ours: persona-lora's trainer settings: preset `all` r=16 (attention, dense MLP, shared + routed experts),
  length-grouped batches of 16, gradient checkpointing (non-reentrant), bf16, with the LoRA-aware expert
  forward (`persona_lora.expert_lora`: grouped GEMMs, no expert weight rebuilt) as training uses it;
- ours-paramwrapper: the same with PEFT's `ParamWrapper` on the routed experts (W + B·A rebuilt for all 64
  experts of every layer on every forward), what training ran before.

Prints tokens/s (non-padding tokens / wall time of the timed steps), peak GPU memory and the ratios of ours to
ours-paramwrapper and to the tutorial. Published anchors for
this model: 300–530 tokens/s; our goal: >= 3,000 tokens/s on one H100.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RECIPES = ("tutorial", "ours", "ours-paramwrapper")
LEAF_TARGETS = ["q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_model(scale: str, device: str, dtype):
    import torch
    from transformers import AutoModelForCausalLM, DeepseekV2Config

    from persona_lora.train.tiny_base import real_config

    cfg = real_config()
    if scale == "tiny":
        cfg.update(num_hidden_layers=3, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
                   n_routed_experts=8, num_experts_per_tok=2, num_attention_heads=4, num_key_value_heads=4,
                   kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, vocab_size=1024)
    cfg.pop("architectures"), cfg.pop("model_type"), cfg.pop("torch_dtype")
    config = DeepseekV2Config(**cfg)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.config.use_cache = False
    return model


def records(n: int, vocab: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt, answer = rng.randint(25, 90), rng.randint(10, 70)
        ids = [rng.randrange(2, vocab) for _ in range(prompt + answer)]
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def run(recipe: str, scale: str, steps: int, warmup: int) -> dict:
    import torch
    from datasets import Dataset
    from transformers import (
        DataCollatorForSeq2Seq,
        PreTrainedTokenizerFast,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    model = build_model(scale, device, dtype)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    if recipe == "tutorial":
        from peft import LoraConfig, get_peft_model

        lora_config = LoraConfig(
            task_type="CAUSAL_LM", target_modules=LEAF_TARGETS, r=8, lora_alpha=32, lora_dropout=0.0
        )
        model = get_peft_model(model, lora_config)
        batch, accum, group = 1, 8, False
    else:
        from persona_lora import presets
        from persona_lora.expert_lora import use_lora_aware_experts
        from persona_lora.peft_compat import attach_new_adapter

        spec = presets.resolve(model, "all")
        model, _ = attach_new_adapter(model, presets.lora_config_for(spec, r=16, alpha=32, dropout=0.0))
        presets.check_coverage(model, spec)
        if recipe == "ours":
            path = use_lora_aware_experts(model)
            assert path.startswith("LoRA-aware"), path
        batch, accum, group = 16, 1, True
    per_step = batch * accum
    data = records(per_step * (steps + warmup), model.config.vocab_size)
    ds = Dataset.from_list(data).map(lambda r: {"length": len(r["input_ids"])})

    timing = {}

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == warmup:
                if cuda:
                    torch.cuda.synchronize()
                timing["t0"], timing["tok0"] = time.time(), state.num_input_tokens_seen

        def on_train_end(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            timing["t1"], timing["tok1"] = time.time(), state.num_input_tokens_seen

    tokenizers = __import__("tokenizers")
    word_level = tokenizers.models.WordLevel({"<pad>": 0, "<unk>": 1}, unk_token="<unk>")
    tok = PreTrainedTokenizerFast(tokenizer_object=tokenizers.Tokenizer(word_level), pad_token="<pad>")
    args = TrainingArguments(
        output_dir="/tmp/bench-gpu-" + recipe, per_device_train_batch_size=batch, gradient_accumulation_steps=accum,
        max_steps=steps + warmup, learning_rate=2e-4, bf16=cuda, use_cpu=not cuda, save_strategy="no", report_to="none",
        logging_steps=10**6, disable_tqdm=True, include_num_input_tokens_seen="non_padding",
        remove_unused_columns=False,
        train_sampling_strategy="group_by_length" if group else "random", dataloader_num_workers=2 if cuda else 0,
    )
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    collator = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
    Trainer(model=model, args=args, train_dataset=ds, data_collator=collator, callbacks=[Clock()]).train()
    wall = timing["t1"] - timing["t0"]
    tokens = timing["tok1"] - timing["tok0"]
    result = {"recipe": recipe, "tokens_per_s": tokens / wall, "wall_s": wall, "tokens": tokens, "steps": steps,
              "peak_gpu_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
              "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
              "device": torch.cuda.get_device_name(0) if cuda else "cpu"}
    del model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=["full", "tiny"], default="full")
    ap.add_argument("--steps", type=int, default=6, help="timed optimizer steps per recipe")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--only", nargs="+", choices=RECIPES)
    args = ap.parse_args()
    recipes = [r for r in RECIPES if not args.only or r in args.only]
    results = [run(r, args.scale, args.steps, args.warmup) for r in recipes]
    print(f"\nLoRA training, DeepSeek-Coder-V2-Lite architecture ({args.scale}), random weights, "
          f"{results[0]['device']}")
    print(f"{'recipe':<19}{'tokens/s':>10}{'peak GPU GiB':>14}{'LoRA params':>14}{'timed tokens':>14}")
    for r in results:
        gpu = f"{r['peak_gpu_gb']:.1f}" if r["peak_gpu_gb"] is not None else "-"
        print(f"{r['recipe']:<19}{r['tokens_per_s']:>10.0f}{gpu:>14}{r['trainable']:>14,}{r['tokens']:>14,}")
    by = {r["recipe"]: r for r in results}
    for other in ("ours-paramwrapper", "tutorial"):
        if "ours" in by and other in by:
            ratio = by["ours"]["tokens_per_s"] / by[other]["tokens_per_s"]
            mem = ""
            if by["ours"]["peak_gpu_gb"] and by[other]["peak_gpu_gb"]:
                mem = f", peak memory {by['ours']['peak_gpu_gb'] / by[other]['peak_gpu_gb']:.2f}x"
            print(f"ours / {other}: tokens/s {ratio:.2f}x{mem}")
    print("goal on one card: ours >= 3,000 tokens/s")
    print("RESULT " + json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
