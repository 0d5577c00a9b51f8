"""Load a persona dataset and validate it, reporting every problem at once.

Accepted input (one format per file):
- Alpaca: `instruction`, `output`, optional `input`, `system`, `history` ([[user, assistant], ...]);
- chat `messages`: [{"role": "system"|"user"|"assistant", "content": str}, ...];
- ShareGPT `conversations`: [{"from": "system"|"human"|"user"|"gpt"|"assistant", "value": str}, ...]
  (an optional top-level `system` string becomes the system message).

Sources: a local `.json` file (an array of records) or `.jsonl` file (one record per line), or a hub dataset id
(`owner/name`, anything that is not an existing path) loaded with `datasets.load_dataset`.

Everything is normalized to `Record = {"messages": [...], "origin": "file.jsonl:12"}`: an optional system
message first, then user/assistant turns alternating, ending with an assistant turn. A bad dataset raises
`DataError` whose `problems` list every problem, each naming the file, the line (JSONL) or record (JSON array,
counted from 1, with the line it starts on), the field, what is wrong and how to fix it. We collect rather than
stop at the first problem because a user fixing a 2,000-record file one error per run gives up.
"""

from __future__ import annotations

import bisect
import codecs
import dataclasses
import difflib
import hashlib
import json
import logging
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

from persona_lora.errors import DataError

logger = logging.getLogger(__name__)

Record = dict[str, Any]

SUPPORTED_SUFFIXES = {".json": "a JSON array of records", ".jsonl": "JSON Lines, one record per line"}
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
# Suffixes that mark a string as a file path even when it also looks like `owner/name`.
_FILE_LIKE_SUFFIXES = {".json", ".jsonl", ".csv", ".tsv", ".txt", ".parquet", ".arrow", ".xlsx", ".yaml", ".yml",
                       ".gz", ".zip", ".md"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_JSON_WS = re.compile(r"[ \t\n\r]*")


@dataclasses.dataclass
class LoadedDataset:
    """A validated dataset plus what the manifest needs to say where it came from."""

    records: list[Record]
    name: str  # file name or hub id, never an absolute path
    source: str  # "local" | "hub"
    sha256: str  # of the file bytes; for hub datasets of the canonical JSON of the rows
    path: str | None = None  # absolute path of a local file
    hub_id: str | None = None
    format: str | None = None  # "alpaca" | "messages" | "sharegpt"

    def __len__(self) -> int:
        return len(self.records)


# ----------------------------------------------------------------------------------------------- entry points


def load_records(source: str, *, revision: str | None = None, split: str = "train") -> LoadedDataset:
    """Load `source` (local .json/.jsonl file or hub dataset id) and return its normalized records.

    Raises DataError listing every problem found. `revision` and `split` only apply to hub datasets."""
    source = str(source)
    path = Path(source).expanduser()
    if path.exists() or not _looks_like_hub_id(source):
        if revision is not None:
            logger.warning("%s: --revision %s ignored: it only applies to hub datasets", source, revision)
        return _load_local(path, display=source)
    return _load_hub(source, revision=revision, split=split)


def dataset_stats(records: list[Record]) -> dict[str, int]:
    """Counts that `data check` prints and the manifest records, so users see what they are training on."""
    stats = {"records": len(records), "turns": 0, "assistant_turns": 0, "user_chars": 0, "assistant_chars": 0,
             "records_with_system": 0, "multi_turn_records": 0, "duplicate_records": 0}
    seen: set[str] = set()
    for rec in records:
        msgs = rec["messages"]
        key = json.dumps(msgs, ensure_ascii=False, sort_keys=True)
        stats["duplicate_records"] += key in seen
        seen.add(key)
        n_assistant = 0
        for m in msgs:
            if m["role"] == "system":
                stats["records_with_system"] += 1
                continue
            stats["turns"] += 1
            if m["role"] == "assistant":
                n_assistant += 1
                stats["assistant_chars"] += len(m["content"])
            else:
                stats["user_chars"] += len(m["content"])
        stats["assistant_turns"] += n_assistant
        stats["multi_turn_records"] += n_assistant > 1
    return stats


def data_error(problems: list[str], source: str) -> DataError:
    """A DataError whose message lists at most MAX_LISTED_PROBLEMS problems (`.problems` keeps them all).

    A file with 10,000 bad lines should not print 10,000 lines; the first 50 show the pattern."""
    err = DataError(problems, source=source)
    if len(problems) > MAX_LISTED_PROBLEMS:
        n = len(problems)
        shown = "".join(f"\n  - {p}" for p in problems[:MAX_LISTED_PROBLEMS])
        err.args = (f"{source}: {n} problems found{shown}\n  ... and {n - MAX_LISTED_PROBLEMS} more",)
    return err


# ----------------------------------------------------------------------------------------------- local files


def _looks_like_hub_id(source: str) -> bool:
    """`owner/name` with no file-type suffix and no path syntax: we try the hub rather than say 'not found'."""
    if source.startswith((".", "/", "~")) or os.sep != "/" and os.sep in source:
        return False
    return bool(_HUB_ID.match(source)) and Path(source).suffix.lower() not in _FILE_LIKE_SUFFIXES


def _load_local(path: Path, display: str) -> LoadedDataset:
    """Read, decode, parse and validate a local file; file-level problems stop early, record problems collect."""
    _check_path(path, display)
    name = path.name
    raw = path.read_bytes()
    text = _decode(raw, name, display)
    suffix = path.suffix.lower()
    items = _parse_json_array(text, name, display) if suffix == ".json" else _parse_jsonl(text, name, display)
    records, fmt = _validate_items(items, name, display)
    return LoadedDataset(records=records, name=name, source="local", sha256=hashlib.sha256(raw).hexdigest(),
                         path=str(path.resolve()), format=fmt)


def _check_path(path: Path, display: str) -> None:
    """Missing file, directory, unsupported extension: say what we expected and what is nearby."""
    if path.is_dir():
        found = sorted(p.name for p in path.iterdir() if p.suffix.lower() in SUPPORTED_SUFFIXES)[:5]
        hint = f" (it holds {', '.join(found)})" if found else ""
        raise data_error([f"{display} is a directory, not a dataset file; fix: give one .json or .jsonl file "
                          f"inside it{hint}"], display)
    if not path.exists():
        hint = ""
        if path.parent.is_dir():
            near = difflib.get_close_matches(path.name, [p.name for p in path.parent.iterdir()], n=3)
            hint = f" Did you mean {', '.join(repr(str(path.parent / n)) for n in near)}?" if near else ""
        raise data_error([f"file not found: {display}; fix: check the path (a hub dataset id looks like "
                          f"'owner/name').{hint}"], display)
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        supported = "; ".join(f"{s} ({what})" for s, what in SUPPORTED_SUFFIXES.items())
        raise data_error([f"{path.name}: unsupported file type {suffix or '(no extension)'!r}; supported: "
                          f"{supported}; fix: convert the file to one of these"], display)


def _decode(raw: bytes, name: str, display: str) -> str:
    """UTF-8 (with or without BOM); on failure name every line with bad bytes and suggest a conversion."""
    if not raw.strip():
        raise data_error([f"{name}: the file is empty; fix: write records into it, as {SUPPORTED_SUFFIXES['.json']} "
                          f"(.json) or {SUPPORTED_SUFFIXES['.jsonl']} (.jsonl)"], display)
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise data_error([f"{name}: the file is UTF-16, not UTF-8; fix: save it as UTF-8 "
                          f"(e.g. iconv -f UTF-16 -t UTF-8 {name} > fixed{Path(name).suffix})"], display)
    bom = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    try:
        return raw[bom:].decode("utf-8")
    except UnicodeDecodeError:
        pass
    fix = "save the file as UTF-8"
    try:
        raw.decode("gb18030")
        fix += f"; it decodes as GBK/GB18030, so: iconv -f GB18030 -t UTF-8 {name} > fixed{Path(name).suffix}"
    except UnicodeDecodeError:
        pass
    problems, offset = [], 0
    for lineno, line in enumerate(raw.split(b"\n"), 1):
        try:
            line[bom if lineno == 1 else 0:].decode("utf-8")
        except UnicodeDecodeError as e:
            start = e.start + (bom if lineno == 1 else 0)
            problems.append(f"{name}, line {lineno}: not valid UTF-8: byte 0x{line[start]:02x} at byte offset "
                            f"{offset + start} (column {start + 1}); fix: {fix}")
        offset += len(line) + 1
    raise data_error(problems, display)


def _parse_json_array(text: str, name: str, display: str) -> list[tuple[str, str, Any]]:
    """A .json file must be one array of objects; returns (place, origin, item) with the line each starts on."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        fix = "correct the JSON syntax there (often a missing comma, quote or bracket)"
        if e.msg == "Extra data" and _first_line_is_object(text):
            fix = ("the file looks like JSON Lines (one object per line): rename it to .jsonl, or wrap the records "
                   "in [ ... ] separated by commas")
        raise data_error([f"{name}, line {e.lineno}, column {e.colno}: invalid JSON ({e.msg}); fix: {fix}"],
                         display) from e
    if isinstance(data, dict):
        inner = [k for k, v in data.items() if isinstance(v, list) and v and isinstance(v[0], dict)]
        hint = f" (the records seem to be under {inner[0]!r}: make the file just that array)" if inner else ""
        raise data_error([f"{name}: top level is a JSON object, but a .json dataset must be an array of records "
                          f"[{{...}}, {{...}}]; fix: put the records in a top-level array{hint}"], display)
    if not isinstance(data, list):
        raise data_error([f"{name}: top level is {_json_type(data)}, but a .json dataset must be an array of "
                          f"records [{{...}}, {{...}}]; fix: put the records in a top-level array"], display)
    if not data:
        raise data_error([f"{name}: the array is empty (no records); fix: add records such as "
                          f'{{"instruction": "...", "output": "..."}}'], display)
    lines = _array_element_lines(text, len(data))
    out = []
    for i, item in enumerate(data, 1):
        at = f" (line {lines[i - 1]})" if lines else ""
        out.append((f"{name}, record {i}{at}", f"{name}:record {i}", item))
    return out


def _first_line_is_object(text: str) -> bool:
    """Whether a failed .json file is really JSON Lines, so we can say 'rename it' instead of 'fix line 2'."""
    first = next((ln for ln in text.split("\n") if ln.strip()), "")
    try:
        return isinstance(json.loads(first), dict)
    except json.JSONDecodeError:
        return False


def _array_element_lines(text: str, count: int) -> list[int] | None:
    """The line each top-level array element starts on, so 'record 812' can also say where to look."""
    decoder = json.JSONDecoder()
    try:
        i = _JSON_WS.match(text, 0).end()
        i = _JSON_WS.match(text, i + 1).end()  # past '['
        starts = []
        while len(starts) < count:
            starts.append(i)
            _, i = decoder.raw_decode(text, i)
            i = _JSON_WS.match(text, i).end()
            i = _JSON_WS.match(text, i + 1).end()  # past ','
    except (json.JSONDecodeError, AttributeError):
        return None
    newlines = [m.start() for m in re.finditer("\n", text)]
    return [bisect.bisect_left(newlines, s) + 1 for s in starts]


def _parse_jsonl(text: str, name: str, display: str) -> list[tuple[str, str, Any]]:
    """One JSON object per non-blank line; every malformed line is reported, the good ones still validated."""
    if text.lstrip().startswith("["):
        try:
            if isinstance(json.loads(text), list):
                raise data_error([f"{name}: the file is one JSON array, not JSON Lines; fix: rename it to .json, "
                                  f"or write one record object per line"], display)
        except json.JSONDecodeError:
            pass
    out = []
    # split on "\n" only: str.splitlines() would also split on U+2028 etc., which JSON strings may contain.
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        place = f"{name}, line {lineno}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            item = _BadLine(f"{name}, line {lineno}, column {e.colno}: invalid JSON ({e.msg}); fix: make this line "
                            f"one complete JSON object (a record may not span several lines in .jsonl)")
        out.append((place, f"{name}:{lineno}", item))
    return out


@dataclasses.dataclass
class _BadLine:
    """A JSONL line that is not JSON: carried along so its problem is listed in line order with the others."""

    problem: str


# ----------------------------------------------------------------------------------------------- hub datasets


def _load_hub(hub_id: str, *, revision: str | None, split: str) -> LoadedDataset:
    """Load a hub dataset through `datasets`, then validate its rows exactly like a local file's records."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise data_error([f"{hub_id}: loading hub datasets needs the 'datasets' package; fix: pip install "
                          f"datasets"], hub_id) from e
    try:
        ds = datasets.load_dataset(hub_id, revision=revision, split=split)
        rows = [dict(row) for row in ds]
    except Exception as e:  # datasets raises many types (connection, not found, bad split); all mean the same
        detail = f"{type(e).__name__}: {e}".replace("\n", " ")[:400]
        at = f", revision {revision!r}" if revision else ""
        raise data_error([f"{hub_id}: could not load hub dataset (split {split!r}{at}): {detail}; fix: check the id "
                          f"at {endpoint}/datasets/{hub_id}, your network connection (and HF_HUB_OFFLINE / "
                          f"HF_DATASETS_OFFLINE), and HF_ENDPOINT (now {endpoint}); if you meant a local file, "
                          f"check its path"], hub_id) from e
    if not rows:
        raise data_error([f"{hub_id}: split {split!r} has no rows; fix: choose another --split"], hub_id)
    canonical = json.dumps(rows, ensure_ascii=False, sort_keys=True, separators=(",", ":"), default=str)
    items = [(f"{hub_id}, record {i}", f"{hub_id}:record {i}", row) for i, row in enumerate(rows, 1)]
    records, fmt = _validate_items(items, hub_id, hub_id)
    return LoadedDataset(records=records, name=hub_id, source="hub",
                         sha256=hashlib.sha256(canonical.encode("utf-8")).hexdigest(), hub_id=hub_id, format=fmt)


# ----------------------------------------------------------------------------------------------- validation


def _validate_items(items: list[tuple[str, str, Any]], name: str, display: str) -> tuple[list[Record], str]:
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
    if isinstance(item, _BadLine):
        return None, None, [item.problem], []
    if not isinstance(item, dict):
        return None, None, [f"{place}: expected a record object {{...}}, got {_json_type(item)}; fix: make each "
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
        problems.append(f"{place}, field {key!r}: expected a string, got {_json_type(value)}; fix: write it as "
                        f"text in quotes, e.g. \"{key}\": \"...\"")
        return None
    if required and not value.strip():
        problems.append(f"{place}, field {key!r}: is empty (or only whitespace); fix: write {what} there, or "
                        f"remove the record")
    return value


def _history(value: Any, place: str, problems: list[str]) -> list[tuple[str, str]]:
    """`history` is [[user, assistant], ...] of non-empty strings; anything else is reported pair by pair."""
    if value is None:
        return []
    fix = 'fix: write history as [["earlier question", "earlier answer"], ...]'
    if not isinstance(value, list):
        problems.append(f"{place}, field 'history': expected a list of [user, assistant] pairs, got "
                        f"{_json_type(value)}; {fix}")
        return []
    pairs = []
    for i, pair in enumerate(value):
        field = f"history[{i}]"
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(s, str) for s in pair)):
            problems.append(f"{place}, field {field!r}: expected a [user, assistant] pair of two strings, got "
                            f"{_json_type(pair)}; {fix}")
        elif not all(s.strip() for s in pair):
            problems.append(f"{place}, field {field!r}: a turn is empty (or only whitespace); fix: write both the "
                            f"question and the answer, or remove the pair")
        else:
            pairs.append((pair[0], pair[1]))
    return pairs


def _chat(item: dict, place: str, field: str, role_key: str, content_key: str, role_map: dict[str, str],
          system: Any) -> tuple[list[dict], list[str]]:
    """`messages` / `conversations`: check each turn's types and role, then the turn structure."""
    problems: list[str] = []
    turns = item.get(field)
    if not isinstance(turns, list):
        problems.append(f"{place}, field {field!r}: expected a list of turns, got {_json_type(turns)}; fix: write "
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
            problems.append(f"{place}, field 'system': expected a string, got {_json_type(system)}; fix: write the "
                            f"system prompt as text in quotes")
        elif system.strip():
            messages.append({"role": "system", "content": system})
            labels.append("system")
    ok = True
    for i, turn in enumerate(turns):
        label = f"{field}[{i}]"
        message = _chat_turn(turn, place, label, role_key, content_key, role_map, problems)
        if message is None:
            ok = False
        else:
            messages.append(message)
            labels.append(label)
    if ok:
        problems += _check_structure(messages, labels, place)
    return messages, problems


def _chat_turn(turn: Any, place: str, label: str, role_key: str, content_key: str, role_map: dict[str, str],
               problems: list[str]) -> dict | None:
    """One turn -> {"role", "content"} or None (after appending its problems)."""
    if not isinstance(turn, dict):
        problems.append(f"{place}, field {label!r}: expected an object {{\"{role_key}\": ..., \"{content_key}\": "
                        f"...}}, got {_json_type(turn)}; fix: write each turn as such an object")
        return None
    before = len(problems)
    role = turn.get(role_key)
    known = list(role_map)
    if not isinstance(role, str):
        state = "is missing" if role is None else f"is {_json_type(role)}"
        problems.append(f"{place}, field '{label}.{role_key}': {state}; fix: set it to one of "
                        f"{', '.join(repr(r) for r in known)}")
    elif role not in role_map:
        near = difflib.get_close_matches(role, known, n=1)
        fix = f"did you mean {near[0]!r}?" if near else f"use one of {', '.join(repr(r) for r in known)}"
        problems.append(f"{place}, field '{label}.{role_key}': unknown role {role!r}; {fix}")
    content = turn.get(content_key)
    if not isinstance(content, str):
        state = "is missing" if content is None else f"expected a string, got {_json_type(content)}"
        extra = " (multi-part content is not supported: join the text parts)" if isinstance(content, list) else ""
        problems.append(f"{place}, field '{label}.{content_key}': {state}{extra}; fix: write the turn's text as a "
                        f"string")
    elif not content.strip():
        problems.append(f"{place}, field '{label}.{content_key}': is empty (or only whitespace); fix: write the "
                        f"text, or remove the turn")
    if len(problems) > before:
        return None
    return {"role": role_map[role], "content": content}


def _check_structure(messages: list[dict], labels: list[str], place: str) -> list[str]:
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


def _json_type(value: Any) -> str:
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
