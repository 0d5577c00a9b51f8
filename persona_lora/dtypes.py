"""The project's one table of tensor dtypes: names users type, safetensors codes, byte sizes, torch dtypes.

Why one table: the same dtype is spelled three ways here — `--dtype bf16` on the command line, `"BF16"` in a
safetensors header, `torch.bfloat16` in memory — and the merge, the safetensors reader, the config it writes and
model loading all translate between them. With one table they cannot disagree about a byte size or about which
dtypes may be merged into, and a dtype added here is known everywhere. torch is imported only when a torch dtype
is asked for, so reading headers and parsing options stays light.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class DType:
    """One safetensors dtype and what the project needs to know about it."""

    code: str  # as written in safetensors headers
    itemsize: float  # bytes per element; fractional for the packed 4- and 6-bit formats
    kind: str  # "float" | "low-bit float" | "int" | "bool" | "complex"
    name: str | None = None  # canonical name, also torch's attribute name; None where torch has no such dtype
    aliases: tuple[str, ...] = ()  # other names accepted where a user gives a dtype


# "float" means a format torch computes in: a merge adds LoRA deltas to it and `--dtype` casts it. The 8/6/4-bit
# floats are quantized storage (they need scales kept elsewhere), so they count as "low-bit float", never as "float".
TABLE: tuple[DType, ...] = (
    DType("F64", 8, "float", "float64", ("fp64",)),
    DType("F32", 4, "float", "float32", ("fp32",)),
    DType("BF16", 2, "float", "bfloat16", ("bf16",)),
    DType("F16", 2, "float", "float16", ("fp16",)),
    DType("F8_E4M3", 1, "low-bit float", "float8_e4m3fn"),
    DType("F8_E5M2", 1, "low-bit float", "float8_e5m2"),
    DType("F8_E8M0", 1, "low-bit float", "float8_e8m0fnu"),
    DType("F6_E2M3", 0.75, "low-bit float"),
    DType("F6_E3M2", 0.75, "low-bit float"),
    DType("F4", 0.5, "low-bit float"),
    DType("I64", 8, "int", "int64"),
    DType("I32", 4, "int", "int32"),
    DType("I16", 2, "int", "int16"),
    DType("I8", 1, "int", "int8"),
    DType("U64", 8, "int", "uint64"),
    DType("U32", 4, "int", "uint32"),
    DType("U16", 2, "int", "uint16"),
    DType("U8", 1, "int", "uint8"),
    DType("BOOL", 1, "bool", "bool"),
    DType("C64", 8, "complex", "complex64"),
)

BY_CODE: dict[str, DType] = {d.code: d for d in TABLE}
# Plain dict lookups on purpose: an unknown (or unhashable) code raises KeyError (TypeError), which the header
# check reports as an invalid entry.
ITEMSIZE: dict[str, float] = {d.code: d.itemsize for d in TABLE}
FLOATS: frozenset[str] = frozenset(d.code for d in TABLE if d.kind == "float")
# What a user may ask model weights to be loaded in or merged to (`--dtype`): the floats GPUs and CPUs compute in.
WEIGHT_DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")

_BY_NAME: dict[str, DType] = {n: d for d in TABLE for n in ((d.name,) if d.name else ()) + d.aliases}


def code_of(name: str | None) -> str | None:
    """The safetensors code of a canonical name or alias ('bf16' -> 'BF16'); None for anything else."""
    d = _BY_NAME.get(name) if isinstance(name, str) else None
    return d.code if d else None


def name_of(code: str) -> str:
    """The canonical name of a safetensors code ('BF16' -> 'bfloat16'), as config.json and manifests record it;
    a code without one (the packed 4/6-bit formats) is returned as it is."""
    d = BY_CODE.get(code)
    return d.name if d and d.name else code


def accepted_names(names: tuple[str, ...] = WEIGHT_DTYPES) -> tuple[str, ...]:
    """Each canonical name followed by its aliases, in the table's order: what an option accepts and lists."""
    out: list[str] = []
    for n in names:
        d = _BY_NAME[n]
        out += [d.name, *d.aliases]
    return tuple(out)


def choices_text(names: tuple[str, ...] = WEIGHT_DTYPES) -> str:
    """'float32, bfloat16 or float16': the canonical names for an error message."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def nbytes(code: str, shape) -> int:
    """Bytes a tensor of this code and shape takes in a safetensors file (packed formats included)."""
    size = math.prod(shape) * ITEMSIZE[code]
    if size != int(size):
        raise ValueError(f"{code} tensor of shape {tuple(shape)} does not fill whole bytes")
    return int(size)


def torch_dtype(code_or_name: str):
    """The torch dtype for a safetensors code or a name/alias ('BF16', 'bf16', 'bfloat16' -> torch.bfloat16)."""
    d = BY_CODE.get(code_or_name) or _BY_NAME.get(code_or_name)
    if d is None:
        raise KeyError(f"unknown dtype {code_or_name!r}")
    import torch

    dtype = getattr(torch, d.name, None) if d.name else None
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{d.code} has no torch dtype in torch {torch.__version__}")
    return dtype
