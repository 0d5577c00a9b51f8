"""Bradley–Terry ratings with bootstrap 95% intervals, fitted to pairwise votes among any number of models.

Why Bradley–Terry and not an online Elo: an Elo rating depends on the order the votes arrived in; BT fits one
strength per model to all votes at once, so the same votes give the same ratings however they were collected
(several demos, a Space, a merge of stores). `P(i beats j) = σ(θ_i − θ_j)`; ratings are shown on the familiar
Elo scale, `1000 + 400·log10(e)·(θ − mean θ)`, so 100 points mean a 64% expected score.

Ties ("tie" and "both bad" alike) count as half a win for each side (the approach the chat arenas use): a tie
says the two are about equally good (or equally bad), which is what a half win means to BT; the Davidson
extension would add a tie parameter that a few hundred demo votes cannot pin down, and it ranks the same.

A weak prior keeps every rating finite: each model plays one virtual tie against a reference of strength
θ = 0. Without it, a model that never won has an infinite MLE (its rating would run to −∞); with it, a model
with no wins gets a low, finite rating whose interval says how little is known. Against thousands of votes the
one virtual game is negligible.

Intervals come from the bootstrap: the votes are resampled with replacement (`rounds` times) and refitted, and
each model's 2.5th and 97.5th percentiles are its 95% interval. Because a vote matters only through its pair and
outcome, resampling the votes is resampling a multinomial over (pair, outcome) cells, which is drawn directly,
and all rounds are fitted at once by a batched Newton method (numpy only; `bench/bench_arena.py` prints the time
of 1,000 rounds over 10,000 votes among 10 models). With a handful of votes the intervals are rough: a pair whose
votes all went one way is resampled only that way, so its interval is narrower than the truth warrants. The result
depends only on the counts per cell, never on the order the votes came in, so merged stores give exactly the
ratings of one store holding all their votes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

OUTCOMES = ("left", "right", "tie")  # who won a vote between (left, right)
PRIOR_GAMES = 1.0  # virtual ties of each model against the reference θ = 0 (keeps every rating finite)
ELO_SCALE = 400.0 / math.log(10.0)
ELO_CENTRE = 1000.0
DEFAULT_ROUNDS = 1000


@dataclass
class Tally:
    """Votes counted per pair: `models` (sorted, so the same votes always give the same order), `pairs` (P, 2)
    model indices i < j, `counts` (P, 3): i's wins, j's wins, ties."""

    models: list[str]
    pairs: np.ndarray
    counts: np.ndarray

    @property
    def votes(self) -> int:
        return int(self.counts.sum())


def tally(votes: Iterable[tuple[str, str, str]], models: Iterable[str] = ()) -> Tally:
    """Count `(left, right, outcome)` votes (outcome in OUTCOMES). `models` adds models that have no vote yet
    (they get the prior's rating and the widest interval)."""
    cells: dict[tuple[str, str], list[int]] = {}
    names = set(models)
    for left, right, outcome in votes:
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {', '.join(OUTCOMES)}, got {outcome!r}")
        if left == right:
            raise ValueError(f"a vote between {left!r} and itself")
        names.update((left, right))
        (i, j), flip = ((left, right), False) if left < right else ((right, left), True)
        row = cells.setdefault((i, j), [0, 0, 0])
        k = 2 if outcome == "tie" else (0 if (outcome == "left") != flip else 1)
        row[k] += 1
    order = sorted(names)
    index = {m: n for n, m in enumerate(order)}
    keys = sorted(cells)
    pairs = np.array([(index[i], index[j]) for i, j in keys], dtype=np.int64).reshape(-1, 2)
    counts = np.array([cells[k] for k in keys], dtype=np.float64).reshape(-1, 3)
    return Tally(order, pairs, counts)


def _matrices(t: Tally, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(wins, games), each (B, K, K), from per-cell counts (B, P, 3); a tie is half a win for each side."""
    k = len(t.models)
    b = counts.shape[0]
    wins = np.zeros((b, k, k))
    i, j = t.pairs[:, 0], t.pairs[:, 1]
    wins[:, i, j] = counts[:, :, 0] + 0.5 * counts[:, :, 2]
    wins[:, j, i] = counts[:, :, 1] + 0.5 * counts[:, :, 2]
    return wins, wins + wins.transpose(0, 2, 1)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # overflow-free


def fit(wins: np.ndarray, games: np.ndarray, *, prior: float = PRIOR_GAMES, tol: float = 1e-10,
        max_iter: int = 200) -> np.ndarray:
    """Log-strengths θ (B, K) maximising the BT likelihood of each of B win matrices plus the prior, by Newton's
    method on all B at once (the objective is strictly concave, so the optimum is unique; steps are capped so a
    far start cannot overshoot). RuntimeError if it does not converge (it has on every case tried)."""
    b, k, _ = wins.shape
    theta = np.zeros((b, k))
    won = wins.sum(axis=2)
    eye = np.eye(k)
    for _ in range(max_iter):
        p = _sigmoid(theta[:, :, None] - theta[:, None, :])
        s = _sigmoid(theta)
        grad = won - (games * p).sum(axis=2) + prior * (0.5 - s)
        w = games * p * (1.0 - p)
        neg_hessian = eye * (w.sum(axis=2) + prior * s * (1.0 - s))[:, :, None] - w  # Laplacian + prior: PD
        step = np.linalg.solve(neg_hessian, grad[:, :, None])[:, :, 0]
        step = np.clip(step, -2.0, 2.0)
        theta += step
        if np.abs(step).max(initial=0.0) < tol:
            return theta
    raise RuntimeError(f"the Bradley–Terry fit did not converge in {max_iter} Newton steps")


def to_elo(theta: np.ndarray) -> np.ndarray:
    """Log-strengths on the Elo scale, centred on 1000 (per row)."""
    return ELO_CENTRE + ELO_SCALE * (theta - theta.mean(axis=-1, keepdims=True))


@dataclass
class Ratings:
    """Ratings of `models` (Elo scale), their bootstrap 95% intervals and the per-model and per-pair counts."""

    models: list[str]
    rating: np.ndarray
    ci_low: np.ndarray
    ci_high: np.ndarray
    games: np.ndarray  # (K, K) votes per pair
    wins: np.ndarray  # (K, K) i's wins over j, ties as halves
    decisive: np.ndarray  # (K, K) i's decisive wins over j (ties excluded)
    ties: np.ndarray  # (K, K) ties between i and j
    rounds: int
    groups: list[list[str]] = field(default_factory=list)  # models connected by votes; > 1: not comparable

    @property
    def votes(self) -> np.ndarray:
        return self.games.sum(axis=1)

    def win_rate(self) -> np.ndarray:
        """Each model's decisive wins over its decisive votes (NaN when it has none)."""
        won = self.decisive.sum(axis=1)
        lost = self.decisive.sum(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            return won / (won + lost)

    def pairwise_win_rate(self) -> np.ndarray:
        """Observed share of i's wins over j (ties as halves); NaN for pairs never compared."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.games > 0, self.wins / self.games, np.nan)

    def predicted(self) -> np.ndarray:
        """P(i beats j) under the fitted model (a tie counted as half)."""
        theta = self.rating / ELO_SCALE
        return _sigmoid(theta[:, None] - theta[None, :])

    def order(self) -> list[int]:
        """Model indices, best first (ties in rating broken by name)."""
        return sorted(range(len(self.models)), key=lambda i: (-self.rating[i], self.models[i]))

    def overlap(self, i: int, j: int) -> float:
        """How much the intervals of i and j overlap: the shared length over the shorter width (0: disjoint)."""
        shared = min(self.ci_high[i], self.ci_high[j]) - max(self.ci_low[i], self.ci_low[j])
        shorter = min(self.ci_high[i] - self.ci_low[i], self.ci_high[j] - self.ci_low[j])
        if shared <= 0:
            return 0.0
        return 1.0 if shorter <= 0 else min(1.0, shared / shorter)


def bradley_terry(t: Tally, *, rounds: int = DEFAULT_ROUNDS, seed: int = 0, prior: float = PRIOR_GAMES) -> Ratings:
    """Fit `t` and bootstrap `rounds` resamples of its votes (seeded: the same votes and seed give the same
    intervals). With no votes every model gets 1000 and an interval of ±inf width is not claimed: (−inf, inf)."""
    k = len(t.models)
    wins, games = _matrices(t, t.counts[None])
    decisive = np.zeros((k, k))
    ties = np.zeros((k, k))
    if len(t.pairs):
        i, j = t.pairs[:, 0], t.pairs[:, 1]
        decisive[i, j], decisive[j, i] = t.counts[:, 0], t.counts[:, 1]
        ties[i, j] = ties[j, i] = t.counts[:, 2]
    theta = fit(wins, games, prior=prior)[0]
    rating = to_elo(theta)
    n = t.votes
    if n == 0 or rounds <= 0:
        low, high = np.full(k, -np.inf), np.full(k, np.inf)
    else:
        rng = np.random.default_rng(seed)
        flat = t.counts.reshape(-1)
        draws = rng.multinomial(n, flat / n, size=rounds).reshape(rounds, *t.counts.shape).astype(np.float64)
        bw, bg = _matrices(t, draws)
        boot = to_elo(fit(bw, bg, prior=prior))
        low, high = np.percentile(boot, [2.5, 97.5], axis=0)
        unseen = games[0].sum(axis=1) == 0  # the prior alone: nothing is known, no interval is claimed
        low[unseen], high[unseen] = -np.inf, np.inf
    return Ratings(list(t.models), rating, low, high, games[0], wins[0], decisive, ties, rounds,
                   connected_groups(t))


def connected_groups(t: Tally) -> list[list[str]]:
    """Models split into groups linked by votes: ratings are comparable only within a group."""
    parent = list(range(len(t.models)))

    def root(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i, j in t.pairs:
        parent[root(int(i))] = root(int(j))
    groups: dict[int, list[str]] = {}
    for n, m in enumerate(t.models):
        groups.setdefault(root(n), []).append(m)
    return sorted(groups.values(), key=lambda g: (-len(g), g))
