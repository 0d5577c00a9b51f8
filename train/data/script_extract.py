"""`data extract --format script`: speaker-labelled lines of a script, read without any model.

The conventions people's scripts actually use, line by line:

- `甄嬛：臣妾遵旨。` / `甄嬛:…` / `Mary: Good morning.` (full- or half-width colon after a short name; a
  parenthetical before the colon, `甄嬛（低头）：…`, is a stage direction of that line),
- `【甄嬛】臣妾遵旨。` (the name in lenticular brackets; `【甄嬛】` alone on a line opens a speech on the next lines),
- screenplay layout: a cue line of the name in capitals (`MARY`, `MARY (V.O.)`), the speech on the lines right
  below it, parentheticals such as `(quietly)` among them.

Everything else is kept as a marker, never as speech: scene headings (`第一场 …`, `1-2 御花园 日 外`, `INT. …`,
`场景：…`) start a new scene; lines wholly in brackets or parentheses are stage directions; other lines are
narration. Directions inside a speech (`臣妾（低头）不敢。`) leave the line and are kept beside it.

A line right below a speech (no blank line between) that is none of the above continues that speech: multi-line
speeches are joined (without a space between CJK text, with one between words). After a blank line, an unlabelled
line is narration. That is the one rule a script must follow for its narration to stay out of the speech.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from persona_lora.errors import SourceFileError

CONVENTIONS = ("`NAME：line` / `NAME: line` (full- or half-width colon)", "`【NAME】line`",
               "screenplay (a NAME line in capitals, the speech on the lines below)")

_CJK = "\u3400-\u9fff\uf900-\ufaff"
_NAME_CJK = rf"[{_CJK}A-Za-z0-9·•\-_]{{1,12}}"
_NAME_LATIN = r"[A-Za-z][A-Za-z0-9.'\-]*(?: [A-Za-z0-9.'\-]+){0,3}"
_PAREN = r"(?:[（(](?P<paren>[^）)]{0,30})[）)])?"
_COLON_LINE = re.compile(rf"^(?P<name>{_NAME_CJK}|{_NAME_LATIN})\s*{_PAREN}\s*[：:]\s*(?P<text>.*)$")
_BRACKET_LINE = re.compile(r"^【(?P<name>[^【】\s]{1,12})】\s*(?P<text>.*)$")
_CUE = re.compile(r"^(?P<name>[A-Z][A-Z0-9.'\-]*(?: [A-Z0-9.'\-]+){0,3})\s*(?:\((?P<ext>[^)]{1,20})\))?$")
_HEADING = re.compile(
    r"^(?:#{1,6}\s+\S"
    r"|第[一二三四五六七八九十百千零〇两\d]+[场幕集回章节景]"
    r"|\d+\s*[-－.、]\s*\d+\s+\S"
    r"|(?:INT|EXT|INT\./EXT|EXT\./INT|I/E)[.\s]"
    r"|(?:场景|场次|Scene|SCENE)\s*[\d一二三四五六七八九十]*\s*[：:\s])"
)
_WHOLE_DIRECTION = re.compile(r"^[（(\[［〔](?P<text>.*)[）)\]］〕]$")
_INLINE_DIRECTION = re.compile(r"[（(](?P<text>[^（）()]{1,80})[）)]")
_SCENE_INFO_LABELS = {"时间", "地点", "人物", "布景", "背景", "Time", "Place", "Location", "Setting", "Characters",
                      "TIME", "PLACE", "LOCATION", "SETTING", "CHARACTERS"}
_NARRATOR_LABELS = {"旁白", "Narrator", "NARRATOR", "Narration", "NARRATION"}
_SPEECH_VERBS = ("说", "道", "问", "喊", "叫", "答", "笑", "曰")
_TRANSITIONS = {"FADE IN", "FADE OUT", "FADE TO BLACK", "CUT TO", "DISSOLVE TO", "THE END", "CONTINUED", "BLACK",
                "SMASH CUT", "END", "INTERCUT", "MONTAGE", "LATER", "CONTINUOUS"}
_QUOTES = {"“": "”", "「": "」", "『": "』", '"': '"', "‘": "’"}


@dataclass
class Utterance:
    """One record of a dialogue file: speech (speaker + line) or a marker (scene, direction, narration, gap)."""

    kind: str  # speech | scene | direction | narration | gap
    scene: int
    text: str = ""  # markers: their text
    speaker: str = ""  # speech only
    line: str = ""  # speech only
    source_line: int | None = None  # script: 1-based line of the file where it starts
    source_chunk: int | None = None  # novel: the chunk it came from
    directions: list[str] = field(default_factory=list)  # speech: stage directions inside it

    def to_json(self) -> dict:
        out: dict = {"kind": self.kind, "scene": self.scene}
        if self.kind == "speech":
            out.update(speaker=self.speaker, line=self.line)
            if self.directions:
                out["directions"] = list(self.directions)
        else:
            out["text"] = self.text
        if self.source_line is not None:
            out["source_line"] = self.source_line
        if self.source_chunk is not None:
            out["source_chunk"] = self.source_chunk
        return out


def join_lines(a: str, b: str) -> str:
    """Two pieces of one speech: no space between CJK text (or after CJK punctuation), one between words."""
    if not a:
        return b
    if not b:
        return a
    if re.match(rf"[{_CJK}\u3000-\u303f\uff00-\uffef]", a[-1]) or re.match(rf"[{_CJK}\u3000-\u303f\uff00-\uffef]",
                                                                            b[0]):
        return a + b
    return a + " " + b


def strip_quotes(text: str) -> str:
    """`“臣妾遵旨。”` → `臣妾遵旨。`: a speech wholly in one pair of quotes loses them."""
    text = text.strip()
    if len(text) >= 2 and text[0] in _QUOTES and text.endswith(_QUOTES[text[0]]) \
            and text[0] not in text[1:-1] and _QUOTES[text[0]] not in text[1:-1]:
        return text[1:-1].strip()
    return text


def _split_directions(text: str) -> tuple[str, list[str]]:
    """The speech without its inline parentheticals, and those parentheticals."""
    directions = [m.group("text").strip() for m in _INLINE_DIRECTION.finditer(text)]
    spoken = _INLINE_DIRECTION.sub("", text)
    return " ".join(spoken.split()) if not re.search(f"[{_CJK}]", spoken) else spoken.strip(), directions


class _Reader:
    """The line-by-line state: the open speech (if any) and whether the previous line was blank."""

    def __init__(self) -> None:
        self.out: list[Utterance] = []
        self.scene = 0
        self.seen_heading = False
        self.open: Utterance | None = None  # the speech later lines may continue
        self.pending_cue: tuple[str, int, list[str]] | None = None  # a cue line waiting for its speech

    def marker(self, kind: str, text: str, number: int) -> None:
        if kind == "scene":
            if self.seen_heading or any(u.kind == "speech" for u in self.out):
                self.scene += 1
            self.seen_heading = True
        self.out.append(Utterance(kind, self.scene, text=text, source_line=number))

    def speech(self, name: str, text: str, number: int, directions: list[str]) -> None:
        spoken, inline = _split_directions(strip_quotes(text))
        utterance = Utterance("speech", self.scene, speaker=name.strip(), line=spoken, source_line=number,
                              directions=[d for d in directions if d] + inline)
        self.out.append(utterance)
        self.open = utterance

    def continue_open(self, text: str) -> None:
        assert self.open is not None
        spoken, inline = _split_directions(text)
        self.open.line = strip_quotes(join_lines(self.open.line, spoken))
        self.open.directions.extend(inline)


def extract_script(text: str, name: str = "script") -> list[Utterance]:
    """Every speech and marker of `text`, in order; a SourceFileError when no line has a recognised speaker."""
    reader = _Reader()
    lines = text.split("\n")
    for index, raw in enumerate(lines):
        number = index + 1
        line = raw.strip().lstrip("\ufeff")
        if not line:
            reader.open = None
            if reader.pending_cue is not None:  # a capitals line with no speech below: a heading of sorts
                cue, cue_number, _ = reader.pending_cue
                reader.marker("narration", cue, cue_number)
                reader.pending_cue = None
            continue
        if reader.pending_cue is not None:
            cue, cue_number, directions = reader.pending_cue
            whole = _WHOLE_DIRECTION.match(line)
            if whole and not reader.open:  # `(quietly)` between the cue and the speech
                directions.append(whole.group("text").strip())
                continue
            reader.pending_cue = None
            reader.speech(cue, line, cue_number, directions)
            continue
        _classify(reader, line, number, lines[index + 1].strip() if index + 1 < len(lines) else "")
    if reader.pending_cue is not None:
        reader.marker("narration", reader.pending_cue[0], reader.pending_cue[1])
    if not any(u.kind == "speech" for u in reader.out):
        shown = [ln.strip() for ln in lines if ln.strip()][:3]
        raise SourceFileError(
            f"{name}: no speaker-labelled lines found; tried {'; '.join(CONVENTIONS)}; the first lines are: "
            + " | ".join(repr(s[:60]) for s in shown)
            + "; fix: label the speakers in one of these ways, or use --format novel for prose")
    return reader.out


def _classify(reader: _Reader, line: str, number: int, next_line: str) -> None:
    """One non-blank line that is not the speech below a cue."""
    if _HEADING.match(line) or (line.startswith("【") and line.endswith("】") and _HEADING.match(line[1:-1])):
        reader.open = None
        reader.marker("scene", line, number)
        return
    bracket = _BRACKET_LINE.match(line)
    if bracket and not _HEADING.match(bracket.group("name")):
        name, text = bracket.group("name"), bracket.group("text").strip()
        if name in _NARRATOR_LABELS:
            reader.open = None
            reader.marker("narration", text, number)
        elif text:
            reader.speech(name, text, number, [])
        elif next_line:
            reader.open = None
            reader.pending_cue = (name, number, [])
        else:
            reader.marker("direction", name, number)
        return
    whole = _WHOLE_DIRECTION.match(line)
    if whole:
        if reader.open is not None and re.match(r"^[(（]", line) and len(whole.group("text")) <= 40 \
                and reader.open.source_line is not None and _is_cue_speech(reader):
            reader.open.directions.append(whole.group("text").strip())  # a parenthetical inside a screenplay speech
            return
        reader.open = None
        reader.marker("direction", whole.group("text").strip(), number)
        return
    colon = _COLON_LINE.match(line)
    if colon and _is_speaker_label(colon.group("name"), colon.group("text")):
        name, text = colon.group("name").strip(), colon.group("text").strip()
        if name in _SCENE_INFO_LABELS or name in _NARRATOR_LABELS:
            reader.open = None
            reader.marker("narration", line if name in _SCENE_INFO_LABELS else text, number)
        elif text:
            reader.speech(name, text, number, [colon.group("paren") or ""])
        elif next_line:
            reader.open = None
            reader.pending_cue = (name, number, [colon.group("paren") or ""])
        else:
            reader.marker("narration", line, number)
        return
    cue = _CUE.match(line)
    if cue and next_line and _is_cue(cue.group("name")):
        reader.open = None
        reader.pending_cue = (cue.group("name").strip(), number, [cue.group("ext") or ""] if cue.group("ext") else [])
        return
    if reader.open is not None:
        reader.continue_open(line)
        return
    reader.marker("narration", line, number)


def _is_cue_speech(reader: _Reader) -> bool:
    """The open speech came from a screenplay cue (its speaker is in capitals)."""
    return bool(reader.open and reader.open.speaker.isupper())


def _is_speaker_label(name: str, text: str) -> bool:
    """`他说：“…”` is narration with a quote, not a speaker label; so is a clock time or a URL."""
    name = name.strip()
    if name.endswith(_SPEECH_VERBS) and text[:1] in "“「\"":
        return False
    if name.lower() in ("http", "https", "ftp", "mailto"):
        return False
    return not name.isdigit()


def _is_cue(name: str) -> bool:
    name = name.strip()
    return (any(c.isalpha() for c in name) and name.rstrip(".:") not in _TRANSITIONS
            and not name.endswith((":", "TO", ".", "!", "?")) and len(name) <= 30)


def speech_share(utterances: list[Utterance], text: str) -> float:
    """Speech records per non-blank line: how script-like a text is (`--format auto` decides on it)."""
    lines = sum(1 for ln in text.split("\n") if ln.strip())
    return sum(u.kind == "speech" for u in utterances) / max(lines, 1)
