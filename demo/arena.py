"""The arena: blind battles between any two of {base, adapters}, one vote each, and a live Bradley–Terry table.

Why: people train many adapters of one persona (data cuts, ranks, DPO rounds) and ask which is best and whether
the difference is real. A battle draws two models without showing their names, both answer the same prompt (on
the backend the page uses: the one resident model with per-row LoRA, or a serving engine), the user votes A / B /
tie / both bad, and only then are the names revealed. Every vote goes into the demo's vote store, the same
table the Blind A/B tab writes (so DPO/KTO export, `data check` and `persona-lora leaderboard` read arena votes
as they read the others), with the two models in a fixed order: the base first when it fights, else the adapter
whose content key sorts first.

Models are identified by content (`persona_lora.vote_sources.model_keys`): an adapter by its weights' sha256 on
this base, so renaming a folder keeps its votes and two adapters with one name stay apart. An engine's model
given by name alone (`--backend openai --adapter NAME`) is known by that name; `NAME=FOLDER` adds the folder's
weights hash.

Pair sampling (`pair_weights`) serves the question the arena answers, "which model is best, and is that real?":
each model's `contention` is how much its 95% interval overlaps the current leader's (1 for the leader, and for a
model with no votes yet; a model with few votes has a wide interval, so it counts as a contender until its votes
place it), and a pair is drawn with weight `FLOOR + (contention_a + contention_b) / 2`. Votes go to the models
that may still be on top, against anyone; pairs of models already known to be below the leader keep a small
share (FLOOR) so every model stays connected to the others and an early mistake can still be corrected.
`bench/bench_arena.py` simulates it against uniform pairs (votes until the top model's interval separates from
the second's).

Battles wait for their vote on the server (`Arena.vote` takes a battle id), so the page and a script
(`battle` / `vote` API endpoints) go through the same checks: one vote per battle, a vote on an unknown or
expired battle refused, nothing counted twice.
"""

from __future__ import annotations

import math
import random
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from persona_lora.artifact import ADAPTER_WEIGHTS
from persona_lora.demo.backend import DemoBackend, SideFailed
from persona_lora.demo.decode import GenerationSettings
from persona_lora.errors import UsageError
from persona_lora.hashing import sha256_file
from persona_lora.ratings import Ratings, bradley_terry, tally
from persona_lora.vote_sources import adapter_key, base_key, merge
from persona_lora.votes import VOTES, VoteStore

FLOOR = 0.05  # the share a settled pair keeps (relative to an open one)
LIVE_ROUNDS = 1000  # bootstrap rounds of the live table (milliseconds for a demo's votes)
PENDING_LIMIT = 10_000  # battles waiting for a vote; the oldest are dropped beyond it
PENDING_SECONDS = 3600.0  # a battle waits this long for its vote
VOTED_MEMORY = 10_000  # battle ids remembered after their vote (to say "already voted" instead of "unknown")
BASE_SLOT = None  # the base, as a contestant's slot
_random = random.SystemRandom()


@dataclass(frozen=True)
class Contestant:
    """One model of the arena: its content `key`, the `name` shown after the vote, and the `slot` the backend
    answers with (None: the base; else the adapter's name in the picker)."""

    key: str
    name: str
    slot: str | None
    sha256: str | None = None
    adapter_id: str | None = None


@dataclass
class Battle:
    """A battle waiting for its vote: the two contestants as shown (A, B), their answers and the prompt."""

    id: str
    a: Contestant
    b: Contestant
    prompt: str
    system_prompt: str
    answer_a: str
    answer_b: str
    settings: dict
    created: float = field(default_factory=time.monotonic)


def pair_weights(keys: list[str], ratings: Ratings | None) -> dict[tuple[str, str], float]:
    """The sampling weight of every pair of `keys` (see the module docstring); `ratings` may know other models
    too, and may be None (no votes yet: all pairs equal)."""
    contender = contention(keys, ratings)
    weights = {}
    for n, a in enumerate(keys):
        for b in keys[n + 1:]:
            weights[(a, b)] = FLOOR + (contender[a] + contender[b]) / 2
    return weights


def contention(keys: list[str], ratings: Ratings | None) -> dict[str, float]:
    """How much each model may still be the best: 1 for the current leader and for a model without votes, else
    how much its interval overlaps the leader's (0: certainly below it). A model with few votes has a wide
    interval, which overlaps the leader's: it counts as a contender until its votes say otherwise."""
    if ratings is None:
        return {k: 1.0 for k in keys}
    index = {m: i for i, m in enumerate(ratings.models)}
    present = [index[k] for k in keys if k in index and math.isfinite(ratings.ci_low[index[k]])]
    leader = max(present, key=lambda i: (ratings.rating[i], ratings.models[i]), default=None)
    out = {}
    for k in keys:
        i = index.get(k)
        if i is None or leader is None or i == leader or not math.isfinite(ratings.ci_low[i]):
            out[k] = 1.0
        else:
            out[k] = ratings.overlap(i, leader)
    return out


def draw_pair(weights: dict[tuple[str, str], float], rng: random.Random) -> tuple[str, str]:
    """One pair, drawn in proportion to its weight."""
    pairs = list(weights)
    return rng.choices(pairs, weights=[weights[p] for p in pairs], k=1)[0]


def weights_sha256(view) -> str | None:
    """The sha256 of an adapter's weights file: a local adapter's folder (`path`), or the folder an engine's
    served adapter was declared with (`folder`, from `--adapter NAME=FOLDER`); None when there is no file."""
    folder = getattr(view, "path", None) or getattr(view, "folder", None)
    if folder is None or not (Path(folder) / ADAPTER_WEIGHTS).is_file():
        return None
    return _hash_cached(Path(folder) / ADAPTER_WEIGHTS)


_hashes: dict[tuple[str, int, int], str] = {}


def _hash_cached(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _hashes:
        _hashes[key] = sha256_file(path)
    return _hashes[key]


class Arena:
    """Battles and votes on `engine`, recorded in `votes`. Thread-safe (the page serves many sessions)."""

    def __init__(self, engine: DemoBackend, votes: VoteStore, *, rounds: int = LIVE_ROUNDS,
                 rng: random.Random | None = None):
        self.engine, self.votes, self.rounds = engine, votes, rounds
        self.rng = rng or _random
        self._lock = threading.Lock()
        self._pending: OrderedDict[str, Battle] = OrderedDict()
        self._voted: OrderedDict[str, int] = OrderedDict()
        self._standings: tuple[int, Standings] | None = None

    # ------------------------------------------------------------------ models

    @property
    def pairs_adapters(self) -> bool:
        """Whether the backend puts two adapters side by side (else every battle has the base on one side)."""
        return hasattr(self.engine, "stream_pair")

    def contestant(self, name: str | None) -> Contestant:
        """The base (None) or a loaded adapter, with its content key."""
        base = self.engine.base_id
        if name is None:
            return Contestant(base_key(base), f"base: {base}", BASE_SLOT)
        view = self.engine.adapter(name)
        sha = weights_sha256(view)
        return Contestant(adapter_key(base, sha, view.adapter_id), view.name, view.name, sha, view.adapter_id)

    def contestants(self) -> list[Contestant]:
        """The base and every loaded adapter (one per content key: the same weights loaded twice fight once)."""
        seen: dict[str, Contestant] = {}
        for c in [self.contestant(None), *(self.contestant(n) for n in self.engine.adapter_names())]:
            seen.setdefault(c.key, c)
        return list(seen.values())

    def draw(self) -> tuple[Contestant, Contestant]:
        """Two different models for a battle (see `pair_weights`), in random order (A, B)."""
        models = self.contestants()
        if len(models) < 2:
            raise UsageError("the arena needs at least one adapter besides the base; load one (top of the page, or "
                             "--adapter)")
        by_key = {c.key: c for c in models}
        weights = pair_weights(list(by_key), self.standings().ratings)
        if not self.pairs_adapters:  # this backend answers an adapter against the base only
            base = models[0].key
            weights = {p: w for p, w in weights.items() if base in p}
        a, b = draw_pair(weights, self.rng)
        pair = [by_key[a], by_key[b]]
        self.rng.shuffle(pair)
        return pair[0], pair[1]

    # ------------------------------------------------------------------ battles

    def stream_battle(self, message: str, system_prompt: str, settings: GenerationSettings,
                      pair: tuple[Contestant, Contestant] | None = None) -> Iterator[tuple[str, str, Battle | None]]:
        """(A text, B text, None) as both answers grow, then (A, B, battle) once both are complete: the battle
        then waits for its vote. A failed side fails the battle (no vote on half a pair); its message calls the
        sides A and B, so it never reveals which model answered."""
        message = (message or "").strip()
        if not message:
            raise UsageError("type a prompt first")
        a, b = pair or self.draw()
        user = [{"role": "user", "content": message}]
        try:
            texts = ("", "")
            for texts in self._stream_two(a, b, user, system_prompt, settings):
                yield texts[0], texts[1], None
        except SideFailed as e:
            raise UsageError(e.describe(("A", "B"))) from e
        battle = Battle(uuid.uuid4().hex, a, b, message, system_prompt or "", texts[0], texts[1],
                        {"max_new_tokens": settings.max_new_tokens, "temperature": settings.temperature,
                         "top_p": settings.top_p, "seed": settings.seed, "greedy": settings.greedy})
        self._remember(battle)
        yield texts[0], texts[1], battle

    def battle(self, message: str, system_prompt: str, settings: GenerationSettings,
               pair: tuple[Contestant, Contestant] | None = None) -> Battle:
        """One whole battle (the API's `battle`); `pair` (A, B) instead of a drawn one."""
        last = None
        for *_, last in self.stream_battle(message, system_prompt, settings, pair):
            pass
        return last

    def _stream_two(self, a: Contestant, b: Contestant, user: list[dict], system: str,
                    settings: GenerationSettings) -> Iterator[tuple[str, str]]:
        """(A text, B text) from the backend: base against adapter as the page's compare, two adapters as a pair."""
        if a.slot is BASE_SLOT or b.slot is BASE_SLOT:
            adapter = b if a.slot is BASE_SLOT else a
            for base_text, adapter_text in self.engine.stream_compare(adapter.slot, user, user, system, settings):
                yield (base_text, adapter_text) if a.slot is BASE_SLOT else (adapter_text, base_text)
        else:
            yield from self.engine.stream_pair(a.slot, b.slot, user, user, system, settings)

    def _remember(self, battle: Battle) -> None:
        with self._lock:
            self._expire()
            self._pending[battle.id] = battle
            while len(self._pending) > PENDING_LIMIT:
                self._pending.popitem(last=False)

    def _expire(self) -> None:
        now = time.monotonic()
        while self._pending:
            oldest = next(iter(self._pending.values()))
            if now - oldest.created <= PENDING_SECONDS:
                break
            self._pending.popitem(last=False)

    # ------------------------------------------------------------------ votes

    def vote(self, battle_id: str, vote: str) -> dict:
        """Record the vote on a waiting battle, once; returns what to reveal: {"vote_id", "vote", "A", "B"}."""
        if vote not in VOTES:
            raise UsageError(f"vote must be one of {', '.join(VOTES)}, got {vote!r}")
        battle_id = (battle_id or "").strip()
        with self._lock:
            self._expire()
            battle = self._pending.pop(battle_id, None)
            if battle is None:
                if battle_id in self._voted:
                    raise UsageError(f"battle {battle_id} already has its vote (vote {self._voted[battle_id]}); each "
                                     "battle takes one vote: start a new battle")
                raise UsageError(f"no battle {battle_id!r} is waiting for a vote (unknown, or older than "
                                 f"{PENDING_SECONDS / 60:.0f} minutes); start a new battle")
            try:
                vote_id = self._record(battle, vote)
            except BaseException:
                self._pending[battle_id] = battle  # not recorded: the battle may still take its vote
                raise
            self._voted[battle_id] = vote_id
            while len(self._voted) > VOTED_MEMORY:
                self._voted.popitem(last=False)
        return {"vote_id": vote_id, "vote": vote, "A": battle.a.name, "B": battle.b.name}

    def _record(self, battle: Battle, vote: str) -> int:
        """Store the vote with the models in the fixed order (the base, or the smaller key, in the first slot)."""
        a, b = battle.a, battle.b
        a_first = a.slot is BASE_SLOT or (b.slot is not BASE_SLOT and a.key < b.key)
        first, second = (a, b) if a_first else (b, a)
        pair = {} if first.slot is BASE_SLOT else {"left_id": first.adapter_id, "left_name": first.name,
                                                   "left_sha256": first.sha256}
        return self.votes.record(
            base_id=self.engine.base_id, adapter_name=second.name, adapter_id=second.adapter_id,
            adapter_sha256=second.sha256, prompt=battle.prompt, answer_a=battle.answer_a, answer_b=battle.answer_b,
            a_side="base" if a_first else "adapter", vote=vote, system_prompt=battle.system_prompt,
            settings={**battle.settings, "mode": "arena", "battle": battle.id}, uid=battle.id, **pair)

    # ------------------------------------------------------------------ standings

    def standings(self) -> Standings:
        """Ratings of every model voted on with this base (recomputed when the store changed)."""
        n = self.votes.count()
        with self._lock:
            if self._standings and self._standings[0] == n:
                return self._standings[1]
        base = self.engine.base_id
        every = self.votes.votes()
        mine = [v for v in every if v["base_id"] == base]
        merged = merge([(str(self.votes.path), mine)])
        loaded = {c.key: c for c in self.contestants()}
        ratings = bradley_terry(tally(merged.battles(), loaded), rounds=self.rounds) if merged.votes else None
        names = {**merged.names, **{k: c.name for k, c in loaded.items()}}
        result = Standings(ratings, names, set(loaded), len(every) - len(mine))
        with self._lock:
            self._standings = (n, result)
        return result


@dataclass
class Standings:
    """The live table: `ratings` (None before the first vote), each key's display name, which keys are loaded
    now, and how many votes of the store are of other bases (left out here)."""

    ratings: Ratings | None
    names: dict[str, str]
    loaded: set[str]
    other_bases: int

    HEADERS = ("rank", "model", "rating", "95% CI", "votes", "win rate")

    def rows(self) -> list[list]:
        r = self.ratings
        if r is None:
            return []
        rows = []
        rate = r.win_rate()
        for rank, i in enumerate(r.order(), 1):
            key = r.models[i]
            name = self.names.get(key, key) + ("" if key in self.loaded else " (not loaded)")
            seen = math.isfinite(r.ci_low[i])
            rows.append([rank, name, f"{r.rating[i]:.0f}" if seen else "no votes",
                         f"{r.ci_low[i]:.0f} to {r.ci_high[i]:.0f}" if seen else "n/a", int(r.votes[i]),
                         "n/a" if math.isnan(rate[i]) else f"{100 * rate[i]:.0f}%"])
        return rows

    def note(self) -> str:
        """What the table leaves out or cannot compare, in one line ("" when nothing)."""
        parts = []
        if self.other_bases:
            parts.append(f"{self.other_bases} vote(s) of other bases in this store are not shown "
                         "(`persona-lora leaderboard` rates them all)")
        if self.ratings and len([g for g in self.ratings.groups if len(g) > 1]) > 1:
            parts.append("some models were never compared with the others, directly or through a third: ratings "
                         "across those groups are not comparable yet")
        if self.ratings and any(k not in self.loaded for k in self.ratings.models):
            parts.append("models marked (not loaded) have votes in the store but are not loaded in this demo")
        return "; ".join(parts)
