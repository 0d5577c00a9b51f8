"""Benchmark: `persona-lora merge` (shard by shard) against PEFT's merge_and_unload() + save_pretrained().

Why: the merge must run on machines that cannot hold the base in memory (DeepSeek-Coder-V2-Lite is 31 GB in
bf16), so its memory must be about one shard plus the adapter, not the model. This builds a toy DeepSeek-V2 of
~1.2 GB (float32) in 6 shards with the real checkpoint layout, an `all`-preset adapter (LoRA on attention, dense
MLP, shared experts and the fused routed experts) with random lora_B, and runs each method in its own process,
which reports its own peak RSS (VmHWM: file pages mapped and touched count too, so mmap-based
loading is charged fairly). A third process only imports the libraries: its RSS is the fixed cost of Python +
torch + transformers + peft that every method pays whatever the model size.

    .venv/bin/python bench/bench_merge.py [--layers 18] [--work DIR] [--keep]

Not a test: takes a few minutes and ~4 GB of disk.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import peak_rss_mb  # noqa: E402

# ------------------------------------------------------------------------------------------ children


def child_baseline(args) -> dict:
    import peft  # noqa: F401
    import safetensors  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import persona_lora.hub_tools.merge.deltas  # noqa: F401
    import persona_lora.hub_tools.merge.run
    import persona_lora.peft_compat  # noqa: F401

    return {}


def child_ours(args) -> dict:
    from persona_lora.hub_tools.merge.run import merge_adapter

    t = time.perf_counter()
    merge_adapter(args.adapter, args.base, args.out)
    return {"work_s": time.perf_counter() - t}


def child_peft(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from persona_lora.peft_compat import load_adapter

    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32)
    model = load_adapter(model, args.adapter).merge_and_unload()
    model.save_pretrained(args.out, max_shard_size="200MB")
    return {"work_s": time.perf_counter() - t}


CHILDREN = {"baseline": child_baseline, "ours": child_ours, "peft": child_peft}


def run_child(kind: str, **paths) -> dict:
    cmd = [sys.executable, __file__, "--child", kind] + [f"--{k}={v}" for k, v in paths.items()]
    t = time.perf_counter()
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_s"] = wall
    return result


# ------------------------------------------------------------------------------------------ setup
def build(work: Path, layers: int) -> tuple[Path, Path]:
    from persona_lora.train.synthetic import make_random_adapter
    from persona_lora.train.tiny_base import TinySpec, build_tiny_base

    base, adapter = work / "base", work / "adapter"
    if not base.exists():
        spec = TinySpec(layers=layers, hidden=1024, heads=8, experts=16, experts_per_token=4, shared_experts=2,
                        moe_intermediate=512, dense_intermediate=2048, kv_lora_rank=256, qk_nope_head_dim=64,
                        qk_rope_head_dim=32, v_head_dim=64, vocab_size=4096, shards=6)
        t = time.perf_counter()
        build_tiny_base(base, spec)
        print(f"built base in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    if not adapter.exists():
        make_random_adapter(base, adapter, "all", seed=0, r=16, alpha=32, std=0.02)
    return base, adapter


def keys_of(folder: Path) -> set[str]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return set(json.loads(index.read_text())["weight_map"])
    from safetensors import safe_open

    with safe_open(folder / "model.safetensors", "pt") as f:
        return set(f.keys())


def tensor(folder: Path, key: str):
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    name = json.loads(index.read_text())["weight_map"][key] if index.is_file() else "model.safetensors"
    with safe_open(folder / name, "pt") as f:
        return f.get_tensor(key)


def _weight_map(folder: Path) -> dict[str, str]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return json.loads(index.read_text())["weight_map"]
    return {k: "model.safetensors" for k in keys_of(folder)}


def cross_check(ours: Path, peft_out: Path, base: Path) -> tuple[float, float]:
    """(max |ours - PEFT's|, min over tensors of max |ours - base|) for a few adapted tensors; PEFT's experts are
    read fused or per expert, as saved. The second number shows the sampled tensors really were changed."""
    peft_map = _weight_map(peft_out)

    def peft_tensor(key: str):
        if key in peft_map:
            return tensor(peft_out, key)
        m = re.match(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$", key)
        e, kind = int(m.group(2)), m.group(3)
        fused = tensor(peft_out, f"{m.group(1)}.{'down_proj' if kind == 'down_proj' else 'gate_up_proj'}")[e]
        return fused if kind == "down_proj" else fused.chunk(2, dim=0)[0 if kind == "gate_proj" else 1]

    keys = ["model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.kv_b_proj.weight",
            "model.layers.0.mlp.gate_proj.weight", "model.layers.2.mlp.shared_experts.up_proj.weight",
            "model.layers.3.mlp.experts.5.gate_proj.weight", "model.layers.3.mlp.experts.5.up_proj.weight",
            "model.layers.4.mlp.experts.9.down_proj.weight"]
    return (max((tensor(ours, k).float() - peft_tensor(k).float()).abs().max().item() for k in keys),
            min((tensor(ours, k).float() - tensor(base, k).float()).abs().max().item() for k in keys))


def layout_of(keys: set[str]) -> str:
    fused = any(k.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")) for k in keys)
    per_expert = any(re.search(r"mlp\.experts\.\d+\.gate_proj\.weight$", k) for k in keys)
    if fused and not per_expert:
        return "fused (experts.gate_up_proj)"
    return "original per-expert" if per_expert and not fused else "mixed"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--child", choices=sorted(CHILDREN))
    ap.add_argument("--base")
    ap.add_argument("--adapter")
    ap.add_argument("--out")
    ap.add_argument("--layers", type=int, default=18,
                    help="18 layers: ~530M parameters, ~2 GB in float32 (10: ~1.15 GB)")
    ap.add_argument("--work", help="working folder (default: a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the working folder")
    args = ap.parse_args()
    if args.child:
        result = CHILDREN[args.child](args)
        result["peak_rss_mb"] = peak_rss_mb()
        print(json.dumps(result))
        return

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-merge-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        base, adapter = build(work, args.layers)
        shards = sorted(base.glob("*.safetensors"))
        largest = max(p.stat().st_size for p in shards) / 2**20
        total = sum(p.stat().st_size for p in shards) / 2**20
        adapter_mb = (adapter / "adapter_model.safetensors").stat().st_size / 2**20
        for d in ("ours", "peft"):
            shutil.rmtree(work / d, ignore_errors=True)
        baseline = run_child("baseline")
        ours = run_child("ours", base=base, adapter=adapter, out=work / "ours")
        peft = run_child("peft", base=base, adapter=adapter, out=work / "peft")
        base_keys, our_keys, peft_keys = keys_of(base), keys_of(work / "ours"), keys_of(work / "peft")
        diff, changed = cross_check(work / "ours", work / "peft", base)

        print(f"\nbase: {len(shards)} shards, {total:.0f} MiB in all, largest shard {largest:.0f} MiB; "
              f"adapter (all preset, r=16) {adapter_mb:.0f} MiB; float32; {os.cpu_count()} CPU cores")
        print(f"libraries-only process (python + torch + transformers + peft imported): "
              f"{baseline['peak_rss_mb']:.0f} MiB peak RSS, "
              f"{baseline['wall_s']:.1f} s\n")
        hdr = (f"| {'method':<42} | {'wall s':>6} | {'work s':>6} | {'peak RSS MiB':>12} | {'RSS / largest shard':>19} "
               f"| {'(RSS - libraries) / shard':>25} | {'goal <= 1.5x shard':<30} |")
        print(hdr)
        print("|" + "|".join("-" * (len(c)) for c in hdr.split("|")[1:-1]) + "|")
        for name, r in (("persona-lora merge (shard by shard)", ours),
                        ("PEFT merge_and_unload + save_pretrained", peft)):
            ratio = r["peak_rss_mb"] / largest
            net = (r["peak_rss_mb"] - baseline["peak_rss_mb"]) / largest
            verdict = ("meets it" if ratio <= 1.5 else "meets it net of libraries" if net <= 1.5 else "misses it")
            print(f"| {name:<42} | {r['wall_s']:>6.1f} | {r['work_s']:>6.1f} | {r['peak_rss_mb']:>12.0f} "
                  f"| {ratio:>18.2f}x | {net:>24.2f}x | {verdict:<30} |")
        print()
        for name, keys, folder in (("ours", our_keys, work / "ours"), ("PEFT", peft_keys, work / "peft")):
            files = sorted(p.name for p in folder.glob("*.safetensors"))
            same_files = files == [p.name for p in shards]
            print(f"output of {name}: layout {layout_of(keys)}; {len(keys)} keys, identical to the base's: "
                  f"{keys == base_keys}; {len(files)} shard file(s), same names as the base's: {same_files}")
        print("max |ours - PEFT| on sampled adapted tensors (attention, dense MLP, shared and routed experts): "
              f"{diff:.2e} "
              f"(each of them differs from the base by at least {changed:.2e})")
        print("wall s: the whole process, start-up and imports included; work s: the merge call alone")
    finally:
        if not args.keep and not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
