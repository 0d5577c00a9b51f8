"""The checks `persona-lora merge` runs before it writes a byte: options, base, output folder, disk space.

Why all up front: a merge of a large base runs for a long time and fills tens of GB; a wrong `--base`, a pickled
checkpoint, an occupied `--out` or a full disk found halfway would waste that time and leave a half-written
folder. Every function here only reads and raises (UsageError for what the user can change on the command line,
VerificationError / ModelLoadError for files that are wrong); the merge steps in hub_tools/merge/run.py call them in
order.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from persona_lora.artifact import ADAPTER_CONFIG, MANIFEST_NAME, PICKLE_SUFFIXES, Manifest, is_ours
from persona_lora.dtypes import FLOATS, WEIGHT_DTYPES, choices_text, code_of
from persona_lora.errors import ModelLoadError, UsageError, VerificationError
from persona_lora.output_folder import Target, check_free_space, check_target
from persona_lora.safetensors_io import INDEX_NAME, SINGLE_NAME, ShardReader

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------ options
def output_dtype(dtype: str | None) -> str | None:
    """`--dtype` (a name or alias of float32/bfloat16/float16) as a safetensors code; None keeps each tensor's."""
    if dtype is None:
        return None
    code = code_of(dtype)
    if code not in {code_of(n) for n in WEIGHT_DTYPES}:
        raise UsageError(f"--dtype must be {choices_text()}; got {dtype!r}")
    return code


def parse_max_shard_size(value) -> int | None:
    """'2GB' (10^9, like transformers), '500MiB', '1e9' or an int -> bytes; None keeps the base's shards."""
    if value is None or value == "":
        return None
    if isinstance(value, int):
        size = value
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?(?:e\d+)?)\s*([kmgt]i?b|b)?\s*", str(value), re.IGNORECASE)
        if not m:
            raise UsageError(f"--max-shard-size {value!r} is not a size; write e.g. 2GB, 500MB or 4GiB")
        unit = (m.group(2) or "b").lower()
        power = "bkmgt".index(unit[0])
        size = int(float(m.group(1)) * ((1024 if "i" in unit else 1000) ** power))
    if size < 1 << 20:
        raise UsageError(f"--max-shard-size {value!r} is below 1MB; shards that small are not useful")
    return size


# ------------------------------------------------------------------------------------------ the base
def check_base_config(manifest: Manifest, base_id: str, have: str, adapter: Path, *, force: bool) -> bool:
    """Compare the base's config.json hash (`have`) with the one the adapter was trained on; True when they
    differ and `force` lets the merge go on. A different config means different shapes or semantics (rope, norm
    eps, expert count) and a merged model that loads but answers wrongly."""
    recorded = manifest.base_model
    want = recorded.config_sha256
    mismatch = bool(want) and want != have
    if mismatch and not force:
        raise VerificationError(
            f"base {base_id} does not match the adapter: its config.json has sha256 {have[:12]}…, the adapter was "
            f"trained on {recorded.id or 'a base'} whose config.json has {want[:12]}… "
            f"({adapter / MANIFEST_NAME}: base_model.config_sha256). Give --base the model it was trained on, or "
            "pass --force if you know the weights fit")
    if mismatch:
        log.warning("base %s's config.json differs from the one the adapter was trained on; merging anyway (--force)",
                    base_id)
    elif not want:
        log.warning("%s records no base_model.config_sha256; the base cannot be checked beyond tensor shapes",
                    MANIFEST_NAME)
    return mismatch


def open_base_weights(base: Path) -> tuple[dict[str, ShardReader], dict | None]:
    """The base's safetensors shards (by file name) and its index (None for a single model.safetensors).

    Refuses pickled checkpoints and indexes that disagree with the shards they name."""
    index_path = base / INDEX_NAME
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
            weight_map = index["weight_map"]
            assert isinstance(weight_map, dict)
        except (ValueError, KeyError, AssertionError) as e:
            raise VerificationError(
                f"{index_path} is not a valid safetensors index ({e}); restore it from the base's source") from None
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (base / n).is_file()]
        if missing:
            raise VerificationError(
                f"{index_path} names shard(s) that are missing: {', '.join(missing[:4])}; the base download is "
                "incomplete")
        shards = {n: ShardReader(base / n) for n in names}
        for name, shard in shards.items():
            listed = {k for k, v in weight_map.items() if v == name}
            if listed != set(shard.tensors):
                odd = sorted(listed ^ set(shard.tensors))
                raise VerificationError(
                    f"{index_path} and {name} disagree about tensor(s) {', '.join(odd[:4])}; the base is corrupt or "
                    "mixed from two downloads")
        return shards, index
    if (base / SINGLE_NAME).is_file():
        return {SINGLE_NAME: ShardReader(base / SINGLE_NAME)}, None
    pickled = sorted(p.name for p in base.iterdir() if p.is_file() and p.suffix.lower() in PICKLE_SUFFIXES)
    if pickled:
        raise VerificationError(
            f"base {base} has pickled weights only ({', '.join(pickled[:4])}): loading a pickle runs arbitrary code, "
            "so merge refuses it. Convert the base to safetensors first (from a trusted copy: "
            "save_pretrained(..., safe_serialization=True))")
    raise ModelLoadError(f"base {base} has no {SINGLE_NAME} and no {INDEX_NAME}; it is not a complete model folder")


def check_not_quantized(changed: list[str], dtypes: dict[str, str]) -> None:
    """Refuse to add deltas to quantized tensors: their values only mean something with scales stored elsewhere,
    so a merge would silently corrupt them."""
    quantized = sorted(k for k in changed if dtypes[k] not in FLOATS)
    if quantized:
        raise ModelLoadError(
            f"{quantized[0]} is stored as {dtypes[quantized[0]]} in the base: merging into quantized weights "
            "is not supported; use the bf16/fp16/fp32 base")


# ------------------------------------------------------------------------------------------ the output folder
def _is_merged_model(folder: Path) -> bool:
    """A folder `overwrite` may replace: a model folder a merge wrote (config.json + safetensors weights and our
    manifest, top-level files only), never a model or files persona-lora did not write."""
    entries = list(folder.iterdir())
    return ((folder / "config.json").is_file() and any(p.suffix == ".safetensors" for p in entries)
            and all(p.is_file() and not p.is_symlink() for p in entries)
            and not (folder / ADAPTER_CONFIG).exists() and is_ours(folder))


def check_out_dir(out: Path, *, overwrite: bool, base: Path, adapter: Path) -> Target:
    """The output folder if it may be written (`replaces`: it holds a merged model `--overwrite` replaces once the
    new one is complete); UsageError otherwise.

    `--overwrite` only ever replaces a merged model (what a merge writes), never the base, the adapter, or a
    folder with other files the user may care about."""
    for other, what in ((base, "the base model"), (adapter, "the adapter")):
        if out == other or other.is_relative_to(out):
            raise UsageError(f"--out {out} would overwrite {what} ({other}); choose a new folder")
    if out.is_relative_to(base):
        raise UsageError(f"--out {out} is inside the base model folder {base}; choose a folder outside it")
    return check_target(out, option="--out", replace=overwrite, ours=_is_merged_model,
                        occupied_hint="choose a new folder or pass --overwrite to replace the model in it",
                        foreign=f"is not a model folder a merge wrote (config.json + *.safetensors and its "
                                f"{MANIFEST_NAME}, files only), so --overwrite will not delete it")


def check_disk(out: Path, need: int) -> None:
    """Refuse a merge the disk holding `out` has no room for (the old model, if replaced, is still there)."""
    check_free_space(out, need, option="--out", what="the merged model")
