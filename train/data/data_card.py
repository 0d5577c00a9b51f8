"""DATA.card.md: where a built dataset came from, for people (the body) and for training (the front matter).

The YAML front matter's `persona_lora_data` block holds the source file's sha256, the extractor and its settings
(model and prompt version for novels), the build settings, the counts per filter and the speakers; it also holds
the sha256 of DATA.json and DATA.eval.json, so a card is only believed for the exact files it was written with:
`read_data_card` returns nothing for a data file edited after the build, and training then records no
extraction rather than a wrong one.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from persona_lora.train.data.dialogue_file import DialogueFile, write_atomically

log = logging.getLogger(__name__)
KEY = "persona_lora_data"


def card_path_for(data_path: Path) -> Path:
    """DATA.json → DATA.card.md; DATA.eval.json → DATA.card.md."""
    stem = data_path.name.removesuffix(".json").removesuffix(".eval")
    return data_path.with_name(f"{stem}.card.md")


def train_config_path_for(data_path: Path) -> Path:
    """DATA.json → DATA.train.yaml: the training config `data build` writes beside the data."""
    stem = data_path.name.removesuffix(".json").removesuffix(".eval")
    return data_path.with_name(f"{stem}.train.yaml")


class BuiltSystemPrompt(NamedTuple):
    text: str
    card: str  # the data card's file name
    config: str  # the training config's file name


def built_system_prompt(data_path: str | Path | None, data_sha256: str | None) -> BuiltSystemPrompt | None:
    """The system prompt `data build` put in every record of `data_path`, by its card (None: none, or no card
    written for these bytes)."""
    block = read_data_card(data_path, data_sha256) if data_path else None
    text = ((block or {}).get("build") or {}).get("system_prompt")
    if not isinstance(text, str) or not text:
        return None
    path = Path(data_path)
    return BuiltSystemPrompt(text, card_path_for(path).name,
                             block.get("train_config") or train_config_path_for(path).name)


def write_data_card(path: Path, *, opts: Any, dialogue: DialogueFile, result: Any,
                    system: str | None, data_sha256: str, eval_sha256: str | None) -> None:
    source = dialogue.source
    settings = source.get("settings") or {}
    block = {
        "format": "alpaca",
        "data_file": Path(opts.out).name,
        "data_sha256": data_sha256,
        "eval_file": Path(opts.out).with_suffix(".eval.json").name if eval_sha256 else None,
        "eval_sha256": eval_sha256,
        "train_config": train_config_path_for(Path(opts.out)).name,
        "source_file": source.get("file"),
        "source_sha256": source.get("sha256"),
        "source_encoding": source.get("encoding"),
        "extractor": source.get("extractor"),
        "extractor_settings": settings,
        "dialogue_file": Path(opts.dialogue).name,
        "character": opts.character,
        "aliases": dict(result.alias_map),
        "build": {"context": opts.context, "unprompted": opts.unprompted, "min_chars": opts.min_chars,
                  "max_chars": opts.max_chars, "eval_fraction": opts.eval_fraction, "seed": opts.seed,
                  "system_prompt": system},
        "counts": {"character_turns": result.candidates, "train_records": len(result.train),
                   "eval_records": len(result.eval), "train_scenes": len(result.scenes_train),
                   "eval_scenes": len(result.scenes_eval), "dropped": dict(result.dropped)},
        "speakers": dict(result.speakers.most_common(50)),
    }
    front = yaml.safe_dump({KEY: block}, allow_unicode=True, sort_keys=False, width=1000)
    write_atomically(path, f"---\n{front}---\n\n{_body(block, result)}")


def _body(block: dict, result: Any) -> str:
    extractor = block["extractor"] or "unknown"
    settings = block["extractor_settings"] or {}
    if extractor == "novel":
        extractor += f" (model `{settings.get('model')}`, prompt `{settings.get('prompt_version')}`)"
    lines = [f"# Persona dataset: {block['character']}", "",
             f"Built by `persona-lora data build` from `{block['dialogue_file']}`, extracted by "
             f"`persona-lora data extract` from `{block['source_file']}`.", "",
             "| | |", "|---|---|",
             f"| Source file | `{block['source_file']}` ({block['source_encoding']}) |",
             f"| Source sha256 | `{block['source_sha256']}` |",
             f"| Extractor | {extractor} |",
             f"| Character | {block['character']} |",
             f"| Aliases | {', '.join(f'{a} → {n}' for a, n in block['aliases'].items()) or 'none'} |",
             f"| Context turns | {block['build']['context']} |",
             f"| Train | `{block['data_file']}`: {len(result.train)} records, {len(result.scenes_train)} scene(s) |",
             "| Eval (held-out scenes) | "
             + (f"`{block['eval_file']}`: {len(result.eval)} records, {len(result.scenes_eval)} scene(s) |"
                if block["eval_file"] else "none |"),
             "", "## Filters", "", "| reason | records dropped |", "|---|---|"]
    lines += [f"| {reason} | {n} |" for reason, n in result.dropped.items()]
    total = sum(result.speakers.values()) or 1
    lines += ["", "## Speakers", "", "| speaker | lines | share |", "|---|---|---|"]
    lines += [f"| {name} | {n} | {100 * n / total:.1f}% |" for name, n in result.speakers.most_common(20)]
    lines += ["", "## Examples", ""]
    for record in result.train[:3]:
        lines += ["```", *(f"{q}\n→ {a}" for q, a in record.get("history", [])), record["instruction"],
                  f"→ {record['output']}", "```", ""]
    return "\n".join(lines)


def read_data_card(data_path: str | Path, data_sha256: str | None) -> dict | None:
    """The card's provenance block when a card beside `data_path` was written for exactly these bytes."""
    data_path = Path(data_path)
    card = card_path_for(data_path)
    if not card.is_file() or not data_sha256:
        return None
    try:
        text = card.read_text(encoding="utf-8")
        _, front, _ = text.split("---\n", 2)
        block = (yaml.safe_load(front) or {}).get(KEY)
    except (OSError, ValueError, yaml.YAMLError, AttributeError):
        log.warning("%s: unreadable front matter; the dataset's extraction is not recorded", card)
        return None
    if not isinstance(block, dict):
        return None
    if data_sha256 not in (block.get("data_sha256"), block.get("eval_sha256")):
        log.warning("%s was written for other bytes than %s (edited after `data build`?); the dataset's "
                    "extraction is not recorded", card.name, data_path.name)
        return None
    return block


def extraction_info(data_path: str | Path | None, data_sha256: str | None):
    """The manifest's `dataset.extraction` for a training file `data build` wrote (None for any other file)."""
    from persona_lora.artifact import ExtractionInfo

    block = read_data_card(data_path, data_sha256) if data_path else None
    if block is None:
        return None
    settings = block.get("extractor_settings") or {}
    return ExtractionInfo(source=block.get("source_file"), source_sha256=block.get("source_sha256"),
                          extractor=block.get("extractor"), model=settings.get("model"),
                          prompt_version=settings.get("prompt_version"), character=block.get("character"),
                          card=card_path_for(Path(data_path)).name)
