"""`data extract --format novel`, the text side: chunks with overlapping edges, and the answers put back together.

Why overlap: a conversation cut at a chunk boundary loses who is speaking; each chunk after the first repeats the
last paragraphs of the one before (`overlap_chars`), so every line is seen whole at least once. The price is that
lines in the overlap come back twice; `assemble` keeps the first and drops a repeat when the line is found in
the shared text, or when it is not found in the text at all but the previous chunk returned the same line.

Scenes: a novel's chapters (`第三章 …`, `Chapter 3`, …) are its scenes for `data build`; a text without chapter
headings makes each chunk a scene, so no context crosses a boundary the model never saw whole.
"""

from __future__ import annotations

import bisect
import hashlib
import re
from dataclasses import dataclass

from persona_lora.train.data.script_extract import Utterance, strip_quotes

_CHAPTER = re.compile(
    r"^\s*(?:第[一二三四五六七八九十百千零〇两\d]+[章回卷节]|Chapter\s+\w+|CHAPTER\s+\w+|#{1,6}\s+\S)", re.MULTILINE)
_SENTENCE_END = re.compile(r"[。！？!?…」”.]")
_CJK = re.compile(r"[\u3000-\u9fff\uf900-\ufaff\uff00-\uffef]")


@dataclass(frozen=True)
class Chunk:
    """One piece of the text sent to the model; `shared_until` ends the part the previous chunk also held."""

    index: int
    start: int
    end: int
    shared_until: int
    text: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


def chunk_text(text: str, *, chunk_chars: int, overlap_chars: int) -> list[Chunk]:
    """Chunks of at most `chunk_chars` characters, cut at a line end (else a sentence end) where one is in the
    second half, each after the first starting at a line start within the last `overlap_chars` of the one before."""
    chunks: list[Chunk] = []
    start, shared_until, n = 0, 0, len(text)
    while start < n:
        end = min(start + chunk_chars, n)
        if end < n:
            end = _cut_point(text, start, end)
        piece = text[start:end]
        if piece.strip():
            chunks.append(Chunk(len(chunks), start, end, shared_until if chunks else start, piece))
        if end >= n:
            break
        next_start = end
        if overlap_chars > 0:
            newline = text.find("\n", max(start + 1, end - overlap_chars), end)
            if newline >= 0 and newline + 1 < end:
                next_start = newline + 1
        shared_until, start = end, next_start
    return chunks


def _cut_point(text: str, start: int, end: int) -> int:
    half = start + (end - start) // 2
    newline = text.rfind("\n", half, end)
    if newline >= 0:
        return newline + 1
    last = None
    for m in _SENTENCE_END.finditer(text, half, end):
        last = m.end()
    return last or end


def estimate_tokens(text: str) -> int:
    """A tokenizer-free estimate: one token per CJK character, one per four other characters."""
    cjk = len(_CJK.findall(text))
    return cjk + (len(text) - cjk + 3) // 4


def chapter_starts(text: str) -> list[int]:
    """Character offsets where chapters begin (empty: the text has no chapter headings)."""
    return [m.start() for m in _CHAPTER.finditer(text)]


def _normal(line: str) -> str:
    return "".join(strip_quotes(line).split())


def assemble(text: str, chunks: list[Chunk], answers: dict[int, list[dict] | None]) -> tuple[list[Utterance], int]:
    """The utterances in reading order from each chunk's answer (None: the chunk failed, written as a gap);
    returns them and how many overlap repeats were dropped."""
    chapters = chapter_starts(text)
    out: list[Utterance] = []
    dropped = 0
    previous: list[tuple[str, int | None]] = []  # (normalized line, absolute offset or None) of the last chunk
    for chunk in chunks:
        answer = answers.get(chunk.index)
        if answer is None:
            out.append(Utterance("gap", _scene(chapters, chunk.start, chunk.index),
                                 text=f"chunk {chunk.index} (characters {chunk.start}-{chunk.end}) failed",
                                 source_chunk=chunk.index))
            previous = []
            continue
        current: list[tuple[str, int | None]] = []
        search_from = 0
        for item in answer:
            line = strip_quotes(item["line"])
            key = _normal(line)
            found = chunk.text.find(line, search_from) if line else -1
            if found < 0 and line:
                found = chunk.text.find(line)
            offset = chunk.start + found if found >= 0 else None
            if found >= 0:
                search_from = found + len(line)
            in_shared = offset is not None and offset < chunk.shared_until
            if (in_shared or offset is None) and any(k == key and (offset is None or o is None or o == offset)
                                                     for k, o in previous):
                dropped += 1
                continue
            current.append((key, offset))
            scene = _scene(chapters, offset if offset is not None else chunk.start, chunk.index)
            out.append(Utterance("speech", scene, speaker=item["speaker"].strip(), line=line,
                                 source_chunk=chunk.index))
        previous = current
    return out, dropped


def _scene(chapters: list[int], offset: int, chunk_index: int) -> int:
    if not chapters:
        return chunk_index
    return max(0, bisect.bisect_right(chapters, offset) - (1 if chapters[0] == 0 else 0))
