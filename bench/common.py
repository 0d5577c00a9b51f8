"""Shared by the benchmarks (run as `python bench/NAME.py`; each puts the repo root on sys.path)."""

from __future__ import annotations

import resource


def peak_rss_mb() -> float:
    """This process's own peak RSS (VmHWM). Not getrusage: Linux carries the parent's peak across fork+exec
    into ru_maxrss, so a child spawned by a big parent would report the parent's memory."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
