"""`persona-lora merge`: fold an adapter into its base's weights, shard by shard, in the base's own layout.

Why not PEFT's `merge_and_unload()` + `save_pretrained()`: that loads the whole base (31 GB in bf16 for
DeepSeek-Coder-V2-Lite), and transformers 5 saves the routed experts in its fused layout
(`mlp.experts.gate_up_proj`), which vLLM, llama.cpp's converters and older transformers do not read. Here every
base shard is streamed tensor by tensor — untouched tensors are copied byte for byte, adapted ones get
`scaling · B @ A` added a block of rows at a time in float32 (hub_tools/merge_math.py) — and written to a shard of
the same name, so peak memory is the adapter plus a few blocks (tens of MB), whatever the model size, and the
output has exactly the base's keys (per-expert `mlp.experts.{e}.gate_proj.weight`, …), index and shard names.

Nothing is written under the final name until every check passed and every shard is complete: the merge goes to a
hidden sibling folder that is renamed at the end. Checks, all before the first byte is written: the adapter's keys
are exactly those its config targets (no leftover, no missing), the base's config.json is the one the adapter was
trained on (manifest `base_model.config_sha256`; `force` overrides), the base holds safetensors (never pickles),
the target folder is empty (or, with `overwrite`, a model folder), and the disk has room. A model replaced with
`overwrite` is deleted only once the new one is complete, so the disk needs room for both for a moment.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import re
import shutil
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from persona_lora.artifact import (
    MANIFEST_NAME,
    TOKENIZER_FILES,
    MergeBase,
    MergeInfo,
    now_iso,
    read_manifest,
    require_adapter_files,
    write_manifest,
)
from persona_lora.hub_tools.files import PICKLE_SUFFIXES
from persona_lora.errors import ModelLoadError, UsageError, VerificationError

log = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
LAYOUT = "original per-expert"  # the hub checkpoints' layout (docs/ARCHITECTURE.md)
FUSED_LAYOUT = "fused (transformers 5)"
PARTIAL_MARKER = ".persona-lora-merge-partial"
BLOCK_BYTES = 32 << 20  # float32 working block: bounds memory independently of tensor size
COPY_BYTES = 16 << 20
DISK_MARGIN = 64 << 20

DTYPE_NAMES = {"float32": "F32", "fp32": "F32", "bfloat16": "BF16", "bf16": "BF16", "float16": "F16", "fp16": "F16"}
_ST_NAMES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
             "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}
FLOATS = ("F64", "F32", "F16", "BF16")


def _torch_dtype(st: str):
    import torch

    return {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[st]


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


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


# ------------------------------------------------------------------------------------------ base shards
@dataclass
class SourceTensor:
    key: str
    shard: str
    dtype: str  # safetensors dtype string
    shape: tuple
    start: int  # byte offsets inside the shard's data section
    end: int


class SourceShard:
    """One base shard, read with plain `readinto` (no mmap: mapped pages of a 5 GB shard would count as resident
    memory as soon as they are touched)."""

    def __init__(self, path: Path):
        from persona_lora.hub_tools.verify import read_safetensors_header

        self.path = path
        self.tensors = read_safetensors_header(path)  # validates offsets, sizes, and that safetensors opens it
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        self.data_start = 8 + n
        self.metadata = header.get("__metadata__")
        self._fh = None

    def entries(self) -> list[SourceTensor]:
        items = [SourceTensor(k, self.path.name, v["dtype"], tuple(v["shape"]), *v["data_offsets"]) for k, v in self.tensors.items()]
        return sorted(items, key=lambda t: t.start)

    def read(self, start: int, end: int) -> bytearray:
        if self._fh is None:
            self._fh = open(self.path, "rb")  # noqa: SIM115 - kept open across tensors, closed by close()
        buf = bytearray(end - start)
        self._fh.seek(self.data_start + start)
        view = memoryview(buf)
        got = 0
        while got < len(buf):
            n = self._fh.readinto(view[got:])
            if not n:
                raise VerificationError(f"{self.path} ended early (truncated while merging?); check the base files")
            got += n
        return buf

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def open_base_weights(base: Path) -> tuple[dict[str, SourceShard], dict | None]:
    """The base's safetensors shards (by file name) and its index (None for a single model.safetensors).

    Refuses pickled checkpoints and indexes that disagree with the shards they name."""
    index_path = base / INDEX_NAME
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
            weight_map = index["weight_map"]
            assert isinstance(weight_map, dict)
        except (ValueError, KeyError, AssertionError) as e:
            raise VerificationError(f"{index_path} is not a valid safetensors index ({e}); restore it from the base's source") from None
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (base / n).is_file()]
        if missing:
            raise VerificationError(f"{index_path} names shard(s) that are missing: {', '.join(missing[:4])}; the base download is incomplete")
        shards = {n: SourceShard(base / n) for n in names}
        for name, shard in shards.items():
            listed = {k for k, v in weight_map.items() if v == name}
            if listed != set(shard.tensors):
                odd = sorted(listed ^ set(shard.tensors))
                raise VerificationError(
                    f"{index_path} and {name} disagree about tensor(s) {', '.join(odd[:4])}; the base is corrupt or mixed "
                    "from two downloads")
        return shards, index
    if (base / SINGLE_NAME).is_file():
        return {SINGLE_NAME: SourceShard(base / SINGLE_NAME)}, None
    pickled = sorted(p.name for p in base.iterdir() if p.is_file() and p.suffix.lower() in PICKLE_SUFFIXES)
    if pickled:
        raise VerificationError(
            f"base {base} has pickled weights only ({', '.join(pickled[:4])}): loading a pickle runs arbitrary code, "
            "so merge refuses it. Convert the base to safetensors first (from a trusted copy: "
            "save_pretrained(..., safe_serialization=True))")
    raise ModelLoadError(f"base {base} has no {SINGLE_NAME} and no {INDEX_NAME}; it is not a complete model folder")


# ------------------------------------------------------------------------------------------ output shards
@dataclass
class OutTensor:
    src: SourceTensor
    dtype: str

    @property
    def nbytes(self) -> int:
        return math.prod(self.src.shape) * _ITEMSIZE[self.dtype]


def plan_output(shards: dict[str, SourceShard], index: dict | None, out_dtype: str | None,
                max_bytes: int | None) -> list[tuple[str, list[OutTensor]]]:
    """[(shard file name, tensors in write order)]. Without `max_bytes` the base's shard names and membership
    are kept; with it tensors are re-packed, in the base's order, greedily into shards of at most `max_bytes`
    (a single larger tensor gets a shard of its own), named like transformers names them."""
    def out_of(t: SourceTensor) -> OutTensor:
        return OutTensor(t, out_dtype if (out_dtype and t.dtype in FLOATS) else t.dtype)

    layout = [(name, [out_of(t) for t in shards[name].entries()]) for name in shards]
    if max_bytes is None:
        return layout
    groups: list[list[OutTensor]] = [[]]
    size = 0
    for _, tensors in layout:
        for t in tensors:
            if groups[-1] and size + t.nbytes > max_bytes:
                groups.append([])
                size = 0
            groups[-1].append(t)
            size += t.nbytes
    if len(groups) == 1:
        return [(SINGLE_NAME, groups[0])]
    return [(f"model-{i:05d}-of-{len(groups):05d}.safetensors", g) for i, g in enumerate(groups, 1)]


def _copy_raw(src: SourceShard, t: SourceTensor, f) -> None:
    for start in range(t.start, t.end, COPY_BYTES):
        f.write(src.read(start, min(t.end, start + COPY_BYTES)))


def _write_cast(src: SourceShard, t: SourceTensor, dtype: str, f) -> None:
    import torch

    size = _ITEMSIZE[t.dtype]
    step = max(size, COPY_BYTES // size * size)
    for start in range(t.start, t.end, step):
        raw = src.read(start, min(t.end, start + step))
        block = torch.frombuffer(raw, dtype=_torch_dtype(t.dtype)).to(_torch_dtype(dtype))
        f.write(block.view(torch.uint8).numpy().data)


def _write_merged(src: SourceShard, t: SourceTensor, dtype: str, delta, f) -> None:
    """W + delta, computed in float32 a block of rows at a time, cast to `dtype`."""
    import torch

    if t.dtype not in FLOATS:
        raise ModelLoadError(
            f"{t.key} is stored as {t.dtype} in {t.shard}: merging into quantized weights is not supported; use a "
            "bf16/fp16/fp32 base")
    if t.end == t.start:
        return
    cols = t.shape[-1]
    rows = math.prod(t.shape[:-1])
    size = _ITEMSIZE[t.dtype]
    step = max(1, BLOCK_BYTES // max(1, cols * 4))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        raw = src.read(t.start + r0 * cols * size, t.start + r1 * cols * size)
        base = torch.frombuffer(raw, dtype=_torch_dtype(t.dtype)).reshape(r1 - r0, cols)
        work = base.to(torch.float32, copy=True)
        delta.add_to(work, r0)
        merged = work.to(_torch_dtype(dtype))
        if dtype != "F32" and not bool(torch.isfinite(merged).all()) and bool(torch.isfinite(work).all()):
            raise VerificationError(
                f"merging into {t.key} gives values that overflow {_ST_NAMES[dtype]}; merge with --dtype float32 "
                "(or bfloat16) instead")
        f.write(merged.reshape(-1).view(torch.uint8).numpy().data)


def write_shard(path: Path, tensors: list[OutTensor], metadata: dict | None, sources: dict[str, SourceShard],
                plan: dict, applied: Counter) -> None:
    """Stream one safetensors file: header first (every size is known up front), then each tensor's bytes."""
    header: dict = {}
    offset = 0
    for t in tensors:
        header[t.src.key] = {"dtype": t.dtype, "shape": list(t.src.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for t in tensors:
            src = sources[t.src.shard]
            delta = plan.get(t.src.key)
            if delta is not None:
                _write_merged(src, t.src, t.dtype, delta, f)
                applied.update(p.layer for p in delta.pieces)
            elif t.dtype == t.src.dtype:
                _copy_raw(src, t.src, f)
            else:
                _write_cast(src, t.src, t.dtype, f)
        written = f.tell()
    if written != 8 + len(raw) + offset:  # pragma: no cover - a bug in the writer, never the user's fault
        raise VerificationError(f"{path.name}: wrote {written} bytes, expected {8 + len(raw) + offset}")


@contextlib.contextmanager
def one_torch_thread():
    """Run torch single-threaded for the merge, then restore the setting.

    The merge streams at disk speed; its arithmetic is rank-r products and casts a block at a time, small enough
    that OpenMP's thread hand-offs cost more than they save — on a busy 2-core machine each tiny matmul took
    ~30 ms with 2 threads against ~0.01 ms with one (the whole tiny-model merge: 1.5 s vs 0.4 s)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


# ------------------------------------------------------------------------------------------ folders
def _is_model_folder(folder: Path) -> bool:
    """A folder `overwrite` may replace: config.json + safetensors weights, top-level files only."""
    entries = list(folder.iterdir())
    return ((folder / "config.json").is_file() and any(p.suffix == ".safetensors" for p in entries)
            and all(p.is_file() and not p.is_symlink() for p in entries)
            and not (folder / "adapter_config.json").exists())


def check_out_dir(out: Path, *, overwrite: bool, base: Path, adapter: Path) -> bool:
    """Raise UsageError unless `out` may be written; True when it holds an old model to replace at the end."""
    for other, what in ((base, "the base model"), (adapter, "the adapter")):
        if out == other or other.is_relative_to(out):
            raise UsageError(f"--out {out} would overwrite {what} ({other}); choose a new folder")
    if out.is_relative_to(base):
        raise UsageError(f"--out {out} is inside the base model folder {base}; choose a folder outside it")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder; choose a new folder")
    if not out.exists() or not any(out.iterdir()):
        return False
    if not overwrite:
        raise UsageError(f"--out {out} exists and is not empty; choose a new folder or pass --overwrite to replace the model in it")
    if not _is_model_folder(out):
        raise UsageError(
            f"--out {out} is not a model folder (config.json + *.safetensors, files only), so --overwrite will not "
            "delete it; choose a new folder or empty it yourself")
    return True


def _partial_dir(out: Path) -> Path:
    tmp = out.parent / f".{out.name}.merge-partial"
    if tmp.exists():
        if not (tmp / PARTIAL_MARKER).is_file():
            raise UsageError(f"{tmp} exists and was not made by persona-lora merge; remove it or choose another --out")
        shutil.rmtree(tmp)  # left by an interrupted merge of ours
    tmp.mkdir(parents=True)
    (tmp / PARTIAL_MARKER).write_text("incomplete persona-lora merge; safe to delete\n")
    return tmp


def check_disk(out: Path, need: int) -> None:
    parent = out if out.exists() else out.parent
    while not parent.exists():
        parent = parent.parent
    free = shutil.disk_usage(parent).free
    if need + DISK_MARGIN > free:
        raise UsageError(
            f"not enough disk space for --out {out}: the merged model needs {_human(need)}, {parent} has "
            f"{_human(free)} free; free some space or choose a folder on another disk")


def _tokenizer_source(adapter: Path, base: Path) -> Path:
    """Tokenizer files come as one set: the adapter's when training changed the tokenizer, else the base's."""
    if any((adapter / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return adapter
    return base


def write_config(base: Path, out: Path, dtype: str | None) -> None:
    """config.json as the base has it (byte for byte) unless the weights' dtype changes."""
    if dtype is None:
        shutil.copyfile(base / "config.json", out / "config.json")
        return
    cfg = json.loads((base / "config.json").read_text(encoding="utf-8"))
    name = _ST_NAMES[dtype]
    keys = [k for k in ("torch_dtype", "dtype") if k in cfg] or ["torch_dtype"]
    for k in keys:
        cfg[k] = name
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# ------------------------------------------------------------------------------------------ the merge
def merge_adapter(
    adapter_dir: str | Path,
    base: str | Path,
    out_dir: str | Path,
    *,
    dtype: str | None = None,
    max_shard_size: str | int | None = None,
    overwrite: bool = False,
    force: bool = False,
    base_revision: str | None = None,
    base_source: str = "auto",
    adapter_id: str | None = None,
    name: str | None = None,
    card_repo_id: str | None = None,
) -> Path:
    """Merge the adapter in `adapter_dir` into `base` (folder or hub id) and write a model folder to `out_dir`.

    dtype: output dtype of floating tensors (float32 | bfloat16 | float16); default keeps each tensor's dtype.
    max_shard_size: re-shard to this size ('2GB'); default keeps the base's shard files and index.
    force: merge even though the base's config.json is not the one the adapter was trained on.
    adapter_id: how the manifest/card name the adapter (its hub id when it was pulled); default its manifest name.
    name / card_repo_id: the merged model's name in its manifest and card (default: the out folder's name).
    Returns the output folder."""
    import torch
    from safetensors.torch import load_file

    from persona_lora.hub_tools.merge_math import check_adapter_keys, discover_layers, plan_deltas
    from persona_lora.train.model_loading import resolve_base, sha256_file

    adapter = require_adapter_files(Path(adapter_dir).expanduser().resolve())
    out = Path(out_dir).expanduser().resolve()
    manifest = read_manifest(adapter)
    if manifest.kind != "adapter":
        raise UsageError(f"{adapter / MANIFEST_NAME} says kind {manifest.kind!r}; merge takes an adapter folder")
    out_dtype = None
    if dtype is not None:
        if dtype not in DTYPE_NAMES:
            raise UsageError(f"--dtype must be float32, bfloat16 or float16; got {dtype!r}")
        out_dtype = DTYPE_NAMES[dtype]
    max_bytes = parse_max_shard_size(max_shard_size)

    rb = resolve_base(str(base), revision=base_revision, source=base_source)
    recorded = manifest.base_model
    want, have = recorded.config_sha256, sha256_file(rb.path / "config.json")
    mismatch = bool(want) and want != have
    if mismatch and not force:
        raise VerificationError(
            f"base {rb.id} does not match the adapter: its config.json has sha256 {have[:12]}…, the adapter was "
            f"trained on {recorded.id or 'a base'} whose config.json has {want[:12]}… "
            f"({adapter / MANIFEST_NAME}: base_model.config_sha256). Give --base the model it was trained on, or "
            "pass --force if you know the weights fit")
    if mismatch:
        log.warning("base %s's config.json differs from the one the adapter was trained on; merging anyway (--force)", rb.id)
    elif not want:
        log.warning("%s records no base_model.config_sha256; the base cannot be checked beyond tensor shapes", MANIFEST_NAME)

    replace_old = check_out_dir(out, overwrite=overwrite, base=rb.path.resolve(), adapter=adapter)
    shards, index = open_base_weights(rb.path)
    try:
        # Everything that can be wrong is found before anything is written.
        layers = discover_layers(rb.path, adapter)
        tensors = {k: v.to(torch.float32) for k, v in load_file(str(adapter / "adapter_model.safetensors")).items()}
        check_adapter_keys(layers, tensors, adapter / "adapter_model.safetensors")
        ckpt_shapes = {k: tuple(v["shape"]) for s in shards.values() for k, v in s.tensors.items()}
        plan, expected = plan_deltas(layers, tensors, ckpt_shapes)
        ckpt_dtypes = {k: v["dtype"] for s in shards.values() for k, v in s.tensors.items()}
        quantized = sorted(k for k in plan if ckpt_dtypes[k] not in FLOATS)
        if quantized:
            raise ModelLoadError(
                f"{quantized[0]} is stored as {ckpt_dtypes[quantized[0]]} in the base: merging into quantized weights "
                "is not supported; use the bf16/fp16/fp32 base")
        layout = plan_output(shards, index, out_dtype, max_bytes)
        total = sum(t.nbytes for _, ts in layout for t in ts)
        check_disk(out, total)
        log.info("merging %d LoRA layer(s) into %d of %d tensors of %s", len(layers), len(plan), len(ckpt_shapes), rb.id)

        tmp = _partial_dir(out)
        try:
            applied: Counter = Counter()
            keep_meta = max_bytes is None
            with one_torch_thread():
                for i, (shard_name, shard_tensors) in enumerate(layout, 1):
                    meta = shards[shard_name].metadata if keep_meta else {"format": "pt"}
                    write_shard(tmp / shard_name, shard_tensors, meta, shards, plan, applied)
                    log.info("wrote %s (%d/%d)", shard_name, i, len(layout))
            if applied != expected:
                off = sorted(k for k in set(applied) | set(expected) if applied[k] != expected[k])
                raise VerificationError(
                    f"internal check failed: LoRA layer(s) {', '.join(off[:4])} were applied {[applied[k] for k in off[:4]]} "
                    f"time(s), expected {[expected[k] for k in off[:4]]}; nothing was written to {out}. Please report this")
            if index is not None or len(layout) > 1:
                meta = dict((index or {}).get("metadata") or {}) if keep_meta else {}
                meta["total_size"] = total
                weight_map = {t.src.key: n for n, ts in layout for t in ts}
                (tmp / INDEX_NAME).write_text(
                    json.dumps({"metadata": meta, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
            _write_extras(rb, adapter, tmp, out_dtype)
            weights_dtype = out_dtype or _dominant_dtype(layout)
            merged_manifest = dataclasses.replace(
                manifest,
                kind="merged",
                name=name or out.name,
                merge=MergeInfo(
                    adapter=adapter_id or manifest.name or adapter.name,
                    dtype=_ST_NAMES.get(weights_dtype, weights_dtype),
                    layout=layout_name(ckpt_shapes),
                    base=MergeBase(id=rb.id, source=rb.source, revision=rb.revision, config_sha256=have),
                    forced_base_mismatch=mismatch,
                    lora_layers=len(layers),
                    tensors_changed=len(plan),
                    created_at=now_iso(),
                ),
            )
            write_manifest(tmp, merged_manifest)
            from persona_lora.model_cards.cards import write_card

            write_card(tmp, repo_id=card_repo_id)
            (tmp / PARTIAL_MARKER).unlink()
            _verify_written(tmp, layout)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        for s in shards.values():
            s.close()
    if replace_old:
        shutil.rmtree(out)
    elif out.exists():
        out.rmdir()  # empty
    tmp.rename(out)
    log.info("merged model written to %s (%s, %d shard(s))", out, _human(total), len(layout))
    return out


def layout_name(keys) -> str:
    """The checkpoint layout, which the output shares with the base: the card tells readers which tools read it."""
    if any(k.endswith((".mlp.experts.gate_up_proj", ".mlp.experts.down_proj")) for k in keys):
        return FUSED_LAYOUT
    if any(re.search(r"\.experts\.\d+\.", k) for k in keys):
        return LAYOUT
    return "original"  # no routed experts: a dense model's one layout


def _dominant_dtype(layout) -> str:
    sizes: Counter = Counter()
    for _, ts in layout:
        for t in ts:
            if t.dtype in FLOATS:
                sizes[t.dtype] += t.nbytes
    return sizes.most_common(1)[0][0] if sizes else "F32"


def _write_extras(rb, adapter: Path, out: Path, out_dtype: str | None) -> None:
    write_config(rb.path, out, out_dtype)
    if (rb.path / "generation_config.json").is_file():
        shutil.copyfile(rb.path / "generation_config.json", out / "generation_config.json")
    source = _tokenizer_source(adapter, rb.path)
    for n in TOKENIZER_FILES:
        if (source / n).is_file():
            shutil.copyfile(source / n, out / n)


def _verify_written(folder: Path, layout) -> None:
    """Re-read every written header: our writer's output must open with safetensors and hold what was planned."""
    from persona_lora.hub_tools.verify import read_safetensors_header

    for name, tensors in layout:
        header = read_safetensors_header(folder / name)
        if set(header) != {t.src.key for t in tensors}:  # pragma: no cover - writer bug
            raise VerificationError(f"{name}: written tensors differ from the plan")
