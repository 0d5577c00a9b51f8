"""Writing a merged model: the output's shard layout, the streaming shard writer, and the small files around it.

Why a writer of our own rather than `safetensors.torch.save_file`: save_file wants every tensor of a shard in
memory at once, and a 5 GB shard of a large base would then cost 5 GB. A safetensors header only needs each
tensor's dtype and shape, which the plan knows before any byte is read, so the header is written first and each
tensor streamed after it: untouched tensors are copied byte for byte, cast ones a block at a time, adapted ones get
`scaling · B @ A` added in float32 a block of rows at a time (hub_tools/merge/deltas.py). Everything is written into
the staging folder (`persona_lora.output_folder`) that takes the output's name once the merge is complete.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import shutil
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from persona_lora.artifact import TOKENIZER_FILES
from persona_lora.dtypes import FLOATS, ITEMSIZE, name_of, nbytes, torch_dtype
from persona_lora.errors import ModelLoadError, VerificationError
from persona_lora.safetensors_io import INDEX_NAME, SINGLE_NAME, ShardReader, ShardTensor, read_safetensors_header

log = logging.getLogger(__name__)

LAYOUT = "original per-expert"  # the hub checkpoints' layout (docs/ARCHITECTURE.md)
FUSED_LAYOUT = "fused (transformers 5)"
BLOCK_BYTES = 32 << 20  # float32 working block: bounds memory independently of tensor size
COPY_BYTES = 16 << 20


# ------------------------------------------------------------------------------------------ output layout
@dataclass(frozen=True)
class OutTensor:
    """One tensor of the output: where its bytes come from in the base, and the dtype it is written in."""

    src: ShardTensor
    dtype: str  # safetensors code

    @property
    def nbytes(self) -> int:
        """Its size in the output file, known before a byte is read: the header is written first."""
        return nbytes(self.dtype, self.src.shape)


Layout = list[tuple[str, list[OutTensor]]]  # [(shard file name, tensors in write order)]


def plan_output(shards: dict[str, ShardReader], out_dtype: str | None, max_bytes: int | None) -> Layout:
    """[(shard file name, tensors in write order)]. Without `max_bytes` the base's shard names and membership
    are kept, so tools that compare a merged model with its base find the same files; with it tensors are
    re-packed, in the base's order, greedily into shards of at most `max_bytes` (a single larger tensor gets a
    shard of its own), named like transformers names them."""
    def out_of(t: ShardTensor) -> OutTensor:
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


def layout_name(keys) -> str:
    """The checkpoint layout, which the output shares with the base: the card tells readers which tools read it."""
    if any(k.endswith((".mlp.experts.gate_up_proj", ".mlp.experts.down_proj")) for k in keys):
        return FUSED_LAYOUT
    if any(re.search(r"\.experts\.\d+\.", k) for k in keys):
        return LAYOUT
    return "original"  # no routed experts: a dense model's one layout


def dominant_dtype(layout: Layout) -> str:
    """The floating dtype holding most of the output's bytes: what the manifest records as the weights' dtype."""
    sizes: Counter = Counter()
    for _, ts in layout:
        for t in ts:
            if t.dtype in FLOATS:
                sizes[t.dtype] += t.nbytes
    return sizes.most_common(1)[0][0] if sizes else "F32"


# ------------------------------------------------------------------------------------------ shard writer
def _copy_raw(src: ShardReader, t: ShardTensor, f) -> None:
    for start in range(t.start, t.end, COPY_BYTES):
        f.write(src.read(start, min(t.end, start + COPY_BYTES)))


def _write_cast(src: ShardReader, t: ShardTensor, dtype: str, f) -> None:
    import torch

    size = ITEMSIZE[t.dtype]
    step = max(size, COPY_BYTES // size * size)
    for start in range(t.start, t.end, step):
        raw = src.read(start, min(t.end, start + step))
        block = torch.frombuffer(raw, dtype=torch_dtype(t.dtype)).to(torch_dtype(dtype))
        f.write(block.view(torch.uint8).numpy().data)


def _write_merged(src: ShardReader, t: ShardTensor, dtype: str, delta, f) -> None:
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
    size = ITEMSIZE[t.dtype]
    step = max(1, BLOCK_BYTES // max(1, cols * 4))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        raw = src.read(t.start + r0 * cols * size, t.start + r1 * cols * size)
        base = torch.frombuffer(raw, dtype=torch_dtype(t.dtype)).reshape(r1 - r0, cols)
        work = base.to(torch.float32, copy=True)
        delta.add_to(work, r0)
        merged = work.to(torch_dtype(dtype))
        if dtype != "F32" and not bool(torch.isfinite(merged).all()) and bool(torch.isfinite(work).all()):
            raise VerificationError(
                f"merging into {t.key} gives values that overflow {name_of(dtype)}; merge with --dtype float32 "
                "(or bfloat16) instead")
        f.write(merged.reshape(-1).view(torch.uint8).numpy().data)


def write_shard(path: Path, tensors: list[OutTensor], metadata: dict | None, sources: dict[str, ShardReader],
                deltas: dict, applied: Counter) -> None:
    """Stream one safetensors file: header first (every size is known up front), then each tensor's bytes.

    `applied` counts, per LoRA layer, the delta pieces added, so the caller can prove every layer landed once."""
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
            delta = deltas.get(t.src.key)
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

    The merge streams at disk speed; its arithmetic is rank-r products and casts a block at a time, so small that
    handing each one to OpenMP's threads costs more than the work itself, and on a busy machine waiting threads
    slow every block down."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def check_applied(applied: Counter, expected: Counter, out: Path) -> None:
    """Every LoRA layer's pieces were added exactly as planned: a layer applied twice or never would give a model
    that loads and runs but is not the adapter's."""
    if applied != expected:
        off = sorted(k for k in set(applied) | set(expected) if applied[k] != expected[k])
        raise VerificationError(
            f"internal check failed: LoRA layer(s) {', '.join(off[:4])} were applied {[applied[k] for k in off[:4]]} "
            f"time(s), expected {[expected[k] for k in off[:4]]}; nothing was written to {out}. Please report this")


# ------------------------------------------------------------------------------------------ files around the weights
def write_index(folder: Path, layout: Layout, metadata: dict, total: int) -> None:
    """model.safetensors.index.json for a sharded output: which shard holds which key, and the total size."""
    meta = dict(metadata)
    meta["total_size"] = total
    weight_map = {t.src.key: n for n, ts in layout for t in ts}
    (folder / INDEX_NAME).write_text(
        json.dumps({"metadata": meta, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")


def write_config(base: Path, out: Path, dtype: str | None) -> None:
    """config.json as the base has it (byte for byte) unless the weights' dtype changes."""
    if dtype is None:
        shutil.copyfile(base / "config.json", out / "config.json")
        return
    cfg = json.loads((base / "config.json").read_text(encoding="utf-8"))
    name = name_of(dtype)
    keys = [k for k in ("torch_dtype", "dtype") if k in cfg] or ["torch_dtype"]
    for k in keys:
        cfg[k] = name
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _tokenizer_source(adapter: Path, base: Path) -> Path:
    """Tokenizer files come as one set: the adapter's when training changed the tokenizer, else the base's."""
    if any((adapter / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return adapter
    return base


def write_extras(base: Path, adapter: Path, out: Path, out_dtype: str | None) -> None:
    """config, generation config and tokenizer: what makes the weights a model folder transformers can load."""
    write_config(base, out, out_dtype)
    if (base / "generation_config.json").is_file():
        shutil.copyfile(base / "generation_config.json", out / "generation_config.json")
    source = _tokenizer_source(adapter, base)
    for n in TOKENIZER_FILES:
        if (source / n).is_file():
            shutil.copyfile(source / n, out / n)


def verify_written(folder: Path, layout: Layout) -> None:
    """Re-read every written header: our writer's output must open with safetensors and hold what was planned."""
    for name, tensors in layout:
        header = read_safetensors_header(folder / name)
        if set(header) != {t.src.key for t in tensors}:  # pragma: no cover - writer bug
            raise VerificationError(f"{name}: written tensors differ from the plan")
