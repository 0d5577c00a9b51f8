"""Which files of a folder belong on a hub, and which downloaded files we are willing to keep.

Why one module: push and pull must agree. A run directory holds much more than the adapter (checkpoints with
optimizer states, TensorBoard events, logs); pushing those leaks data and bloats repos, and pickled files
(`*.bin`, `*.pt`, …) execute code when loaded, so they never travel unless the user names them explicitly.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path

from persona_lora.artifact import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    CARD_NAME,
    LOSS_CURVE,
    MANIFEST_NAME,
    PICKLE_SUFFIXES,
    TOKENIZER_FILES,
    is_pickle,
)
from persona_lora.errors import ModelLoadError, UsageError, VerificationError

ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json")
MODEL_PATTERNS = ("*.safetensors",)
COMMON_FILES = (CARD_NAME, MANIFEST_NAME, LOSS_CURVE) + TOKENIZER_FILES
PICKLE_PATTERNS = tuple(f"*{s}" for s in PICKLE_SUFFIXES)
SKIPPED_DIRS = {
    "checkpoints": "checkpoint folder (optimizer/scheduler states; never pushed)",
    "runs": "training logs (TensorBoard)",
    "logs": "training logs",
    "wandb": "training logs",
}


def pull_patterns(allow_pickle: bool = False) -> list[str]:
    """allow_patterns for downloads: top-level adapter/model/card/tokenizer files, pickles only when allowed."""
    patterns = list(ADAPTER_FILES + MODEL_FILES + MODEL_PATTERNS + COMMON_FILES)
    if allow_pickle:
        patterns += list(PICKLE_PATTERNS)
    return patterns


def matches_pull_patterns(path: str, allow_pickle: bool = False) -> bool:
    """Top-level files only: `*.safetensors` must not pull `checkpoints/x.safetensors`."""
    return "/" not in path and any(fnmatch.fnmatch(path, p) for p in pull_patterns(allow_pickle))


def _allowed(name: str, kind: str) -> bool:
    if name in COMMON_FILES:
        return True
    if kind == "adapter":
        return name in ADAPTER_FILES
    return name in MODEL_FILES or any(fnmatch.fnmatch(name, p) for p in MODEL_PATTERNS)


def select_files(
    folder: Path, kind: str, include_extra: list[str] | None = None
) -> tuple[list[str], list[tuple[str, str]]]:
    """(files to push, [(skipped file, why)]), paths relative to `folder` in POSIX form.

    `include_extra` patterns (fnmatch on the relative path or the file name) override every exclusion.
    """
    include_extra = list(include_extra or [])
    selected: list[str] = []
    skipped: list[tuple[str, str]] = []
    matched: set[str] = set()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        name = path.name
        hits = {pat for pat in include_extra if fnmatch.fnmatch(rel, pat) or fnmatch.fnmatch(name, pat)}
        if hits:
            matched |= hits
            selected.append(rel)
            continue
        top = rel.split("/")[0]
        if any(part.startswith(".") for part in rel.split("/")):
            skipped.append((rel, "hidden file"))
        elif "/" in rel:
            skipped.append((rel, SKIPPED_DIRS.get(top, f"in subfolder {top}/ (only top-level files are pushed)")))
        elif is_pickle(name):
            skipped.append((rel, "pickled file (runs code when loaded; pass --include to push it anyway)"))
        elif "tfevents" in name or name.endswith((".log", ".out")) or name in ("trainer_state.json",):
            skipped.append((rel, "training log/state"))
        elif _allowed(name, kind):
            selected.append(rel)
        else:
            skipped.append((rel, f"not part of a{'n' if kind == 'adapter' else ''} {kind} folder"))

    unmatched = [pat for pat in include_extra if pat not in matched]
    if unmatched:  # a pattern that names nothing is a typo or a wrong folder: pushing without that file is not asked
        raise UsageError(f"--include {', '.join(map(repr, unmatched))} matches no file in {folder} (patterns match a "
                         "path relative to the folder, e.g. 'checkpoints/*', or a file name); fix the pattern or "
                         "drop it")
    weights = [r for r in selected if r.endswith(".safetensors") and "/" not in r]
    needed = "adapter_model.safetensors" if kind == "adapter" else "*.safetensors weights"
    ok = "adapter_model.safetensors" in selected if kind == "adapter" else bool(weights)
    ok = ok or any(is_pickle(r) and "/" not in r for r in selected)  # pickled weights named with --include
    if not ok:
        pickled = [r for r, _ in skipped if is_pickle(r) and "/" not in r]
        if pickled:
            raise VerificationError(
                f"{folder} has pickled weights ({', '.join(pickled)}) instead of {needed}: pickles run code when "
                "loaded, so they are not pushed. Re-save with save_pretrained(..., safe_serialization=True), "
                "or pass --include with their names to push them anyway"
            )
        raise ModelLoadError(f"{folder} has no {needed}; it is not a complete {kind} folder")
    return selected, skipped
