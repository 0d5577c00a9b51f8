"""Freed host memory kept for reuse during CPU training, instead of being handed back to the OS every step.

Why: a training step on the CPU allocates and frees the same large activations and gradients step after step.
glibc's malloc serves every allocation above its mmap threshold (128 KiB, adapting up to 32 MiB) with a fresh
mapping that is unmapped again on free, and it trims free memory at the top of the heap above a threshold, so each
step's tensors land on new pages: every first touch is a page fault and the kernel zeroes the page before the
kernel of the op can write it. On the tiny base's persona run (batch 16, preset `all`) that was about 14,000 faults
per step; with both thresholds raised it is at most a few hundred per step, the steps are faster, and peak
resident memory stays within a few percent. The allocators PyTorch's CPU performance guides recommend preloading
(jemalloc, tcmalloc) keep freed memory the same way; this gets the effect from the C library already loaded, with
nothing to install or preload.

The cost: the process keeps up to `TRIM_THRESHOLD` of freed memory mapped rather than returning it between steps,
so resident memory stays near its peak while training runs (its peak is what the memory plan budgets anyway).
Only training on the CPU asks for it (`train/trainer.set_up`); GPU runs, merges and the demo keep the C library's
defaults. Elsewhere than glibc (macOS, musl) nothing changes. `PERSONA_LORA_HOST_MALLOC=stock` keeps the defaults,
for comparisons (`bench/bench_train.py --only ours-all-stock-malloc`).
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform

HOST_MALLOC_ENV = "PERSONA_LORA_HOST_MALLOC"
# allocations up to this size come from the heap (freed ones are reused), larger ones are mapped and unmapped
MMAP_THRESHOLD = 512 << 20
# free memory at the top of the heap is returned to the OS only beyond this much
TRIM_THRESHOLD = 1 << 30
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers (malloc.h)

log = logging.getLogger(__name__)


def keep_freed_memory(device: str) -> str:
    """Raise glibc's mmap and trim thresholds when `device` is the CPU. Returns what was done, in words."""
    if device != "cpu":
        return f"not asked for: training on {device}"
    if os.environ.get(HOST_MALLOC_ENV, "").strip().lower() == "stock":
        return f"{HOST_MALLOC_ENV}=stock: C library defaults"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return f"not glibc ({platform.system()} {platform.libc_ver()[0] or 'unknown libc'}): C library defaults"
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError) as e:
        return f"mallopt unavailable ({e}): C library defaults"
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if not (mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
        return "mallopt refused the thresholds: C library defaults"
    done = (f"freed memory kept for reuse (glibc mmap threshold {MMAP_THRESHOLD >> 20} MiB, "
            f"trim threshold {TRIM_THRESHOLD >> 20} MiB)")
    log.debug(done)
    return done
