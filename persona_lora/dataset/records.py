"""Records of any supported format -> normalized conversations, with every problem of a dataset found at once.

A record becomes `{"messages": [...], "origin": "file.jsonl:12"}`: an optional system message first, then
user/assistant turns alternating, ending with an assistant turn. Each problem names the place (file and line or
record), the field, what is wrong and how to fix it; all are collected rather than stopping at the first, because
a user fixing a 2,000-record file one error per run gives up.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
from collections import Counter
from typing import Any

from persona_lora.errors import DataError

logger = logging.getLogger("persona_lora.dataset.reading")  # the warnings belong to loading a dataset

Record = dict[str, Any]

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
FORMAT_KEYS = {
    "alpaca": ("instruction", "input", "output", "system", "history"),
    "messages": ("messages",),
    "sharegpt": ("conversations", "system"),
}
FORMAT_LABELS = {
    "alpaca": "Alpaca (instruction/output)",
    "messages": "chat 'messages' (role/content)",
    "sharegpt": "ShareGPT 'conversations' (from/value)",
}
MAX_LISTED_PROBLEMS = 50


def data_error(problems: list[str], source: str) -> DataError:
    """A DataError whose message lists at most MAX_LISTED_PROBLEMS problems (`.problems` keeps them all).

    A file with 10,000 bad lines should not print 10,000 lines; the first 50 show the pattern."""
    err = DataError(problems, source=source)
    if len(problems) > MAX_LISTED_PROBLEMS:
        n = len(problems)
        shown = "".join(f"\n  - {p}" for p in problems[:MAX_LISTED_PROBLEMS])
        err.args = (f"{source}: {n} problems found{shown}\n  ... and {n - MAX_LISTED_PROBLEMS} more",)
    return err


@dataclasses.dataclass
class BadLine:
    """A JSONL line that is not JSON: carried along so its problem is listed in line order with the others."""

    problem: str


def validate_items(items: list[tuple[str, str, Any]], name: str, display: str) -> tuple[list[Record], str]:
    """Normalize every item, collect every problem, check one format per file, warn once about unknown keys."""
    problems: list[str] = []
    records: list[Record] = []
    formats: dict[str, list[str]] = {}
    unknown: Counter[str] = Counter()
    for place, origin, item in items:
        fmt, messages, item_problems, extra = _normalize(item, place)
        problems += item_problems
        unknown.update(extra)
        if fmt:
            formats.setdefault(fmt, []).append(place)
        if messages is not None and not item_problems:
            records.append({"messages": messages, "origin": origin})
    if len(formats) > 1:
        parts = [f"{len(places)} record{'s' if len(places) != 1 else ''} in {FORMAT_LABELS[f]}, first at {places[0]}"
                 for f, places in sorted(formats.items(), key=lambda kv: -len(kv[1]))]
        problems.append(f"{name}: mixed formats in one file: {'; '.join(parts)}; fix: convert all records to one "
                        f"format (or split the file)")
    if problems:
        raise data_error(problems, display)
    if unknown:
        fmt = next(iter(formats))
        keys = ", ".join(f"{k!r} ({n} record{'s' if n != 1 else ''})" for k, n in sorted(unknown.items()))
        logger.warning("%s: ignoring unknown keys %s; %s records use %s", name, keys, FORMAT_LABELS[fmt],
                       ", ".join(repr(k) for k in FORMAT_KEYS[fmt]))
    return records, next(iter(formats))


def _normalize(item: Any, place: str) -> tuple[str | None, list[dict] | None, list[str], list[str]]:
    """One raw item -> (format, messages, problems, unknown keys)."""
    if isinstance(item, BadLine):
        return None, None, [item.problem], []
    if not isinstance(item, dict):
        return None, None, [f"{place}: expected a record object {{...}}, got {json_type(item)}; fix: make each "
                            f"record a JSON object with its fields"], []
    present = [f for f, key in (("messages", "messages"), ("sharegpt", "conversations"), ("alpaca", "instruction"),
                                ("alpaca", "output")) if key in item]
    kinds = list(dict.fromkeys(present))
    if len(kinds) > 1:
        return None, None, [f"{place}: the record mixes formats ({', '.join(FORMAT_LABELS[k] for k in kinds)}); "
                            f"fix: keep the fields of one format only"], []
    if not kinds:
        return None, None, [_no_format_problem(item, place)], []
    fmt = kinds[0]
    extra = [k for k in item if k not in FORMAT_KEYS[fmt]]
    if fmt == "alpaca":
        messages, problems = _alpaca(item, place)
    elif fmt == "messages":
        messages, problems = _chat(item, place, "messages", "role", "content", {r: r for r in ROLES}, None)
    else:
        messages, problems = _chat(item, place, "conversations", "from", "value", SHAREGPT_ROLES,
                                   item.get("system"))
    return fmt, messages, problems, extra


def _no_format_problem(item: dict, place: str) -> str:
    """No known key: suggest the key the user probably misspelled."""
    known = ["instruction", "output", "input", "messages", "conversations"]
    renames = [f"{k!r} to {m[0]!r}" for k in item if (m := difflib.get_close_matches(str(k), known, n=1))]
    hint = f" (misspelled? rename {', '.join(renames)})" if renames else ""
    keys = ", ".join(repr(k) for k in item) or "none"
    return (f"{place}: record is in no known format (keys: {keys}){hint}; fix: use Alpaca ('instruction', "
            f"'output'), chat 'messages' (role/content) or ShareGPT 'conversations' (from/value)")


def _alpaca(item: dict, place: str) -> tuple[list[dict], list[str]]:
    """instruction(+input) -> user, output -> assistant, history -> earlier turns, system -> system message."""
    problems: list[str] = []
    instruction = _text_field(item, "instruction", place, problems, required=True,
                              what="the user's message (the question or command)")
    inp = _text_field(item, "input", place, problems, required=False)
    output = _text_field(item, "output", place, problems, required=True, what="the persona's answer")
    system = _text_field(item, "system", place, problems, required=False)
    history = _history(item.get("history"), place, problems)
    messages = [{"role": "system", "content": system}] if system and system.strip() else []
    for user, assistant in history:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    user = instruction + ("\n" + inp if inp and inp.strip() else "") if instruction is not None else None
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    return messages, problems


def _text_field(item: dict, key: str, place: str, problems: list[str], *, required: bool,
                what: str = "") -> str | None:
    """A string field: missing (with did-you-mean), wrong type, empty — each its own problem."""
    value = item.get(key)
    if value is None:
        if required:
            near = difflib.get_close_matches(key, [str(k) for k in item if k not in FORMAT_KEYS["alpaca"]], n=1)
            fix = f"rename {near[0]!r} to {key!r}" if near else f"add {key!r} with {what}"
            state = "is null" if key in item else "is missing"
            problems.append(f"{place}, field {key!r}: required field {state}; fix: {fix}")
        return None
    if not isinstance(value, str):
        problems.append(f"{place}, field {key!r}: expected a string, got {json_type(value)}; fix: write it as "
                        f"text in quotes, e.g. \"{key}\": \"...\"")
        return None
    if required and not value.strip():
        problems.append(f"{place}, field {key!r}: is empty (or only whitespace); fix: write {what} there, or "
                        f"remove the record")
    if (bad := unencodable(value)) is not None:
        problems.append(f"{place}, field {key!r}: {bad}")
        return None
    return value


def unencodable(text: str) -> str | None:
    """What makes `text` impossible to tokenize (a lone surrogate from a bad `\\ud8xx` escape), with the fix; None
    when it is fine. JSON allows such escapes, but no tokenizer can encode them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return (f"holds a lone surrogate \\u{ord(text[e.start]):04x} at character {e.start + 1} (half of an escaped "
                "character pair, not text); fix: repair or remove that escape")
    return None


def _history(value: Any, place: str, problems: list[str]) -> list[tuple[str, str]]:
    """`history` is [[user, assistant], ...] of non-empty strings; anything else is reported pair by pair."""
    if value is None:
        return []
    fix = 'fix: write history as [["earlier question", "earlier answer"], ...]'
    if not isinstance(value, list):
        problems.append(f"{place}, field 'history': expected a list of [user, assistant] pairs, got "
                        f"{json_type(value)}; {fix}")
        return []
    pairs = []
    for i, pair in enumerate(value):
        field = f"history[{i}]"
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(s, str) for s in pair)):
            problems.append(f"{place}, field {field!r}: expected a [user, assistant] pair of two strings, got "
                            f"{json_type(pair)}; {fix}")
        elif not all(s.strip() for s in pair):
            problems.append(f"{place}, field {field!r}: a turn is empty (or only whitespace); fix: write both the "
                            f"question and the answer, or remove the pair")
        elif bad := next((b for b in map(unencodable, pair) if b), None):
            problems.append(f"{place}, field {field!r}: {bad}")
        else:
            pairs.append((pair[0], pair[1]))
    return pairs


def _chat(item: dict, place: str, field: str, role_key: str, content_key: str, role_map: dict[str, str],
          system: Any) -> tuple[list[dict], list[str]]:
    """`messages` / `conversations`: check each turn's types and role, then the turn structure."""
    problems: list[str] = []
    turns = item.get(field)
    if not isinstance(turns, list):
        problems.append(f"{place}, field {field!r}: expected a list of turns, got {json_type(turns)}; fix: write "
                        f'"{field}": [{{"{role_key}": "...", "{content_key}": "..."}}, ...]')
        return [], problems
    if not turns:
        problems.append(f"{place}, field {field!r}: the list is empty; fix: add user and assistant turns, or "
                        f"remove the record")
        return [], problems
    messages: list[dict] = []
    labels: list[str] = []
    if system is not None:
        if not isinstance(system, str):
            problems.append(f"{place}, field 'system': expected a string, got {json_type(system)}; fix: write the "
                            f"system prompt as text in quotes")
        elif (bad := unencodable(system)) is not None:
            problems.append(f"{place}, field 'system': {bad}")
        elif system.strip():
            messages.append({"role": "system", "content": system})
            labels.append("system")
    ok = True
    for i, turn in enumerate(turns):
        label = f"{field}[{i}]"
        message = chat_turn(turn, place, label, role_key, content_key, role_map, problems)
        if message is None:
            ok = False
        else:
            messages.append(message)
            labels.append(label)
    if ok:
        problems += check_structure(messages, labels, place)
    return messages, problems


def chat_turn(turn: Any, place: str, label: str, role_key: str, content_key: str, role_map: dict[str, str],
               problems: list[str]) -> dict | None:
    """One turn -> {"role", "content"} or None (after appending its problems)."""
    if not isinstance(turn, dict):
        problems.append(f"{place}, field {label!r}: expected an object {{\"{role_key}\": ..., \"{content_key}\": "
                        f"...}}, got {json_type(turn)}; fix: write each turn as such an object")
        return None
    before = len(problems)
    role = turn.get(role_key)
    known = list(role_map)
    if not isinstance(role, str):
        state = "is missing" if role is None else f"is {json_type(role)}"
        problems.append(f"{place}, field '{label}.{role_key}': {state}; fix: set it to one of "
                        f"{', '.join(repr(r) for r in known)}")
    elif role not in role_map:
        near = difflib.get_close_matches(role, known, n=1)
        fix = f"did you mean {near[0]!r}?" if near else f"use one of {', '.join(repr(r) for r in known)}"
        problems.append(f"{place}, field '{label}.{role_key}': unknown role {role!r}; {fix}")
    content = turn.get(content_key)
    if not isinstance(content, str):
        state = "is missing" if content is None else f"expected a string, got {json_type(content)}"
        extra = " (multi-part content is not supported: join the text parts)" if isinstance(content, list) else ""
        problems.append(f"{place}, field '{label}.{content_key}': {state}{extra}; fix: write the turn's text as a "
                        f"string")
    elif not content.strip():
        problems.append(f"{place}, field '{label}.{content_key}': is empty (or only whitespace); fix: write the "
                        f"text, or remove the turn")
    elif (bad := unencodable(content)) is not None:
        problems.append(f"{place}, field '{label}.{content_key}': {bad}")
    if len(problems) > before:
        return None
    return {"role": role_map[role], "content": content}


def check_structure(messages: list[dict], labels: list[str], place: str) -> list[str]:
    """Optional system first, then user/assistant alternating from a user turn, ending with an assistant turn."""
    problems = []
    for i, m in enumerate(messages):
        if m["role"] == "system" and i > 0:
            problems.append(f"{place}, field {labels[i]!r}: a system message may only come first; fix: move it to "
                            f"the start (one system message per record)")
    turns = [(labels[i], m["role"]) for i, m in enumerate(messages) if m["role"] != "system"]
    if not turns:
        return problems + [f"{place}: only a system message, no user or assistant turns; fix: add them"]
    if turns[0][1] != "user":
        problems.append(f"{place}, field {turns[0][0]!r}: the conversation starts with an assistant turn; fix: "
                        f"add the user's message before it (after an optional system message), or remove it")
    for (prev_label, prev_role), (label, role) in zip(turns, turns[1:]):
        if role == prev_role:
            other = "assistant" if role == "user" else "user"
            problems.append(f"{place}, fields {prev_label!r} and {label!r}: two {role} turns in a row; user and "
                            f"assistant turns must alternate; fix: merge them, or add the {other} turn between them")
    if all(role != "assistant" for _, role in turns):
        problems.append(f"{place}: no assistant turn, so nothing to train on; fix: add the assistant's reply")
    elif turns[-1][1] == "user":
        problems.append(f"{place}, field {turns[-1][0]!r}: the conversation ends with a user turn; fix: add the "
                        f"assistant's reply after it, or remove it")
    return problems


def json_type(value: Any) -> str:
    """'a number (42)' — the JSON name of a value's type plus a short excerpt, for 'expected X, got Y'."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        kind = "a boolean"
    elif isinstance(value, (int, float)):
        kind = "a number"
    elif isinstance(value, str):
        kind = "a string"
    elif isinstance(value, list):
        kind = "a list"
    elif isinstance(value, dict):
        kind = "an object"
    else:
        kind = type(value).__name__
    text = json.dumps(value, ensure_ascii=False, default=str)
    return f"{kind} ({text[:40] + '…' if len(text) > 40 else text})"
