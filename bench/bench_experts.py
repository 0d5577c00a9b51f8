"""Benchmark: LoRA on the routed experts, the LoRA-aware forward against PEFT's `ParamWrapper`, side by side.

    .venv/bin/python bench/bench_experts.py [--base DIR] [--repeats 7] [--threads 1] [--skip-demo]

Why: `ParamWrapper` rebuilds W + s·B·A for every expert on every forward; `persona_lora.expert_lora` computes
x·Wᵀ + s·(x·Aᵀ)·Bᵀ for the routed tokens only. On the tiny DeepSeek-V2 base (built into a temp dir unless --base),
all in one process, best of --repeats interleaved runs after a warm-up (other jobs on a shared machine only ever
add time):

1. One MoE layer (layer 1: router, routed experts, shared experts) for each transformers
   `experts_implementation`, forward+backward (input gradient and LoRA gradients, as in training) and forward
   alone, on a training batch (16 x 100 tokens) and on one decode token: the layer without LoRA ("bare"), with
   the `all` preset's LoRA through `ParamWrapper`, and through the LoRA-aware forward (both also carry the
   shared experts' linear LoRA). Goal: LoRA-aware forward+backward <= 1.3x bare.
2. Demo decode per token (the demo engine, greedy, EOS ignored; per token = (t(56 tokens) - t(8)) / 48, so the
   prompt's prefill cancels): base alone, adapter alone, both sides in one batch, for an `all` and an `attention`
   adapter, with the LoRA-aware forward and with `ParamWrapper` (PERSONA_LORA_EXPERT_LORA=peft). Goals for
   `all` with the LoRA-aware forward: adapter <= 1.2x base; both <= 1.3x one side.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PROMPT = "Who are you, and what did you do today?"
SYSTEM = "You are Zhen Huan, a consort in the imperial palace."
STRATEGIES = ("grouped_mm", "batched_mm", "eager")


def interleaved(fns: dict, repeats: int) -> dict[str, float]:
    """Best time of each function over `repeats` rounds that run every function once (after one warm-up)."""
    times = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: min(v) for k, v in times.items()}


# ------------------------------------------------------------------------------------------ 1: one MoE layer


def moe_layers(base: Path, strategy: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from persona_lora import presets
    from persona_lora.expert_lora import use_lora_aware_experts
    from persona_lora.peft_compat import attach_new_adapter

    def load():
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        model.set_experts_implementation(strategy)
        return model

    out = {"bare": load().model.layers[1].mlp}
    for kind in ("ParamWrapper", "LoRA-aware"):
        model = load()
        spec = presets.resolve(model, "all", None)
        peft_model, _ = attach_new_adapter(model, presets.lora_config_for(spec, r=8, alpha=16, dropout=0.0))
        with torch.no_grad():
            gen = torch.Generator().manual_seed(0)
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
        if kind == "LoRA-aware":
            assert use_lora_aware_experts(peft_model).startswith("LoRA-aware")
        out[kind] = peft_model.get_base_model().model.layers[1].mlp
    return out


def layer_table(base: Path, repeats: int) -> list[tuple]:
    import torch

    rows = []
    for strategy in STRATEGIES:
        layers = moe_layers(base, strategy)
        hidden = layers["bare"].config.hidden_size
        for label, tokens in (("16x100 tokens", 1600), ("1 token", 1)):
            x = torch.randn(1, tokens, hidden, generator=torch.Generator().manual_seed(1))

            def step(layer):
                xx = x.clone().requires_grad_()
                layer(xx).sum().backward()
                layer.zero_grad(set_to_none=True)

            def forward(layer):
                with torch.no_grad():
                    layer(x)

            fb = interleaved({k: (lambda m=m: step(m)) for k, m in layers.items()}, repeats)
            fw = interleaved({k: (lambda m=m: forward(m)) for k, m in layers.items()},
                             repeats * (3 if tokens == 1 else 1))
            rows.append((strategy, label, fb, fw))
    return rows


def print_layer_table(rows: list[tuple]) -> None:
    print("\n1. one MoE layer, LoRA r=8 (`all` preset), per experts_implementation; ratio = time / bare layer")
    print(f"{'implementation':<15}{'tokens':<15}{'pass':<9}{'bare ms':>9}{'ParamWrapper':>14}{'LoRA-aware':>12}"
          f"{'PW/bare':>9}{'ours/bare':>11}{'PW/ours':>9}")
    for strategy, label, fb, fw in rows:
        for name, t in (("fwd+bwd", fb), ("forward", fw)):
            b, p, o = t["bare"], t["ParamWrapper"], t["LoRA-aware"]
            print(f"{strategy:<15}{label:<15}{name:<9}{b * 1e3:>9.2f}{p * 1e3:>12.2f}ms{o * 1e3:>10.2f}ms"
                  f"{p / b:>8.2f}x{o / b:>10.2f}x{p / o:>8.2f}x")
    print("goal: LoRA-aware fwd+bwd <= 1.3x bare")


# ------------------------------------------------------------------------------------------ 2: demo decode


def demo_table(base: Path, work: Path, repeats: int) -> list[tuple]:
    from persona_lora.demo.engine import Engine, GenerationSettings
    from persona_lora.peft_compat import EXPERT_LORA_ENV
    from persona_lora.train.synthetic import make_random_adapter

    adapters = {preset: make_random_adapter(base, work / f"persona-{preset}", preset, seed=seed, r=16, alpha=32,
                                            system_prompt=SYSTEM)
                for preset, seed in (("all", 2), ("attention", 1))}
    engines = {}
    for path in ("LoRA-aware", "ParamWrapper"):
        if path == "ParamWrapper":
            os.environ[EXPERT_LORA_ENV] = "peft"
        try:
            engine = Engine(str(base), device="cpu", dtype="float32", max_new_tokens_cap=64)
            names = {preset: engine.add_adapter(str(folder)).name for preset, folder in adapters.items()}
        finally:
            os.environ.pop(EXPERT_LORA_ENV, None)
        engines[path] = (engine, names)

    def run(engine, side, name, tokens):
        settings = GenerationSettings(max_new_tokens=tokens, ignore_eos=True)
        if side == "both":
            return engine.compare(name, PROMPT, SYSTEM, settings)
        return engine.answer(None if side == "base" else name, PROMPT, SYSTEM, settings)

    rows = []
    for preset in adapters:
        fns = {}
        for path, (engine, names) in engines.items():
            for side in ("base", "adapter", "both"):
                for tokens in (8, 56):
                    fns[(path, side, tokens)] = (lambda e=engine, s=side, n=names[preset], t=tokens: run(e, s, n, t))
        best = interleaved(fns, repeats)
        for path in engines:
            per = {side: (best[(path, side, 56)] - best[(path, side, 8)]) / 48 for side in ("base", "adapter", "both")}
            rows.append((preset, path, per))
    for engine, _ in engines.values():
        engine.close()
    return rows


def print_demo_table(rows: list[tuple]) -> None:
    print("\n2. demo decode, ms per token (prefill cancelled), one resident model")
    print(f"{'adapter':<11}{'experts path':<14}{'base':>8}{'adapter':>9}{'both':>8}"
          f"{'adapter/base':>14}{'both/adapter':>14}")
    for preset, path, per in rows:
        b, a, both = per["base"], per["adapter"], per["both"]
        print(f"{preset:<11}{path:<14}{b * 1e3:>8.2f}{a * 1e3:>9.2f}{both * 1e3:>8.2f}"
              f"{a / b:>13.2f}x{both / a:>13.2f}x")
    print("goals (`all`, LoRA-aware): adapter/base <= 1.2x, both/adapter <= 1.3x")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", type=Path, help="base model folder (default: build the tiny DeepSeek-V2 in a temp dir)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1: steadier on shared 2-core machines)")
    ap.add_argument("--skip-demo", action="store_true", help="only the one-layer table")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-experts-") as tmp:
        work = Path(tmp)
        base = args.base
        if base is None:
            from persona_lora.train.tiny_base import TinySpec, build_tiny_base

            base = build_tiny_base(work / "tiny-base", TinySpec())
        layers = layer_table(base, args.repeats)
        demo = None if args.skip_demo else demo_table(base, work, args.repeats)
    print(f"\ntiny DeepSeek-V2 base, CPU, torch threads {args.threads}, {os.cpu_count()} CPUs, best of {args.repeats}")
    print_layer_table(layers)
    if demo:
        print_demo_table(demo)
    return 0


if __name__ == "__main__":
    sys.exit(main())
