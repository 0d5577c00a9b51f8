"""Benchmark: the portable adapter spelling costs persona-lora nothing.

    .venv/bin/python bench/bench_interop.py [--base DIR] [--repeats 5] [--tokens 256]

Portable adapters name the dense-MLP and shared-expert LoRA as parameters so stock PEFT loads them as trained;
stock PEFT then runs those layers through `ParamWrapper`, which rebuilds W + B·A on every forward, while
persona-lora's own loader turns them back into ordinary linear LoRA (same tensors). Side by side on the tiny
DeepSeek-V2 base (built into a temp dir unless --base), adapters `attention+mlp` and `all` with random LoRA B:
forward and forward+backward time of one batch (4 x --tokens tokens), best of --repeats after a warm-up, for
  ours    persona_lora.peft_compat.load_adapter (what train, eval and the demo run)
  stock   peft.PeftModel.from_pretrained on the same folder (what other people's code runs)
and the largest logit difference between the two. Goal: ours <= stock (the portable spelling does not slow
persona-lora down) with identical outputs to 1e-5.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def best(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=256)
    args = ap.parse_args(argv)

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from persona_lora.peft_compat import load_adapter
    from persona_lora.train.synthetic import make_random_adapter
    from persona_lora.train.tiny_base import build_tiny_base

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        base = args.base or build_tiny_base(Path(tmp) / "base")
        ids = torch.randint(3, 4000, (4, args.tokens))
        rows = []
        for preset in ("attention+mlp", "all"):
            adapter = make_random_adapter(base, Path(tmp) / preset.replace("+", "-"), preset)
            models = {
                "ours": load_adapter(AutoModelForCausalLM.from_pretrained(base), adapter, is_trainable=True),
                "stock": PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(adapter),
                                                   is_trainable=True),
            }
            with torch.no_grad():
                out = {k: m.eval()(input_ids=ids).logits for k, m in models.items()}
            diff = (out["ours"] - out["stock"]).abs().max().item()
            for name, model in models.items():
                model.train()

                def forward(model=model):
                    with torch.no_grad():
                        model(input_ids=ids)

                def step(model=model):
                    model(input_ids=ids, labels=ids).loss.backward()
                    model.zero_grad(set_to_none=True)

                rows.append((preset, name, best(forward, args.repeats), best(step, args.repeats), diff))
    print(f"{'preset':<15}{'loader':<8}{'forward s':>11}{'fwd+bwd s':>11}{'vs stock':>10}{'max |dlogit|':>14}")
    stock = {(p, "fwd"): f for p, n, f, _, _ in rows if n == "stock"} | {
        (p, "step"): s for p, n, _, s, _ in rows if n == "stock"}
    for preset, name, fwd, step, diff in rows:
        ratio = step / stock[(preset, "step")]
        print(f"{preset:<15}{name:<8}{fwd:>11.4f}{step:>11.4f}{ratio:>9.2f}x{diff:>14.2e}")
    print("goal: ours <= 1.00x stock (fwd+bwd), max |dlogit| <= 1e-5")
    return 0


if __name__ == "__main__":
    sys.exit(main())
