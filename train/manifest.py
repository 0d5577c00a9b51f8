"""The adapter folder's manifest (`persona_manifest.json`): the provenance of a run.

Cards, hub tools and the demo read only this (and PEFT's own files), so everything they show must be here.
The schema is documented in docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import json
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

from persona_lora.errors import ManifestError

MANIFEST_NAME = "persona_manifest.json"
SCHEMA = "persona-lora/manifest@1"
REQUIRED = ("schema", "kind", "name", "base_model")
LIBRARIES = ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "safetensors", "tokenizers", "huggingface_hub")


def read_manifest(folder: str | Path) -> dict:
    """Read and check a folder's manifest; errors name the file and the fix."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(
            f"{path} is missing: this folder was not written by `persona-lora train` (or the file was deleted); "
            "train again or restore it"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"{path} is not valid JSON ({e}); restore it from the hub or train again") from e
    if not isinstance(data, dict):
        raise ManifestError(f"{path} must hold a JSON object")
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        raise ManifestError(f"{path} lacks {', '.join(missing)}; it is incomplete or not a persona-lora manifest")
    if data["schema"] != SCHEMA:
        raise ManifestError(f"{path} has schema {data['schema']!r}; this persona-lora reads {SCHEMA!r}")
    return data


def write_manifest(folder: str | Path, data: dict) -> Path:
    path = Path(folder) / MANIFEST_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False, sort_keys=False) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def now_iso() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def environment() -> dict:
    """Library versions and hardware, for provenance."""
    from importlib.metadata import PackageNotFoundError, version

    libs = {}
    for name in LIBRARIES:
        try:
            libs[name] = version(name)
        except PackageNotFoundError:
            pass
    try:
        import torch

        if torch.cuda.is_available():
            n = torch.cuda.device_count()
            hardware = f"{n}× {torch.cuda.get_device_name(0)}"
        else:
            import os

            hardware = f"CPU ({os.cpu_count()} cores)"
    except ImportError:  # pragma: no cover
        hardware = "unknown"
    return {
        "python": sys.version.split()[0],
        "platform": f"{platform.system()}-{platform.machine()}",
        "hardware": hardware,
        "libraries": libs,
    }
