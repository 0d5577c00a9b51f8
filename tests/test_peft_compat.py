"""Canaries for persona_lora/peft_compat.py: the PEFT behaviours it works around, and that its workarounds hold.

When the PEFT pin moves, run this file first: a failing canary names the assumption that no longer holds
(PEFT's MoE target rewrite, its refusal of dropout on fused experts, the rewrite switch being restored).
"""

from __future__ import annotations

import pytest
import torch.nn as nn

from persona_lora import presets
from persona_lora.peft_compat import VERIFIED_PEFT, attach_new_adapter, is_param_wrapper, rewrite_is_safe
from persona_lora.presets import check_coverage
from tests.peft_helpers import IDS, adapted, attach, fresh

MLP = ("gate_proj", "up_proj", "down_proj")


def test_the_rewrite_probe_sees_the_pinned_peft_rewrite_existing_linear_layers():
    """peft 0.21.2 re-targets dense-MLP names onto the experts (huggingface/peft#3711). When a PEFT with the fix
    is installed, the probe turns True and `native_targets()` stops patching: then update this canary."""
    assert rewrite_is_safe() is False


def test_the_pinned_peft_is_the_verified_one():
    import peft

    assert peft.__version__ == VERIFIED_PEFT, (
        f"PEFT {peft.__version__} is installed; persona_lora/peft_compat.py was verified on {VERIFIED_PEFT}: "
        "audit it, run these canaries, then update VERIFIED_PEFT")


# ------------------------------------------------------------------------------------------------ dropout
def test_peft_alone_refuses_dropout_on_fused_experts(tiny_base):
    import peft

    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj"],
                             target_parameters=presets.EXPERT_PARAMS)
    with pytest.raises(ValueError, match="lora_dropout"):
        peft.get_peft_model(fresh(tiny_base), config)


def test_dropout_with_all_goes_on_linear_layers_only(tiny_base):
    spec, peft_model, note = attach(fresh(tiny_base), "all", dropout=0.1)
    found = adapted(peft_model)
    linear = {n: m for n, m in found.items() if not is_param_wrapper(m)}
    experts = {n: m for n, m in found.items() if is_param_wrapper(m)}
    assert linear and experts
    for name, mod in linear.items():
        drop = mod.lora_dropout["default"]
        assert isinstance(drop, nn.Dropout) and drop.p == 0.1, name
    for name, mod in experts.items():
        assert not isinstance(mod.lora_dropout["default"], nn.Dropout), name
    assert note and "0.1" in note and str(len(linear)) in note
    check_coverage(peft_model, spec)
    peft_model.train()
    peft_model(input_ids=IDS, labels=IDS).loss.backward()  # and it trains


def test_dropout_without_experts_is_plain_peft_dropout(tiny_base):
    _, peft_model, note = attach(fresh(tiny_base), "attention+mlp", dropout=0.1)
    assert note is None
    for mod in adapted(peft_model).values():
        assert isinstance(mod.lora_dropout["default"], nn.Dropout) and mod.lora_dropout["default"].p == 0.1


# ------------------------------------------------------------------------------------------------ PEFT's rewrite
DENSE_TARGETS = [f"model.layers.0.mlp.{p}" for p in MLP]


def test_plain_peft_rewrites_dense_mlp_targets_to_the_experts(tiny_base):
    import peft

    model = fresh(tiny_base)
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(DENSE_TARGETS)))
    found = set(adapted(peft_model))
    assert not found & set(DENSE_TARGETS)  # the dense MLP we named is NOT adapted...
    assert found and all(".mlp.experts." in n for n in found)  # ...the routed experts are, which we did not name


def test_attach_new_adapter_adapts_exactly_the_named_modules(tiny_base):
    import peft

    model = fresh(tiny_base)
    peft_model, _ = attach_new_adapter(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(DENSE_TARGETS)))
    assert set(adapted(peft_model)) == set(DENSE_TARGETS)
    # and PEFT's own conversion is switched back on afterwards
    again = peft.get_peft_model(
        fresh(tiny_base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(DENSE_TARGETS))
    )
    assert not set(adapted(again)) & set(DENSE_TARGETS)
