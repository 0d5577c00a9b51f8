"""`persona-lora export ADAPTER --for vllm|sglang --out DIR`: the adapter as a serving engine loads it.

Why an export step: persona-lora's adapters put LoRA on transformers 5's fused routed experts (PEFT's
`target_parameters`), a layout SGLang does not read and vLLM reads only behind a start flag and a per-adapter
declaration; and vLLM loads LoRA on MLA's `kv_b_proj` without ever applying it. Served as they are, such adapters
fail to load or, worse, answer like a different model under the adapter's name. The export writes the per-module
layout each engine reads, refuses what the engine would silently ignore, and says in its README how to serve it.

`export_adapter` reads only: the adapter folder (through `persona_lora.artifact`), and the base's config.json — the
architecture is built on the meta device to learn how PEFT injects the adapter (`merge.deltas.discover_layers`), so
a hub base costs one small download. Before writing it checks the disk has room for the tensors; it writes into
a hidden staging sibling (`persona_lora.output_folder`) renamed at the end, so the output folder only ever holds a
complete export, and nothing is left behind when it fails.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from persona_lora import engines
from persona_lora.artifact import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    CARD_NAME,
    MANIFEST_NAME,
    Manifest,
    read_adapter_config,
    read_manifest,
    require_adapter_files,
)
from persona_lora.consistency import check_folder
from persona_lora.errors import ModelLoadError, UsageError
from persona_lora.hub_tools.export.card import CardFacts, render
from persona_lora.hub_tools.export.layout import (
    drop_leaf,
    expert_shapes_from_config,
    fill_expert_projections,
    per_module,
    state_dict,
    summarize,
    target_leaves,
    uniform_rank,
)
from persona_lora.output_folder import OutputFolder, Target, check_free_space, check_target

log = logging.getLogger(__name__)

CHAT_TEMPLATE = "chat_template.jinja"


@dataclass(frozen=True)
class ExportBase:
    """The base as far as an export needs it: a folder with its config.json, and how the serve command names it."""

    config_dir: Path
    serve_name: str  # hub id, or the absolute path of a local base folder


def export_adapter(
    adapter_dir: str | Path,
    *,
    engine: str,
    out_dir: str | Path,
    base: str | Path | None = None,
    allow_dropped_kv_b: bool = False,
    hub: str = "hf",
) -> Path:
    """Write the adapter in `adapter_dir` as `engine` ("vllm" | "sglang") loads it into the new folder `out_dir`.

    base: the base model (folder or hub id) whose config.json describes the architecture; default the manifest's
    `base_model.id` (a local folder of that name if there is one, else that hub id on `hub`).
    allow_dropped_kv_b: (vLLM) export an adapter with LoRA on kv_b_proj anyway, without those tensors, and say
    so in the export's README; refused by default because vLLM would silently not apply them.
    Returns the output folder. Raises `persona_lora.errors` exceptions naming the cause and the fix."""
    import torch
    from safetensors.torch import load_file

    from persona_lora.hub_tools.merge.deltas import check_adapter_keys, discover_layers
    from persona_lora.peft_compat import is_legacy_spelling

    eng = engines.engine(engine)
    adapter = require_adapter_files(Path(adapter_dir).expanduser().resolve())
    manifest = _adapter_manifest(adapter)
    check_folder(adapter)
    config = read_adapter_config(adapter) or {}
    target = _check_out_dir(Path(out_dir).expanduser().resolve(), adapter)
    out = target.path
    rb = resolve_export_base(base, manifest, hub=hub)

    _warn_other_config(rb, manifest)
    layers = discover_layers(rb.config_dir, adapter)
    weights = adapter / ADAPTER_WEIGHTS
    tensors = load_file(str(weights))
    check_adapter_keys(layers, tensors, weights)
    base_config = json.loads((rb.config_dir / "config.json").read_text(encoding="utf-8"))
    with torch.no_grad():
        modules = per_module(layers, tensors, expert_shapes_from_config(base_config))
        dropped = []
        if eng.key == "vllm":
            modules, dropped = drop_leaf(modules, engines.KV_B)
            if dropped and not allow_dropped_kv_b:
                raise engines.kv_b_refusal(str(adapter), len(dropped))
            modules = fill_expert_projections(modules)
        if not modules:
            raise UsageError(f"{adapter}: nothing is left to export once kv_b_proj is dropped; serve the merged "
                             "model (`persona-lora merge`) or export for SGLang (`--for sglang`)")
        source_r, source_alpha = int(config.get("r", 8)), config.get("lora_alpha", 8)  # PEFT's defaults
        modules, r, alpha, folded = uniform_rank(modules, source_r, source_alpha)
        max_rank = engines.vllm_max_lora_rank(r) if eng.key == "vllm" else r
        tensors_out = state_dict(modules)
    check_free_space(out, sum(t.numel() * t.element_size() for t in tensors_out.values()), option="--out",
                     what="the export")

    chat = manifest.chat
    template = chat.chat_template if chat and chat.template_source == "file" and chat.chat_template else None
    facts = CardFacts(
        engine=eng, adapter_name=manifest.name, lora_name=engines.lora_name(manifest.name), base=rb.serve_name,
        base_id=manifest.base_model.id, out=str(out), r=r, alpha=alpha, source_r=source_r,
        source_alpha=source_alpha, folded=folded, max_rank=max_rank, summary=summarize(modules),
        dropped_kv_b=len(dropped),
        spelling="legacy" if is_legacy_spelling(config, manifest.base_model.model_type) else "portable",
        system_prompt=chat.system_prompt if chat else None,
        chat_template=str(out / CHAT_TEMPLATE) if template else None,
    )
    export_config = engines.adapter_config(manifest.base_model.id, r, alpha, target_leaves(modules))
    _write(target, adapter, tensors_out, export_config, render(facts), template)
    if dropped:
        log.warning("exported without kv_b_proj LoRA in %d layer(s) (%s); see %s", len(dropped), engines.KV_B_ISSUE,
                    out / CARD_NAME)
    log.info("exported %s for %s %s into %s (%d LoRA modules)", manifest.name, eng.label, eng.version, out,
             len(modules))
    return out


def _adapter_manifest(adapter: Path) -> Manifest:
    manifest = read_manifest(adapter)
    if manifest.kind != "adapter":
        raise UsageError(f"{adapter / MANIFEST_NAME} says kind {manifest.kind!r}; export takes an adapter folder "
                         "(a merged model is served as it is: `vllm serve DIR`)")
    return manifest


def _warn_other_config(rb: ExportBase, manifest: Manifest) -> None:
    """A base config other than the training one is not refused (the tensors' shapes are checked against it, and
    the engine serves whatever base it is given), but it is worth a line: merge refuses it without --force."""
    from persona_lora.hashing import sha256_file

    want = manifest.base_model.config_sha256
    if want and sha256_file(rb.config_dir / "config.json") != want:
        log.warning("%s's config.json is not the one %s was trained on (%s); serve the export on the training base",
                    rb.serve_name, manifest.name, manifest.base_model.id)


def resolve_export_base(base: str | Path | None, manifest: Manifest, *, hub: str = "hf") -> ExportBase:
    """A folder holding the base's config.json: the local folder `base` (or the manifest's base id) names, else
    that hub id's config.json alone, downloaded into the hub client's cache."""
    from persona_lora.hub_ids import is_repo_id
    from persona_lora.hubs.backends import backend

    spec = str(base) if base is not None else manifest.base_model.id
    local = Path(spec).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelLoadError(f"base {spec} is not a model folder: it has no config.json")
        return ExportBase(local.resolve(), str(local.resolve()))
    if base is None and manifest.base_model.source == "local":
        raise UsageError(f"the adapter was trained on a local base folder named {spec!r}, which is not here; pass "
                         "--base PATH (that folder) or --base HUB_ID (the model it was built from)")
    if not is_repo_id(spec) or spec.startswith((".", "~", "/")):
        raise ModelLoadError(f"base {spec}: no such folder, and it is not a hub id (owner/name); pass --base PATH "
                             "(the base's folder) or --base HUB_ID")
    revision = manifest.base_model.revision if base is None else None
    be = backend(hub)
    token = be.token(None)
    hint = f" (there is no local folder {spec}; pass --base PATH if the base is on this machine)"
    with be.errors("download the config of base", spec, revision=revision, token=token, error_type=ModelLoadError,
                   hint=hint):
        folder = be.snapshot(spec, revision=revision, commit=None, allow_patterns=["config.json"], token=token)
    if not (Path(folder) / "config.json").is_file():
        raise ModelLoadError(f"base {spec} has no config.json on {be.label}; is it a model repo?")
    return ExportBase(Path(folder), spec)


def _check_out_dir(out: Path, adapter: Path) -> Target:
    """`out` when it may be written: new, or an empty folder; never the adapter or a folder inside it."""
    if out == adapter or out.is_relative_to(adapter) or adapter.is_relative_to(out):
        raise UsageError(f"--out {out} overlaps the adapter folder {adapter}; choose a folder outside it")
    return check_target(out, option="--out", occupied_hint="export writes only into a new or empty folder: choose "
                        "another --out, or remove that folder first")


def _write(out: Target, adapter: Path, tensors: dict, config: dict, card: str, template: str | None) -> None:
    """Weights, config, card, the manifest copy (and the chat template training used, when it was not the base's)
    into a staging sibling that takes `out`'s name once all are written."""
    with OutputFolder(out) as tmp:
        _save_tensors(tensors, tmp / ADAPTER_WEIGHTS)
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        (tmp / CARD_NAME).write_text(card, encoding="utf-8")
        shutil.copyfile(adapter / MANIFEST_NAME, tmp / MANIFEST_NAME)
        if template:
            (tmp / CHAT_TEMPLATE).write_text(template, encoding="utf-8")


def _save_tensors(tensors: dict, path: Path) -> None:
    """safetensors' `save_file`, with a full disk reported as the OSError it is (safetensors wraps it in its own
    error type), so the staging folder turns it into one message about `--out`."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata={"format": "pt"})
    except SafetensorError as e:
        if "StorageFull" in str(e) or "No space left" in str(e):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from None
        raise
