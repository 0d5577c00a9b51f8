"""`backend(hub)`: the one way push, pull, base-model loading and the votes push reach a hub.

Each client's quirks (endpoint and token variables, default branch, exception types, commit semantics) live in
one module per client (`hf_backend.py`, `ms_backend.py`), which implement `interface.HubBackend`; each client's
exceptions are translated there into one sentence that names the repo and the fix.
"""

from __future__ import annotations

from persona_lora.errors import UsageError
from persona_lora.hub_ids import HUBS
from persona_lora.hubs.interface import HubBackend


def backend(hub: str) -> HubBackend:
    """The backend of `hub` ("hf" or "modelscope")."""
    if hub == "hf":
        from persona_lora.hubs.hf_backend import HuggingFace

        return HuggingFace()
    if hub == "modelscope":
        from persona_lora.hubs.ms_backend import ModelScope

        return ModelScope()
    raise UsageError(f"--hub must be one of {', '.join(HUBS)}; got {hub!r}")
