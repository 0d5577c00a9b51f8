"""The one consistency check of an adapter (or merged-model) folder, used by every command that reads one.

Push, pull, merge, card, export and the demo must give the same verdict on the same folder: a truncated weights
file, an `adapter_config.json` whose rank disagrees with its tensors, or a manifest that describes another
adapter is refused by all of them, with every problem listed at once, before anything is uploaded, merged,
rendered or loaded. Nothing here loads weights: safetensors headers are read directly.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from persona_lora.artifact import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    MANIFEST_NAME,
    Manifest,
    read_adapter_config,
    read_manifest,
)
from persona_lora.errors import ManifestError, ModelLoadError, VerificationError
from persona_lora.safetensors_io import INDEX_NAME, read_safetensors_header

log = logging.getLogger(__name__)

# PEFT's saved keys: base_model.model.<module>.lora_A.weight (no adapter name), lora_embedding_A for embeddings
LORA_KEY = re.compile(
    r"^(?:base_model\.model\.)?(.*?)\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.[\w-]+)?(?:\.weight)?$")
MAX_LISTED = 8


@dataclass
class CheckedFolder:
    """A folder that passed the check: its kind, manifest (None for a folder we did not write) and contents."""

    path: Path
    kind: str  # adapter | model
    manifest: Manifest | None
    adapter_config: dict | None = None
    tensors: dict[str, list[int]] = field(default_factory=dict)  # adapter tensor shapes


def check_folder(folder: str | Path, *, allow_pickle: bool = False) -> CheckedFolder:
    """Check `folder` and return what it holds; `VerificationError` listing every problem otherwise."""
    folder = Path(folder)
    if not folder.is_dir():
        raise VerificationError(f"{folder}: no such folder")
    problems: list[str] = []
    manifest = None
    if (folder / MANIFEST_NAME).is_file():
        try:
            manifest = read_manifest(folder)
        except ManifestError as e:
            problems.append(str(e))
    if (folder / ADAPTER_CONFIG).is_file():
        checked = _check_adapter(folder, manifest, problems, allow_pickle)
    elif (folder / "config.json").is_file():
        checked = _check_model(folder, manifest, problems, allow_pickle)
    else:
        raise VerificationError(f"{folder} holds neither an adapter ({ADAPTER_CONFIG}) nor a model (config.json)")
    if problems:
        shown = problems[:MAX_LISTED] + ([f"… and {len(problems) - MAX_LISTED} more"]
                                         if len(problems) > MAX_LISTED else [])
        raise VerificationError(f"{folder} is not a consistent {checked.kind} folder:"
                                + "".join(f"\n  - {p}" for p in shown)
                                + "\nRestore the folder from its run (or pull it again), or train again.")
    return checked


def _check_adapter(folder: Path, manifest: Manifest | None, problems: list[str], allow_pickle: bool):
    checked = CheckedFolder(folder, "adapter", manifest)
    try:
        config = read_adapter_config(folder)
    except ModelLoadError as e:
        problems.append(str(e))
        config = None
    if config is not None:
        checked.adapter_config = config
        if config.get("peft_type") != "LORA":
            problems.append(f"{ADAPTER_CONFIG}: peft_type is {config.get('peft_type')!r}, expected 'LORA' (a PEFT "
                            "LoRA adapter)")
        if not isinstance(config.get("r"), int) or isinstance(config.get("r"), bool) or config["r"] < 1:
            problems.append(f"{ADAPTER_CONFIG}: r is {config.get('r')!r}, expected a positive integer")
    weights = folder / ADAPTER_WEIGHTS
    if weights.is_file():
        try:
            header = read_safetensors_header(weights)
        except VerificationError as e:
            problems.append(str(e))
            header = {}
        else:
            if not header:
                problems.append(f"{ADAPTER_WEIGHTS} holds no tensors")
        checked.tensors = {name: info["shape"] for name, info in header.items()}
    elif allow_pickle and (folder / "adapter_model.bin").is_file():
        log.warning("adapter weights are pickled (adapter_model.bin): not checked beyond their hash")
    else:
        problems.append(f"{ADAPTER_WEIGHTS} is missing")
    if config is not None and checked.tensors:
        problems += rank_problems(config, checked.tensors)
    if manifest is not None and config is not None:
        problems += manifest_problems(manifest, config)
    return checked


def rank_problems(config: dict, tensors: dict[str, list[int]]) -> list[str]:
    """Every LoRA pair complete, A's rank = B's rank = the config's (a multiple of it for fused experts)."""
    ranks = {config.get("r")} | {v for v in (config.get("rank_pattern") or {}).values() if isinstance(v, int)}
    pairs: dict[str, dict[str, list[int]]] = {}
    for name, shape in tensors.items():
        m = LORA_KEY.match(name)
        if m:
            pairs.setdefault(m.group(1), {})[m.group(2).replace("embedding_", "")] = shape
        else:
            return [f"{ADAPTER_WEIGHTS}: {name} is not a LoRA tensor (lora_A / lora_B); merged or foreign weights?"]
    problems = []
    for module, parts in sorted(pairs.items()):
        a, b = parts.get("lora_A"), parts.get("lora_B")
        if a is None or b is None or len(a) != 2 or len(b) != 2:
            problems.append(f"{module}: incomplete LoRA pair (needs a 2-D lora_A and lora_B)")
            continue
        if a[0] != b[1]:
            problems.append(f"{module}: lora_A has rank {a[0]}, lora_B {b[1]}")
        elif not any(r and (a[0] == r or (".experts" in module and a[0] % r == 0)) for r in ranks):
            problems.append(f"{module}: rank {a[0]} in the weights, {ADAPTER_CONFIG} says r={config.get('r')}")
    return problems


def manifest_problems(manifest: Manifest, config: dict) -> list[str]:
    """The manifest must describe this adapter: same rank, alpha and base as its PEFT config."""
    problems = []
    if manifest.kind != "adapter":
        problems.append(f"{MANIFEST_NAME} says kind {manifest.kind!r} but the folder holds an adapter")
    lora = manifest.lora
    if lora is not None:
        if lora.r is not None and lora.r != config.get("r"):
            problems.append(f"{MANIFEST_NAME} says r={lora.r}, {ADAPTER_CONFIG} says r={config.get('r')}")
        if lora.alpha is not None and lora.alpha != config.get("lora_alpha"):
            problems.append(f"{MANIFEST_NAME} says alpha={lora.alpha}, {ADAPTER_CONFIG} says "
                            f"lora_alpha={config.get('lora_alpha')}")
    recorded = config.get("base_model_name_or_path")
    if recorded and manifest.base_model.id and recorded != manifest.base_model.id:
        problems.append(f"{MANIFEST_NAME} says base {manifest.base_model.id!r}, {ADAPTER_CONFIG} says {recorded!r}")
    return problems


def _check_model(folder: Path, manifest: Manifest | None, problems: list[str], allow_pickle: bool):
    import json

    checked = CheckedFolder(folder, "model", manifest)
    if manifest is not None and manifest.kind != "merged":
        problems.append(f"{MANIFEST_NAME} says kind {manifest.kind!r} but the folder holds a model")
    shards = sorted(folder.glob("*.safetensors"))
    if not shards and not (allow_pickle and any(folder.glob("*.bin"))):
        problems.append("config.json but no *.safetensors weights")
    for shard in shards:
        try:
            read_safetensors_header(shard)
        except VerificationError as e:
            problems.append(str(e))
    index = folder / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
        except (ValueError, AttributeError):
            weight_map = None
        if not isinstance(weight_map, dict):
            problems.append(f"{INDEX_NAME} has no weight_map")
        else:
            missing = sorted(set(weight_map.values()) - {s.name for s in shards})
            if missing:
                problems.append(f"{INDEX_NAME} names shards that are missing: {', '.join(missing)}")
    return checked
