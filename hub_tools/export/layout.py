"""The adapter's LoRA layers rewritten in the layout the serving engines read: one linear LoRA per module.

Why per module: PEFT stores LoRA on transformers 5's fused routed experts as one `lora_A` (r·E, in) and one
`lora_B` (out, r·E) per fused parameter (`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`); SGLang reads only
per-expert keys, and vLLM reads them for DeepSeek-V2 without extra flags (see persona_lora/engines.py). Expert e's
delta is `scaling · left @ right` with (left, right) from `peft_compat.expert_factors`, oriented like the fused
parameter's slice [e] — (2I, H) for gate_up_proj, (H, I) for down_proj — so its per-expert LoRA is
lora_B = left, lora_A = right; transformers 5 fuses `gate_up_proj[e] = cat(gate_proj, up_proj)` along the rows,
so gate_proj gets the first I rows of lora_B and up_proj the last I, both with the same lora_A. Attention, the
dense MLP and the shared experts are linear LoRA already and keep their tensors.

Both engines apply one rank and one scaling per adapter (engines.adapter_config), so `uniform_rank` makes
every module use the largest rank (zero rows/columns added to A/B change nothing in B @ A) and folds a module's
own scaling into its lora_B. For persona-lora's adapters (one r, one alpha) it changes nothing.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace

from persona_lora.errors import ModelLoadError
from persona_lora.hub_tools.merge.deltas import PEFT_PREFIX, LoraLayer
from persona_lora.peft_compat import expert_factors

GATE_UP, DOWN = "gate_up_proj", "down_proj"
EXPERT_LEAVES = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModuleLora:
    """LoRA on one module as an engine applies it: `scaling · lora_b @ lora_a` is added to `module`'s weight."""

    module: str  # model.layers.1.mlp.experts.3.gate_proj, model.layers.0.self_attn.q_proj
    lora_a: object  # torch.Tensor (r, in)
    lora_b: object  # torch.Tensor (out, r)
    scaling: float
    source: str  # label of the PEFT layer it came from
    expert: bool = False

    @property
    def rank(self) -> int:
        return int(self.lora_a.shape[0])

    @property
    def leaf(self) -> str:
        return self.module.rsplit(".", 1)[-1]

    def keys(self) -> tuple[str, str]:
        """The safetensors keys PEFT gives this module, which both engines parse (vllm/lora/utils.py
        `parse_fine_tuned_lora_name` drops `base_model.model.` and `.lora_{A,B}.weight`; SGLang's
        lora/lora.py `_process_weight` files the key under its layer)."""
        return f"{PEFT_PREFIX}{self.module}.lora_A.weight", f"{PEFT_PREFIX}{self.module}.lora_B.weight"


def per_module(layers: list[LoraLayer], tensors: dict,
               expert_shapes: dict[str, tuple] | None = None) -> list[ModuleLora]:
    """Every LoRA layer as per-module LoRA: linear layers as they are, fused experts split per expert.

    `tensors` are the adapter's tensors by key; `expert_shapes` maps gate_up_proj/down_proj to the (E, out, in)
    shape the base's config implies for the fused parameter (a layer PEFT wrapped with another shape is refused:
    its per-expert slices would not be the checkpoint's (out, in) weights)."""
    out: list[ModuleLora] = []
    for lay in layers:
        a, b = tensors[lay.key_a], tensors[lay.key_b]
        if lay.kind == "linear":  # A (r, in), B (out, r) also with fan_in_fan_out: only the stored weight is (in, out)
            out.append(ModuleLora(lay.module, a, b, lay.scaling, lay.label))
            continue
        _check_expert_layer(lay, expert_shapes)
        E, rows, _ = lay.param_shape
        for e in range(E):
            left, right = expert_factors(lay.experts, a, b, e)
            prefix = f"{lay.module}.{e}"
            if lay.parameter == GATE_UP:
                half = rows // 2
                out.append(ModuleLora(f"{prefix}.gate_proj", right, left[:half], lay.scaling, lay.label, True))
                out.append(ModuleLora(f"{prefix}.up_proj", right, left[half:], lay.scaling, lay.label, True))
            else:
                out.append(ModuleLora(f"{prefix}.down_proj", right, left, lay.scaling, lay.label, True))
    return out


def _check_expert_layer(lay: LoraLayer, expert_shapes: dict[str, tuple] | None) -> None:
    if lay.parameter not in (GATE_UP, DOWN) or len(lay.param_shape) != 3:
        raise ModelLoadError(
            f"{lay.label}: LoRA on a fused {lay.parameter} of shape {lay.param_shape} has no per-expert layout "
            "export knows (mlp.experts.gate_up_proj / down_proj); serve the merged model (`persona-lora merge`)")
    want = (expert_shapes or {}).get(lay.parameter)
    odd_gate_up = lay.parameter == GATE_UP and lay.param_shape[1] % 2
    if odd_gate_up or (want and tuple(want) != tuple(lay.param_shape)):
        raise ModelLoadError(
            f"{lay.label}: PEFT wrapped a {lay.parameter} of shape {lay.param_shape}, but the base's config gives "
            f"{tuple(want) if want else '(E, 2·I, H)'} (experts, out, in); its per-expert slices would not be the "
            "checkpoint's gate_proj/up_proj/down_proj weights. Is --base the model the adapter was trained on?")


def expert_shapes_from_config(config: dict) -> dict[str, tuple] | None:
    """(E, out, in) of DeepSeek-V2's fused expert parameters in transformers 5, from config.json."""
    try:
        experts, hidden = int(config["n_routed_experts"]), int(config["hidden_size"])
        inter = int(config["moe_intermediate_size"])
    except (KeyError, TypeError, ValueError):
        return None
    return {GATE_UP: (experts, 2 * inter, hidden), DOWN: (experts, hidden, inter)}


def drop_leaf(modules: list[ModuleLora], leaf: str) -> tuple[list[ModuleLora], list[ModuleLora]]:
    """(kept, dropped): the modules whose leaf name is not / is `leaf`."""
    return [m for m in modules if m.leaf != leaf], [m for m in modules if m.leaf == leaf]


def fill_expert_projections(modules: list[ModuleLora]) -> list[ModuleLora]:
    """Give every expert of a layer with routed-expert LoRA all three projections, missing ones as zero LoRA.

    vLLM packs each expert's gate_proj, up_proj and down_proj LoRA together (vllm/lora/lora_weights.py
    `PackedLoRALayerWeights.pack_moe`) and expects all three; an adapter that adapted only gate_up_proj or only
    down_proj gets zeros there, which add nothing to the weights."""
    import torch

    have = {m.module: m for m in modules if m.expert}
    layers: dict[str, set[str]] = {}
    for name in have:
        expert_prefix, leaf = name.rsplit(".", 1)
        layers.setdefault(expert_prefix.rsplit(".", 1)[0], set()).add(expert_prefix.rsplit(".", 1)[1])
    filled = list(modules)
    for layer, experts in layers.items():
        for e in sorted(experts, key=int):
            present = {leaf: have.get(f"{layer}.{e}.{leaf}") for leaf in EXPERT_LEAVES}
            gate = present["gate_proj"] or present["up_proj"]
            down = present["down_proj"]
            for leaf, m in present.items():
                if m is not None:
                    continue
                ref = gate or down
                r = ref.rank
                if leaf == "down_proj":  # (H, I): H = gate's input, I = gate's output
                    shape_a, shape_b = (r, gate.lora_b.shape[0]), (gate.lora_a.shape[1], r)
                elif gate is not None:
                    shape_a, shape_b = tuple(gate.lora_a.shape), tuple(gate.lora_b.shape)
                else:  # gate/up (I, H) from down (H, I)
                    shape_a, shape_b = (r, down.lora_b.shape[0]), (down.lora_a.shape[1], r)
                zeros = ModuleLora(f"{layer}.{e}.{leaf}", torch.zeros(shape_a, dtype=ref.lora_a.dtype),
                                   torch.zeros(shape_b, dtype=ref.lora_b.dtype), ref.scaling, "zero fill", True)
                filled.append(zeros)
    return filled


def uniform_rank(modules: list[ModuleLora], r: int, alpha: float) -> tuple[list[ModuleLora], int, float, bool]:
    """(modules, r, alpha, changed) with one rank and one scaling for all modules, every delta unchanged.

    The adapter's own r and alpha are kept when every module already uses them (the usual case: `changed` is
    False); otherwise the rank is the largest module rank and the scaling the most common one (so the fewest
    lora_B change)."""
    import torch

    ranks = {m.rank for m in modules}
    scalings = Counter(m.scaling for m in modules)
    if ranks == {r} and set(scalings) == {alpha / r}:
        return modules, r, alpha, False
    out_r = max(ranks)
    out_scaling = scalings.most_common(1)[0][0]
    out_alpha = out_scaling * out_r
    out_alpha = int(out_alpha) if float(out_alpha).is_integer() else out_alpha
    out_scaling = out_alpha / out_r
    result = []
    for m in modules:
        a, b = m.lora_a, m.lora_b
        if m.scaling != out_scaling:
            b = (b.to(torch.float32) * (m.scaling / out_scaling)).to(b.dtype)
        if m.rank < out_r:
            a = torch.cat([a, a.new_zeros(out_r - m.rank, a.shape[1])], dim=0)
            b = torch.cat([b, b.new_zeros(b.shape[0], out_r - m.rank)], dim=1)
        result.append(replace(m, lora_a=a, lora_b=b, scaling=out_scaling))
    return result, out_r, out_alpha, True


def state_dict(modules: list[ModuleLora]) -> dict:
    """The safetensors content: each module's two tensors under PEFT's keys, contiguous and unshared (gate_proj
    and up_proj of an expert start from the same lora_A; safetensors refuses tensors that share memory)."""
    tensors = {}
    for m in sorted(modules, key=lambda m: _natural(m.module)):
        key_a, key_b = m.keys()
        if key_a in tensors:
            raise ModelLoadError(f"{m.module}: two LoRA layers of the adapter write the same module ({m.source})")
        tensors[key_a] = m.lora_a.detach().clone().contiguous()
        tensors[key_b] = m.lora_b.detach().clone().contiguous()
    return tensors


def _natural(name: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in name.split("."))


def target_leaves(modules: list[ModuleLora]) -> list[str]:
    """The adapter_config.json `target_modules`: the leaf names of every adapted module."""
    return sorted({m.leaf for m in modules})


@dataclass(frozen=True)
class Summary:
    """What the export holds, for its card: counts per kind of module."""

    linear: Counter  # leaf name -> modules
    expert_layers: int
    experts: int
    zero_filled: int


def summarize(modules: list[ModuleLora]) -> Summary:
    linear = Counter(m.leaf for m in modules if not m.expert)
    expert_layers = {m.module.rsplit(".", 2)[0] for m in modules if m.expert}
    experts = {m.module.rsplit(".", 1)[0] for m in modules if m.expert}
    return Summary(linear, len(expert_layers), len(experts), sum(m.source == "zero fill" for m in modules))
