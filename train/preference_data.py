"""Preference data for DPO and KTO: the demo's votes or a preference file, validated, counted and tokenized.

Sources (one per run):
- the demo's vote database (SQLite, `persona-lora demo --votes PATH`), read without writing to it;
- a `.json`/`.jsonl` file in TRL's conversational formats: pairs `prompt`/`chosen`/`rejected` (what the demo's
  export writes) or single judgements `prompt`/`completion`/`label` (KTO). `prompt` is a list of messages
  (optional system, then user/assistant turns ending with a user turn); `chosen`, `rejected` and `completion` are
  lists of one assistant message; `label` is true (desirable) or false.

From votes to data, stated (and counted, so the manifest and `data check` say what became of every vote):
a decisive vote (A or B) is a pair, the winner's answer chosen; "both bad" is two undesirable examples (KTO
only: DPO has no pair to learn from); a tie is dropped; a vote whose two answers are the same text, or one of
them empty, is dropped; the same prompt voted both ways (two votes on the same two answers, each preferring the
other) is kept, and counted. For KTO every pair is two examples, its chosen answer desirable and its rejected one
not.

Prompts are tokenized through the one formatting path (`train.chat_format`), with the configured system prompt
for prompts without their own, exactly as SFT and inference format them: a pair's prompt ids are what the demo
feeds the model, its answer ids the answer and its single EOS (what SFT puts labels on). TRL's trainers would
render the conversations again with `apply_chat_template`; `preference_train` gives them these ids instead.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from persona_lora.dataset.records import ROLES, chat_turn, check_structure, data_error, json_type
from persona_lora.errors import DataError

SQLITE_MAGIC = b"SQLite format 3\x00"
PAIR_KEYS = ("prompt", "chosen", "rejected")
UNPAIRED_KEYS = ("prompt", "completion", "label")
_ROLE_MAP = {r: r for r in ROLES}
_HUGE = 10**9

# what became of the votes / records: the keys of `PreferenceSet.counts`, in the order `data check` prints them
DECISIVE, BOTH_BAD, TIES, IDENTICAL, EMPTY, CONFLICTING = (
    "decisive votes (pairs)", "both-bad votes (2 undesirable examples each, KTO only)", "ties (dropped)",
    "same answer on both sides (dropped)", "an empty answer (dropped)", "prompts voted both ways (kept)")


@dataclass
class PreferenceSet:
    """Validated preference data: pairs and/or single judgements, with where it came from and the counts."""

    kind: str  # votes | pairs | unpaired
    name: str  # file name, never an absolute path
    sha256: str
    pairs: list[dict] = field(default_factory=list)  # {"prompt": [...], "chosen": str, "rejected": str, "origin"}
    singles: list[dict] = field(default_factory=list)  # {"prompt": [...], "completion": str, "label": bool, ...}
    counts: dict[str, int] = field(default_factory=dict)
    win_rates: list[dict] = field(default_factory=list)  # votes only: per pair of models
    source: str = "local"  # local | hub (a hub dataset: `name` is its id)

    def examples(self, method: str) -> list[dict]:
        """DPO: the pairs. KTO: every pair as a desirable and an undesirable example, then the single ones."""
        if method == "dpo":
            if not self.pairs:
                why = ("it holds single judgements (prompt/completion/label), which only KTO trains on"
                       if self.singles else "it holds no decisive vote or pair")
                raise DataError(f"{self.name}: no preference pairs for DPO: {why}; fix: use --method kto, or give "
                                "pairs (prompt/chosen/rejected)", self.name)
            return list(self.pairs)
        out = []
        for p in self.pairs:
            out.append({"prompt": p["prompt"], "completion": p["chosen"], "label": True, "origin": p["origin"]})
            out.append({"prompt": p["prompt"], "completion": p["rejected"], "label": False, "origin": p["origin"]})
        out += self.singles
        if not out:
            raise DataError(f"{self.name}: no examples for KTO (every vote was a tie or dropped); fix: collect "
                            "decisive or 'both bad' votes first", self.name)
        return out


def is_preference_source(path: str) -> bool:
    """Whether `path` is a vote database or a preference file (its first record has prompt and chosen or
    completion), so `data check` knows which checks to run."""
    p = Path(path).expanduser()
    if not p.is_file():
        return False
    with open(p, "rb") as f:
        head = f.read(65536)
    if head.startswith(SQLITE_MAGIC):
        return True
    text = head.decode("utf-8", errors="replace").lstrip("\ufeff").lstrip()
    first = None
    if p.suffix.lower() == ".jsonl":
        line = text.split("\n", 1)[0]
        try:
            first = json.loads(line)
        except ValueError:
            return False
    elif text.startswith("["):
        try:
            first, _ = json.JSONDecoder().raw_decode(text[1:].lstrip())
        except ValueError:
            return False
    return isinstance(first, dict) and "prompt" in first and ("chosen" in first or "completion" in first)


def load_preferences(source: str, *, revision: str | None = None) -> PreferenceSet:
    """Read a vote database, a preference file or a hub dataset of preference records (e.g. the votes the demo
    pushed: its default config is the pairs); DataError listing every problem (file, line, field, fix)."""
    from persona_lora.dataset.reading import check_path, looks_like_hub_id

    path = Path(source).expanduser()
    if path.is_file() and path.read_bytes()[:16] == SQLITE_MAGIC:
        return _from_votes(path)
    if not path.exists() and looks_like_hub_id(source):
        return _from_hub(source, revision)
    check_path(path, source)
    return _from_file(path, source)


# ----------------------------------------------------------------------------------------------- votes


def _from_votes(path: Path) -> PreferenceSet:
    from persona_lora.votes import read_votes

    raw = path.read_bytes()
    votes = read_votes(path)
    counts = Counter({"votes": len(votes), DECISIVE: 0, BOTH_BAD: 0, TIES: 0, IDENTICAL: 0, EMPTY: 0,
                      CONFLICTING: 0})
    pairs, singles = [], []
    verdicts: dict[tuple, set[str]] = {}
    for v in votes:
        origin = f"{path.name}:vote {v['id']}"
        left, right = (v["answer_a"], v["answer_b"]) if v["a_side"] == "base" else (v["answer_b"], v["answer_a"])
        prompt = ([{"role": "system", "content": v["system_prompt"]}] if v["system_prompt"] else []) + [
            {"role": "user", "content": v["prompt"]}]
        if v["winner"] == "tie":
            counts[TIES] += 1
        elif not left.strip() or not right.strip():
            counts[EMPTY] += 1
        elif left == right:
            counts[IDENTICAL] += 1
        elif v["winner"] == "both_bad":
            counts[BOTH_BAD] += 1
            singles += [{"prompt": prompt, "completion": text, "label": False, "origin": origin,
                         "models": vote_models(v)} for text in (left, right)]
        else:
            chosen, rejected = (left, right) if v["winner"] == "base" else (right, left)
            counts[DECISIVE] += 1
            pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "origin": origin,
                          "models": vote_models(v)})
            key = (v["system_prompt"], v["prompt"], frozenset((left, right)))
            verdicts.setdefault(key, set()).add(chosen)
    conflicting = {k for k, chosen in verdicts.items() if len(chosen) > 1}
    counts[CONFLICTING] = len(conflicting)
    return PreferenceSet("votes", path.name, hashlib.sha256(raw).hexdigest(), pairs, singles, dict(counts),
                         _win_rates(votes))


def vote_models(vote: dict) -> list[dict]:
    """The adapters whose answers a vote judged: the adapter slot, and the first slot when it was an adapter too
    (`id` as the demo recorded it; `sha256` of its weights when the vote records it)."""
    models = [{"id": vote["adapter_id"], "sha256": vote.get("adapter_sha256")}]
    if vote.get("left_id"):
        models.append({"id": vote["left_id"], "sha256": vote.get("left_sha256")})
    return models


def votes_for_other_adapters(ps: PreferenceSet, ids: set[str], sha256: str | None) -> dict[str, int]:
    """Training examples from votes that judged none of the given adapter's answers, per adapter judged. An adapter
    is the given one when the vote records its weights' sha256 and it matches, else when its recorded id is one of
    `ids` (the demo records a local adapter by its folder name, a hub one as id@commit)."""
    def same(model: dict) -> bool:
        if model["sha256"] and sha256:
            return model["sha256"] == sha256
        return model["id"] in ids

    other: dict[str, int] = {}
    seen = set()
    for example in ps.pairs + ps.singles:
        models = example.get("models")
        if not models or example["origin"] in seen or any(same(m) for m in models):
            continue
        seen.add(example["origin"])  # a both-bad vote gives two examples: count the vote once
        label = " vs ".join(m["id"] for m in models)
        other[label] = other.get(label, 0) + 1
    return other


def require_votes_for(ps: PreferenceSet, adapter: str, ids: set[str], sha256: str | None, *, allow: bool,
                      print_fn=print) -> None:
    """Preference tuning from `--init-adapter` learns from judgements of that adapter's answers; votes cast on
    another adapter's answers would tune it towards (or away from) a different model. Refused (UsageError naming
    the adapters and counts) unless `allow`, then printed as a warning."""
    from persona_lora.errors import UsageError

    other = votes_for_other_adapters(ps, ids, sha256)
    if not other:
        return
    n = sum(other.values())
    listed = ", ".join(f"{name}: {count}" for name, count in sorted(other.items()))
    what = f"{n} vote(s) in {ps.name} judged another adapter's answers than --init-adapter {adapter} ({listed})"
    if allow:
        print_fn(f"warning: {what}; training on them (--allow-other-adapter)")
        return
    raise UsageError(f"{what}; tuning {adapter} on them would move it towards another model's answers. Collect votes "
                     f"with the demo on {adapter}, or pass --allow-other-adapter to train on them anyway")


def _win_rates(votes: list[dict]) -> list[dict]:
    """Per pair of models, the counts the demo's table shows (model_b is the adapter slot)."""
    table: dict[tuple, Counter] = {}
    for v in votes:
        key = (v.get("left_id") or "base", v["adapter_id"])
        table.setdefault(key, Counter())[v["winner"]] += 1
    rows = []
    for (a, b), c in sorted(table.items()):
        decisive = c["base"] + c["adapter"]
        rows.append({"model_a": b, "model_b": a, "votes": sum(c.values()), "a_wins": c["adapter"],
                     "b_wins": c["base"], "ties": c["tie"], "both_bad": c["both_bad"],
                     "win_rate": round(c["adapter"] / decisive, 4) if decisive else None})
    return rows


# ----------------------------------------------------------------------------------------------- files


def _from_file(path: Path, display: str) -> PreferenceSet:
    from persona_lora.dataset.reading import read_json_items

    raw, items = read_json_items(path, display)
    return _validated(items, path.name, display, hashlib.sha256(raw).hexdigest())


def _from_hub(hub_id: str, revision: str | None) -> PreferenceSet:
    """A hub dataset's train split through `datasets` (canonical JSON of the rows hashed, as for SFT data)."""
    import datasets

    try:
        rows = [dict(r) for r in datasets.load_dataset(hub_id, revision=revision, split="train")]
    except Exception as e:  # datasets raises many types (connection, not found, bad split); all mean the same
        detail = f"{type(e).__name__}: {e}".replace("\n", " ")[:300]
        raise data_error([f"{hub_id}: could not load the hub dataset ({detail}); fix: check the id, the revision "
                          "and HF_ENDPOINT, or give a local file"], hub_id) from e
    canonical = json.dumps(rows, ensure_ascii=False, sort_keys=True, separators=(",", ":"), default=str)
    items = [(f"{hub_id}, record {i}", f"{hub_id}:record {i}", row) for i, row in enumerate(rows, 1)]
    ps = _validated(items, hub_id, hub_id, hashlib.sha256(canonical.encode("utf-8")).hexdigest())
    ps.source = "hub"
    return ps


def _validated(items: list, name: str, display: str, sha256: str) -> PreferenceSet:
    problems: list[str] = []
    pairs, singles, kinds = [], [], {}
    for place, origin, item in items:
        kind, example = _record(item, place, problems)
        if kind:
            kinds.setdefault(kind, place)
        if example is not None:
            example["origin"] = origin
            (pairs if kind == "pairs" else singles).append(example)
    if len(kinds) > 1:
        problems.append(f"{name}: mixed formats: pairs (prompt/chosen/rejected) first at {kinds['pairs']}, single "
                        f"judgements (prompt/completion/label) first at {kinds['unpaired']}; fix: one format per file")
    if not items:
        problems.append(f"{name}: no records; fix: write preference records into it")
    if problems:
        raise data_error(problems, display)
    kind = next(iter(kinds))
    same = [p for p in pairs if p["chosen"] == p["rejected"]]
    pairs = [p for p in pairs if p["chosen"] != p["rejected"]]
    counts = {"records": len(items), ("pairs" if kind == "pairs" else "single judgements"): len(pairs or singles)}
    if same:
        counts[IDENTICAL] = len(same)
    if singles:
        counts["desirable"] = sum(s["label"] for s in singles)
        counts["undesirable"] = len(singles) - counts["desirable"]
    verdicts: dict[tuple, set[str]] = {}
    for p in pairs:
        key = (json.dumps(p["prompt"], ensure_ascii=False), frozenset((p["chosen"], p["rejected"])))
        verdicts.setdefault(key, set()).add(p["chosen"])
    if pairs:
        counts[CONFLICTING] = sum(len(c) > 1 for c in verdicts.values())
    return PreferenceSet(kind, name, sha256, pairs, singles, counts)


def _record(item: Any, place: str, problems: list[str]) -> tuple[str | None, dict | None]:
    """One record -> (pairs | unpaired, normalized example or None), appending its problems."""
    from persona_lora.dataset.reading import BadLine

    if isinstance(item, BadLine):
        problems.append(item.problem)
        return None, None
    if not isinstance(item, dict):
        problems.append(f"{place}: expected a record object {{...}}, got {json_type(item)}; fix: write each record "
                        "as an object with prompt, chosen and rejected (or prompt, completion and label)")
        return None, None
    if "chosen" in item or "rejected" in item:
        kind, keys = "pairs", PAIR_KEYS
    elif "completion" in item or "label" in item:
        kind, keys = "unpaired", UNPAIRED_KEYS
    else:
        problems.append(f"{place}: a preference record needs prompt, chosen and rejected (DPO pairs) or prompt, "
                        f"completion and label (KTO); it has {', '.join(map(repr, item)) or 'no keys'}; fix: use one "
                        "of those formats")
        return None, None
    before = len(problems)
    for key in keys:
        if key not in item or item[key] is None:
            problems.append(f"{place}, field {key!r}: required field is missing; fix: add it (format: "
                            f"{'/'.join(keys)})")
    if len(problems) > before:
        return kind, None
    prompt = _messages(item["prompt"], place, "prompt", problems)
    if kind == "unpaired":
        completion = _answer(item["completion"], place, "completion", problems)
        if not isinstance(item["label"], bool):
            problems.append(f"{place}, field 'label': expected true or false, got {json_type(item['label'])}; "
                            "fix: true for a desirable answer, false for an undesirable one")
        answers = {"completion": completion}
    else:
        answers = {k: _answer(item[k], place, k, problems) for k in ("chosen", "rejected")}
    if len(problems) > before or prompt is None:
        return kind, None
    for key, text in answers.items():
        msgs = [*prompt, {"role": "assistant", "content": text}]
        labels = [f"prompt[{i}]" for i in range(len(prompt))] + [f"{key}[0]"]
        problems += check_structure(msgs, labels, place)
    if len(problems) > before:
        return kind, None
    if kind == "pairs":
        return kind, {"prompt": prompt, **answers}
    return kind, {"prompt": prompt, "completion": answers["completion"], "label": item["label"]}


def _messages(value: Any, place: str, key: str, problems: list[str]) -> list[dict] | None:
    if not isinstance(value, list) or not value:
        what = "an empty list" if value == [] else json_type(value)
        problems.append(f"{place}, field {key!r}: expected a list of messages, got {what}; fix: write "
                        f'"{key}": [{{"role": "user", "content": "..."}}] (TRL\'s conversational format)')
        return None
    out = [chat_turn(turn, place, f"{key}[{i}]", "role", "content", _ROLE_MAP, problems)
           for i, turn in enumerate(value)]
    return None if any(m is None for m in out) else out


def _answer(value: Any, place: str, key: str, problems: list[str]) -> str | None:
    """`[{"role": "assistant", "content": "..."}]` -> its text."""
    msgs = _messages(value, place, key, problems)
    if msgs is None:
        return None
    if len(msgs) != 1 or msgs[0]["role"] != "assistant":
        problems.append(f"{place}, field {key!r}: expected one assistant message, got "
                        f"{', '.join(m['role'] for m in msgs)}; fix: "
                        f'"{key}": [{{"role": "assistant", "content": "..."}}]')
        return None
    return msgs[0]["content"]


# ----------------------------------------------------------------------------------------------- tokens


@dataclass
class EncodedPreferences:
    """Token ids for TRL's collators, and what encoding did to the examples (counted, never silent)."""

    rows: list[dict]  # DPO: prompt_ids, chosen_ids, rejected_ids; KTO: prompt_ids, completion_ids, label
    origins: list[str]
    truncated: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    tokens: int = 0
    needed_length: int = 0  # the data.max_length that keeps every example whole (prompt + longest answer + EOS)


def encode_preferences(tokenizer, examples: list[dict], method: str, *, system_prompt: str | None, max_length: int,
                       overlong: str = "truncate") -> EncodedPreferences:
    """Each example through the one formatting path: prompt ids as inference feeds them, answer ids the answer and
    its EOS. Over-long examples are cut from the left of the prompt (keeping its first token), or dropped with
    `overlong: drop` or when even the answers do not fit; both are counted."""
    from persona_lora.chat_format import conversation_for, encode_examples

    answers = ("chosen", "rejected") if method == "dpo" else ("completion",)
    convs = [conversation_for([*ex["prompt"], {"role": "assistant", "content": ex[a]}], system_prompt)
             for ex in examples for a in answers]
    encoded = encode_examples(tokenizer, convs, max_length=_HUGE, train_on="last")
    out = EncodedPreferences([], [])
    for i, ex in enumerate(examples):
        parts = [_split(encoded[i * len(answers) + k], ex["origin"]) for k in range(len(answers))]
        prompt = parts[0][0]
        if any(p != prompt for p, _ in parts):
            raise DataError(f"{ex['origin']}: the chat template renders this prompt differently before each answer; "
                            "use a prefix-stable template (--chat-template FILE)", ex["origin"])
        longest = max(len(a) for _, a in parts)
        out.needed_length = max(out.needed_length, len(prompt) + longest)
        if len(prompt) + longest > max_length:
            reason = (f"longer than max_length={max_length} (overlong: drop)" if overlong == "drop"
                      else f"answer + EOS alone exceeds max_length={max_length}")
            if overlong == "drop" or longest + 1 > max_length:
                out.dropped[reason] = out.dropped.get(reason, 0) + 1
                continue
            cut = len(prompt) + longest - max_length
            prompt = prompt[:1] + prompt[1 + cut:]
            out.truncated += 1
        row = {"prompt_ids": prompt, **{f"{a}_ids": ids for a, (_, ids) in zip(answers, parts)}}
        if method == "kto":
            row["label"] = bool(ex["label"])
        out.rows.append(row)
        out.origins.append(ex["origin"])
        out.tokens += len(prompt) * len(answers) + sum(len(ids) for _, ids in parts)
    return out


def _split(enc, origin: str) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids) of one encoded conversation: the answer is its last trained span."""
    from persona_lora.chat_format import IGNORE_INDEX

    trained = [i for i, label in enumerate(enc.labels) if label != IGNORE_INDEX]
    if not trained:
        raise DataError(f"{origin}: the answer encodes to no tokens; fix: write the answer text", origin)
    end = trained[-1] + 1
    start = end
    while start > 0 and enc.labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return list(enc.input_ids[:start]), list(enc.input_ids[start:end])


# ----------------------------------------------------------------------------------------------- data check


def format_preference_stats(ps: PreferenceSet) -> str:
    """What `data check` prints for a vote database or a preference file."""
    what = {"votes": "a vote database of the demo", "pairs": "preference pairs (DPO; KTO unpairs them)",
            "unpaired": "single judgements (KTO)"}[ps.kind]
    lines = [f"OK: {ps.name} is valid ({what}; sha256 {ps.sha256[:12]})"]
    lines += [f"  {label:<55} {value:,}" for label, value in ps.counts.items()]
    dpo = len(ps.pairs)
    kto = 2 * len(ps.pairs) + len(ps.singles)
    lines.append(f"  {'training examples':<55} dpo {dpo:,} pairs; kto {kto:,} examples")
    if ps.win_rates:
        lines.append("  win rates per pair (adapter slot vs the other; decisive votes):")
        for r in ps.win_rates:
            rate = "n/a" if r["win_rate"] is None else f"{100 * r['win_rate']:.0f}%"
            lines.append(f"    {r['model_a']} vs {r['model_b']}: {r['votes']} votes, {r['a_wins']}-{r['b_wins']}, "
                         f"{r['ties']} ties, {r['both_bad']} both bad, win rate {rate}")
    return "\n".join(lines)


def token_report(ps: PreferenceSet, tokenizer, *, system_prompt: str | None, max_length: int, base: str) -> str:
    """`data check --base`: the examples through the one formatting path, and what max_length would do to them."""
    lines = [f"tokens (tokenizer of {base}; system prompt: "
             f"{'none' if not system_prompt else f'{len(system_prompt)} chars'}):"]
    for method in ("dpo", "kto"):
        try:
            examples = ps.examples(method)
        except DataError:
            continue
        enc = encode_preferences(tokenizer, examples, method, system_prompt=system_prompt, max_length=max_length)
        dropped = sum(enc.dropped.values())
        lines.append(f"  {method:<6} {len(enc.rows):,} examples, {enc.tokens:,} tokens; at max_length {max_length}: "
                     f"{enc.truncated} truncated (prompt cut from the left), {dropped} dropped")
    return "\n".join(lines)
