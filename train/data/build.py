"""`persona-lora data build DIALOGUE.jsonl --character NAME --out DATA.json`: a dialogue file → a persona dataset.

Each turn of the character becomes an answer; the turns before it in the same scene (`context` of them, each
with who spoke, `皇后：……`) become the instruction and the `history` of an Alpaca record, the format `train` and
`data check` read. Consecutive lines of one speaker are one turn. Aliases fold names into one speaker before
anything is counted, and the speakers table with its "did you mean" lines shows what is left to alias. Every
record a filter drops is counted by reason. The split into DATA.json and DATA.eval.json is by scene, so no scene
(and no line of its context) is in both; DATA.card.md says where it all came from.
"""

from __future__ import annotations

import json
import random
import re
import shlex
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from persona_lora.errors import UsageError
from persona_lora.train.data.dialogue_file import DialogueFile, read_dialogue, refuse_existing, write_atomically
from persona_lora.train.data.script_extract import Utterance, join_lines
from persona_lora.train.data.speaker_names import CJK, closest_speakers, near_names, spelling_variants

_PUNCT_ONLY = re.compile(r"^[\W_]*$")
_BRACKETED = re.compile(r"[（(\[［〔【][^）)\]］〕】]*[）)\]］〕】]")
FILTERS = ("no line before it (scene start)", "only punctuation", "only narration or stage directions",
           "too short", "too long", "duplicate")


@dataclass
class BuildOptions:
    dialogue: str
    character: str
    out: Path
    aliases: list[str] = field(default_factory=list)  # "A" (an alias of the character) or "A=NAME"
    aliases_file: str | None = None
    context: int = 4
    unprompted: str = "drop"  # keep | drop
    min_chars: int = 2
    max_chars: int = 1000
    system_prompt: str | None = None
    character_sheet: str | None = None
    eval_fraction: float = 0.1
    seed: int = 42
    overwrite: bool = False


@dataclass
class Turn:
    speaker: str
    text: str
    scene: int
    first: Utterance


@dataclass
class BuildResult:
    train: list[dict]
    eval: list[dict]
    dropped: Counter
    speakers: Counter
    candidates: int  # character turns before filtering
    scenes_train: list[int]
    scenes_eval: list[int]
    suggestions: list[str]
    alias_map: dict[str, str]
    variants: list[tuple[str, str]] = field(default_factory=list)  # (alias, name) of one speaker spelt two ways


def parse_aliases(character: str, flags: list[str], file: str | None) -> dict[str, str]:
    """alias → canonical name, from `--alias A` / `--alias A=NAME` and an aliases file (JSON `{"NAME": [A, …]}`
    or lines `NAME: A, B`)."""
    out: dict[str, str] = {}

    def add(alias: str, name: str, where: str) -> None:
        alias, name = alias.strip(), name.strip()
        if not alias or not name:
            raise UsageError(f"{where}: an alias needs a name on both sides (ALIAS or ALIAS=NAME)")
        if out.get(alias, name) != name:
            raise UsageError(f"{where}: {alias!r} is given as an alias of both {out[alias]!r} and {name!r}")
        if alias != name:
            out[alias] = name

    if file:
        from persona_lora.train.data.source_text import read_source_text

        text = read_source_text(file).text
        try:
            table = json.loads(text)
        except ValueError:
            table = None
        if isinstance(table, dict):
            for name, aliases in table.items():
                for alias in [aliases] if isinstance(aliases, str) else aliases or []:
                    add(str(alias), str(name), f"--aliases {file}")
        else:
            for number, line in enumerate(text.split("\n"), start=1):
                if not line.strip() or line.lstrip().startswith("#"):
                    continue
                match = re.match(r"^\s*([^:：]+)[:：](.*)$", line)
                if not match:
                    raise UsageError(f"--aliases {file}, line {number}: expected `NAME: ALIAS, ALIAS` or a JSON "
                                     f'object {{"NAME": ["ALIAS", …]}}, got {line.strip()!r}')
                name, rest = match.group(1), match.group(2)
                for alias in re.split(r"[,，、]", rest):
                    if alias.strip():
                        add(alias, name, f"--aliases {file}, line {number}")
    for flag in flags:
        alias, sep, name = flag.partition("=")
        add(alias, name if sep else character, f"--alias {flag}")
    return out


def _pad(text: str, width: int) -> str:
    """Left-aligned in `width` terminal columns (a CJK character takes two)."""
    import unicodedata

    shown = sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)
    return text + " " * max(0, width - shown)


def speakers_table(speakers: Counter, limit: int = 15) -> str:
    total = sum(speakers.values()) or 1
    rows = [f"  {_pad('speaker', 16)} {'lines':>6} {'share':>7}"]
    rows += [f"  {_pad(name, 16)} {n:>6} {100 * n / total:>6.1f}%" for name, n in speakers.most_common(limit)]
    if len(speakers) > limit:
        rest = sum(n for _, n in speakers.most_common()[limit:])
        rows.append(f"  … {len(speakers) - limit} more speakers with {rest} lines")
    return "\n".join(rows)


def shell_word(text: str) -> str:
    """`text` as one word of a shell command: as it is unless it holds spaces or shell syntax (a CJK name stays
    readable; `Consort Hua` becomes `'Consort Hua'`)."""
    return text if re.fullmatch(r"[^\s'\"\\$`!*?&;|<>(){}\[\]#~]+", text) else shlex.quote(text)


def _scenes(n: int) -> str:
    return f"{n} scene{'s' if n != 1 else ''}"


def _lines(n: int) -> str:
    return f"{n} line{'s' if n != 1 else ''}"


def label(speaker: str, text: str) -> str:
    """Who spoke, kept in the context: `皇后：……` for CJK names, `Queen: …` otherwise."""
    return f"{speaker}：{text}" if CJK.search(speaker) else f"{speaker}: {text}"


def scene_turns(utterances: list[Utterance], alias_map: dict[str, str]) -> dict[int, list[list[Turn]]]:
    """Per scene, its runs of turns (a gap, a failed novel chunk, splits a scene into runs no context crosses)."""
    scenes: dict[int, list[list[Turn]]] = {}
    for u in utterances:
        runs = scenes.setdefault(u.scene, [[]])
        if u.kind == "gap":
            runs.append([])
            continue
        if u.kind != "speech":
            continue
        speaker = alias_map.get(u.speaker, u.speaker)
        run = runs[-1]
        if run and run[-1].speaker == speaker:
            run[-1].text = join_lines(run[-1].text, u.line)
        else:
            run.append(Turn(speaker, u.line, u.scene, u))
    return scenes


def _reason(answer: str, opts: BuildOptions) -> str | None:
    stripped = answer.strip()
    if _PUNCT_ONLY.match(stripped):
        return "only punctuation" if stripped else "only narration or stage directions"
    if _PUNCT_ONLY.match(_BRACKETED.sub("", stripped)):
        return "only narration or stage directions"
    if len(stripped) < opts.min_chars:
        return "too short"
    if len(stripped) > opts.max_chars:
        return "too long"
    return None


def records_for(run: list[Turn], character: str, opts: BuildOptions, dropped: Counter,
                seen: set[str], system: str | None) -> tuple[list[dict], int]:
    """The records of one run of turns, and how many character turns it had."""
    records, candidates = [], 0
    for t, turn in enumerate(run):
        if turn.speaker != character:
            continue
        candidates += 1
        window = run[max(0, t - opts.context):t]
        while window and window[0].speaker == character:  # an answer without its question is no history
            window = window[1:]
        history, pending = [], []
        for w in window:
            if w.speaker == character:
                history.append(["\n".join(pending), w.text])
                pending = []
            else:
                pending.append(label(w.speaker, w.text))
        if not pending:
            if opts.unprompted == "drop":
                dropped["no line before it (scene start)"] += 1
                continue
            pending = ["(scene start)"]
        reason = _reason(turn.text, opts)
        if reason:
            dropped[reason] += 1
            continue
        record = {"instruction": "\n".join(pending), "input": "", "output": turn.text.strip()}
        if history:
            record["history"] = history
        if system:
            record["system"] = system
        key = json.dumps(record, ensure_ascii=False, sort_keys=True)
        if key in seen:
            dropped["duplicate"] += 1
            continue
        seen.add(key)
        records.append(record)
    return records, candidates


def build_dataset(dialogue: DialogueFile, opts: BuildOptions, system: str | None) -> BuildResult:
    alias_map = parse_aliases(opts.character, opts.aliases, opts.aliases_file)
    character = alias_map.get(opts.character, opts.character)
    speakers = Counter(alias_map.get(u.speaker, u.speaker) for u in dialogue.utterances if u.kind == "speech")
    if character not in speakers:
        shown = ", ".join(f"{s} ({_lines(speakers[s])})" for s in closest_speakers(character, speakers))
        raise UsageError(f"--character {opts.character}: not among the {len(speakers)} speakers of "
                         f"{opts.dialogue}; closest: {shown}; fix: --character with one of them, or --alias "
                         f"{opts.character}=NAME")
    suggestions = [s for s in near_names(character, speakers) if s not in alias_map]
    variants = spelling_variants(speakers)
    dropped: Counter = Counter({reason: 0 for reason in FILTERS})
    per_scene: dict[int, list[dict]] = {}
    seen: set[str] = set()
    candidates = 0
    for scene, runs in scene_turns(dialogue.utterances, alias_map).items():
        for run in runs:
            records, n = records_for(run, character, opts, dropped, seen, system)
            candidates += n
            if records:
                per_scene.setdefault(scene, []).extend(records)
    train_scenes, eval_scenes = split_scenes(per_scene, opts.eval_fraction, opts.seed, opts.dialogue)
    return BuildResult([r for s in train_scenes for r in per_scene[s]], [r for s in eval_scenes for r in per_scene[s]],
                       dropped, speakers, candidates, train_scenes, eval_scenes, suggestions, alias_map,
                       variants)


def split_scenes(per_scene: dict[int, list[dict]], fraction: float, seed: int,
                 name: str) -> tuple[list[int], list[int]]:
    """Whole scenes held out, drawn with `seed`, until they hold at least `fraction` of the records."""
    scenes = sorted(per_scene)
    if not scenes:
        raise UsageError(f"{name}: no record is left after the filters (see the counts above); fix: loosen "
                         "--min-chars/--max-chars, --unprompted keep, or a larger --context")
    if fraction <= 0:
        return scenes, []
    if len(scenes) < 2:
        raise UsageError(f"--eval-fraction {fraction:g}: the split is by scene and the records come from one "
                         f"scene only; fix: --eval-fraction 0 (and hold out data another way)")
    order = scenes[:]
    random.Random(seed).shuffle(order)
    total = sum(len(v) for v in per_scene.values())
    held: list[int] = []
    while order[len(held):][1:] and sum(len(per_scene[s]) for s in held) < fraction * total:
        held.append(order[len(held)])
    return [s for s in scenes if s not in held], sorted(held)


def output_paths(out: Path) -> tuple[Path, Path, Path, Path]:
    """DATA.json and what is written beside it: DATA.eval.json, DATA.card.md, DATA.train.yaml."""
    from persona_lora.train.data.data_card import card_path_for, train_config_path_for

    if out.suffix != ".json" or out.name.endswith(".eval.json"):
        raise UsageError(f"--out {out}: give a .json file name not ending in .eval.json (DATA.json; "
                         "DATA.eval.json, DATA.card.md and DATA.train.yaml are written beside it)")
    return out, out.with_suffix(".eval.json"), card_path_for(out), train_config_path_for(out)


def run_build(opts: BuildOptions, print_line=print) -> int:
    from persona_lora.hashing import sha256_file
    from persona_lora.train.data.data_card import write_data_card
    from persona_lora.train.data.training_config import train_command, write_training_config

    if opts.context < 1:
        raise UsageError(f"--context must be at least 1 turn, got {opts.context}")
    if not 0 <= opts.eval_fraction <= 0.5:
        raise UsageError(f"--eval-fraction must be from 0 to 0.5, got {opts.eval_fraction}")
    if opts.min_chars < 1 or opts.max_chars < opts.min_chars:
        raise UsageError(f"--min-chars/--max-chars: need 1 <= min <= max, got {opts.min_chars} and {opts.max_chars}")
    if opts.system_prompt and opts.character_sheet:
        raise UsageError("--system-prompt and --character-sheet both give the system prompt; keep one")
    data_path, eval_path, card_path, config_path = output_paths(Path(opts.out))
    refuse_existing([data_path, eval_path, card_path, config_path], opts.overwrite)
    system = opts.system_prompt
    if opts.character_sheet:
        from persona_lora.train.data.source_text import read_source_text

        system = read_source_text(opts.character_sheet).text.strip()
    dialogue = read_dialogue(opts.dialogue)
    result = build_dataset(dialogue, opts, system)
    print_line(f"speakers of {Path(opts.dialogue).name} (after aliases):\n" + speakers_table(result.speakers))
    if result.suggestions:
        flags = " ".join(f"--alias {shell_word(s)}" for s in result.suggestions)
        listed = ", ".join(f"{s} ({_lines(result.speakers[s])})" for s in result.suggestions)
        print_line(f"did you mean: {listed} — the same character as {opts.character}? if so add: {flags}")
    for alias, name in result.variants:
        print_line(f"did you mean: {alias} ({_lines(result.speakers[alias])}) is {name} "
                   f"({_lines(result.speakers[name])})? if so add: --alias {shell_word(f'{alias}={name}')}")
    write_atomically(data_path, json.dumps(result.train, ensure_ascii=False, indent=1) + "\n")
    if result.eval:
        write_atomically(eval_path, json.dumps(result.eval, ensure_ascii=False, indent=1) + "\n")
    else:  # --overwrite: an eval file of an earlier build would no longer match this one
        eval_path.unlink(missing_ok=True)
    write_data_card(card_path, opts=opts, dialogue=dialogue, result=result, system=system,
                    data_sha256=sha256_file(data_path),
                    eval_sha256=sha256_file(eval_path) if result.eval else None)
    write_training_config(config_path, data_path=data_path, eval_path=eval_path if result.eval else None,
                          system_prompt=system, character=opts.character)
    kept = len(result.train) + len(result.eval)
    drops = ", ".join(f"{reason} {n}" for reason, n in result.dropped.items() if n) or "none"
    print_line(f"{result.candidates} turns of {opts.character}: {kept} records kept, dropped: {drops}")
    print_line(f"wrote {data_path} ({len(result.train)} records, {_scenes(len(result.scenes_train))})"
               + (f", {eval_path} ({len(result.eval)} records, {_scenes(len(result.scenes_eval))})" if result.eval
                  else "") + f", {card_path}, {config_path}")
    what = ["data.path", *(["data.eval_path (the held-out scenes)"] if result.eval else []),
            *(["data.system_prompt (the one every record carries)"] if system else [])]
    print_line(f"the training config {config_path} sets {', '.join(what)}")
    print_line(f"next: persona-lora data check {data_path}")
    print_line(f"then: {train_command(config_path, data_path)}")
    return 0
