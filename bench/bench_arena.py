"""Benchmark: the arena's statistics. (1) The CPU time of one Bradley–Terry fit with 1,000 bootstrap rounds over
10,000 votes among 10 models (goal: under 5 s). (2) On simulated votes from known strengths: how many votes it
takes until the top model's 95% interval separates from the second's, with uniformly drawn pairs against the
arena's pair sampling (`demo.arena.pair_weights`: few votes and overlapping intervals first).

Simulation: 10 models with the Elo ratings of a scenario (SCENARIOS: "close", all within 260 points and the best
two 60 apart; "spread", the best two as close but the rest falling away to 590 below, as a base and early
checkpoints would); each vote draws a pair (uniformly, or by the arena's weights from the current fit), and its
winner with the BT probability. The fit
(`persona_lora.ratings.bradley_terry`, --rounds bootstrap rounds) is redone every --every votes (the demo refits
after every vote; batches keep the bench short), and a run stops at the first fit where the fitted best model's
interval lies wholly above the fitted second's, or at --cap votes. Both strategies see the same seeds. The table
says, per strategy, the median and mean votes needed, how many runs separated within the cap, and how often the
model found on top was the true best.

    .venv/bin/python bench/bench_arena.py [--seeds 20] [--every 25] [--rounds 200] [--cap 30000] [--scenario …]

Not a test: about ten minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from persona_lora.demo.arena import draw_pair, pair_weights  # noqa: E402
from persona_lora.ratings import ELO_SCALE, bradley_terry, tally  # noqa: E402

SCENARIOS = {  # Elo; m0 is the best, m1 the second
    "close": [1150, 1090, 1040, 1010, 990, 970, 950, 930, 910, 890],
    "spread": [1150, 1090, 1040, 1010, 950, 880, 800, 720, 640, 560],
}
STRENGTHS = SCENARIOS["close"]


def timing(repeats: int) -> list[float]:
    """CPU seconds of tally + fit + 1,000 bootstrap rounds over 10,000 votes among 10 models, per repeat."""
    rng = np.random.default_rng(0)
    theta = (np.array(STRENGTHS) - 1000) / ELO_SCALE
    i = rng.integers(0, 10, 10_000)
    j = (i + rng.integers(1, 10, 10_000)) % 10
    wins = rng.random(10_000) < 1 / (1 + np.exp(-(theta[i] - theta[j])))
    votes = [(f"m{a}", f"m{b}", "left" if w else "right") for a, b, w in zip(i, j, wins)]
    times = []
    for _ in range(repeats):
        start = time.process_time()
        bradley_terry(tally(votes), rounds=1000, seed=1)
        times.append(time.process_time() - start)
    return times


def separated(r) -> tuple[bool, str]:
    """Whether the fitted best model's interval lies above the fitted second's; and which model is on top."""
    top, second = r.order()[:2]
    return bool(r.ci_low[top] > r.ci_high[second]), r.models[top]


def votes_needed(strategy: str, seed: int, every: int, rounds: int, cap: int,
                 strengths: list[float]) -> tuple[int | None, bool]:
    """Votes until separation (None: not within `cap`) and whether the model on top was the true best."""
    rng = random.Random(seed)
    theta = {f"m{k}": (s - 1000) / ELO_SCALE for k, s in enumerate(strengths)}
    keys = list(theta)
    votes: list[tuple[str, str, str]] = []
    ratings = None
    uniform = {pair: 1.0 for pair in pair_weights(keys, None)}
    while len(votes) < cap:
        weights = uniform if strategy == "uniform" else pair_weights(keys, ratings)
        for _ in range(every):
            a, b = draw_pair(weights, rng)
            p = 1 / (1 + np.exp(-(theta[a] - theta[b])))
            votes.append((a, b, "left" if rng.random() < p else "right"))
        ratings = bradley_terry(tally(votes, keys), rounds=rounds, seed=seed)
        done, top = separated(ratings)
        if done:
            return len(votes), top == "m0"
    return None, False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=20)
    p.add_argument("--every", type=int, default=25, help="votes between refits (default 25)")
    p.add_argument("--rounds", type=int, default=200, help="bootstrap rounds per refit in the simulation")
    p.add_argument("--cap", type=int, default=30_000, help="votes after which a run gives up")
    p.add_argument("--repeats", type=int, default=3, help="timing repeats")
    p.add_argument("--scenario", choices=[*SCENARIOS, "all"], default="all")
    args = p.parse_args(argv)

    times = timing(args.repeats)
    print(f"BT fit + 1,000 bootstrap rounds, 10,000 votes, 10 models: CPU {min(times):.3f} s best, "
          f"{statistics.median(times):.3f} s median of {args.repeats} (goal < 5 s)")

    for name in SCENARIOS if args.scenario == "all" else [args.scenario]:
        print(f"\n{name}: Elo {SCENARIOS[name]}\nvotes until the top model's 95% interval separates from the second's "
              f"({args.seeds} seeds, refit every {args.every} votes, {args.rounds} bootstrap rounds, cap {args.cap})")
        print(f"{'strategy':<10} {'median':>8} {'mean':>8} {'separated':>10} {'true best on top':>17}")
        results = {}
        for strategy in ("uniform", "arena"):
            runs = [votes_needed(strategy, seed, args.every, args.rounds, args.cap, SCENARIOS[name])
                    for seed in range(args.seeds)]
            needed = [n if n is not None else args.cap for n, _ in runs]
            results[strategy] = needed
            print(f"{strategy:<10} {statistics.median(needed):>8.0f} {statistics.mean(needed):>8.0f} "
                  f"{sum(n is not None for n, _ in runs):>7}/{args.seeds} "
                  f"{sum(ok for _, ok in runs):>14}/{args.seeds}")
        ratio = statistics.median(results["arena"]) / statistics.median(results["uniform"])
        fewer = sum(a < u for a, u in zip(results["arena"], results["uniform"]))
        print(f"arena / uniform, median votes: {ratio:.2f}; the arena needed fewer votes in {fewer} of {args.seeds} "
              "seeds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
