"""Load a persona dataset and validate it, reporting every problem at once.

Accepted input (one format per file):
- Alpaca: `instruction`, `output`, optional `input`, `system`, `history` ([[user, assistant], ...]);
- chat `messages`: [{"role": "system"|"user"|"assistant", "content": str}, ...];
- ShareGPT `conversations`: [{"from": "system"|"human"|"user"|"gpt"|"assistant", "value": str}, ...]
  (an optional top-level `system` string becomes the system message).

Sources: a local `.json` file (an array of records) or `.jsonl` file (one record per line), or a hub dataset id
(`owner/name`, anything that is not an existing path) loaded with `datasets.load_dataset`.

This module reads the bytes (decoding, JSON syntax, file-level problems: each named with its line and column);
`records.py` normalizes and validates each record. A bad dataset raises `DataError` whose `problems` list every
problem, each naming the file, the line (JSONL) or record (JSON array, counted from 1, with the line it starts
on), the field, what is wrong and how to fix it.
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
from pathlib import Path
from typing import Any

from persona_lora.dataset.records import (  # noqa: F401  (MAX_LISTED_PROBLEMS: part of this module's API)
    MAX_LISTED_PROBLEMS,
    BadLine,
    Record,
    data_error,
    json_type,
    validate_items,
)
from persona_lora.hub_ids import is_repo_id

logger = logging.getLogger(__name__)

SUPPORTED_SUFFIXES = {".json": "a JSON array of records", ".jsonl": "JSON Lines, one record per line"}
# Suffixes that mark a string as a file path even when it also looks like `owner/name`.
_FILE_LIKE_SUFFIXES = {".json", ".jsonl", ".csv", ".tsv", ".txt", ".parquet", ".arrow", ".xlsx", ".yaml", ".yml",
                       ".gz", ".zip", ".md"}
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
    if path.exists() or not looks_like_hub_id(source):
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


# ----------------------------------------------------------------------------------------------- local files


def looks_like_hub_id(source: str) -> bool:
    """`owner/name` with no file-type suffix and no path syntax: we try the hub rather than say 'not found'."""
    if source.startswith((".", "/", "~")) or os.sep != "/" and os.sep in source:
        return False
    return is_repo_id(source) and Path(source).suffix.lower() not in _FILE_LIKE_SUFFIXES


def read_json_items(path: Path, display: str) -> tuple[bytes, list[tuple[str, str, Any]]]:
    """(the file's bytes, its items as (place, origin, value)) of a local .json array or .jsonl file, for any kind
    of record (training records here, preference records in the preference reader). File-level problems (missing,
    wrong type, undecodable, malformed JSON) raise DataError at once; a malformed JSONL line becomes a `BadLine`
    item, so the caller reports it with the record problems."""
    check_path(path, display)
    raw = path.read_bytes()
    text = _decode(raw, path.name, display)
    parse = _parse_json_array if path.suffix.lower() == ".json" else _parse_jsonl
    return raw, parse(text, path.name, display)


def _load_local(path: Path, display: str) -> LoadedDataset:
    """Read, decode, parse and validate a local file; file-level problems stop early, record problems collect."""
    name = path.name
    raw, items = read_json_items(path, display)
    records, fmt = validate_items(items, name, display)
    return LoadedDataset(records=records, name=name, source="local", sha256=hashlib.sha256(raw).hexdigest(),
                         path=str(path.resolve()), format=fmt)


def check_path(path: Path, display: str) -> None:
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
        raise data_error([f"{name}: top level is {json_type(data)}, but a .json dataset must be an array of "
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
            item = BadLine(f"{name}, line {lineno}, column {e.colno}: invalid JSON ({e.msg}); fix: make this line "
                            f"one complete JSON object (a record may not span several lines in .jsonl)")
        out.append((place, f"{name}:{lineno}", item))
    return out


# ----------------------------------------------------------------------------------------------- hub datasets


def _load_hub(hub_id: str, *, revision: str | None, split: str) -> LoadedDataset:
    """Load a hub dataset through `datasets`, then validate its rows exactly like a local file's records."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    import datasets

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
    records, fmt = validate_items(items, hub_id, hub_id)
    return LoadedDataset(records=records, name=hub_id, source="hub",
                         sha256=hashlib.sha256(canonical.encode("utf-8")).hexdigest(), hub_id=hub_id, format=fmt)
