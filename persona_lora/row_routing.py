"""Per-row LoRA in one batch (`RowRouting`): each row of a forward pass takes its own adapter or none, so the
demo's base and adapter answers, and training's sample answers, decode together on one resident model.

This is item 4 of `peft_compat` (which finds the modules it hooks and says which PEFT behaviour it relies on):
vanilla linear LoRA computes `lora_B(lora_A(x)) * scaling[adapter]`, so a per-row tensor as `scaling` (the
adapter's scale on adapter rows, 0 on base rows) serves both sides of a batch; PEFT's `adapter_names`
mixed-batch path is the fallback for layers with a LoRA variant. The fused experts get the LoRA-aware forward
(`expert_lora.use_lora_aware_experts`), which reads the rows of the current pass from here.
"""

from __future__ import annotations

import contextlib

from persona_lora.expert_lora import use_lora_aware_experts
from persona_lora.peft_compat import BASE_ROW, row_hook_targets


class RowRouting:
    """Give each row of a batch its own adapter (or none) in one forward pass of a PeftModel.

    `install(peft_model)` after every adapter load or delete; then `with routing.rows(keys, active):` around each
    forward, where `keys` has one entry per batch row (`BASE_ROW` or the active adapter's name)."""

    def __init__(self):
        self._row_keys: list[str] | None = None
        self._active: str | None = None
        self._handles: list = []
        self._lora_linears: list = []
        self._masked: dict[int, tuple] = {}
        self._token_scales: dict[tuple, object] = {}
        self._row_scales: dict[tuple, object] = {}  # per pass: the masks `_mask_scaling` made, by scale and shape

    def install(self, peft_model) -> None:
        """(Re)install the hooks on the LoRA modules present now: linear LoRA layers get a pre-hook that gives
        them the per-row scaling (or PEFT's `adapter_names`); the fused-experts modules get the LoRA-aware forward
        (`use_lora_aware_experts`), which reads the rows of the current pass from here."""
        for handle in self._handles:
            handle.remove()
        self._lora_linears, hooked = row_hook_targets(peft_model)
        self._handles = [m.register_forward_pre_hook(self._inject_rows, with_kwargs=True) for m in hooked]
        use_lora_aware_experts(peft_model, routing=self)

    def uninstall(self, peft_model) -> None:
        """Remove the hooks; the fused experts keep the LoRA-aware forward, without per-row routing."""
        for handle in self._handles:
            handle.remove()
        self._handles, self._lora_linears = [], []
        use_lora_aware_experts(peft_model)

    def keys_for(self, wrapper) -> list[str] | None:
        """The current pass's row keys as a fused-experts wrapper sees them (an adapter it has no LoRA of is the
        base there); None when every row uses the active adapter."""
        if self._row_keys is None:
            return None
        return [k if k in wrapper.lora_A else BASE_ROW for k in self._row_keys]

    def token_scale(self, keys: list[str], x):
        """(tokens,) 1 for tokens of adapter rows, 0 for base rows. Dim 0 of the experts' inputs is rows x seq in
        row-major order (transformers flattens (batch, seq) before calling the experts), so row i owns one
        contiguous slice."""
        import torch

        total = x.shape[0]
        if total % len(keys):
            raise RuntimeError(f"cannot split {total} expert inputs into {len(keys)} rows; use --no-mixed-batch")
        where = (tuple(keys), total, x.dtype, x.device)
        if where not in self._token_scales:
            rows = torch.tensor([0.0 if k == BASE_ROW else 1.0 for k in keys], dtype=x.dtype, device=x.device)
            self._token_scales[where] = rows.repeat_interleave(total // len(keys))
        return self._token_scales[where]

    @contextlib.contextmanager
    def rows(self, keys: list[str], active: str):
        """Route the next forward pass: row i uses `keys[i]` (`BASE_ROW` or `active`, the PeftModel's active
        adapter). A batch with no base row runs on PEFT's plain path."""
        import torch

        self._active = active
        self._row_keys = None if BASE_ROW not in keys else list(keys)
        if self._row_keys is None:
            yield
            return
        masked = []
        by_device = {}
        for m in self._lora_linears:
            if active in m.lora_A and active not in m.lora_variant:
                weight = m.lora_B[active].weight
                where = (weight.dtype, weight.device)
                if where not in by_device:
                    by_device[where] = torch.tensor([0.0 if k == BASE_ROW else 1.0 for k in keys],
                                                    dtype=weight.dtype, device=weight.device)
                self._masked[id(m)] = (active, m.scaling[active], by_device[where])
                masked.append(m)
        try:
            yield
        finally:
            for m in masked:
                key, scale, _ = self._masked[id(m)]
                m.scaling[key] = scale
            self._masked.clear()
            self._token_scales.clear()
            self._row_scales.clear()
            self._row_keys = None

    def _inject_rows(self, module, args, kwargs):
        keys = self._row_keys
        # A layer without the active adapter computes the base for every row on PEFT's plain path.
        if keys is None or self._active not in getattr(module, "lora_A", (self._active,)):
            return args, kwargs
        masked = self._masked.get(id(module))
        if masked is not None and args and _mask_scaling(module, masked, args[0], len(keys), self._row_scales):
            return args, kwargs
        kwargs["adapter_names"] = keys
        return args, kwargs


def _mask_scaling(module, masked, x, n_rows: int, made: dict) -> bool:
    """Give `module.scaling` the per-row mask shaped for this input: (rows, 1, …, 1) for inputs led by the rows
    ((rows, seq, in); MLA's kv_b_proj sees (rows, 1, cached positions, rank)), (rows*seq, 1) for flattened
    (rows*seq, in). False (PEFT's mixed-batch path instead) for other shapes. `made` keeps the masks of this pass:
    the modules of one adapter share a few scales and shapes, so each mask is made once per pass."""
    key, scale, rows = masked
    if x.dim() >= 3 and x.shape[0] == n_rows:
        shape = (-1, *[1] * (x.dim() - 1))
        where = (id(rows), scale, shape)
        if where not in made:
            made[where] = rows.view(shape) * scale
    elif x.dim() == 2 and x.shape[0] % n_rows == 0:
        where = (id(rows), scale, x.shape[0])
        if where not in made:
            made[where] = rows.repeat_interleave(x.shape[0] // n_rows).view(-1, 1) * scale
    else:
        module.scaling[key] = scale
        return False
    module.scaling[key] = made[where]
    return True
