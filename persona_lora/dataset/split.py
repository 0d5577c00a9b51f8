"""The seeded train/held-out split of a dataset's records: one function, so training (`train/prepare.py`) and
`persona-lora eval`, which rebuilds an adapter's held-out set from its manifest, never drift apart."""

from __future__ import annotations

import random


def split_indices(n: int, seed: int, eval_fraction: float) -> tuple[list[int], list[int]]:
    """(held-out, training) record indices, each sorted: the seeded split training uses. `persona-lora eval`
    calls this same function to rebuild an adapter's held-out set from its manifest, so the two never drift."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_eval = int(round(n * eval_fraction)) if eval_fraction > 0 else 0
    if eval_fraction > 0 and n >= 2:
        n_eval = max(1, min(n_eval, n - 1))
    return sorted(order[:n_eval]), sorted(order[n_eval:])
