"""What a Space is made of, as values: the plan's types (`SpacePlan`, `AdapterSource`) and the hardware table
with the sizing rules that pick a flavour for a base. `plan.py` builds a plan from these; `files.py` writes the
folder and checks the card against the same table, so both read one definition.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from persona_lora.errors import UsageError
from persona_lora.hub_tools.space.app import SpaceSettings

INCLUDE_BASE_LIMIT = 2 * 1024**3  # bytes: a bigger base belongs in its own model repo, which the Space downloads
CPU_MAX_PARAMS = 1_000_000_000  # above this a CPU answers too slowly for a shared page: suggest a GPU
OVERHEAD = 1.2  # KV cache, activations and buffers on top of the weights
RUNTIME_GIB = 1.0  # Python, torch, Gradio

# hardware flavour -> (kind, memory in GiB one process can use: RAM for CPUs, one GPU's memory for GPUs, since
# the demo holds its one resident model on one device)
HARDWARE = {
    "cpu-basic": ("cpu", 16), "cpu-upgrade": ("cpu", 32),
    "zero-a10g": ("zerogpu", 70),  # ZeroGPU: half an H200 per call
    "t4-small": ("gpu", 16), "t4-medium": ("gpu", 16), "l4x1": ("gpu", 24), "l4x4": ("gpu", 24),
    "a10g-small": ("gpu", 24), "a10g-large": ("gpu", 24), "a10g-largex2": ("gpu", 24), "a10g-largex4": ("gpu", 24),
    "l40sx1": ("gpu", 48), "l40sx4": ("gpu", 48), "l40sx8": ("gpu", 48),
    "a100-large": ("gpu", 80), "a100x4": ("gpu", 80), "a100x8": ("gpu", 80),
    "rtx-pro-6000": ("gpu", 96), "rtx-pro-6000x2": ("gpu", 96), "rtx-pro-6000x4": ("gpu", 96),
    "rtx-pro-6000x8": ("gpu", 96),
}
SUGGESTION_ORDER = ("cpu-basic", "cpu-upgrade", "t4-small", "l4x1", "l40sx1", "a100-large", "rtx-pro-6000")


@dataclass
class AdapterSource:
    """One `--adapter`: where it is here (a folder, pulled for a hub id) and how the Space names it."""

    spec: str
    folder: Path
    repo_id: str | None = None  # hub id (with @revision in `spec`) when referenced, not copied
    in_space: str = ""  # what the Space's settings list: `adapters/NAME` or the hub reference
    files: list[str] = field(default_factory=list)  # the files to copy (local adapters)


@dataclass
class SpacePlan:
    """Everything `write_space` and `push_space` need, checked."""

    repo_id: str
    base: str
    base_revision: str | None
    base_folder: Path | None  # a local base folder (copied with --include-base)
    base_files: list[str]
    base_params: int | None
    hardware: str
    hardware_given: bool
    adapters: list[AdapterSource]
    settings: SpaceSettings
    title: str
    short_description: str
    license: str
    private: bool = False
    wheel: Path | None = None

    @property
    def hub_models(self) -> list[str]:
        """Hub ids the Space uses (the card's `models:`)."""
        ids = [] if self.base_folder is not None else [self.base]
        return ids + [a.repo_id for a in self.adapters if a.repo_id]


def parameter_count(shapes: dict[str, list[int]]) -> int:
    return sum(math.prod(s) for s in shapes.values())


def memory_gib(params: int, kind: str) -> float:
    """What the demo needs to hold the base: bf16 on a GPU, float32 on a CPU (the demo's `--dtype auto`)."""
    per = 4 if kind == "cpu" else 2
    return params * per * OVERHEAD / 1024**3 + RUNTIME_GIB


def suggest_hardware(params: int | None, zerogpu: bool) -> str:
    """The cheapest flavour that holds the base: a CPU for small bases, else the smallest GPU that fits."""
    if zerogpu:
        return "zero-a10g"
    if params is None:
        return "cpu-basic"
    for name in SUGGESTION_ORDER:
        kind, mem = HARDWARE[name]
        if kind == "cpu" and params > CPU_MAX_PARAMS:
            continue
        if memory_gib(params, kind) <= mem:
            return name
    return SUGGESTION_ORDER[-1]


def check_hardware(hardware: str, params: int | None, base: str) -> None:
    """UsageError when `base` does not fit `hardware`, naming what it needs and flavours that fit."""
    kind, mem = HARDWARE[hardware]
    if params is None:
        return
    need = memory_gib(params, kind)
    if need <= mem:
        return
    fits = [n for n in SUGGESTION_ORDER if HARDWARE[n][0] != "cpu" and memory_gib(params, "gpu") <= HARDWARE[n][1]]
    dtype, where = ("float32", "RAM") if kind == "cpu" else ("bfloat16", "memory on one GPU")
    raise UsageError(
        f"--hardware {hardware}: base {base} has {params / 1e9:.2f}B parameters and needs about {need:.0f} GiB of "
        f"{where} in {dtype}; {hardware} has {mem} GiB. Choose {' or '.join(fits[:3]) or 'a larger GPU'}, or leave "
        "out --hardware to get the suggested one")
