"""The one resident model of the demo: base weights loaded once, every adapter a PEFT adapter on top of them.

Why: showing an adapter beside its base must not cost a second model copy, so adapters are loaded into the one
model (`persona_lora.peft_compat.load_adapter`, which keeps PEFT from re-targeting our MoE adapters) and each
forward pass says which adapter each batch row uses. PEFT's active adapter and the per-row routing
(`persona_lora.peft_compat.RowRouting`) are state of that one model, so this class is used by the engine's one
inference thread only: it sets that state right before each pass. The routing hooks are installed once per
adapter load and read the rows of the current pass, which is cheaper than toggling PEFT's `disable_adapter()`
on every step; installing them also gives LoRA on the fused MoE experts its LoRA-aware forward (no expert weight
rebuilt per token; base rows of a mixed batch get no LoRA term).

`ResidentModel` is the `demo.decode.DecodeTarget` the decode loop runs against.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from pathlib import Path

from persona_lora.errors import ModelLoadError
from persona_lora.peft_compat import BASE_ROW, load_adapter
from persona_lora.row_routing import RowRouting

log = logging.getLogger(__name__)

BASE = BASE_ROW  # the key of a row without adapter


def eos_ids(model, tokenizer) -> frozenset[int]:
    """Every id that ends an answer: the model's generation config and config may each name several (chat
    models often end a turn with a token other than the tokenizer's EOS), plus the tokenizer's own."""
    ids = set()
    gen = getattr(model, "generation_config", None)
    for source in (getattr(gen, "eos_token_id", None), getattr(model.config, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(int(i) for i in source)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)


class ResidentModel:
    """The loaded model (a PeftModel once an adapter is in) and the state a forward pass depends on."""

    def __init__(self, model, tokenizer, base_id: str):
        model.eval()
        self.model = model  # becomes a PeftModel when the first adapter is loaded
        self.base_id = base_id
        self.device = next(model.parameters()).device
        self.eos_ids = eos_ids(model, tokenizer)
        params = inspect.signature(model.forward).parameters
        self.cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self.keeps_logits = "logits_to_keep" in params
        # PEFT's active adapter as last set here. Code that calls `model.set_adapter` itself (on the inference
        # thread) must record it here too, or the next pass may skip switching back.
        self.active: str | None = None
        self._routing = RowRouting()  # per-row adapters in one batch (reinstalled on every adapter load)

    def load(self, path: Path, key: str, name: str) -> None:
        """Load the adapter in `path` as `key` (inference thread only: no forward pass sees it half-loaded).
        One that does not fit this base is removed again, so the model stays as it was."""
        try:
            self.model = load_adapter(self.model, path, key)
        except (RuntimeError, ValueError, KeyError, OSError) as e:  # shapes or names that do not fit this base
            if hasattr(self.model, "peft_config") and key in self.model.peft_config:
                try:  # the first error is the one to report; a failing clean-up must not replace it
                    self.model.delete_adapter(key)
                    self._routing.install(self.model)
                except Exception:  # noqa: BLE001
                    log.debug("removing the half-loaded adapter %s failed", key, exc_info=True)
            self.active = None
            raise ModelLoadError(f"cannot load adapter {name} from {path} onto {self.base_id}: {e}") from e
        self.model.eval()
        self.active = None
        self._routing.install(self.model)

    def new_cache(self):
        """An empty KV cache shaped for this model's layers."""
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    def forward(self, keys: list[str], **inputs):
        """One forward pass with each row's adapter (inference thread only); the last position's logits."""
        inner = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        with self._rows(keys):
            return inner(**inputs).logits[:, -1, :]

    @contextlib.contextmanager
    def _rows(self, keys: list[str]):
        """Set the model's state for a batch whose rows use `keys` (BASE and at most one adapter)."""
        adapters = set(keys) - {BASE}
        if len(adapters) > 1:
            raise ValueError(f"one batch mixes several adapters {sorted(adapters)}; the engine pairs base with one")
        if not hasattr(self.model, "peft_config"):
            if adapters:
                raise ValueError("no adapter is loaded")
            yield
            return
        # the active adapter is the batch's one; for a base-only batch any, as long as PEFT knows it
        key = next(iter(adapters)) if adapters else (self.active or next(iter(self.model.peft_config)))
        if self.active != key:
            self.model.set_adapter(key, inference_mode=True)
            self.active = key
        # a base-only batch is routed too: cheaper than toggling `disable_adapter()`, same bare computation
        with self._routing.rows(keys, key):
            yield
