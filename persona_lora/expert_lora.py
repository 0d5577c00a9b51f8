"""LoRA on fused MoE experts without rebuilding the expert weights: part of `persona_lora.peft_compat`.

This module is item 7 of `peft_compat` (the one home of PEFT internals), in a file of its own only so that neither
passes 500 lines; audit the two together when the PEFT or transformers pin moves. It imports nothing from PEFT's
private modules: `peft_compat.use_lora_aware_experts` finds the `ParamWrapper`s and installs `ExpertsForward`,
which reads their state (parameter, active adapters, `lora_A`/`lora_B` layout, scaling) into `LowRank` factors
and runs `lora_experts_forward`, or hands the call back to PEFT for anything it does not handle.

Why: PEFT's `ParamWrapper` adds `s·B_e·A_e` to every expert's weight, for all E experts, on every forward, and
backpropagates through that full-size sum. On DeepSeek-Coder-V2-Lite that is a full copy of the routed experts
written and read per step, whatever the batch. Here the tokens routed to expert e get

    y = x·W_eᵀ + s·(x·A_eᵀ)·B_eᵀ

so the LoRA cost is two rank-r products per routed token and `W_e + s·B_e·A_e` is never formed. The dispatch
follows transformers' `experts_implementation` of the same experts module (`grouped_mm`: tokens sorted by
expert, one grouped GEMM per projection; `batched_mm`: per-pair weights gathered, one bmm; `eager`: a loop over
the experts that received tokens), so the base part computes what transformers computes and only experts that
receive tokens do work. A per-token LoRA factor (0 for the demo's base rows in a mixed batch) lets one pass
serve rows with and without the adapter.

One departure from transformers' order of operations, exact in real arithmetic: the routing weight of each
(token, expert) pair scales the down projection's input (intermediate width) rather than its output (hidden
width). The projection is linear and bias-free (experts with a bias or a post-expert norm go to PEFT's path), so
the product is the same, and the elementwise work and saved activation of that step, forward and backward, shrink
by intermediate/hidden (1408/2048 on the real model, 128/256 on the tiny base).
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from persona_lora.peft_compat import BASE_ROW, EXPERT_LORA_ENV, is_param_wrapper, log_once, outermost_param_wrappers

STRATEGIES = ("grouped_mm", "batched_mm", "eager")
_EXPERT_PARAMS = ("gate_up_proj", "down_proj")


@dataclass(frozen=True)
class LowRank:
    """One adapter's LoRA on one fused projection, per expert: `a` (E, r, in), `b` (E, out, r), `scale`."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float


def lora_experts_forward(experts, hidden_states, top_k_index, top_k_weights, lora: dict[str, list[LowRank]],
                         strategy: str = "grouped_mm", token_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The experts module's output with LoRA: `lora` maps "gate_up_proj" / "down_proj" to the adapters' factors
    (an absent or empty entry: that projection has no LoRA). `token_scale` (tokens,) multiplies every LoRA term of
    a token; None means 1 everywhere."""
    forward = {"grouped_mm": _grouped, "batched_mm": _batched, "eager": _eager}[strategy]
    return forward(experts, hidden_states, top_k_index, top_k_weights, lora, token_scale)


# ------------------------------------------------------------------------------------------------ which path


def _chain(outer):
    """The ParamWrappers nested around one experts module, outermost first, and the experts module."""
    wrappers, module = [], outer
    while is_param_wrapper(module):
        wrappers.append(module)
        module = module.base_layer
    return wrappers, module


def _strategy(wrappers, experts) -> tuple[str | None, str]:
    """(dispatch strategy, "") for experts we mirror, else (None, why not). With no wrappers: the rules for the
    bare experts (`use_fast_bare_experts`), the same ones less those about the adapter."""
    if os.environ.get(EXPERT_LORA_ENV, "").strip().lower() == "peft":
        return None, f"{EXPERT_LORA_ENV}=peft"
    names = [w.parameter_name for w in wrappers]
    if len(set(names)) != len(names) or set(names) - set(_EXPERT_PARAMS):
        return None, f"LoRA on {names}"
    missing = [a for a in (*_EXPERT_PARAMS, "_apply_gate", "num_experts") if not hasattr(experts, a)]
    if missing:
        return None, f"{type(experts).__name__} has no {missing}"
    flags = {"bias": getattr(experts, "has_bias", False),
             "transposed weights": getattr(experts, "is_transposed", False),
             "a post-expert norm": getattr(experts, "has_post_expert_norm", False),
             "expert parallelism": getattr(experts, "_is_expert_parallel", False),
             "no gate": not getattr(experts, "has_gate", True)}
    odd = [k for k, v in flags.items() if v]
    if odd:
        return None, f"experts with {', '.join(odd)}"
    if any(int(w.num_experts) != int(experts.num_experts) or not w._did_swap_in_out_features for w in wrappers):
        return None, "an expert layout other than (E, out, in)"
    impl = _implementation(experts)
    if impl not in STRATEGIES:
        return None, f"experts_implementation {impl!r}"
    return impl, ""


def _implementation(experts) -> str:
    return getattr(getattr(experts, "config", None), "_experts_implementation", None) or "eager"


def _unsupported(wrapper, name: str) -> str:
    if not isinstance(wrapper.lora_dropout[name], nn.Identity):
        return "dropout"
    if name in wrapper.lora_variant:
        return "a LoRA variant"
    if wrapper.lora_bias.get(name):
        return "lora_bias"
    if not isinstance(wrapper.scaling[name], (int, float)):
        return "a tensor scaling"
    return ""


class ExpertsForward:
    """The forward of one experts module's outermost `ParamWrapper` (set as its instance attribute `forward`).

    LoRA-aware (`lora_experts_forward`) when the experts are of a kind we mirror and every active adapter is
    plain LoRA; PEFT's `ParamWrapper.forward` otherwise (disabled or merged adapters go there too: PEFT then
    computes the bare experts). Under `routing`, base rows of a mixed batch get a LoRA factor of 0; on PEFT's
    path the rows are split and base rows go through the bare experts module, as PEFT refuses mixed batches."""

    def __init__(self, outer, routing=None):
        self.outer = outer
        self.wrappers, self.experts = _chain(outer)
        self.strategy, self.why = _strategy(self.wrappers, self.experts)
        self.routing = routing

    def __call__(self, x, top_k_index, top_k_weights, *args, **kwargs):
        keys = self.routing.keys_for(self.outer) if self.routing is not None else None
        if keys is not None and all(k == BASE_ROW for k in keys):
            if self.strategy and not args and not kwargs:
                return lora_experts_forward(self.experts, x, top_k_index, top_k_weights, {}, self.strategy)
            return self.experts(x, top_k_index, top_k_weights, *args, **kwargs)
        lora = self._lora() if self.strategy and not args and not kwargs else None
        if lora is None:
            if keys is None:
                return type(self.outer).forward(self.outer, x, top_k_index, top_k_weights, *args, **kwargs)
            return self._split_rows(keys, x, top_k_index, top_k_weights, *args, **kwargs)
        if not lora:  # no active adapter has LoRA here
            return lora_experts_forward(self.experts, x, top_k_index, top_k_weights, {}, self.strategy)
        scale = None if keys is None else self.routing.token_scale(keys, x)
        return lora_experts_forward(self.experts, x, top_k_index, top_k_weights, lora, self.strategy, scale)

    def _lora(self):
        """{parameter: [LowRank per active adapter]}, or None when PEFT's path must run."""
        out = {}
        for w in self.wrappers:
            if w.disable_adapters or w.merged:
                return None
            deltas = []
            for name in w.active_adapters:
                if name not in w.lora_A:
                    continue
                why = _unsupported(w, name)
                if why:
                    log_once(logging.INFO, f"adapter {name!r} has {why} on the routed experts: they run on PEFT's "
                                            "ParamWrapper")
                    return None
                a, b, n = w.lora_A[name].weight, w.lora_B[name].weight, int(w.num_experts)
                deltas.append(LowRank(a.view(n, -1, a.shape[-1]), b.view(b.shape[0], -1, n).permute(2, 0, 1),
                                      float(w.scaling[name])))
            if deltas:
                out[w.parameter_name] = deltas
        return out

    def _split_rows(self, keys, x, *args, **kwargs):
        """PEFT's path for a mixed batch: row i owns one contiguous slice of the flattened (rows*seq) inputs; base
        rows go through the bare experts, adapter rows through the wrapper with the active adapter."""
        total = x.shape[0]
        if total % len(keys):
            raise RuntimeError(f"cannot split {total} expert inputs into {len(keys)} rows; use --no-mixed-batch")
        per = total // len(keys)

        def cut(t, part):  # every per-token input (hidden states, routing indices and weights)
            return t[part] if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == total else t

        out = []
        for i, key in enumerate(keys):
            part = slice(i * per, (i + 1) * per)
            fn = self.experts if key == BASE_ROW else functools.partial(type(self.outer).forward, self.outer)
            out.append(fn(x[part], *[cut(a, part) for a in args], **{k: cut(v, part) for k, v in kwargs.items()}))
        return torch.cat(out, dim=0)


# ------------------------------------------------------------------------------------------------ grouped_mm


def _grouped(experts, x, top_k_index, top_k_weights, lora, token_scale):
    """transformers' `grouped_mm_experts_forward`, plus the LoRA terms as grouped GEMMs of rank r."""
    from transformers.integrations.moe import _grouped_mm

    num_tokens, top_k = top_k_index.shape
    expert_ids, perm = torch.sort(top_k_index.reshape(-1))
    token_of_pair = perm // top_k
    # Gathers as `index_select` of a permutation: their backward is a plain scatter of distinct rows, where advanced
    # indexing (`x[idx]`) backpropagates through an accumulating index_put that sorts the indices (slow on CPU).
    # The token copies per pair are made by repeat_interleave, whose backward is a deterministic sum.
    xg = x.repeat_interleave(top_k, dim=0).index_select(0, perm)
    weights_g = top_k_weights.reshape(-1).index_select(0, perm)
    counts = torch.histc(expert_ids.float() if x.device.type in ("cpu", "mps") else expert_ids.int(),
                         bins=experts.num_experts, min=0, max=experts.num_experts - 1)
    offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
    pair_scale = None if token_scale is None else token_scale[token_of_pair].unsqueeze(-1)
    # Decoding routes fewer pairs than there are experts: gathering each pair's rank-r factors is then cheaper
    # than grouped GEMMs that visit every expert (transformers' CPU kernel loops over all of them).
    few = expert_ids.numel() < experts.num_experts

    def project(inp, weight, deltas):
        if len(deltas) == 1 and not few:  # training and prefill: one adapter, one autograd node
            a, b = _aligned(deltas[0], weight)
            return _GroupedLora.apply(inp, weight, a, b, offsets, deltas[0].scale, pair_scale)
        out = _grouped_mm(inp, weight.transpose(-2, -1), offsets)
        for d in deltas:
            if few:
                out = out + _gathered(inp, d, expert_ids, weight.dtype, pair_scale)
                continue
            a, b = _aligned(d, weight)
            low = _grouped_mm(inp, a.transpose(-2, -1), offsets) * _factor(d.scale, pair_scale)
            out = out + _grouped_mm(low, b.transpose(-2, -1), offsets)
        return out

    h = experts._apply_gate(project(xg, experts.gate_up_proj, lora.get("gate_up_proj") or ()))
    out = project(h * weights_g.unsqueeze(-1), experts.down_proj, lora.get("down_proj") or ())
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.size(0), device=perm.device)
    return out.index_select(0, inverse).view(num_tokens, top_k, -1).sum(dim=1).to(x.dtype)


def _gathered(inp, d: LowRank, expert_ids, dtype, pair_scale):
    """The LoRA term of each (token, expert) pair from that expert's gathered factors: two rank-r bmm's."""
    low = torch.bmm(d.a[expert_ids].to(dtype), inp.unsqueeze(-1)).squeeze(-1) * _factor(d.scale, pair_scale)
    return torch.bmm(d.b[expert_ids].to(dtype), low.unsqueeze(-1)).squeeze(-1)


def _factor(scale: float, pair_scale):
    return scale if pair_scale is None else pair_scale * scale


def _aligned(d: LowRank, weight):
    """The factors in the weight's dtype; on CUDA with the rank padded by zero rows so every grouped-GEMM operand
    has 16-byte aligned strides (the kernel's requirement; the zeros add nothing)."""
    a, b = d.a.to(weight.dtype), d.b.to(weight.dtype)
    if weight.device.type == "cuda":
        pad = -a.shape[1] % max(1, 16 // weight.element_size())
        if pad:
            a, b = F.pad(a, (0, 0, 0, pad)), F.pad(b, (0, pad))
    return a, b.contiguous()


class _GroupedLora(torch.autograd.Function):
    """`inp·W_eᵀ + s·(inp·A_eᵀ)·B_eᵀ` per expert group of rows, with a backward that gives the LoRA factors and the
    input their gradients without autograd's extra full-size temporaries (the LoRA output is added in place, the
    input gradient accumulated in place). inp (S, in) sorted by expert, W (E, out, in), A (E, r, in), B (E, out, r),
    `offsets` the groups' cumulative ends, `pair_scale` None or (S, 1)."""

    @staticmethod
    def forward(ctx, inp, weight, a, b, offsets, scale, pair_scale):
        from transformers.integrations.moe import _grouped_mm

        low = _grouped_mm(inp, a.transpose(-2, -1), offsets) * _factor(scale, pair_scale)
        out = _grouped_mm(inp, weight.transpose(-2, -1), offsets)
        out.add_(_grouped_mm(low, b.transpose(-2, -1), offsets))
        ctx.save_for_backward(inp, weight, a, b, offsets, low, pair_scale)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad):
        from transformers.integrations.moe import _grouped_mm

        inp, weight, a, b, offsets, low, pair_scale = ctx.saved_tensors
        grad = grad.contiguous()
        grad_low = _grouped_mm(grad, b, offsets) * _factor(ctx.scale, pair_scale)  # (S, r)
        grad_inp = grad_weight = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_inp = _grouped_mm(grad, weight, offsets)
            grad_inp.add_(_grouped_mm(grad_low, a, offsets))
        if ctx.needs_input_grad[1]:
            grad_weight = _per_group_outer(grad, inp, offsets)
        if ctx.needs_input_grad[2]:
            grad_a = _per_group_outer(grad_low, inp, offsets)
        if ctx.needs_input_grad[3]:
            grad_b = _per_group_outer(grad, low, offsets)
        return grad_inp, grad_weight, grad_a, grad_b, None, None, None


def _per_group_outer(left, right, offsets):
    """(E, m, n): leftᵀ·right over each group's rows (the weight gradient of a grouped GEMM)."""
    from transformers.integrations.moe import _can_use_grouped_mm

    left_t = left.t()
    if _can_use_grouped_mm(left_t, right, offsets):
        return F.grouped_mm(left_t, right, offs=offsets)
    out = left.new_zeros(offsets.numel(), left.shape[1], right.shape[1])
    start = 0
    for e, end in enumerate(offsets.tolist()):
        if end > start:
            torch.mm(left_t[:, start:end], right[start:end], out=out[e])
        start = end
    return out


# ------------------------------------------------------------------------------------------------ batched_mm


def _batched(experts, x, top_k_index, top_k_weights, lora, token_scale):
    """transformers' `batched_mm_experts_forward`, plus the LoRA terms as rank-r bmm's of the gathered factors."""
    num_tokens, top_k = top_k_index.shape
    xs = x.repeat_interleave(top_k, dim=0)
    expert_ids = top_k_index.reshape(-1)
    pair_scale = None if token_scale is None else token_scale.repeat_interleave(top_k).unsqueeze(-1)

    def project(inp, weight, deltas):
        out = torch.bmm(weight[expert_ids], inp.unsqueeze(-1)).squeeze(-1)
        for d in deltas:
            out = out + _gathered(inp, d, expert_ids, weight.dtype, pair_scale)
        return out

    h = experts._apply_gate(project(xs, experts.gate_up_proj, lora.get("gate_up_proj") or ()))
    out = project(h * top_k_weights.reshape(-1, 1), experts.down_proj, lora.get("down_proj") or ())
    return out.view(num_tokens, top_k, -1).sum(dim=1).to(x.dtype)


# ------------------------------------------------------------------------------------------------ eager


def _eager(experts, x, top_k_index, top_k_weights, lora, token_scale):
    """transformers' eager loop over the experts that received tokens, plus the LoRA terms per expert."""
    final = torch.zeros_like(x)
    with torch.no_grad():
        mask = F.one_hot(top_k_index, num_classes=experts.num_experts + 1).permute(2, 1, 0)
        hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()

    def project(inp, weight, deltas, e, tokens):
        out = F.linear(inp, weight[e])
        for d in deltas:
            low = F.linear(inp, d.a[e].to(weight.dtype))
            low = low * _factor(d.scale, None if token_scale is None else token_scale[tokens].unsqueeze(-1))
            out = out + F.linear(low, d.b[e].to(weight.dtype))
        return out

    for e in hit[:, 0].tolist():
        if e == experts.num_experts:
            continue
        pos, tokens = torch.where(mask[e])
        gate_up = project(x[tokens], experts.gate_up_proj, lora.get("gate_up_proj") or (), e, tokens)
        h = experts._apply_gate(gate_up) * top_k_weights[tokens, pos, None]
        out = project(h, experts.down_proj, lora.get("down_proj") or (), e, tokens)
        final.index_add_(0, tokens, out.to(final.dtype))
    return final


def use_lora_aware_experts(peft_model, routing=None) -> str:
    """Give the outermost `ParamWrapper` of every LoRA-adapted experts module the LoRA-aware forward
    (`ExpertsForward`), which falls back to PEFT's own where we do not mirror the experts or the adapter; with
    `routing`, each batch row takes its own adapter. Call again after adapters are added or removed (the demo does,
    through `row_routing.RowRouting.install`). Returns the choice, also logged once: "LoRA-aware (strategy)" or
    "PEFT's ParamWrapper (reason)"; "" when the model has no LoRA on fused experts."""
    choices = set()
    for wrapper in outermost_param_wrappers(peft_model):
        forward = ExpertsForward(wrapper, routing)
        wrapper.forward = forward
        choices.add(f"LoRA-aware ({forward.strategy})" if forward.strategy else f"PEFT's ParamWrapper ({forward.why})")
    choice = "; ".join(sorted(choices))
    if choice:
        log_once(logging.INFO, f"LoRA on the routed experts runs {choice}")
    use_fast_bare_experts(peft_model)
    return choice


class BareExpertsForward:
    """The forward of an experts module that carries no LoRA (set as its instance attribute `forward`): the
    routine above with no LoRA terms, which computes what transformers' experts forward computes with cheaper
    gathers (permutation `index_select` instead of advanced indexing, whose backward sorts) and the routing weights
    applied at intermediate width. The dispatch strategy follows the model's `experts_implementation` at each call;
    one we do not mirror (set after installation) runs transformers' own forward."""

    def __init__(self, experts):
        self.experts = experts

    def __call__(self, x, top_k_index, top_k_weights, *args, **kwargs):
        impl = _implementation(self.experts)
        if args or kwargs or impl not in STRATEGIES:
            return type(self.experts).forward(self.experts, x, top_k_index, top_k_weights, *args, **kwargs)
        return lora_experts_forward(self.experts, x, top_k_index, top_k_weights, {}, impl)


def use_fast_bare_experts(model) -> str:
    """Give every experts module that has no LoRA on it (the default preset, eval of attention-only adapters, the
    frozen base in inference) `BareExpertsForward`, by the rules of the LoRA path: experts of a kind we mirror and
    no `PERSONA_LORA_EXPERT_LORA=peft` opt-out. Experts wrapped by a `ParamWrapper` are left to
    `use_lora_aware_experts` (and PEFT's path, when it runs, then reaches the bare forward installed here through
    its base layer, with its parametrized weights). Returns the choice, also logged once: "ours (strategy)",
    "transformers' (reason)", or "" when the model has no such experts."""
    choices = set()
    for module in model.modules():
        if is_param_wrapper(module):
            continue
        for child in module.children():
            if is_param_wrapper(child) or not all(hasattr(child, a) for a in (*_EXPERT_PARAMS, "num_experts")):
                continue
            if isinstance(child.__dict__.get("forward"), BareExpertsForward):
                choices.add(f"ours ({_implementation(child)})")
                continue
            strategy, why = _strategy([], child)
            if strategy:
                child.forward = BareExpertsForward(child)
                choices.add(f"ours ({strategy})")
            else:
                choices.add(f"transformers' ({why})")
    choice = "; ".join(sorted(choices))
    if choice:
        log_once(logging.INFO, f"the routed experts without LoRA run {choice}")
    return choice
