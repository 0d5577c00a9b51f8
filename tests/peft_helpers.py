"""Helpers shared by the LoRA coverage tests: a fresh tiny model, LoRA attached by preset, and an independent walk
over a PEFT model that lists what is adapted (without going through the code under test)."""

from __future__ import annotations

import torch
import torch.nn as nn

from persona_lora.peft_compat import attach_new_adapter
from persona_lora.presets import lora_config_for, resolve

IDS = torch.tensor([[0, 11, 250, 37, 902, 4, 1500, 1]])


def fresh(path):
    from transformers import AutoModelForCausalLM  # imported when used: collecting the tests stays fast

    return AutoModelForCausalLM.from_pretrained(path).eval()


def attach(model, preset=None, targets=None, dropout=0.0, r=4):
    spec = resolve(model, preset, targets)
    config = lora_config_for(spec, r=r, alpha=2 * r, dropout=dropout)
    peft_model, note = attach_new_adapter(model, config, dropout=dropout)
    return spec, peft_model, note


def adapted(peft_model) -> dict[str, nn.Module]:
    """{what is adapted: the LoRA module} from a walk over the PEFT model; fused experts as `...experts.<param>`."""
    out = {}
    for name, mod in peft_model.named_modules():
        lora_a = getattr(mod, "lora_A", None)
        if not isinstance(lora_a, nn.ModuleDict) or not len(lora_a):
            continue
        name = name.removeprefix("base_model.model.")
        if getattr(mod, "parameter_name", None):  # LoRA on a parameter (fused experts), nested via base_layer
            name = name.removesuffix(".base_layer") + "." + mod.parameter_name
        assert name not in out, name
        out[name] = mod
    return out
