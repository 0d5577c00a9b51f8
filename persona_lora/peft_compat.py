"""Everything persona-lora knows about PEFT's and transformers' private behaviour, in one place.

Verified on peft 0.21.2 with transformers 5.24 (the pins in pyproject.toml). When the PEFT pin moves, audit this
module only, then run the canary tests in tests/test_peft_compat.py; they fail when any assumption below stops
holding. What is assumed, and where it is used:

1. The MoE target rewrite. When PEFT injects LoRA into a MoE model (DeepSeek-V2 and the `MOE_REWRITTEN_LEAVES`
   model types), it converts the adapter config "from transformers 4 to 5": every `target_modules` entry ending
   in gate/up/down_proj becomes `target_parameters` on the fused routed experts, and the dense MLP of layer 0 and
   the shared experts are silently left out. Our adapter configs are written against the transformers-5 model
   already, so `native_targets()` switches the rewrite off (it replaces
   `peft.utils.transformers_weight_conversion.convert_peft_config_for_transformers`) while one of our adapters
   is created or loaded. Used by `attach_new_adapter`/`load_adapter` (training, demo, merge, tests).
2. Dropout on fused experts. PEFT's `ParamWrapper` (LoRA on a 3-D expert parameter) refuses `lora_dropout != 0`,
   so a config with experts carries 0 and `attach_new_adapter` swaps dropout back into the linear LoRA layers.
3. `ParamWrapper` internals that merge needs (`expert_lora_layout`): which parameter it wraps, how many experts,
   whether PEFT swapped in/out features, and that `lora_A` is (r*E, in) with experts outer and `lora_B`
   (out, r*E) with experts inner.
4. Per-row LoRA in one batch (`RowRouting`, used by the demo engine). Vanilla linear LoRA computes
   `lora_B(lora_A(x)) * scaling[adapter]`, so a per-row tensor as `scaling` (the adapter's scale on adapter
   rows, 0 on base rows) serves both sides of a batch; PEFT's `adapter_names` mixed-batch path is the fallback
   for layers with a LoRA variant (DoRA, …). `ParamWrapper` refuses mixed batches: the LoRA-aware expert
   forward (item 7) gives base rows a LoRA factor of 0 instead, and where it falls back to `ParamWrapper` it
   splits the flattened (rows*seq) expert inputs by row.
5. `MOE_REWRITTEN_LEAVES`: the model types PEFT 0.21 rewrites, and which leaf names (transformers 5.24
   `_MODEL_TO_CONVERSION_PATTERN`, PEFT `_MOE_TARGET_MODULE_MAPPING`). Hard-coded so a card renders the same
   whatever library versions the machine has.
6. The portable spelling of an adapter config (upstream issue huggingface/peft#3711). Stock PEFT's rewrite only
   looks at `target_modules`, so an adapter whose dense-MLP and shared-expert LoRA is named in
   `target_parameters` (`model.layers.0.mlp.gate_proj.weight`) loads as trained with unpatched PEFT and
   transformers; the tensors keep linear LoRA's keys and shapes. We train and serve those layers as ordinary
   linear LoRA (`internal_config`), and write adapters in the portable spelling (`portable_config`).
   `rewrite_is_safe()` probes PEFT once: when its rewrite no longer touches layers that exist as linear modules
   (the upstream fix), `native_targets()` stops switching it off.
7. LoRA on the routed experts without rebuilding them (`use_lora_aware_experts`, used by training, eval and, through
   `RowRouting`, the demo). `ParamWrapper` folds `W + s·B·A` into every expert's weight on every forward; the
   outermost `ParamWrapper` of each experts module instead gets a forward that reads the wrappers' active
   adapters and computes `x·W_eᵀ + s·(x·A_eᵀ)·B_eᵀ` for the routed tokens only (`persona_lora.expert_lora`,
   this module's arithmetic, kept in a file of its own for size). It relies on: PEFT nests one `ParamWrapper`
   per targeted parameter around the experts module (the outer one from the last `target_parameters` entry);
   item 3's factor layout; `disable_adapters`, `merged`, `active_adapters`, `lora_dropout`, `lora_variant`,
   `lora_bias` and `scaling` meaning what they mean for linear LoRA; and transformers' experts modules exposing
   `gate_up_proj` (E, 2I, H), `down_proj` (E, H, I), `_apply_gate` and the `experts_implementation` in their
   config. Anything else (dropout or a variant on an adapter, a merged adapter, bias, transposed or
   expert-parallel experts, an experts kernel we do not mirror, `PERSONA_LORA_EXPERT_LORA=peft`) runs on
   `ParamWrapper` as before; the choice is logged once per reason.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import re
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# PeftModel's constructor asks the model `is_gradient_checkpointing`, which transformers 5 deprecated for
# `is_activation_checkpointing`: a FutureWarning printed on every training run and demo start that the user can do
# nothing about. Filtered here, where the PEFT internals are kept, for that message alone.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)

VERIFIED_PEFT = "0.21.2"
_lock = threading.RLock()

_QWEN2_MOE_LIKE = (
    "Dots3NoteTextModel afmoe deepseek_v2 deepseek_v3 deepseek_v32 dots1 ernie4_5_moe glm4_moe glm4_moe_lite "
    "glm_moe_dsa glm4v_moe longcat_flash solar_open mellum qwen3_moe beam qwen3_omni_moe qwen3_omni_moe_thinker "
    "qwen3_omni_moe_text qwen3_next hunyuan_v1_moe flex_olmo olmoe sarvam_mla exaone_moe cohere2_moe"
).split()
MOE_REWRITTEN_LEAVES: dict[str, tuple[str, ...]] = {
    **{t: ("gate_proj", "up_proj", "down_proj", "gate") for t in _QWEN2_MOE_LIKE},
    "minimax": ("w1", "w2", "w3", "gate"),
    "minimax_m2": ("w1", "w2", "w3", "gate"),
}
BASE_ROW = "__base__"  # PEFT's name for "no adapter" in a mixed batch


# ------------------------------------------------------------------------------------------------ 1, 2: attach/load


@contextlib.contextmanager
def native_targets():
    """Disable PEFT's v4->v5 target rewrite while our (already v5-native) adapter is injected or loaded; a PEFT
    whose rewrite leaves existing linear layers alone is left as it is."""
    import peft.utils.transformers_weight_conversion as conversion

    if rewrite_is_safe():
        yield
        return
    with _lock:
        original = conversion.convert_peft_config_for_transformers
        conversion.convert_peft_config_for_transformers = lambda *args, **kwargs: None
        try:
            yield
        finally:
            conversion.convert_peft_config_for_transformers = original


def is_param_wrapper(module) -> bool:
    """LoRA on a fused (3-D) expert parameter."""
    from peft.tuners.lora.layer import ParamWrapper

    return isinstance(module, ParamWrapper)


def attach_new_adapter(model, lora_config, *, dropout: float = 0.0, adapter_name: str = "default"):
    """Wrap `model` in a PeftModel with a fresh adapter, coverage exactly as configured. When the config had to
    carry dropout 0 because of the fused experts, put `dropout` back on the linear LoRA layers.
    Returns (peft_model, dropout_note or None)."""
    import torch.nn as nn
    from peft import get_peft_model

    with native_targets():
        peft_model = get_peft_model(model, lora_config, adapter_name=adapter_name)
    note = None
    if dropout and lora_config.lora_dropout == 0 and lora_config.target_parameters:
        n = 0
        for _, mod in peft_model.named_modules():
            if is_param_wrapper(mod) or not hasattr(mod, "lora_dropout"):
                continue
            if adapter_name in mod.lora_dropout:
                mod.lora_dropout[adapter_name] = nn.Dropout(p=dropout)
                n += 1
        note = (f"dropout {dropout} on the {n} linear LoRA layers; 0 on the fused routed experts (PEFT's "
                "ParamWrapper does not support dropout)")
        log.info(note)
    return peft_model, note


def load_adapter(model, adapter_dir: str | Path, adapter_name: str = "default", *, is_trainable: bool = False):
    """Load one of our adapters (either spelling) onto a base model (a PreTrainedModel, or a PeftModel that already
    holds others) with the coverage it was trained with, linear layers as linear LoRA. Returns the PeftModel."""
    from peft import LoraConfig, PeftModel

    from persona_lora.artifact import require_adapter_files

    adapter_dir = require_adapter_files(adapter_dir)
    config = internal_config(LoraConfig.from_pretrained(str(adapter_dir)))
    config.inference_mode = not is_trainable
    with native_targets():
        if isinstance(model, PeftModel):
            model.add_adapter(adapter_name, config)
            model.load_adapter(str(adapter_dir), adapter_name=adapter_name, is_trainable=is_trainable)
            return model
        return PeftModel.from_pretrained(model, str(adapter_dir), adapter_name=adapter_name,
                                         is_trainable=is_trainable, config=config)


# ------------------------------------------------------------------------------------------------ 3: ParamWrapper


@dataclass(frozen=True)
class ExpertLora:
    """How a `ParamWrapper` lays out LoRA on a fused (E, a, b) parameter."""

    parameter: str  # the wrapped parameter's name, e.g. gate_up_proj
    num_experts: int
    swapped: bool  # True: the parameter is stored (E, out, in)
    param_shape: tuple


def expert_lora_layout(module) -> ExpertLora:
    """Read a `ParamWrapper`'s layout (merge turns it into per-expert deltas)."""
    param = module.get_param()
    return ExpertLora(module.parameter_name, int(module.num_experts), bool(module._did_swap_in_out_features),
                      tuple(param.shape))


def expert_factors(layout: ExpertLora, a, b, e: int):
    """(left, right) with left @ right = expert e's delta without scaling, oriented like parameter[e].
    `a` is (r*E, in) with experts outer, `b` is (out, r*E) with experts inner."""
    E = layout.num_experts
    a_e = a.reshape(E, -1, a.shape[-1])[e]  # (r, in)
    b_e = b.reshape(b.shape[0], -1, E)[:, :, e]  # (out, r)
    return (b_e, a_e) if layout.swapped else (a_e.t(), b_e.t())


def lora_module_label(name: str, module) -> tuple[bool, str]:
    """(is fused experts, label) of an adapted module: expert wrappers are named by the parameter they adapt."""
    if is_param_wrapper(module):
        return True, f"{name.removesuffix('.base_layer')}.{module.parameter_name}"
    return False, name


def is_plain_lora_linear(module) -> bool:
    """PEFT's LoRA `Linear` (a module merge can fold as scaling * B @ A)."""
    from peft.tuners.lora.layer import Linear

    return isinstance(module, Linear)


# ------------------------------------------------------------------------------------------------ 4: per-row LoRA


def row_hook_targets(peft_model) -> tuple[list, list]:
    """(PEFT's linear LoRA layers, every module that takes PEFT's `adapter_names` per row except the fused-expert
    wrappers) of `peft_model` as it is now: what `row_routing.RowRouting` hooks."""
    from peft.tuners.lora.layer import Linear, LoraLayer, ParamWrapper
    from peft.utils.other import AuxiliaryTrainingWrapper

    inner = peft_model.get_base_model()
    linears = [m for m in inner.modules() if isinstance(m, Linear)]
    hooked = [m for m in inner.modules()
              if isinstance(m, (LoraLayer, AuxiliaryTrainingWrapper)) and not isinstance(m, ParamWrapper)]
    return linears, hooked


def outermost_param_wrappers(model) -> list:
    """The outermost `ParamWrapper` of every LoRA-adapted fused-experts module (PEFT nests one per targeted
    parameter): where `expert_lora.use_lora_aware_experts` installs its forward."""
    from peft.tuners.lora.layer import ParamWrapper

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    wrappers = [m for m in inner.modules() if isinstance(m, ParamWrapper)]
    nested = {id(w.base_layer) for w in wrappers}
    return [w for w in wrappers if id(w) not in nested]


# ------------------------------------------------------------------------------------------------ 5: model types


def needs_moe_rewrite_off(model_type: str | None, *target_lists) -> bool:
    """Whether stock PEFT would re-target an adapter of `model_type` onto the fused routed experts when loading it.

    Each of `target_lists` is a list of target module names or a string (PEFT's "all-linear", or a regex that
    PEFT resolves against the model); the answer is yes exactly when such a target names a rewritten leaf on a
    rewritten model type."""
    leaves = MOE_REWRITTEN_LEAVES.get(model_type or "")
    if not leaves:
        return False
    names: list[str] = []
    for targets in target_lists:
        if isinstance(targets, str):
            if targets.lower() == "all-linear" or any(leaf in targets for leaf in leaves):
                return True
            names.append(targets)
        elif isinstance(targets, (list, tuple, set)):
            names += [str(t) for t in targets]
    return any(t == leaf or t.endswith("." + leaf) for t in names for leaf in leaves)


# ------------------------------------------------------------------------------------------------ 6: spelling

LINEAR_WEIGHT = ".weight"  # a `target_parameters` entry ending so names an nn.Linear's weight


def module_regex(names: list[str]) -> str:
    """A compact regex that matches exactly `names` (layer indices collapsed per leaf path)."""
    by_shape: dict[str, set[str]] = {}
    for n in names:
        m = re.match(r"^(.*?\.layers\.)(\d+)(\..*)$", n)
        if m:
            by_shape.setdefault(re.escape(m.group(1)) + "(%s)" + re.escape(m.group(3)), set()).add(m.group(2))
        else:
            by_shape.setdefault(re.escape(n), set())
    parts = []
    for shape, layers in sorted(by_shape.items()):
        parts.append(shape % "|".join(sorted(layers, key=int)) if layers else shape)
    return "^(?:" + "|".join(parts) + ")$"


def rewritten_modules(model_type: str | None, module_names: list[str]) -> list[str]:
    """The linear modules among `module_names` whose names stock PEFT would move onto the fused experts."""
    leaves = MOE_REWRITTEN_LEAVES.get(model_type or "", ())
    return [n for n in module_names if n.rsplit(".", 1)[-1] in leaves]


def portable_config(config: dict, module_names: list[str], model_type: str | None) -> dict:
    """An adapter_config.json (as a dict) whose linear targets are the full `module_names`, in the spelling stock
    PEFT and transformers load as trained: the modules PEFT would re-target are named as parameters instead."""
    moved = rewritten_modules(model_type, module_names)
    if not moved:
        return dict(config)
    kept = [n for n in module_names if n not in moved]
    out = dict(config)
    out["target_modules"] = module_regex(kept) if kept else None
    params = [p for p in config.get("target_parameters") or [] if p not in {m + LINEAR_WEIGHT for m in moved}]
    out["target_parameters"] = params + [m + LINEAR_WEIGHT for m in sorted(moved)]
    return out


def internal_config(config):
    """A LoraConfig as persona-lora runs it: linear layers named in `target_parameters` (the portable spelling)
    go back to `target_modules`, so they run as ordinary linear LoRA with the same tensors."""
    params = list(config.target_parameters or [])
    linear = [p.removesuffix(LINEAR_WEIGHT) for p in params if p.endswith(LINEAR_WEIGHT)]
    if not linear:
        return config
    config = copy.deepcopy(config)
    config.target_parameters = [p for p in params if not p.endswith(LINEAR_WEIGHT)] or None
    targets = config.target_modules
    if isinstance(targets, str):
        config.target_modules = f"(?:{targets})|(?:{module_regex(linear)})"
    else:
        config.target_modules = sorted(set(targets or []) | set(linear))
    return config


def has_expert_lora(config: dict) -> bool:
    """Whether an adapter_config.json puts LoRA on fused expert parameters (not linear weights named as
    parameters)."""
    return any(not p.endswith(LINEAR_WEIGHT) for p in config.get("target_parameters") or [])


def is_legacy_spelling(config: dict, model_type: str | None) -> bool:
    """Whether stock PEFT would load this adapter_config onto the wrong weights (the spelling persona-lora wrote
    before adapters were portable): its `target_modules` names modules PEFT re-targets on this model type."""
    return needs_moe_rewrite_off(model_type, config.get("target_modules"))


@functools.cache
def rewrite_is_safe() -> bool:
    """Whether this PEFT's MoE rewrite leaves alone a dense-MLP layer that exists as a linear module (the upstream
    fix). Probed once per process on a one-layer DeepSeek-V2 built on the meta device."""
    import peft.utils.transformers_weight_conversion as conversion
    import torch
    from peft import LoraConfig
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    config = DeepseekV2Config(num_hidden_layers=2, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                              n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
                              num_attention_heads=2, num_key_value_heads=2, kv_lora_rank=16, q_lora_rank=None,
                              qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, vocab_size=64)
    with torch.device("meta"):
        model = DeepseekV2ForCausalLM(config)
    dense = [f"model.layers.0.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
    lora = LoraConfig(r=2, target_modules=list(dense))
    try:
        conversion.convert_peft_config_for_transformers(lora, model, None)
    except Exception:  # noqa: BLE001 - any failure means: do not rely on it
        return False
    safe = set(dense) <= set(lora.target_modules or [])
    log.info("PEFT %s MoE target rewrite %s existing linear layers", _peft_version(),
             "leaves alone" if safe else "re-targets")
    return safe


def _peft_version() -> str:
    import peft

    return peft.__version__


# ------------------------------------------------------------------------------------------------ 7: expert LoRA

EXPERT_LORA_ENV = "PERSONA_LORA_EXPERT_LORA"  # "peft": keep PEFT's ParamWrapper forward (comparisons, bisecting)


_logged: set[str] = set()


def log_once(level: int, text: str) -> None:
    """Log `text` the first time only (a choice made per module or per pass, reported once per process)."""
    if text not in _logged:
        _logged.add(text)
        log.log(level, text)
