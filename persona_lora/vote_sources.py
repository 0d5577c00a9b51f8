"""Votes from anywhere, counted once, between models identified by content: what ratings are fitted to.

Sources: the demo's SQLite store (`--votes`), a JSONL file of raw votes (`votes.jsonl`, what the demo's push and
a Space's scheduled push write), or a hub dataset of votes (its `votes` config). Several sources may be given;
a vote is counted once however many of them hold it, by its `uid` (schema 3), or, for a vote cast before votes
had one, by a hash of what it is (time, models, prompt, answers, vote): the same old vote read from a database
and from its export is still one vote.

A model is its content, not its display name (`model_keys`): the base is `base:<base id>`; an adapter is the
sha256 of its weights on that base, `sha256:<hex>@<base id>`, so renaming the adapter's folder keeps its votes
together and two different adapters with one name stay apart. An adapter whose vote carries no sha256 (votes
from before schema 3; an engine's served model given by name alone) falls back to its recorded id,
`id:<adapter id>@<base id>`. The base is known by its id (hub id, or a local folder's name): renaming a local
base's folder starts a new base.

Every problem is one message naming the source and the fix: a file of another schema, a store with no votes,
a hub dataset that is not votes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from persona_lora.errors import UsageError
from persona_lora.votes import ADDED_COLUMNS, COLUMNS, VOTES, read_votes

SQLITE_MAGIC = b"SQLite format 3\x00"
REQUIRED = tuple(c for c in COLUMNS if c not in dict(ADDED_COLUMNS) and c != "id")
BASE_PREFIX = "base:"


def base_key(base_id: str) -> str:
    return f"{BASE_PREFIX}{base_id}"


def adapter_key(base_id: str, sha256: str | None, adapter_id: str) -> str:
    """An adapter on a base: by its weights' sha256 when known, else by its recorded id."""
    return f"sha256:{sha256}@{base_id}" if sha256 else f"id:{adapter_id}@{base_id}"


def model_keys(vote: dict) -> tuple[str, str]:
    """(first slot, adapter slot) of a vote as content keys (see the module docstring)."""
    base = vote["base_id"]
    left = base_key(base) if not vote.get("left_id") else adapter_key(base, vote.get("left_sha256"), vote["left_id"])
    return left, adapter_key(base, vote.get("adapter_sha256"), vote["adapter_id"])


def outcome(vote: dict) -> str:
    """"left" (the first slot won), "right" (the adapter slot won) or "tie" (tie or both bad)."""
    return {"base": "left", "adapter": "right"}.get(vote["winner"], "tie")


def vote_uid(vote: dict) -> str:
    """The vote's own uid, or one derived from its content for votes cast before uids existed."""
    if vote.get("uid"):
        return str(vote["uid"])
    what = [vote.get(c) for c in ("created_at", "base_id", "adapter_id", "left_id", "system_prompt", "prompt",
                                  "answer_a", "answer_b", "a_side", "vote")]
    return "content:" + hashlib.sha256(json.dumps(what, ensure_ascii=False).encode("utf-8")).hexdigest()[:32]


@dataclass
class VoteSet:
    """Votes read from `sources`, each counted once; `duplicates` how many repeats were left out; `names` the
    display name of each model key (the newest vote's), `aliases` every other name it was voted under."""

    votes: list[dict]
    sources: list[str]
    read: int
    duplicates: int
    names: dict[str, str] = field(default_factory=dict)
    aliases: dict[str, list[str]] = field(default_factory=dict)

    def battles(self) -> list[tuple[str, str, str]]:
        """(left key, right key, outcome) per vote: what `ratings.tally` counts."""
        return [(*model_keys(v), outcome(v)) for v in self.votes]


def merge(batches: Iterable[tuple[str, list[dict]]]) -> VoteSet:
    """Votes of several sources, de-duplicated by `vote_uid`, oldest first within each source."""
    seen: set[str] = set()
    out: list[dict] = []
    sources, read = [], 0
    for source, votes in batches:
        sources.append(source)
        for v in votes:
            read += 1
            uid = vote_uid(v)
            if uid in seen:
                continue
            seen.add(uid)
            out.append(v)
    names: dict[str, str] = {}
    every: dict[str, set[str]] = {}
    for v in sorted(out, key=lambda v: str(v.get("created_at") or "")):
        left, right = model_keys(v)
        shown = {left: v.get("left_name") or v.get("left_id") or f"base: {v['base_id']}", right: v["adapter_name"]}
        for key, name in shown.items():
            names[key] = name
            every.setdefault(key, set()).add(name)
    aliases = {k: sorted(n - {names[k]}) for k, n in every.items() if len(n) > 1}
    return VoteSet(out, sources, read, read - len(out), names, aliases)


def load_votes(sources: list[str], *, revision: str | None = None) -> VoteSet:
    """Read every source (SQLite store, JSONL of votes, or hub dataset id) and merge them."""
    if not sources:
        raise UsageError("give at least one votes source: the demo's --votes file, a votes.jsonl, or a hub dataset")
    batches = [(s, read_source(s, revision=revision)) for s in sources]
    merged = merge(batches)
    if not merged.votes:
        raise UsageError(f"{', '.join(sources)}: no votes yet; cast some in the demo's Arena or Blind A/B tab (or "
                         "with its battle and vote API) first")
    return merged


def read_source(source: str, *, revision: str | None = None) -> list[dict]:
    """The votes of one source, checked to be votes (UsageError naming the source otherwise)."""
    from persona_lora.dataset.reading import looks_like_hub_id

    path = Path(source).expanduser()
    if path.is_file():
        with open(path, "rb") as f:
            head = f.read(16)
        if head == SQLITE_MAGIC:
            return read_votes(path)
        return _checked(_jsonl_rows(path, source), source)
    if path.is_dir():
        raise UsageError(f"{source} is a folder; give the votes file in it (the demo's votes.sqlite or a votes.jsonl)")
    if looks_like_hub_id(source):
        return _checked(_hub_rows(source, revision), source)
    raise UsageError(f"{source}: no such file, and it is not a hub dataset id (owner/name)")


def _jsonl_rows(path: Path, source: str) -> list[tuple[str, object]]:
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append((f"{source}, line {n}", json.loads(line)))
            except ValueError as e:
                raise UsageError(f"{source}, line {n}: not JSON ({e}); give the demo's votes.jsonl (one vote per "
                                "line) or its votes.sqlite") from None
    return rows


def _hub_rows(hub_id: str, revision: str | None) -> list[tuple[str, object]]:
    """The `votes` config of a dataset the demo or a Space pushed (its default config is the DPO pairs)."""
    import datasets

    try:
        rows = datasets.load_dataset(hub_id, "votes", revision=revision, split="train")
    except ValueError as e:  # datasets: no config of that name
        if "votes" in str(e) and "config" in str(e).lower():
            raise UsageError(f"{hub_id}: a hub dataset without a `votes` config, so not the votes of a persona-lora "
                             "demo or Space; give the dataset that `demo --push-votes-to` or a Space's votes_dataset "
                             "wrote") from None
        raise _hub_failed(hub_id, e) from e
    except Exception as e:  # datasets raises many types (connection, not found); all mean the same here
        raise _hub_failed(hub_id, e) from e
    return [(f"{hub_id}, record {n}", dict(r)) for n, r in enumerate(rows, 1)]


def _hub_failed(hub_id: str, e: Exception) -> UsageError:
    detail = f"{type(e).__name__}: {e}".replace("\n", " ")[:300]
    return UsageError(f"{hub_id}: no local file of that name, and as a hub dataset its votes could not be loaded "
                      f"({detail}); fix: check the path, or the id, revision and HF_ENDPOINT")


def _checked(rows: list[tuple[str, object]], source: str) -> list[dict]:
    """Rows that are votes; a file of another schema is named with what it lacks (the first bad row only)."""
    out = []
    for where, row in rows:
        if not isinstance(row, dict):
            raise UsageError(f"{where}: a {type(row).__name__}, not a vote object; give the demo's votes.jsonl")
        missing = [c for c in REQUIRED if c not in row]
        if missing:
            hint = (" (these are preference pairs, not votes: give votes.jsonl, beside preferences.jsonl)"
                    if "chosen" in row else "")
            raise UsageError(f"{where}: not a vote of the persona-lora demo, it lacks {', '.join(missing)}{hint}; "
                             "give the demo's votes.sqlite or votes.jsonl")
        if row["vote"] not in VOTES or row["winner"] not in ("base", "adapter", "tie", "both_bad"):
            raise UsageError(f"{where}: vote {row['vote']!r} / winner {row['winner']!r} is not one the demo records "
                             f"({', '.join(VOTES)})")
        out.append({c: row.get(c) for c in COLUMNS})
    return out
