"""One training step at DeepSeek-Coder-V2-Lite's real widths: our routed-expert LoRA against PEFT's `ParamWrapper`,
the frozen base and the default preset, side by side in one run.

    .venv/bin/python bench/bench_wide.py [--base DIR | --layers 3] [--batches 4,16] [--seq 256] [--steps 2]
        [--checkpointing off,on] [--cases ours-all,peft-all,floor,default,default-stock] [--device cpu|cuda]
        [--dtype fp32|bf16] [--compile]
    (GPU, the real depth:  --layers 27 --device cuda --dtype bf16)

Why: on the toy base the experts are tiny, so the cost `ParamWrapper` adds (W + s·B·A rebuilt for all 64 experts
of a layer on every forward, and a gradient the size of those weights on every backward) is hidden. The real
widths fit a CPU when the depth is cut: without --base, a `tiny-base --preset lite-wide --layers N` folder
(random weights, bfloat16 on disk) is built into a temp dir and loaded in --dtype.

Cases, each in its own process (peak memory is its own; the peak is reset before each configuration's steps):
- ours-all: preset `all` (attention, dense MLP, shared and routed experts) with our expert routine;
- peft-all: the same adapter on PEFT's `ParamWrapper` (PERSONA_LORA_EXPERT_LORA=peft), what stock PEFT and
  ms-swift users get;
- floor: the frozen base, no LoRA: forward and backward down to the input embeddings, no optimizer (what no LoRA
  method can beat);
- default: the default preset `attention+mlp` (no LoRA on the routed experts, which run our routine bare);
- default-stock: the same with PERSONA_LORA_EXPERT_LORA=peft (the bare experts on transformers' forward).

A step is forward + backward + AdamW on r-8 LoRA (alpha 16) over batch x seq tokens of persona data
(../shared/data/huanhuan.json when present, else our sample data) in the chat format, rows packed full, loss on the
answer tokens only with logits at those positions only (as the trainer does). One warm-up step, then --steps
measured; the fastest counts (a shared machine only ever adds time). Printed: step time, tokens/s, the
forward / backward / optimizer split, peak memory, and beside them the arithmetic each case must do per step
(`predicted`): matmul FLOPs and bytes of weight-sized tensors written. Goals (3 layers, CPU, `all`): ours <= 1.15x
the floor's step time; >= 3.5x ParamWrapper's tokens/s at batch 4, >= 2.5x at 16; peak memory below
ParamWrapper's; default >= 1.15x faster than default-stock. No LoRA step is faster than the floor's, so
ours/ParamWrapper can be at most ParamWrapper/floor: each row's notes print that ceiling, measured and as predicted
by the matmul work alone (ParamWrapper's excess over it is memory traffic: the `wt GB` column). With --compile the
decoder layers run under torch.compile; the first (compiling) step's time is printed separately.
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

from bench.common import peak_rss_mb  # noqa: E402

HUANHUAN = REPO.parent / "shared" / "data" / "huanhuan.json"
SYSTEM = "假设你是皇帝身边的女人--甄嬛。"
CASES = {  # case: (LoRA preset or None, PERSONA_LORA_EXPERT_LORA)
    "ours-all": ("all", ""),
    "peft-all": ("all", "peft"),
    "floor": (None, ""),
    "default": ("attention+mlp", ""),
    "default-stock": ("attention+mlp", "peft"),
}
RANK, ALPHA = 8, 16


# ------------------------------------------------------------------------------------------------ data


def batches(tokenizer, batch: int, seq: int, count: int):
    """`count` batches of `batch` rows x `seq` tokens: our chat-formatted records packed end to end, labels on the
    answers only."""
    import torch

    from persona_lora.chat_format import conversation_for, encode_examples

    src = HUANHUAN if HUANHUAN.is_file() else REPO / "examples" / "data" / "persona_zh.json"
    records = json.loads(src.read_text(encoding="utf-8"))
    need = batch * seq * count
    convs = []
    for r in records[: max(64, need // 20)]:
        messages = r.get("messages") or [{"role": "user", "content": (r["instruction"] + r.get("input", "")).strip()},
                                         {"role": "assistant", "content": r["output"]}]
        convs.append(conversation_for(messages, SYSTEM))
    ids, labels = [], []
    while len(ids) < need:
        for enc in encode_examples(tokenizer, convs, max_length=4096):
            ids += enc.input_ids
            labels += enc.labels
    ids = torch.tensor(ids[:need]).view(count, batch, seq)
    labels = torch.tensor(labels[:need]).view(count, batch, seq)
    return list(zip(ids, labels)), src.name


# ------------------------------------------------------------------------------------------------ predicted


def predicted(case: str, cfg: dict, batch: int, seq: int, answers: int, checkpointing: bool, nbytes: int) -> dict:
    """Matmul FLOPs per step (forward, backward, with the recomputation of checkpointing) and bytes of tensors the
    size of a layer's routed-expert weights written per step, from the model's shape: what the case must do."""
    preset, env = CASES[case]
    h, v, n = cfg["hidden_size"], cfg["vocab_size"], cfg["num_attention_heads"]
    nope, rope, vh, kv = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"], cfg["kv_lora_rank"]
    e, k, i, shared = cfg["n_routed_experts"], cfg["num_experts_per_tok"], cfg["moe_intermediate_size"], \
        cfg["n_shared_experts"] * cfg["moe_intermediate_size"]
    layers, dense = cfg["num_hidden_layers"], cfg["first_k_dense_replace"]
    t = batch * seq
    attn = [(h, n * (nope + rope)), (h, kv + rope), (kv, n * (nope + vh)), (n * vh, h)]  # (in, out) per linear
    mlp = [(h, cfg["intermediate_size"])] * 2 + [(cfg["intermediate_size"], h)]
    shared_l = [(h, shared)] * 2 + [(shared, h)]
    routed = [(h, 2 * i), (i, h)]  # per (token, expert) pair: gate_up, down

    def mm(pairs, rows):
        return sum(2 * rows * a * b for a, b in pairs)

    scores = 2 * batch * n * seq * seq * (nope + rope + vh) / 2  # causal half of QKᵀ and PV
    moe = mm(attn, t) + mm(shared_l, t) + mm(routed, t * k) + 2 * t * h * e
    fwd_layers = dense * (mm(attn, t) + mm(mlp, t) + scores) + (layers - dense) * (moe + scores)
    fwd = fwd_layers + 2 * answers * h * v
    bwd = fwd_layers + scores * layers + 2 * answers * h * v  # input gradients (scores: 2 products each way)
    lora = extra_fwd = extra_bwd = written = 0.0
    if preset:
        def low(pairs, rows):
            return sum(2 * rows * RANK * (a + b) for a, b in pairs)
        adapted = dense * (low(attn, t) + low(mlp, t)) + (layers - dense) * (low(attn, t) + low(shared_l, t))
        if preset == "all":
            adapted += (layers - dense) * low(routed, t * k)
        lora = adapted  # forward; backward does it twice (input and factor gradients)
    expert_elems = e * 3 * h * i
    if preset == "all" and env == "peft":
        fold = 2 * e * RANK * 3 * h * i  # baddbmm W + s·B·A per expert, both projections
        extra_fwd = (layers - dense) * fold
        # the weight-sized gradient of W + s·B·A from the routed tokens, then its products with B and A
        extra_bwd = (layers - dense) * (mm(routed, t * k) + 2 * fold)
        written = (layers - dense) * expert_elems * nbytes * 2  # the folded weights, and their gradient
    if checkpointing:
        fwd_again = fwd_layers + lora + extra_fwd
        written += (layers - dense) * expert_elems * nbytes if (preset == "all" and env == "peft") else 0
    else:
        fwd_again = 0
    total = fwd + lora + extra_fwd + fwd_again + bwd + 2 * lora + extra_bwd
    return {"gflop": total / 1e9, "lora_gflop": 3 * lora / 1e9, "rebuild_gflop": (extra_fwd + extra_bwd) / 1e9,
            "weights_gb": written / 1e9}


# ------------------------------------------------------------------------------------------------ worker


def reset_peak(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    except OSError:
        pass


def peak_mb(device: str) -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else peak_rss_mb()


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def worker(args) -> None:
    import torch

    from persona_lora import presets
    from persona_lora.expert_lora import use_fast_bare_experts, use_lora_aware_experts
    from persona_lora.model_loading import load_base_model, load_tokenizer, resolve_base
    from persona_lora.peft_compat import attach_new_adapter
    from persona_lora.train.answer_logits import answer_positions

    preset, _ = CASES[args.worker]
    dtype = {"fp32": "float32", "bf16": "bfloat16"}[args.dtype]
    t0 = time.perf_counter()
    rb = resolve_base(str(args.base))
    model = load_base_model(rb, dtype=dtype, device=args.device)
    model.config.use_cache = False
    load_s = time.perf_counter() - t0
    tokenizer = load_tokenizer(rb)
    bare = use_fast_bare_experts(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()  # as training does with checkpointing; the floor needs it always
    if preset:
        spec = presets.resolve(model, preset, None)
        model, _ = attach_new_adapter(model, presets.lora_config_for(spec, r=RANK, alpha=ALPHA, dropout=0.0))
        path = use_lora_aware_experts(model) or f"no LoRA on the routed experts; bare: {bare}"
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4)
    else:
        for p in model.parameters():
            p.requires_grad_(False)
        path, params, optimizer = f"bare: {bare}", [], None
    inner = model.get_base_model() if preset else model
    compile_s = None
    if args.compile:  # what `training.compile: true` does
        from persona_lora.train.compiled_layers import compile_decoder_layers

        compile_decoder_layers(model, args.device)
    model.train()
    results = []
    for checkpointing in args.checkpointing:
        if checkpointing:
            inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            inner.gradient_checkpointing_disable()
        for batch in args.batches:
            data, source = batches(tokenizer, batch, args.seq, args.steps + 1)
            times = []
            reset_peak(args.device)
            for step, (ids, labels) in enumerate(data):
                ids, labels = ids.to(args.device), labels.to(args.device)
                sync(args.device)
                a = time.perf_counter()
                loss = model(input_ids=ids, labels=labels, **answer_positions(labels)).loss
                sync(args.device)
                b = time.perf_counter()
                loss.backward()
                sync(args.device)
                c = time.perf_counter()
                if optimizer:
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                sync(args.device)
                d = time.perf_counter()
                if step == 0 and args.compile and compile_s is None:
                    compile_s = d - a
                times.append((d - a, b - a, c - b, d - c))
            best = min(times[1:])
            answers = int((labels[:, 1:] != -100).sum())  # the last batch's labelled positions
            results.append({"checkpointing": checkpointing, "batch": batch, "step_s": best[0], "fwd_s": best[1],
                            "bwd_s": best[2], "opt_s": best[3], "warmup_s": times[0][0], "answers": answers,
                            "peak_mb": peak_mb(args.device), "loss": float(loss)})
    print(json.dumps({"case": args.worker, "path": path, "load_s": load_s, "compile_s": compile_s,
                      "trainable": sum(p.numel() for p in params), "source": source,
                      "experts_implementation": inner.config._experts_implementation, "results": results}))


# ------------------------------------------------------------------------------------------------ parent


def run_case(case: str, args, base: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("PERSONA_LORA_EXPERT_LORA", None)
    if CASES[case][1]:
        env["PERSONA_LORA_EXPERT_LORA"] = CASES[case][1]
    cmd = [sys.executable, __file__, "--worker", case, "--base", str(base), "--device", args.device, "--dtype",
           args.dtype, "--seq", str(args.seq), "--steps", str(args.steps),
           "--batches", ",".join(map(str, args.batches)),
           "--checkpointing", ",".join("on" if c else "off" for c in args.checkpointing)]
    if args.compile:
        cmd.append("--compile")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.stderr.write(proc.stderr[-4000:])
        return {"case": case, "error": f"exit {proc.returncode}", "results": []}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def report(out: list[dict], cfg: dict, args) -> None:
    nbytes = 4 if args.dtype == "fp32" else 2
    by = {r["case"]: r for r in out}
    for r in out:
        extra = f", compile {r['compile_s']:.1f} s (first step)" if r.get("compile_s") else ""
        print(f"{r['case']}: {r.get('path', r.get('error'))}; load {r.get('load_s', 0):.1f} s{extra}; "
              f"trainable {r.get('trainable', 0):,}; experts_implementation {r.get('experts_implementation')}")
    print()
    mem = "peak GPU MiB" if args.device == "cuda" else "peak RSS MiB"
    head = (f"{'ckpt':<5}{'batch':>6} {'case':<14}{'step s':>8}{'tok/s':>8}{'xfloor':>8}{'fwd s':>8}{'bwd s':>8}"
            f"{'opt s':>7}{mem:>14} | {'pred GFLOP':>10}{'LoRA':>7}{'rebuild':>8}{'wt GB':>7}")
    print(head)
    print("-" * len(head))
    for checkpointing in args.checkpointing:
        for batch in args.batches:
            rows = {c: next((x for x in by[c]["results"] if x["checkpointing"] == checkpointing
                             and x["batch"] == batch), None) for c in by}
            floor = rows.get("floor")
            for case, x in rows.items():
                if x is None:
                    print(f"{'on' if checkpointing else 'off':<5}{batch:>6} {case:<14}  failed")
                    continue
                p = predicted(case, cfg, batch, args.seq, x["answers"], checkpointing, nbytes)
                ratio = f"{x['step_s'] / floor['step_s']:.2f}" if floor else "-"
                print(f"{'on' if checkpointing else 'off':<5}{batch:>6} {case:<14}{x['step_s']:>8.2f}"
                      f"{batch * args.seq / x['step_s']:>8.1f}{ratio:>8}{x['fwd_s']:>8.2f}{x['bwd_s']:>8.2f}"
                      f"{x['opt_s']:>7.2f}{x['peak_mb']:>14,.0f} | {p['gflop']:>10,.0f}{p['lora_gflop']:>7.1f}"
                      f"{p['rebuild_gflop']:>8,.0f}{p['weights_gb']:>7.2f}")
            ours, peft = rows.get("ours-all"), rows.get("peft-all")
            default, stock = rows.get("default"), rows.get("default-stock")
            notes = []
            if ours and peft:
                notes.append(f"ours/ParamWrapper tokens/s {peft['step_s'] / ours['step_s']:.2f}x, peak memory "
                             f"{ours['peak_mb'] / peft['peak_mb']:.2f}x")
            if ours and floor:
                notes.append(f"ours/floor step {ours['step_s'] / floor['step_s']:.2f}x")
            if peft and floor:  # no LoRA path is faster than the frozen base: this bounds ours/ParamWrapper
                pw, fl = (predicted(c, cfg, batch, args.seq, rows[c]["answers"], checkpointing, nbytes)["gflop"]
                          for c in ("peft-all", "floor"))
                notes.append(f"ceiling for ours/ParamWrapper (ParamWrapper/floor): "
                             f"{peft['step_s'] / floor['step_s']:.2f}x measured, {pw / fl:.2f}x by matmul work alone")
            if default and stock:
                notes.append(f"default vs default-stock {stock['step_s'] / default['step_s']:.2f}x faster")
            print("      " + "; ".join(notes))
    print("\npred GFLOP: matmul work per step (forward, recomputation, backward; attention scores causal); LoRA: of "
          "it, the rank-8 products; rebuild: of it, ParamWrapper's W + s·B·A folds and their weight-sized "
          "gradients; wt GB: weight-sized tensors written per step (folded experts and their gradients).")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", type=Path, help="a lite-wide base folder (default: build one into a temp dir)")
    p.add_argument("--layers", type=int, default=3, help="layers of the base built when --base is not given")
    p.add_argument("--batches", default="4,16")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=2, help="measured steps after one warm-up")
    p.add_argument("--checkpointing", default="off,on")
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--compile", action="store_true", help="torch.compile each decoder layer (training.compile)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.batches = [int(b) for b in str(args.batches).split(",")]
    args.checkpointing = [c == "on" for c in str(args.checkpointing).split(",")]
    if args.worker:
        worker(args)
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-wide-") as tmp:
        base = args.base
        if base is None:
            from persona_lora.train.tiny_base import build_wide_base

            t = time.perf_counter()
            base = build_wide_base(Path(tmp) / "lite-wide", layers=args.layers, dtype="bfloat16")
            print(f"built a {args.layers}-layer lite-wide base in {time.perf_counter() - t:.0f} s")
        cfg = json.loads((Path(base) / "config.json").read_text())
        print(f"base {base}: {cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, "
              f"{cfg['n_routed_experts']} experts of {cfg['moe_intermediate_size']}; {args.device} {args.dtype}; "
              f"batches {args.batches} x {args.seq}; {args.steps} measured steps after a warm-up")
        out = []
        for case in args.cases.split(","):
            t = time.perf_counter()
            out.append(run_case(case, args, Path(base)))
            print(f"  {case} done in {time.perf_counter() - t:.0f} s", flush=True)
        print(f"data: {out[0].get('source')}")
        report(out, cfg, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
