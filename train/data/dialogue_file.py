"""The dialogue file between `data extract` and `data build`: JSON Lines, one object per utterance in reading order.

The first line says where the utterances came from (`{"kind": "source", "file", "sha256", "encoding",
"extractor", "settings"}`), so `data build` can write the dataset's provenance without the source at hand. Then
one object per speech (`{"kind": "speech", "speaker", "line", "scene", "source_line" | "source_chunk"}`) or marker
(`scene`, `direction`, `narration`: `{"kind", "text", "scene", …}`; `gap`: a novel chunk that failed, written only
with `--allow-failed`). A hand-edited file is welcome: every record is checked and every problem named.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from persona_lora.errors import DataError, SourceFileError, UsageError
from persona_lora.train.data.script_extract import Utterance

KINDS = ("speech", "scene", "direction", "narration", "gap")


@dataclass
class DialogueFile:
    """A read dialogue file: its source header and its utterances."""

    source: dict = field(default_factory=dict)
    utterances: list[Utterance] = field(default_factory=list)


def refuse_existing(paths: list[Path], overwrite: bool) -> None:
    """Nothing the user made is replaced without --overwrite."""
    existing = [str(p) for p in paths if p.exists()]
    if existing and not overwrite:
        raise UsageError(f"{', '.join(existing)} already exist{'s' if len(existing) == 1 else ''}; fix: choose "
                         "another --out or pass --overwrite to replace it")


def write_atomically(path: Path, text: str) -> None:
    """Write the whole file or nothing: a killed run never leaves a file that looks complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_dialogue(path: Path, source: dict, utterances: list[Utterance]) -> None:
    lines = [json.dumps({"kind": "source", **source}, ensure_ascii=False)]
    lines += [json.dumps(u.to_json(), ensure_ascii=False) for u in utterances]
    write_atomically(path, "\n".join(lines) + "\n")


def read_dialogue(path: str | Path) -> DialogueFile:
    """Every record checked; a DataError lists every problem (file, line, field, fix)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise SourceFileError(f"{path} does not exist; fix: give the file `persona-lora data extract --out` wrote")
    out = DialogueFile()
    problems: list[str] = []
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise SourceFileError(f"{path}: not UTF-8 (invalid byte at byte offset {e.start}); fix: give the file "
                              "`persona-lora data extract --out` wrote, or save it as UTF-8") from None
    if not text.strip():
        raise SourceFileError(f"{path} is empty; fix: run `persona-lora data extract SOURCE --out {path.name}` first")
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        place = f"line {number}"
        try:
            item = json.loads(line)
        except ValueError as e:
            problems.append(f"{place}: not JSON ({e.msg}); fix: one JSON object per line")
            continue
        if not isinstance(item, dict):
            problems.append(f"{place}: expected a JSON object, got {type(item).__name__}")
            continue
        kind = item.get("kind", "speech")
        if kind == "source":
            out.source = {k: v for k, v in item.items() if k != "kind"}
            continue
        if kind not in KINDS:
            problems.append(f"{place}: kind {kind!r} is not one of {', '.join(KINDS)}")
            continue
        scene = item.get("scene", 0)
        if not isinstance(scene, int) or isinstance(scene, bool) or scene < 0:
            problems.append(f"{place}: 'scene' must be a scene index (0, 1, …), got {scene!r}")
            continue
        u = Utterance(kind, scene, source_line=_int_or_none(item.get("source_line")),
                      source_chunk=_int_or_none(item.get("source_chunk")))
        if kind == "speech":
            speaker, said = item.get("speaker"), item.get("line")
            if not isinstance(speaker, str) or not speaker.strip():
                problems.append(f"{place}: 'speaker' must be a non-empty string, got {speaker!r}")
                continue
            if not isinstance(said, str):
                problems.append(f"{place}: 'line' must be a string, got {said!r}")
                continue
            u.speaker, u.line = speaker.strip(), said
            u.directions = [str(d) for d in item.get("directions") or []]
        else:
            u.text = str(item.get("text", ""))
        out.utterances.append(u)
    if problems:
        raise DataError(problems, source=str(path))
    if not any(u.kind == "speech" for u in out.utterances):
        raise SourceFileError(f"{path} holds no speech records; fix: extract again, or check the file is the "
                              "output of `persona-lora data extract`")
    return out


def _int_or_none(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
