"""`persona-lora upgrade-adapter DIR`: rewrite an adapter written in the legacy spelling into the portable one.

Adapters that persona-lora wrote before its configs were portable name the dense-MLP and shared-expert layers of
a MoE model in `target_modules`; stock PEFT re-targets those names onto the fused routed experts and so loads the
adapter onto the wrong weights (or fails on the shapes). The portable spelling names the same layers as
parameters; the tensors do not change, so the upgraded adapter gives identical outputs everywhere. Only
`adapter_config.json` is rewritten (the old one is kept beside it), and the card is regenerated.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from persona_lora.artifact import (
    ADAPTER_CONFIG,
    MANIFEST_NAME,
    adapter_model_type,
    read_adapter_config,
    read_manifest,
    require_adapter_files,
    write_adapter_config,
)
from persona_lora.errors import ModelLoadError
from persona_lora.peft_compat import is_legacy_spelling, portable_config

log = logging.getLogger(__name__)

LEGACY_BACKUP = "adapter_config.legacy.json"


def upgrade_adapter(folder: str | Path, *, base: str | None = None, base_source: str = "auto") -> bool:
    """Rewrite `folder`'s adapter_config.json in the portable spelling; False when it already is portable.

    The modules the adapter adapts are read off the base's architecture (its config.json only: `base`, or the
    base the manifest records), so the rewrite names exactly the layers the adapter was trained on."""
    from persona_lora.consistency import check_folder
    from persona_lora.hub_tools.merge.deltas import discover_layers
    from persona_lora.model_loading import resolve_base_config

    folder = require_adapter_files(Path(folder).expanduser())
    check_folder(folder)  # a truncated or inconsistent adapter is refused, not called portable (or rewritten)
    config = read_adapter_config(folder)
    model_type = adapter_model_type(folder)
    if model_type is not None and not is_legacy_spelling(config, model_type):
        log.info("%s is already in the portable spelling", folder)
        return False
    if base is None:
        if not (folder / MANIFEST_NAME).is_file():
            raise ModelLoadError(f"{folder} has no {MANIFEST_NAME} recording its base; pass --base BASE (the base "
                                 "model folder or hub id it was trained on)")
        recorded = read_manifest(folder).base_model
        base = recorded.id
        if recorded.source == "local" and not Path(base).expanduser().is_dir():
            raise ModelLoadError(f"{folder} was trained on a local base recorded as {base!r}, which is not a folder "
                                 f"here; pass --base with the path of that base folder (e.g. --base runs/{base})")
    rb = resolve_base_config(base, source=base_source)
    model_type = model_type or adapter_model_type(folder, rb.path)
    if not is_legacy_spelling(config, model_type):
        return False
    names = [layer.module for layer in discover_layers(rb.path, folder) if layer.kind == "linear"]
    backup = folder / LEGACY_BACKUP
    if not backup.exists():
        shutil.copyfile(folder / ADAPTER_CONFIG, backup)
    write_adapter_config(folder, portable_config(config, names, model_type))
    if (folder / MANIFEST_NAME).is_file():
        from persona_lora.model_cards.cards import write_card

        write_card(folder)
    log.info("%s rewritten in the portable spelling (the old config is kept as %s)", folder, LEGACY_BACKUP)
    return True
