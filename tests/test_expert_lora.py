"""The LoRA-aware forward of the routed experts (`persona_lora.expert_lora`, installed by
`expert_lora.use_lora_aware_experts`) against PEFT's `ParamWrapper`, which it replaces in training, eval and the demo.

What must hold: the same outputs and gradients (LoRA A/B and the input's) as `ParamWrapper` to 1e-5 relative in
fp32, for the `all` preset and the leaf target list, with and without gradient checkpointing, for every experts
implementation we mirror; no tensor the size of a fused expert parameter is formed; base rows of a mixed demo batch
get exactly no LoRA; anything we do not handle runs on PEFT's own path, logged once; and a 20-step training run
gives ParamWrapper's loss curve.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from persona_lora import peft_compat
from persona_lora.expert_lora import BareExpertsForward, ExpertsForward, use_fast_bare_experts, use_lora_aware_experts
from persona_lora.peft_compat import BASE_ROW, EXPERT_LORA_ENV, is_param_wrapper
from persona_lora.presets import LEAF_TARGETS
from persona_lora.row_routing import RowRouting
from tests.peft_helpers import attach, fresh

RTOL = 1e-5
IDS = torch.randint(3, 4000, (3, 24), generator=torch.Generator().manual_seed(2))


def adapted_model(tiny_base, preset="all", targets=None, *, checkpointing=False, strategy="grouped_mm",
                  lora_aware=True, device="cpu", dtype=torch.float32):
    """The tiny base with LoRA (r 4, random B so the LoRA terms count), seeded: two calls give the same weights."""
    torch.manual_seed(0)
    model = fresh(tiny_base).to(device=device, dtype=dtype)
    model.set_experts_implementation(strategy)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    _, peft_model, _ = attach(model, preset, targets)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen).to(p) * 0.05)
    if lora_aware:
        assert use_lora_aware_experts(peft_model) == f"LoRA-aware ({strategy})"
    return peft_model.train()


def run(peft_model, ids=IDS):
    """Logits, input-embedding gradient and every LoRA gradient of one training step."""
    emb = peft_model.get_input_embeddings()(ids.to(peft_model.device)).detach().requires_grad_()
    out = peft_model(inputs_embeds=emb, labels=ids.to(peft_model.device))
    out.loss.backward()
    grads = {n: p.grad.float().cpu() for n, p in peft_model.named_parameters() if p.grad is not None}
    return out.logits.detach().float().cpu(), emb.grad.float().cpu(), grads


def rel(got, want) -> float:
    """Largest difference relative to the largest reference value (absolute where the reference is all zeros)."""
    diff = (got.float() - want.float()).abs().max()
    scale = want.float().abs().max()
    return (diff / scale if scale > 0 else diff).item()


def assert_same_step(got, want, rtol=RTOL, experts_adapted=True):
    (logits, d_input, grads), (ref_logits, ref_input, ref_grads) = got, want
    assert rel(logits, ref_logits) <= rtol
    assert rel(d_input, ref_input) <= rtol
    assert grads.keys() == ref_grads.keys() and any(".experts." in n for n in grads) is experts_adapted and grads
    worst = max(ref_grads, key=lambda n: rel(grads[n], ref_grads[n]))
    assert rel(grads[worst], ref_grads[worst]) <= rtol, worst


# ------------------------------------------------------------------------------------------------ exactness


@pytest.mark.parametrize("checkpointing", [False, True], ids=["no-checkpointing", "checkpointing"])
@pytest.mark.parametrize("preset,targets", [("all", None), (None, LEAF_TARGETS)], ids=["all", "leaf-targets"])
def test_outputs_and_gradients_equal_param_wrapper(tiny_base, preset, targets, checkpointing):
    want = run(adapted_model(tiny_base, preset, targets, checkpointing=checkpointing, lora_aware=False))
    assert_same_step(run(adapted_model(tiny_base, preset, targets, checkpointing=checkpointing)), want)


@pytest.mark.parametrize("strategy", ["batched_mm", "eager"])
def test_every_mirrored_experts_implementation_is_exact(tiny_base, strategy):
    want = run(adapted_model(tiny_base, strategy=strategy, lora_aware=False))
    assert_same_step(run(adapted_model(tiny_base, strategy=strategy)), want)


def test_decode_sized_batches_are_exact(tiny_base):
    """One token routes fewer pairs than there are experts: the gathered-factor path, forward and backward."""
    one = IDS[:1, :2]
    assert_same_step(run(adapted_model(tiny_base), one), run(adapted_model(tiny_base, lora_aware=False), one))


class _Shapes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(r.alias_info is not None for r in func._schema.returns):  # views of the weights allocate nothing
            return out
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.seen.add(tuple(t.shape))
        return out


def test_no_expert_weight_is_rebuilt(tiny_base):
    """Neither forward nor backward makes a tensor shaped like a fused expert parameter (W + s·B·A or its
    gradient); PEFT's ParamWrapper does, which shows the check sees it."""
    experts = fresh(tiny_base).model.layers[1].mlp.experts
    fused = {tuple(experts.gate_up_proj.shape), tuple(experts.down_proj.shape)}
    for lora_aware in (True, False):
        model = adapted_model(tiny_base, lora_aware=lora_aware)
        with _Shapes() as shapes:
            run(model)
        assert bool(fused & shapes.seen) is not lora_aware


# ------------------------------------------------------------------------------------------------ bare experts


def bare_model(tiny_base, preset=None, strategy="grouped_mm", ours=True):
    """The tiny base, or with `preset` a LoRA that leaves the routed experts bare (random B so it counts), in
    training mode; `ours`: the bare experts on our routine."""
    torch.manual_seed(0)
    model = fresh(tiny_base)
    model.set_experts_implementation(strategy)
    if preset:
        _, model, _ = attach(model, preset)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
        chosen = use_lora_aware_experts(model)
        assert chosen == ""  # nothing on the routed experts is adapted
    if ours:
        assert use_fast_bare_experts(model) == f"ours ({strategy})"
    return model.train()


@pytest.mark.parametrize("strategy", ["grouped_mm", "batched_mm", "eager"])
def test_bare_experts_equal_transformers(tiny_base, strategy, monkeypatch):
    """The frozen base: logits and the input-embedding gradient (all backward passes through the experts) within
    1e-5 of transformers' own experts forward, for every implementation we mirror, and at decode size."""
    from persona_lora import expert_lora

    got, want = bare_model(tiny_base, strategy=strategy), bare_model(tiny_base, strategy=strategy, ours=False)
    calls = []
    routine = expert_lora.lora_experts_forward
    monkeypatch.setattr(expert_lora, "lora_experts_forward", lambda *a, **k: calls.append(a[-1]) or routine(*a, **k))
    for ids in (IDS, IDS[:1, :2]):
        (logits, d_input, _), (ref_logits, ref_input, _) = run(got, ids), run(want, ids)
        assert rel(logits, ref_logits) <= RTOL and rel(d_input, ref_input) <= RTOL
        assert d_input.abs().max() > 0
    assert calls == [strategy] * 6  # our routine ran in the 3 MoE layers of `got` (twice), never in `want`


def test_default_preset_with_bare_experts_equals_transformers(tiny_base):
    """The default preset (no LoRA on the routed experts): logits, input gradient and every LoRA gradient."""
    want = run(bare_model(tiny_base, "attention+mlp", ours=False))
    assert_same_step(run(bare_model(tiny_base, "attention+mlp")), want, experts_adapted=False)


def test_bare_experts_follow_the_opt_out_and_the_loader(tiny_base, monkeypatch):
    from persona_lora.model_loading import load_base_model

    model = load_base_model(str(tiny_base), device="cpu", dtype="float32")
    assert sum(isinstance(m.__dict__.get("forward"), BareExpertsForward) for m in model.modules()) == 3
    monkeypatch.setenv(EXPERT_LORA_ENV, "peft")
    plain = load_base_model(str(tiny_base), device="cpu", dtype="float32")
    assert not any(isinstance(m.__dict__.get("forward"), BareExpertsForward) for m in plain.modules())
    assert use_fast_bare_experts(plain) == f"transformers' ({EXPERT_LORA_ENV}=peft)"
    with torch.no_grad():
        assert rel(model(input_ids=IDS).logits, plain(input_ids=IDS).logits) <= RTOL


# ------------------------------------------------------------------------------------------------ demo rows


@pytest.mark.parametrize("strategy", ["grouped_mm", "batched_mm", "eager"])
def test_mixed_rows_base_rows_get_no_lora(tiny_base, strategy):
    """The demo's both-sides batch: with per-row routing, a base row equals the model without the adapter and an
    adapter row equals the adapter alone, in one forward pass."""
    model = adapted_model(tiny_base, strategy=strategy, lora_aware=False).eval()
    routing = RowRouting()
    routing.install(model)
    ids = IDS[:2, :12]
    with torch.no_grad():
        with model.disable_adapter():
            base = model(input_ids=ids).logits
        alone = model(input_ids=ids).logits
        with routing.rows([BASE_ROW, "default"], "default"):
            mixed = model(input_ids=ids).logits
    assert any(isinstance(m.__dict__.get("forward"), ExpertsForward) and m.forward.strategy == strategy
               for m in model.modules())
    assert rel(mixed[0], base[0]) <= RTOL and rel(mixed[1], alone[1]) <= RTOL
    assert rel(alone[0], base[0]) > 1e-3  # the adapter does change row 0 when it is routed there


# ------------------------------------------------------------------------------------------------ fallbacks


def test_env_forces_param_wrapper_and_the_choice_is_logged_once(tiny_base, monkeypatch, caplog):
    monkeypatch.setattr(peft_compat, "_logged", set())  # what earlier tests logged in this process
    caplog.set_level(logging.INFO, logger="persona_lora.peft_compat")
    monkeypatch.setenv(EXPERT_LORA_ENV, "peft")
    model = adapted_model(tiny_base, lora_aware=False)
    assert use_lora_aware_experts(model) == f"PEFT's ParamWrapper ({EXPERT_LORA_ENV}=peft)"
    use_lora_aware_experts(model)
    assert sum(f"{EXPERT_LORA_ENV}=peft" in r.getMessage() for r in caplog.records) == 1
    monkeypatch.delenv(EXPERT_LORA_ENV)
    assert_same_step(run(model), run(adapted_model(tiny_base, lora_aware=False)), rtol=0.0)


def test_unhandled_adapters_and_states_run_on_peft(tiny_base, monkeypatch, caplog):
    """Dropout put on the experts' LoRA, a disabled adapter or a merged one: PEFT's own path (bit for bit)."""
    monkeypatch.setattr(peft_compat, "_logged", set())
    caplog.set_level(logging.INFO, logger="persona_lora.peft_compat")
    model = adapted_model(tiny_base).eval()
    wrappers = [m for m in model.modules() if is_param_wrapper(m)]
    plain = adapted_model(tiny_base, lora_aware=False).eval()
    with torch.no_grad():
        for w in wrappers:
            w.lora_dropout["default"] = nn.Dropout(0.0)
        assert torch.equal(model(input_ids=IDS).logits, plain(input_ids=IDS).logits)
        assert sum("dropout" in r.getMessage() for r in caplog.records) == 1
        for w in wrappers:
            w.lora_dropout["default"] = nn.Identity()
        with model.disable_adapter(), plain.disable_adapter():
            assert torch.equal(model(input_ids=IDS).logits, plain(input_ids=IDS).logits)
        model.merge_adapter()
        plain.merge_adapter()
        assert torch.equal(model(input_ids=IDS).logits, plain(input_ids=IDS).logits)


def test_training_setup_uses_it(tiny_base, tmp_path):
    from persona_lora.model_loading import resolve_base
    from persona_lora.train.config import config_from_dict
    from persona_lora.train.model_setup import build_adapted_model

    cfg = config_from_dict({"base": {"model": str(tiny_base), "device": "cpu"}, "data": {"path": "x.json"},
                            "lora": {"preset": "all", "r": 4, "alpha": 8},
                            "training": {"output_dir": str(tmp_path / "out")}})
    built = build_adapted_model(cfg, resolve_base(str(tiny_base)), "cpu")
    assert built.experts_forward == "LoRA-aware (grouped_mm)"


@pytest.mark.slow
def test_twenty_training_steps_give_param_wrappers_loss_curve(tiny_base, small_persona_data, tmp_path, monkeypatch):
    import json

    from persona_lora.cli import main
    from tests.conftest import train_args

    losses = {}
    for path in ("lora-aware", "peft"):
        if path == "peft":
            monkeypatch.setenv(EXPERT_LORA_ENV, "peft")
        out = tmp_path / path
        assert main(train_args(tiny_base, small_persona_data, out, "--max-steps", "20", "--set",
                               "training.logging_steps=1", "--set", "training.samples=0", "--set",
                               "data.eval_fraction=0", "--set", "training.report_to=[none]")) == 0
        history = json.loads((out / "persona_manifest.json").read_text())["metrics"]["history"]
        losses[path] = [h["loss"] for h in history if h.get("loss") is not None]
    assert len(losses["peft"]) == 20
    assert max(abs(a - b) for a, b in zip(losses["lora-aware"], losses["peft"])) <= 1e-4


# ------------------------------------------------------------------------------------------------ CUDA


@pytest.mark.gpu
@pytest.mark.parametrize("checkpointing", [False, True], ids=["no-checkpointing", "checkpointing"])
def test_cuda_bf16_is_as_close_to_fp32_as_param_wrapper(tiny_base, checkpointing):
    """In bf16 on CUDA (grouped GEMMs) both paths round differently, so each is compared with the fp32 result: the
    LoRA-aware forward's error must stay within 2x ParamWrapper's (and within bf16's few-percent range)."""
    ref = run(adapted_model(tiny_base, checkpointing=checkpointing, lora_aware=False))  # fp32 on the CPU
    err = {}
    for lora_aware in (True, False):
        got = run(adapted_model(tiny_base, checkpointing=checkpointing, lora_aware=lora_aware, device="cuda",
                                dtype=torch.bfloat16))
        err[lora_aware] = max([rel(got[0], ref[0]), rel(got[1], ref[1])]
                              + [rel(got[2][n], ref[2][n]) for n in ref[2] if "experts" in n])
    assert err[True] <= max(2 * err[False], 1e-3) and err[True] < 0.1, err
