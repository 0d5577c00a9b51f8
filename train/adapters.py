"""Creating and loading our LoRA adapters with exactly the coverage they were made with.

PEFT 0.21 converts adapter configs "from transformers 4 to 5" whenever it injects LoRA into a MoE model such
as DeepSeek-V2: every `target_modules` entry ending in gate/up/down_proj is rewritten into `target_parameters`
on the fused routed experts, and the dense MLP of the first layer and the shared experts are then silently
left out (DESIGN.md). Our adapter configs are written against the transformers-5 model in the first place
(full-name regex for linear layers, explicit `target_parameters` for the fused experts), so that conversion
must not run on them. `native_targets()` switches it off for the duration of one inject/load; everything that
creates or loads one of our adapters goes through the functions below.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from pathlib import Path

from persona_lora.errors import ModelLoadError

log = logging.getLogger(__name__)
_lock = threading.RLock()


@contextlib.contextmanager
def native_targets():
    """Disable PEFT's v4->v5 target rewrite while our (already v5-native) adapter is injected or loaded."""
    import peft.utils.transformers_weight_conversion as conversion

    with _lock:
        original = conversion.convert_peft_config_for_transformers
        conversion.convert_peft_config_for_transformers = lambda *args, **kwargs: None
        try:
            yield
        finally:
            conversion.convert_peft_config_for_transformers = original


def attach_new_adapter(model, lora_config, *, dropout: float = 0.0, adapter_name: str = "default"):
    """Wrap `model` in a PeftModel with a fresh adapter. When the config had to carry dropout 0 because of the
    fused experts (PEFT's `ParamWrapper` refuses dropout), put `dropout` back on the linear LoRA layers.
    Returns (peft_model, dropout_note or None)."""
    import torch.nn as nn
    from peft import get_peft_model

    with native_targets():
        peft_model = get_peft_model(model, lora_config, adapter_name=adapter_name)
    note = None
    if dropout and lora_config.lora_dropout == 0 and lora_config.target_parameters:
        n = 0
        for name, mod in peft_model.named_modules():
            if type(mod).__name__ == "ParamWrapper" or not hasattr(mod, "lora_dropout"):
                continue
            if adapter_name in mod.lora_dropout:
                mod.lora_dropout[adapter_name] = nn.Dropout(p=dropout)
                n += 1
        note = f"dropout {dropout} on the {n} linear LoRA layers; 0 on the fused routed experts (PEFT's ParamWrapper does not support dropout)"
        log.info(note)
    return peft_model, note


def _check_adapter_dir(adapter_dir: Path) -> None:
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ModelLoadError(f"{adapter_dir} is not an adapter folder: adapter_config.json is missing")
    if not (adapter_dir / "adapter_model.safetensors").is_file():
        raise ModelLoadError(
            f"{adapter_dir} has no adapter_model.safetensors (persona-lora loads safetensors only; "
            "convert pickled adapter_model.bin first)"
        )


def load_adapter(model, adapter_dir: str | Path, adapter_name: str = "default", *, is_trainable: bool = False):
    """Load one of our adapters onto a base model (a PreTrainedModel or a PeftModel that already holds others).

    Returns the PeftModel."""
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    _check_adapter_dir(adapter_dir)
    with native_targets():
        if isinstance(model, PeftModel):
            model.load_adapter(str(adapter_dir), adapter_name=adapter_name, is_trainable=is_trainable)
            return model
        return PeftModel.from_pretrained(model, str(adapter_dir), adapter_name=adapter_name, is_trainable=is_trainable)
