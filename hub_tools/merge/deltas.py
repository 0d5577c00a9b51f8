"""What to add to which checkpoint tensor when an adapter is merged: the LoRA deltas, in the base's own layout.

Why PEFT is asked rather than re-implemented: which module a LoRA key belongs to, its scaling (alpha/r, rsLoRA,
`rank_pattern`/`alpha_pattern`), and — for LoRA on transformers 5's fused expert tensors — which of the nested
`ParamWrapper`s holds `gate_up_proj` and which `down_proj` (the outer `mlp.experts` wrapper holds `down_proj`, the
inner `mlp.experts.base_layer` one `gate_up_proj`, and with hidden == 2·intermediate their shapes are equal, so the
shapes cannot tell them apart) are all decided by PEFT when it injects the adapter. So `discover_layers` injects the
adapter's config into the base architecture built on the `meta` device (no weights, so no memory, even for the
real DeepSeek-Coder-V2-Lite) and reads the answers off the wrapped modules.

The deltas themselves follow PEFT's `get_delta_weight` exactly:
- `Linear`: `scaling · B @ A` (transposed with `fan_in_fan_out`), shape (out, in).
- `ParamWrapper` on a 3-D (E, ·, ·) parameter: `A` is (r·E, in) and reshapes to (E, r, in) — experts outer;
  `B` is (out, r·E) and reshapes to (out, r, E) — experts *inner*; expert e's delta is
  `scaling · B[:, :, e] @ A[e]` for parameters stored (E, out, in) (DeepSeek-V2's `gate_up_proj` (E, 2I, H) and
  `down_proj` (E, H, I)), and its transpose for (E, in, out) ones.

Each delta is kept as low-rank factors (`Piece`: left (rows, r) @ right (r, cols)) and only multiplied out a block
of rows at a time when the tensor is written, so no full-size delta — let alone a fused (E, 2I, H) one — is ever
held in memory. Fused expert deltas are split back per expert the way transformers 5 fuses the hub checkpoint
(`gate_up_proj[e] = cat(experts.{e}.gate_proj.weight, experts.{e}.up_proj.weight)`, `down_proj[e] =
experts.{e}.down_proj.weight`), so the output keeps the base's original per-expert keys.
"""

from __future__ import annotations

import json
import logging
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from persona_lora.errors import ModelLoadError, VerificationError
from persona_lora.peft_compat import expert_factors

log = logging.getLogger(__name__)

PEFT_PREFIX = "base_model.model."
MAX_LISTED = 8

# Adapter features a merge into plain weights cannot honour (or that our adapters never use): refused by name.
_UNSUPPORTED = {
    "use_dora": "DoRA",
    "lora_bias": "LoRA bias terms (lora_bias)",
    "modules_to_save": "fully trained modules (modules_to_save)",
    "trainable_token_indices": "trainable token indices",
    "layer_replication": "layer replication",
    "alora_invocation_tokens": "activated LoRA (alora)",
    "use_qalora": "QA-LoRA",
}


@dataclass
class LoraLayer:
    """One adapted module/parameter as PEFT injects it, with the two adapter keys it consumes."""

    label: str  # e.g. model.layers.1.mlp.experts.gate_up_proj / model.layers.0.self_attn.q_proj
    module: str  # base-model module name without PEFT's prefix or `.base_layer`
    kind: str  # "linear" | "experts"
    parameter: str  # "weight" for linear layers, the fused parameter name for experts
    key_a: str
    key_b: str
    scaling: float
    fan_in_fan_out: bool = False
    experts: object = None  # peft_compat.ExpertLora, for LoRA on fused experts
    param_shape: tuple = ()
    lora_a_shape: tuple = ()
    lora_b_shape: tuple = ()


@dataclass
class Piece:
    """`scaling · left @ right` fills `rows` consecutive rows of a checkpoint tensor viewed as 2-D."""

    layer: str
    rows: int
    left: object  # torch.Tensor (rows, r)
    right: object  # torch.Tensor (r, cols)
    scaling: float


@dataclass
class TensorDelta:
    """Everything added to one checkpoint tensor: pieces stacked along its rows (2-D view: prod(shape[:-1]) x
    shape[-1]); for a 2-D weight one piece, for a fused (E, a, b) checkpoint tensor one piece per expert."""

    key: str
    shape: tuple
    pieces: list = field(default_factory=list)

    def add_to(self, block, r0: int) -> None:
        """Add the delta of rows [r0, r0 + len(block)) of the 2-D view to `block` (float32, in place)."""
        r1 = r0 + block.shape[0]
        start = 0
        for p in self.pieces:
            lo, hi = max(r0, start), min(r1, start + p.rows)
            if lo < hi:
                block[lo - r0:hi - r0].addmm_(p.left[lo - start:hi - start], p.right, alpha=p.scaling)
            start += p.rows


def check_adapter_config(adapter_config: dict, path: Path) -> None:
    """Refuse adapters whose effect is not `W + scaling·B@A` on existing weights, naming the field."""
    if adapter_config.get("peft_type") != "LORA":
        raise ModelLoadError(
            f"{path}: peft_type is {adapter_config.get('peft_type')!r}; merge handles LoRA adapters only")
    used = [label for key, label in _UNSUPPORTED.items() if adapter_config.get(key)]
    if used:
        raise ModelLoadError(
            f"{path}: the adapter uses {', '.join(used)}, which persona-lora merge does not support (persona-lora "
            "never trains them); merge it with PEFT's merge_and_unload() instead"
        )


def discover_layers(base_dir: Path, adapter_dir: Path) -> list[LoraLayer]:
    """Every LoRA layer of the adapter as PEFT would inject it into the base, found on a weightless (meta) model."""
    import torch
    from peft import LoraConfig, get_peft_model_state_dict
    from transformers import AutoConfig, AutoModelForCausalLM

    from persona_lora.peft_compat import (
        attach_new_adapter,
        expert_lora_layout,
        internal_config,
        is_param_wrapper,
        is_plain_lora_linear,
    )

    check_adapter_config(json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8")),
                         adapter_dir / "adapter_config.json")
    try:
        config = AutoConfig.from_pretrained(base_dir)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"cannot build the architecture of {base_dir / 'config.json'}: {e}") from e
    lora_config = internal_config(LoraConfig.from_pretrained(str(adapter_dir)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # base_model_name_or_path renamed, deprecations
        try:
            peft_model, _ = attach_new_adapter(model, lora_config)
        except ValueError as e:
            raise VerificationError(
                f"{adapter_dir / 'adapter_config.json'} does not fit the base {base_dir.name}: {e}"
            ) from e
        expected = sorted(get_peft_model_state_dict(peft_model))
    layers: dict[str, LoraLayer] = {}
    for key in expected:
        m = re.match(r"^(.*)\.(lora_A|lora_B)\.weight$", key)
        if not m:
            raise ModelLoadError(f"{adapter_dir}: the adapter has a {key!r} part that merge does not support")
        path = m.group(1)
        if path in layers:
            continue
        mod = peft_model.get_submodule(path)
        module = re.sub(r"(\.base_layer)+$", "", path.removeprefix(PEFT_PREFIX))
        a, b = mod.lora_A["default"].weight, mod.lora_B["default"].weight
        scaling = float(mod.scaling["default"])
        if is_param_wrapper(mod):
            layout = expert_lora_layout(mod)
            layers[path] = LoraLayer(
                label=f"{module}.{layout.parameter}", module=module, kind="experts", parameter=layout.parameter,
                key_a=f"{path}.lora_A.weight", key_b=f"{path}.lora_B.weight", scaling=scaling, experts=layout,
                param_shape=layout.param_shape, lora_a_shape=tuple(a.shape), lora_b_shape=tuple(b.shape),
            )
            if len(layout.param_shape) != 3:
                raise ModelLoadError(f"{module}.{layout.parameter}: LoRA on a {len(layout.param_shape)}-D parameter "
                                     "is not supported by merge")
        elif is_plain_lora_linear(mod):
            layers[path] = LoraLayer(
                label=module, module=module, kind="linear", parameter="weight",
                key_a=f"{path}.lora_A.weight", key_b=f"{path}.lora_B.weight", scaling=scaling,
                fan_in_fan_out=bool(mod.fan_in_fan_out), param_shape=tuple(mod.get_base_layer().weight.shape),
                lora_a_shape=tuple(a.shape), lora_b_shape=tuple(b.shape),
            )
        else:
            raise ModelLoadError(f"{module}: LoRA on a {type(mod).__name__} layer is not supported by merge")
    return list(layers.values())


def check_adapter_keys(layers: list[LoraLayer], tensors: dict, weights_path: Path) -> None:
    """The adapter file must hold exactly the keys PEFT expects, with PEFT's shapes: a leftover key would be
    silently ignored by a merge (and warned about at best by PEFT's loader), a missing one silently leaves a
    module un-adapted."""
    expected = {k: s for lay in layers for k, s in ((lay.key_a, lay.lora_a_shape), (lay.key_b, lay.lora_b_shape))}
    leftover = sorted(set(tensors) - set(expected))
    missing = sorted(set(expected) - set(tensors))
    problems = []
    if leftover:
        problems.append(
            f"{len(leftover)} key(s) that adapter_config.json does not target (leftover): {_some(leftover)}")
    if missing:
        problems.append(f"{len(missing)} key(s) that adapter_config.json targets are missing: {_some(missing)}")
    for key in sorted(set(expected) & set(tensors)):
        if tuple(tensors[key].shape) != tuple(expected[key]):
            problems.append(f"{key} has shape {tuple(tensors[key].shape)}, the base needs {tuple(expected[key])}")
    if problems:
        raise VerificationError(
            f"{weights_path} does not fit the base as its adapter_config.json targets it:"
            + "".join(f"\n  - {p}" for p in problems[:MAX_LISTED])
            + "\nThe adapter's own files were checked first and agree with each other, so --base is most likely not "
            "the model the adapter was trained on (--force skips only the comparison of its config.json): give that "
            "base. If it is that base, the adapter folder was edited or mixes files of different runs"
        )


def _some(keys: list[str]) -> str:
    return ", ".join(keys[:4]) + (", …" if len(keys) > 4 else "")


def plan_deltas(layers: list[LoraLayer], tensors: dict,
                ckpt_shapes: dict[str, tuple]) -> tuple[dict[str, TensorDelta], Counter]:
    """Map every LoRA layer onto the checkpoint tensors it changes.

    Returns ({checkpoint key: TensorDelta}, {layer label: number of pieces}) — the second is what `merge` must
    have applied, exactly, by the end. `tensors` are the adapter's tensors (float32)."""
    plan: dict[str, TensorDelta] = {}
    expected: Counter = Counter()
    problems: list[str] = []

    def add(key: str, label: str, shape: tuple, pieces: list[Piece]) -> None:
        if key not in ckpt_shapes:
            problems.append(f"{label}: the base checkpoint has no tensor {key}")
        elif tuple(ckpt_shapes[key]) != tuple(shape):
            problems.append(f"{label}: {key} is {tuple(ckpt_shapes[key])} in the base checkpoint, the adapter's delta "
                            f"is {tuple(shape)}")
        elif key in plan:
            problems.append(
                f"{label}: {key} is also changed by {plan[key].pieces[0].layer}; one tensor, one LoRA layer")
        else:
            plan[key] = TensorDelta(key, tuple(shape), pieces)
            expected[label] += len(pieces)

    for lay in layers:
        a, b = tensors[lay.key_a], tensors[lay.key_b]
        if lay.kind == "linear":
            left, right = (a.t(), b.t()) if lay.fan_in_fan_out else (b, a)
            shape = (left.shape[0], right.shape[1])
            add(f"{lay.module}.weight", lay.label, shape, [Piece(lay.label, shape[0], left, right, lay.scaling)])
            continue
        E, rows, cols = lay.param_shape
        factors = [expert_factors(lay.experts, a, b, e) for e in range(E)]
        fused_key = f"{lay.module}.{lay.parameter}"
        if fused_key in ckpt_shapes:  # a checkpoint already saved in transformers 5's fused layout
            add(fused_key, lay.label, lay.param_shape,
                [Piece(lay.label, rows, left, right, lay.scaling) for left, right in factors])
        elif lay.parameter == "gate_up_proj":  # hub layout: gate rows first, then up rows (transformers' Concatenate)
            half = rows // 2
            for e, (left, right) in enumerate(factors):
                add(f"{lay.module}.{e}.gate_proj.weight", lay.label, (half, cols),
                    [Piece(lay.label, half, left[:half], right, lay.scaling)])
                add(f"{lay.module}.{e}.up_proj.weight", lay.label, (rows - half, cols),
                    [Piece(lay.label, rows - half, left[half:], right, lay.scaling)])
        elif lay.parameter == "down_proj":
            for e, (left, right) in enumerate(factors):
                add(f"{lay.module}.{e}.down_proj.weight", lay.label, (rows, cols),
                    [Piece(lay.label, rows, left, right, lay.scaling)])
        else:
            problems.append(
                f"{lay.label}: the base checkpoint has neither the fused tensor {fused_key} nor a per-expert layout "
                "merge knows (experts.{e}.gate_proj/up_proj/down_proj.weight)"
            )
    if problems:
        raise VerificationError(
            "the adapter does not fit the base checkpoint's tensors:"
            + "".join(f"\n  - {p}" for p in problems[:MAX_LISTED])
            + (f"\n  - … and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else "")
            + "\nIs --base the model the adapter was trained on?"
        )
    return plan, expected
