"""`persona-lora data extract SOURCE --out DIALOGUE.jsonl`: a script or a novel → the character lines in order.

`script` needs no model (`script_extract`); `novel` asks an OpenAI-compatible endpoint chunk by chunk
(`novel_chunks`, `novel_extract`); `auto` takes the script reading when speaker-labelled lines make up at least
`AUTO_SCRIPT_SHARE` of the text's lines and asks for `--endpoint` otherwise. The output is written whole or not
at all: a run with failed chunks writes nothing unless `--allow-failed`, and then every gap is in the file.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from persona_lora.errors import EndpointError, SourceFileError, UsageError
from persona_lora.train.data.dialogue_file import refuse_existing, write_dialogue
from persona_lora.train.data.novel_chunks import assemble, chunk_text, estimate_tokens
from persona_lora.train.data.script_extract import Utterance, extract_script, speech_share
from persona_lora.train.data.source_text import SourceText, read_source_text

AUTO_SCRIPT_SHARE = 0.3
DEFAULT_CHUNK_CHARS = 3000
DEFAULT_OVERLAP_CHARS = 300


@dataclass
class ExtractOptions:
    source: str
    out: Path
    format: str = "auto"  # script | novel | auto
    overwrite: bool = False
    endpoint: str | None = None
    model: str | None = None
    api_key_env: str | None = None
    concurrency: int = 4
    retries: int = 3
    backoff: float = 1.0
    timeout: float = 120.0
    chunk_chars: int = DEFAULT_CHUNK_CHARS
    overlap_chars: int = DEFAULT_OVERLAP_CHARS
    cache_dir: Path | None = None
    dry_run: bool = False
    allow_failed: bool = False
    json_schema: bool = True


def default_cache_dir() -> Path:
    """Answers are the user's state: under the user's cache folder, never in the project."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "persona-lora" / "extract"


def run_extract(opts: ExtractOptions, print_line=print) -> int:
    if not opts.dry_run:
        refuse_existing([opts.out], opts.overwrite)
    source = read_source_text(opts.source)
    print_line(f"read {source.path.name}: {source.size:,} bytes, {source.encoding}")
    fmt = opts.format
    utterances: list[Utterance] | None = None
    if fmt in ("script", "auto"):
        try:
            utterances = extract_script(source.text, source.path.name)
        except SourceFileError:
            if fmt == "script":
                raise
        share = speech_share(utterances, source.text) if utterances else 0.0
        if fmt == "auto" and share < AUTO_SCRIPT_SHARE:
            if not opts.endpoint:
                found = sum(u.kind == "speech" for u in utterances or [])
                raise UsageError(
                    f"{source.path.name} reads as prose ({found} speaker-labelled lines, {share:.0%} of its lines): "
                    "extract with a model: --format novel --endpoint URL --model NAME [--api-key-env VAR]; or "
                    "--format script to take only the labelled lines")
            fmt, utterances = "novel", None
        elif fmt == "auto":
            fmt = "script"
    if fmt == "script":
        assert utterances is not None
        if opts.dry_run:
            print_line(summary(utterances))
            print_line(f"dry run: nothing written (would write {opts.out})")
            return 0
        write_dialogue(opts.out, _header(source, "script", {}), utterances)
        print_line(summary(utterances))
        print_line(f"wrote {opts.out}; next: persona-lora data build {opts.out} --character NAME --out DATA.json")
        return 0
    return _run_novel(opts, source, print_line)


def _header(source: SourceText, extractor: str, settings: dict) -> dict:
    return {"file": source.path.name, "sha256": source.sha256, "bytes": source.size, "encoding": source.encoding,
            "extractor": extractor, "settings": settings}


def summary(utterances: list[Utterance]) -> str:
    kinds = Counter(u.kind for u in utterances)
    speakers = Counter(u.speaker for u in utterances if u.kind == "speech")
    scenes = len({u.scene for u in utterances})
    top = ", ".join(f"{name} {n}" for name, n in speakers.most_common(8))
    more = f", … {len(speakers) - 8} more" if len(speakers) > 8 else ""
    markers = ", ".join(f"{kinds[k]} {k}" for k in ("scene", "direction", "narration", "gap") if kinds[k])
    return (f"{kinds['speech']:,} lines by {len(speakers)} speakers in {scenes} scene{'s' if scenes != 1 else ''} "
            f"({top}{more}); markers kept: {markers or 'none'}")


def _run_novel(opts: ExtractOptions, source: SourceText, print_line) -> int:
    from persona_lora.train.data.novel_extract import (
        PROMPT_VERSION,
        SYSTEM_PROMPT,
        AnswerCache,
        EndpointSettings,
        NovelClient,
        run_chunks,
    )

    if opts.chunk_chars < 200:
        raise UsageError(f"--chunk-chars must be at least 200, got {opts.chunk_chars}")
    if not 0 <= opts.overlap_chars < opts.chunk_chars // 2:
        raise UsageError(f"--overlap-chars must be from 0 to half of --chunk-chars ({opts.chunk_chars // 2}), got "
                         f"{opts.overlap_chars}")
    chunks = chunk_text(source.text, chunk_chars=opts.chunk_chars, overlap_chars=opts.overlap_chars)
    cache = AnswerCache(opts.cache_dir or default_cache_dir(), (opts.model or "").strip())
    if opts.dry_run:
        cached = sum(cache.get(c) is not None for c in chunks) if opts.model else 0
        tokens = sum(estimate_tokens(c.text) + estimate_tokens(SYSTEM_PROMPT) for c in chunks)
        print_line(f"dry run: {len(chunks)} chunks of up to {opts.chunk_chars:,} characters ({opts.overlap_chars} "
                   f"overlap), about {tokens:,} prompt tokens in all (estimate: 1 per CJK character, 1 per 4 "
                   f"others); {cached} already answered in the cache"
                   + ("" if opts.model else " (give --model to count them)")
                   + f"; would send {len(chunks) - cached}; nothing sent, nothing written")
        return 0
    if not opts.endpoint or not opts.model:
        raise UsageError("--format novel needs --endpoint URL and --model NAME (an OpenAI-compatible chat API, e.g. "
                         "vLLM at http://127.0.0.1:8000/v1); --dry-run counts the chunks without them")
    client = NovelClient(EndpointSettings(opts.endpoint, opts.model.strip(), opts.api_key_env, opts.concurrency,
                                          opts.retries, opts.backoff, opts.timeout, opts.json_schema),
                         progress=print_line)
    try:
        run = run_chunks(chunks, client, cache, progress=print_line)
    finally:
        client.close()
    print_line(f"{len(chunks)} chunks: {run.from_cache} from the cache, {run.sent} sent ({run.requests} requests), "
               f"{len(run.failures)} failed")
    if run.failures:
        _refuse_failed(opts, run, len(chunks), cache.folder)
    answers = {i: run.answers.get(i) for i in range(len(chunks))}
    utterances, repeats = assemble(source.text, chunks, answers)
    settings = {"model": opts.model.strip(), "prompt_version": PROMPT_VERSION, "chunk_chars": opts.chunk_chars,
                "overlap_chars": opts.overlap_chars, "chunks": len(chunks), "overlap_repeats_dropped": repeats,
                "failed_chunks": sorted(run.failures), "json_schema": opts.json_schema and not run.schema_refused}
    write_dialogue(opts.out, _header(source, "novel", settings), utterances)
    print_line(summary(utterances) + f"; {repeats} overlap repeats dropped")
    print_line(f"wrote {opts.out}; next: persona-lora data build {opts.out} --character NAME --out DATA.json")
    return 0


def _refuse_failed(opts: ExtractOptions, run, total: int, cache_folder: Path) -> None:
    failed = sorted(run.failures)
    reasons = "; ".join(f"chunk {i + 1}: {run.failures[i]}" for i in failed[:3])
    more = f"; … {len(failed) - 3} more" if len(failed) > 3 else ""
    if len(failed) == total:
        raise EndpointError(f"every chunk failed ({total} of {total}): {reasons}{more}; nothing written to "
                            f"{opts.out}")
    if not opts.allow_failed:
        raise EndpointError(f"{len(failed)} of {total} chunks failed ({reasons}{more}); the {total - len(failed)} "
                            f"answers received are cached in {cache_folder}: run the same command again to ask only "
                            f"for the failed chunks, or add --allow-failed to write the rest with each gap marked; "
                            f"nothing written to {opts.out}")
