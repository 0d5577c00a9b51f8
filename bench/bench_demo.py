"""Benchmark: the demo engine's two answers (one resident model) against one answer alone, and its memory
against the obvious alternative, two model copies (the base + a merged tuned model).

Why: the demo must show both answers at about the cost of one (goal: both <= 1.3x one answer) and hold the base
weights once however many adapters are loaded (goal: 1x resident weights). Measured on the toy DeepSeek-V2
(built here unless --base is given) with two adapters made on the spot, lora_B random so the answers differ:
`attention` (LoRA on linear layers only: PEFT's mixed batch) and `all` (also LoRA on the fused routed experts,
PEFT's ParamWrapper, which refuses mixed batches: the engine splits the rows itself).

Timing: greedy, the same prompt, exactly --new-tokens tokens (EOS ignored), best of --repeats runs after one
warm-up (the minimum: other jobs on a shared machine only ever add time), all in one process. \
"one alone" is the engine decoding one side only (the same decode loop, so the
ratio isolates the cost of the second side); "HF generate" is `model.generate` on the PEFT model for the
adapter side, for reference. Memory: each setup runs in its own process and reports its RSS after one
generation; a process that only imports the libraries gives the fixed cost to subtract. "weights" counts the
parameter bytes each setup keeps resident.

    .venv/bin/python bench/bench_demo.py [--new-tokens 64] [--repeats 3] [--threads 1] [--base DIR]

Not a test: about a minute or two on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPT = "Who are you, and what did you do today?"
SYSTEM = "You are Zhen Huan, a consort in the imperial palace."
PRESETS = {"attention": 1, "all": 2}  # preset -> seed of the random lora_B


def make_adapter(base: Path, out: Path, preset: str, seed: int) -> Path:
    """An adapter of our trainer's kind without training (r=16, random lora_B, manifest)."""
    from persona_lora.train.synthetic import make_random_adapter

    return make_random_adapter(base, out, preset, seed=seed, r=16, alpha=32, system_prompt=SYSTEM)


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _param_mb(*models) -> float:
    seen, total = set(), 0
    for m in models:
        for p in m.parameters():
            if p.data_ptr() not in seen:
                seen.add(p.data_ptr())
                total += p.numel() * p.element_size()
    return total / 2**20


# ------------------------------------------------------------------------------------------ timing


def time_engine(base: Path, adapters: dict[str, Path], new_tokens: int, repeats: int) -> list[dict]:
    from persona_lora.demo.engine import Engine, GenerationSettings

    engine = Engine(str(base), max_new_tokens_cap=new_tokens)
    names = {preset: engine.add_adapter(str(path)).name for preset, path in adapters.items()}
    settings = GenerationSettings(max_new_tokens=new_tokens, ignore_eos=True)
    turn = [{"role": "user", "content": PROMPT}]

    def run(kind: str, name: str) -> float:
        t = time.perf_counter()
        if kind == "both":
            out = engine.compare(name, PROMPT, SYSTEM, settings)
        elif kind == "adapter":
            out = engine.answer(name, PROMPT, SYSTEM, settings)
        else:
            out = engine.answer(None, PROMPT, SYSTEM, settings)
        assert out
        return time.perf_counter() - t

    rows = []
    for preset, name in names.items():
        kinds = ("base", "adapter", "both")
        for kind in kinds:  # warm-up
            run(kind, name)
        samples = {k: [] for k in kinds}
        for _ in range(repeats):  # interleaved, so drift (other jobs on the machine) hits every kind alike
            for kind in kinds:
                samples[kind].append(run(kind, name))
        med = {k: min(v) for k, v in samples.items()}
        med["hf_generate"] = _hf_generate_time(engine, name, turn, new_tokens, repeats)
        rows.append({"preset": preset, **med})
    engine.close()
    return rows


def _hf_generate_time(engine, name: str, turn, new_tokens: int, repeats: int) -> float:
    """`generate` on the resident PEFT model with the adapter active (run on the engine's inference thread)."""
    import torch

    from persona_lora.chat_format import conversation_for, encode_prompt

    info = engine.adapter(name)

    def go():
        engine.model.set_adapter(info.key)
        engine.resident.active = info.key
        ids = torch.tensor([encode_prompt(engine.tokenizer, conversation_for(turn, SYSTEM))], device=engine.device)
        times = []
        for _ in range(repeats + 1):
            t = time.perf_counter()
            with torch.no_grad():
                engine.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                      min_new_tokens=new_tokens, do_sample=False,
                                      pad_token_id=engine.tokenizer.pad_token_id)
            times.append(time.perf_counter() - t)
        return min(times[1:])

    return engine._worker.call(go).result()


# ------------------------------------------------------------------------------------------ memory children


def child(kind: str, base: Path, adapters: list[Path], threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    import peft  # noqa: F401
    import transformers  # noqa: F401

    import persona_lora.demo.engine  # noqa: F401

    if kind == "imports":
        return {"rss_mb": _rss_mb(), "weights_mb": 0.0}
    if kind == "engine":
        from persona_lora.demo.engine import Engine, GenerationSettings

        engine = Engine(str(base), max_new_tokens_cap=16)
        names = [engine.add_adapter(str(a)).name for a in adapters]
        for name in names:
            engine.compare(name, PROMPT, SYSTEM, GenerationSettings(max_new_tokens=16))
        out = {"rss_mb": _rss_mb(), "weights_mb": _param_mb(engine.model)}
        engine.close()
        return out
    # two copies: the base, and a second copy with the adapter merged into it (what a two-model demo holds)
    from persona_lora.model_loading import load_base_model
    from persona_lora.peft_compat import load_adapter

    base_model = load_base_model(str(base), device="cpu")
    tuned = load_adapter(load_base_model(str(base), device="cpu"), adapters[0]).merge_and_unload()
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        for m in (base_model, tuned):
            m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)
    return {"rss_mb": _rss_mb(), "weights_mb": _param_mb(base_model, tuned)}


def run_child(kind: str, base: Path, adapters: list[Path], threads: int) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--base", str(base), "--threads", str(threads),
           *[a for p in adapters for a in ("--adapter", str(p))]]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"{kind} child failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------ main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", type=Path, help="base model folder (default: build the toy DeepSeek-V2 in a temp dir)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (default 1: steadier on shared 2-core machines)"
    )
    ap.add_argument("--child", choices=["imports", "engine", "two-copies"], help=argparse.SUPPRESS)
    ap.add_argument("--adapter", type=Path, action="append", default=[], help=argparse.SUPPRESS)
    args = ap.parse_args()

    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.child:
        print(json.dumps(child(args.child, args.base, args.adapter, args.threads)))
        return 0

    import torch

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-demo-"))
    base = args.base
    if base is None:
        from persona_lora.train.tiny_base import TinySpec, build_tiny_base

        base = build_tiny_base(work / "tiny-base", TinySpec())
    adapters = {
        preset: make_adapter(base, work / f"persona-{preset}", preset, seed) for preset, seed in PRESETS.items()
    }

    rows = time_engine(base, adapters, args.new_tokens, args.repeats)
    mem = {kind: run_child(kind, base, list(adapters.values()) if kind == "engine" else [adapters["all"]], args.threads)
           for kind in ("imports", "engine", "two-copies")}

    print(f"\nbase {base.name}, {args.new_tokens} new tokens, greedy, best of {args.repeats}, "
          f"torch threads {args.threads}, {os.cpu_count()} CPUs\n")
    print(f"{'adapter preset':<16}{'base alone':>12}{'adapter alone':>15}{'both (1 model)':>16}"
          f"{'both/adapter':>14}{'both/base':>11}{'HF generate':>13}")
    for r in rows:
        print(f"{r['preset']:<16}{r['base']:>11.2f}s{r['adapter']:>14.2f}s{r['both']:>15.2f}s"
              f"{r['both'] / r['adapter']:>13.2f}x{r['both'] / r['base']:>10.2f}x{r['hf_generate']:>12.2f}s")
    fixed = mem["imports"]["rss_mb"]
    print(f"\n{'memory':<44}{'weights':>10}{'RSS':>10}{'RSS - imports':>15}")
    labels = {
        "engine": "demo engine: base + 2 adapters, one model",
        "two-copies": "two copies: base + merged `all` model",
    }
    for kind, label in labels.items():
        m = mem[kind]
        print(f"{label:<44}{m['weights_mb']:>8.1f}MB{m['rss_mb']:>8.1f}MB{m['rss_mb'] - fixed:>13.1f}MB")
    e, t = mem["engine"], mem["two-copies"]
    print(f"{'ratio engine / two copies':<44}{e['weights_mb'] / t['weights_mb']:>9.2f}x"
          f"{e['rss_mb'] / t['rss_mb']:>9.2f}x"
          f"{(e['rss_mb'] - fixed) / (t['rss_mb'] - fixed):>14.2f}x")
    print(f"(imports alone: {fixed:.1f} MB RSS; "
          f"engine weights = {e['weights_mb'] / (t['weights_mb'] / 2):.3f}x one base copy)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
