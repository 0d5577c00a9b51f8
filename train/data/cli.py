"""`persona-lora data check|preview|extract|build`: make a dataset and look at it before training on it.

    persona-lora data extract examples/script/palace.txt --out runs/palace.dialogue.jsonl
    persona-lora data build runs/palace.dialogue.jsonl --character 林婉 --alias 婉婉 --out runs/palace.json

    persona-lora data check examples/data/persona_zh.json
    persona-lora data check examples/data/persona_zh.json --base ./tiny-base --max-length 512
    persona-lora data preview examples/data/persona_multiturn.jsonl --base ./tiny-base -n 2

`check` validates (exit 0 valid, 1 invalid with every problem on stderr, 2 usage) and prints statistics; with
`--base` it also tokenizes every record through the one formatting path (persona_lora/chat_format.py) and prints token
lengths. `preview` prints the exact training text with the trained spans (labels != -100) marked, or with
`--json` one object per record with `input_ids`, `labels` and `text`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from typing import Any

from persona_lora.dataset.reading import LoadedDataset, dataset_stats, load_records
from persona_lora.errors import UsageError

logger = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 1024
# Far beyond any real sequence: used to measure full lengths without truncating.
_UNLIMITED = 10**9
MARK_OPEN, MARK_CLOSE = "⟦", "⟧"
ANSI_TRAINED, ANSI_RESET = "\033[1;32m", "\033[0m"


def configure_data(data: argparse.ArgumentParser) -> None:
    """`persona-lora data` with its `check` and `preview` subcommands."""
    data.description = ("Make a dataset from a script or a novel (extract, build), validate it and see exactly what "
                        "training will see (check, preview).")
    sub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND")

    check = sub.add_parser("check", help="validate a dataset and print statistics",
                           description="Validate a dataset (exit 0 valid, 1 invalid, 2 usage) and print statistics; "
                                       "with --base also token-length statistics.")
    _add_source_args(check)
    check.add_argument("--base", help="base model (local dir or hub id) whose tokenizer measures token lengths")
    check.add_argument("--max-length", type=int, default=None,
                       help=f"count records longer than this many tokens (needs --base; default {DEFAULT_MAX_LENGTH})")
    _add_format_args(check)

    preview = sub.add_parser("preview", help="show the exact training text with the trained spans marked",
                             description="Print the exact text each record becomes, with the tokens the model is "
                                         f"trained on wrapped in {MARK_OPEN} {MARK_CLOSE} (green on a terminal).")
    _add_source_args(preview)
    preview.add_argument("--base", required=True, help="base model (local dir or hub id) whose tokenizer to use")
    preview.add_argument("-n", type=int, default=3, help="how many records to show (default 3)")
    preview.add_argument("--json", action="store_true",
                         help="one JSON object per record: origin, input_ids, labels, text, truncated")
    preview.add_argument("--max-length", type=int, default=DEFAULT_MAX_LENGTH,
                         help=f"truncate to this many tokens, as training would (default {DEFAULT_MAX_LENGTH})")
    preview.add_argument("--train-on", choices=["all", "last"], default="all",
                         help="train on every assistant turn or only the last (default all)")
    _add_format_args(preview)
    _configure_extract(sub)
    _configure_build(sub)
    data.set_defaults(data_parser=data)


def _configure_extract(sub) -> None:
    from pathlib import Path

    p = sub.add_parser("extract", help="a script or a novel → its lines in order, with who speaks (JSON Lines)",
                       description="Read a script (speaker-labelled lines: 名字：…, 【名字】…, NAME: …, screenplay "
                                   "cues) without a model, or a novel through an OpenAI-compatible endpoint, and "
                                   "write one JSON object per utterance: speaker, line, scene, source position.")
    p.add_argument("source", metavar="SOURCE", help="the text file (UTF-8, UTF-8 with BOM, GB18030/GBK)")
    p.add_argument("--out", required=True, type=Path, metavar="DIALOGUE.jsonl", help="where to write the lines")
    p.add_argument("--format", choices=("auto", "script", "novel"), default="auto",
                   help="script (no model), novel (asks --endpoint), auto (script when speaker labels make up the "
                        "text; default)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--dry-run", action="store_true", help="print what would be done (novel: chunks, token estimate, "
                   "answers already cached); send and write nothing")
    novel = p.add_argument_group("novel (an OpenAI-compatible chat endpoint: vLLM, SGLang, a hosted API)")
    novel.add_argument("--endpoint", metavar="URL", help="the API base, e.g. http://127.0.0.1:8000/v1")
    novel.add_argument("--model", metavar="NAME", help="the model name at the endpoint")
    novel.add_argument("--api-key-env", metavar="VAR", help="environment variable holding the API key (never "
                       "printed or stored); leave out for an endpoint without a key")
    novel.add_argument("--concurrency", type=int, default=4, metavar="N", help="chunks asked at once (default 4)")
    novel.add_argument("--retries", type=int, default=3, metavar="N",
                       help="tries after the first for a failed or invalid answer (default 3)")
    novel.add_argument("--retry-delay", type=float, default=1.0, metavar="S",
                       help="seconds before the first retry, doubled each time (default 1)")
    novel.add_argument("--timeout", type=float, default=120.0, metavar="S", help="seconds to wait for one answer "
                       "(default 120)")
    novel.add_argument("--chunk-chars", type=int, default=3000, metavar="N", help="characters per chunk "
                       "(default 3000)")
    novel.add_argument("--overlap-chars", type=int, default=300, metavar="N", help="characters each chunk repeats "
                       "of the one before, so no conversation is cut (default 300)")
    novel.add_argument("--cache-dir", type=Path, metavar="DIR", help="where answers are kept (default "
                       "$XDG_CACHE_HOME/persona-lora/extract): a re-run sends only chunks without one")
    novel.add_argument("--allow-failed", action="store_true", help="write the output even when chunks failed, each "
                       "gap marked in it (default: write nothing)")
    novel.add_argument("--no-json-schema", action="store_true", help="do not send response_format json_schema "
                       "(answers are validated either way)")


def _configure_build(sub) -> None:
    from pathlib import Path

    p = sub.add_parser("build", help="a dialogue file → an Alpaca dataset of one character's lines, with its card",
                       description="Each line of --character becomes an answer, the turns before it in the scene "
                                   "the instruction and history. Writes DATA.json, DATA.eval.json (held-out "
                                   "scenes), DATA.card.md (provenance) and DATA.train.yaml (the training config "
                                   "`persona-lora train` takes: data.path, data.eval_path, data.system_prompt).")
    p.add_argument("dialogue", metavar="DIALOGUE.jsonl", help="the file `data extract` wrote")
    p.add_argument("--character", required=True, metavar="NAME", help="whose lines become the answers")
    p.add_argument("--alias", action="append", default=[], metavar="A[=NAME]",
                   help="another name of --character (or A=NAME: of NAME); repeatable")
    p.add_argument("--aliases", metavar="FILE", help='aliases file: JSON {"NAME": ["A", …]} or lines NAME: A, B')
    p.add_argument("--out", required=True, type=Path, metavar="DATA.json", help="the training file")
    p.add_argument("--context", type=int, default=4, metavar="N", help="turns before a line kept as its context "
                   "(default 4)")
    p.add_argument("--unprompted", choices=("drop", "keep"), default="drop",
                   help="lines nobody spoke before in the scene: drop (default) or keep with '(scene start)'")
    p.add_argument("--min-chars", type=int, default=2, metavar="N", help="drop shorter answers (default 2)")
    p.add_argument("--max-chars", type=int, default=1000, metavar="N", help="drop longer answers (default 1000)")
    p.add_argument("--system-prompt", metavar="TEXT", help="system prompt of every record (and data.system_prompt "
                   "of DATA.train.yaml)")
    p.add_argument("--character-sheet", metavar="FILE", help="a text file whose text becomes the system prompt")
    p.add_argument("--eval-fraction", type=float, default=0.1, metavar="X",
                   help="share of records held out, by whole scenes, in DATA.eval.json (default 0.1; 0: none)")
    p.add_argument("--seed", type=int, default=42, help="seed of the scene split (default 42)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")


def run_data(args: argparse.Namespace) -> int:
    """`data check|preview|extract|build`; `data` alone prints its help (usage error)."""
    if args.data_command == "check":
        return cmd_check(args)
    if args.data_command == "preview":
        return cmd_preview(args)
    if args.data_command == "extract":
        from persona_lora.train.data.extract import ExtractOptions, run_extract

        return run_extract(ExtractOptions(
            args.source, args.out, args.format, args.overwrite, args.endpoint, args.model, args.api_key_env,
            args.concurrency, args.retries, args.retry_delay, args.timeout, args.chunk_chars, args.overlap_chars,
            args.cache_dir, args.dry_run, args.allow_failed, not args.no_json_schema))
    if args.data_command == "build":
        from persona_lora.train.data.build import BuildOptions, run_build

        return run_build(BuildOptions(
            args.dialogue, args.character, args.out, args.alias, args.aliases, args.context, args.unprompted,
            args.min_chars, args.max_chars, args.system_prompt, args.character_sheet, args.eval_fraction, args.seed,
            args.overwrite))
    args.data_parser.print_help()
    return 2


def _add_source_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", metavar="PATH", help="a .json / .jsonl file (SFT records, or DPO/KTO preference "
                        "records), a hub dataset id owner/name, or the demo's vote database (SQLite)")
    parser.add_argument("--revision", help="hub dataset revision (branch, tag or commit)")
    parser.add_argument("--split", default="train", help="hub dataset split (default train)")


def _add_format_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--system-prompt", default=None,
                        help="system prompt prepended to records that have none (as training would)")
    parser.add_argument("--base-revision", default=None, help="revision of --base on its hub")
    parser.add_argument("--chat-template", default=None, metavar="FILE",
                        help="Jinja chat template file, for a base whose tokenizer has none")


# ----------------------------------------------------------------------------------------------- check


def cmd_check(args: argparse.Namespace) -> int:
    """Validate (DataError propagates to the CLI: exit 1), print statistics, then token lengths with --base."""
    if args.max_length is not None and not args.base:
        raise UsageError("data check: --max-length needs --base (token lengths need the base's tokenizer); "
                         "fix: add --base MODEL or drop --max-length")
    max_length = args.max_length if args.max_length is not None else DEFAULT_MAX_LENGTH
    if max_length < 1:
        raise UsageError(f"data check: --max-length must be a positive number of tokens, got {max_length}")
    from persona_lora.train import preference_data

    if preference_data.is_preference_source(args.path):  # the demo's votes or a DPO/KTO file
        prefs = preference_data.load_preferences(args.path)
        print(preference_data.format_preference_stats(prefs))
        if args.base:
            print(preference_data.token_report(prefs, _tokenizer(args), system_prompt=args.system_prompt,
                                               max_length=max_length, base=args.base))
        return 0
    ds = load_records(args.path, revision=args.revision, split=args.split)
    print(format_stats(ds, dataset_stats(ds.records)))
    if args.base:
        tokenizer = _tokenizer(args)
        lengths = token_lengths(tokenizer, ds.records, system_prompt=args.system_prompt)
        print(format_token_stats(lengths, max_length=max_length, base=args.base, system_prompt=args.system_prompt))
    return 0


def format_stats(ds: LoadedDataset, stats: dict[str, int]) -> str:
    """The human summary `data check` prints for a valid dataset."""
    n = max(stats["records"], 1)
    where = f"hub, {ds.hub_id}" if ds.source == "hub" else "local"
    rows = [
        ("records", f"{stats['records']:,}"),
        ("with a system prompt", f"{stats['records_with_system']:,}"),
        ("multi-turn records", f"{stats['multi_turn_records']:,}"),
        ("user/assistant turns", f"{stats['turns']:,} ({stats['assistant_turns']:,} assistant)"),
        ("user chars", f"{stats['user_chars']:,} (mean {stats['user_chars'] / n:.1f} per record)"),
        ("assistant chars", f"{stats['assistant_chars']:,} (mean {stats['assistant_chars'] / n:.1f} per record)"),
        ("duplicate records", f"{stats['duplicate_records']:,}"),
    ]
    fmt = f", {ds.format}" if ds.format else ""
    head = f"OK: {ds.name} is valid ({where}{fmt}; sha256 {ds.sha256[:12]})"
    return head + "".join(f"\n  {label:<22} {value}" for label, value in rows)


def token_lengths(tokenizer: Any, records: list[dict], *, system_prompt: str | None) -> list[tuple[int, int]]:
    """(total tokens, trained tokens) per record, untruncated, through the exact training formatting path."""
    from persona_lora.chat_format import conversation_for, encode_example

    out = []
    for rec in records:
        enc = encode_example(tokenizer, conversation_for(rec["messages"], system_prompt), max_length=_UNLIMITED)
        if enc is None:
            out.append((0, 0))
            continue
        out.append((len(enc.input_ids), sum(1 for label in enc.labels if label != -100)))
    return out


def format_token_stats(lengths: list[tuple[int, int]], *, max_length: int, base: str,
                       system_prompt: str | None) -> str:
    """min/mean/p95/max token lengths and how many records `max_length` would cut."""
    totals = sorted(t for t, _ in lengths)
    trained = sum(tr for _, tr in lengths)
    total = sum(totals)
    over = sum(1 for t in totals if t > max_length)
    p95 = totals[min(len(totals) - 1, math.ceil(0.95 * len(totals)) - 1)] if totals else 0
    mean = total / len(totals) if totals else 0.0
    sp = "none" if not system_prompt else f"{len(system_prompt)} chars"
    return (f"tokens (tokenizer of {base}; system prompt: {sp}):\n"
            f"  {'length':<22} min {totals[0] if totals else 0}  mean {mean:.1f}  p95 {p95}  "
            f"max {totals[-1] if totals else 0}\n"
            f"  {'total tokens':<22} {total:,} ({trained:,} trained, "
            f"{100 * trained / total if total else 0:.1f}%)\n"
            f"  {'over max_length':<22} {over} of {len(totals)} records longer than {max_length} tokens"
            + (" (training truncates or drops them)" if over else ""))


# ----------------------------------------------------------------------------------------------- preview


def cmd_preview(args: argparse.Namespace) -> int:
    """Print the first `-n` records as the model will be trained on them."""
    problems = []
    if args.n < 1:
        problems.append(f"-n must be at least 1, got {args.n}")
    if args.max_length < 1:
        problems.append(f"--max-length must be a positive number of tokens, got {args.max_length}")
    if problems:
        raise UsageError("data preview: " + "; ".join(problems))
    from persona_lora.chat_format import conversation_for, encode_example

    ds = load_records(args.path, revision=args.revision, split=args.split)
    tokenizer = _tokenizer(args)
    color = sys.stdout.isatty() and not args.json
    if not args.json:
        legend = "green" if color else f"{MARK_OPEN}…{MARK_CLOSE}"
        print(f"{ds.name}: first {min(args.n, len(ds.records))} of {len(ds.records)} records; {legend} marks the "
              f"tokens trained on (labels != -100)")
    for rec in ds.records[: args.n]:
        enc = encode_example(tokenizer, conversation_for(rec["messages"], args.system_prompt),
                             max_length=args.max_length, train_on=args.train_on)
        if args.json:
            print(json.dumps(_preview_json(tokenizer, rec, enc), ensure_ascii=False))
        else:
            print(_preview_text(tokenizer, rec, enc, color=color))
    return 0


def _preview_json(tokenizer: Any, rec: dict, enc: Any) -> dict:
    if enc is None:
        return {"origin": rec["origin"], "dropped": True}
    return {"origin": rec["origin"], "input_ids": list(enc.input_ids), "labels": list(enc.labels),
            "text": tokenizer.decode(list(enc.input_ids), skip_special_tokens=False),
            "truncated": bool(enc.truncated)}


def _preview_text(tokenizer: Any, rec: dict, enc: Any, *, color: bool) -> str:
    if enc is None:
        return f"── {rec['origin']}: dropped (longer than --max-length) ──"
    n_trained = sum(1 for label in enc.labels if label != -100)
    note = ", truncated" if enc.truncated else ""
    head = f"── {rec['origin']}: {len(enc.input_ids)} tokens, {n_trained} trained{note} ──"
    return head + "\n" + mark_trained(tokenizer, enc.input_ids, enc.labels, color=color)


def trained_spans(input_ids: list[int], labels: list[int]) -> list[tuple[bool, list[int]]]:
    """Runs of consecutive tokens that are / are not trained on, in order."""
    spans: list[tuple[bool, list[int]]] = []
    for token, label in zip(input_ids, labels):
        trained = label != -100
        if spans and spans[-1][0] == trained:
            spans[-1][1].append(token)
        else:
            spans.append((trained, [token]))
    return spans


def mark_trained(tokenizer: Any, input_ids: list[int], labels: list[int], *, color: bool = False) -> str:
    """The decoded text with trained spans wrapped in ⟦ ⟧ (or coloured, for a terminal)."""
    parts = []
    for trained, ids in trained_spans(list(input_ids), list(labels)):
        text = tokenizer.decode(ids, skip_special_tokens=False)
        if trained:
            text = f"{ANSI_TRAINED}{text}{ANSI_RESET}" if color else f"{MARK_OPEN}{text}{MARK_CLOSE}"
        parts.append(text)
    return "".join(parts)


def _tokenizer(args: argparse.Namespace) -> Any:
    """The base's tokenizer, loaded the way training loads it (lazily: check without --base needs no torch)."""
    from persona_lora.model_loading import load_tokenizer

    return load_tokenizer(args.base, revision=args.base_revision, chat_template_file=args.chat_template)
