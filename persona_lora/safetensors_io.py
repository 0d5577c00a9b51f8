"""The project's one safetensors reader: a validated header, and a shard's tensor bytes read without mmap.

Why our own reader next to the `safetensors` library: pull and verify check downloaded files without loading a
byte of weights (a truncated or hand-edited file must fail with a sentence naming it, not inside a loader), and the
merge streams a multi-GB base shard a block at a time with plain `readinto` — mapped pages of a shard count as
resident memory once touched, which is what the merge exists to avoid. Both start from the same header parse, done
once per file and cross-checked with the reference implementation.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from persona_lora.dtypes import ITEMSIZE
from persona_lora.errors import VerificationError

MAX_HEADER = 100_000_000  # bytes; a larger header is a corrupt length field, not a real checkpoint
# How transformers names a checkpoint's weights: one file, or shards listed by an index.
SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


@dataclass(frozen=True)
class SafetensorsHeader:
    """One file's parsed header: tensors (name -> dtype, shape, data_offsets), `__metadata__`, data start."""

    tensors: dict[str, dict]
    metadata: dict | None
    data_start: int  # byte position of the data section: offsets in `tensors` are relative to it


def parse_header(path: Path) -> SafetensorsHeader:
    """Read and check a safetensors header: every tensor's offsets and byte size agree with its dtype and shape,
    the data section has no holes, overlaps or trailing bytes, and the `safetensors` library opens the file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise VerificationError(f"{path.name} is not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > min(MAX_HEADER, size - 8):
            raise VerificationError(
                f"{path.name} is not a valid safetensors file (header length {n} > file size {size})")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise VerificationError(f"{path.name} has a corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise VerificationError(f"{path.name} has a corrupt safetensors header (not a JSON object)")
    data_len = size - 8 - n
    spans = []
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = info["dtype"], list(info["shape"]), info["data_offsets"]
            numel = 1
            for d in shape:
                if not isinstance(d, int) or d < 0:
                    raise ValueError(f"bad dimension {d!r}")
                numel *= d
            expected = numel * ITEMSIZE[dtype]
        except (KeyError, TypeError, ValueError) as e:
            raise VerificationError(f"{path.name}: tensor {name} has an invalid header entry ({e})") from None
        if not (0 <= start <= end <= data_len) or end - start != expected:
            raise VerificationError(
                f"{path.name}: tensor {name} points outside the file or has the wrong byte size "
                f"(offsets {start}-{end}, data {data_len} bytes); the file is truncated or corrupt"
            )
        spans.append((start, end))
        tensors[name] = {"dtype": dtype, "shape": shape, "data_offsets": [start, end]}
    spans.sort()
    pos = 0
    for start, end in spans:
        if start != pos:
            raise VerificationError(f"{path.name}: tensor data overlaps or has holes; the file is corrupt")
        pos = end
    if pos != data_len:
        raise VerificationError(f"{path.name}: {data_len - pos} trailing bytes after the tensors; the file is corrupt")
    try:  # and the reference implementation agrees
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as f:
            list(f.keys())
    except ImportError:  # pragma: no cover
        pass
    except Exception as e:
        raise VerificationError(f"{path.name} does not open with safetensors ({e})") from None
    return SafetensorsHeader(tensors, header.get("__metadata__"), 8 + n)


def read_safetensors_header(path: Path) -> dict[str, dict]:
    """{tensor name: {"dtype", "shape", "data_offsets"}} after checking the header is self-consistent."""
    return parse_header(path).tensors


@dataclass(frozen=True)
class ShardTensor:
    """Where one tensor's bytes lie in its shard (offsets inside the data section)."""

    key: str
    shard: str  # the shard's file name
    dtype: str  # safetensors code
    shape: tuple
    start: int
    end: int


class ShardReader:
    """One safetensors file opened for streaming: its checked header, and byte ranges read with `readinto`.

    The file handle is opened on the first read and kept across tensors until `close()` (or the end of a `with`
    block), so a merge reading thousands of tensors opens each shard once."""

    def __init__(self, path: Path):
        self.path = path
        header = parse_header(path)
        self.tensors = header.tensors
        self.metadata = header.metadata
        self.data_start = header.data_start
        self._fh = None

    def entries(self) -> list[ShardTensor]:
        """The shard's tensors in file order, which is the order reading them sequentially wants."""
        items = [ShardTensor(k, self.path.name, v["dtype"], tuple(v["shape"]), *v["data_offsets"])
                 for k, v in self.tensors.items()]
        return sorted(items, key=lambda t: t.start)

    def read(self, start: int, end: int) -> bytearray:
        """Bytes [start, end) of the data section, into a fresh buffer (torch.frombuffer can wrap it)."""
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
        """Close the file handle, if a read opened one."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
