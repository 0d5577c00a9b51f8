"""Benchmark: `data extract` and `data build`, the figures the data path is judged by.

    .venv/bin/python bench/bench_data_extract.py              # 1 MB of script text
    .venv/bin/python bench/bench_data_extract.py --mb 4

Printed:
  script accuracy   precision and recall of (speaker, line) against the answer keys of examples/script/
  script 1 MB       seconds to extract + build a script of about --mb MB (our two examples repeated, with
                    scene headings, names and lines varied so nothing is a duplicate), through the CLI functions
                    with the file written and read as a user's would be; goal: under 10 s on the CPU
  novel chunks      chunks sent on a fresh run and on a re-run of `--format novel` against the local
                    OpenAI-protocol test server (tests/openai_server.py); goal: all, then 0
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
EXAMPLES = REPO / "examples" / "script"


def accuracy() -> list[tuple[str, float, float, int]]:
    from persona_lora.train.data.script_extract import extract_script

    rows = []
    for name in ("palace", "garden"):
        got = [(u.speaker, u.line) for u in extract_script((EXAMPLES / f"{name}.txt").read_text(encoding="utf-8"))
               if u.kind == "speech"]
        key = [(k["speaker"], k["line"]) for k in map(json.loads, (EXAMPLES / f"{name}.key.jsonl").read_text(
            encoding="utf-8").splitlines())]
        hits = sum((Counter(got) & Counter(key)).values())
        rows.append((name, hits / max(len(got), 1), hits / max(len(key), 1), len(key)))
    return rows


def big_script(mb: float) -> str:
    """Our examples repeated until `mb` megabytes, each copy's headings, names and lines numbered apart."""
    palace = (EXAMPLES / "palace.txt").read_text(encoding="utf-8")
    garden = (EXAMPLES / "garden.txt").read_text(encoding="utf-8")
    parts, size, i = [], 0, 0
    while size < mb * 1_000_000:
        copy = re.sub(r"^第(.)场", lambda m: f"第{i * 3 + '一二三'.index(m.group(1)) + 1}场", palace, flags=re.M)
        copy = re.sub(r"(。|？)", rf"，第{i}回\1", copy)  # lines differ from copy to copy
        copy = copy.replace("小桃", f"小桃{i % 7}")
        piece = copy + "\n" + garden.replace("INT. TEA HOUSE", f"INT. TEA HOUSE {i}").replace(
            "EXT. HARBOUR", f"EXT. HARBOUR {i}").replace("tonight.", f"tonight, for the {i}th time.") + "\n"
        parts.append(piece)
        size += len(piece.encode("utf-8"))
        i += 1
    return "".join(parts)


def time_script(mb: float, tmp: Path) -> tuple[int, float, float, int, int]:
    from persona_lora.train.data.build import BuildOptions, run_build
    from persona_lora.train.data.extract import ExtractOptions, run_extract

    source = tmp / "big.txt"
    source.write_text(big_script(mb), encoding="utf-8")
    quiet = lambda *_: None  # noqa: E731
    t0 = time.perf_counter()
    run_extract(ExtractOptions(str(source), tmp / "big.dialogue.jsonl", format="script"), quiet)
    t1 = time.perf_counter()
    run_build(BuildOptions(str(tmp / "big.dialogue.jsonl"), "林婉", tmp / "big.json", aliases=["婉婉", "婉嫔"]), quiet)
    t2 = time.perf_counter()
    lines = sum(1 for line in (tmp / "big.dialogue.jsonl").open(encoding="utf-8")) - 1
    records = len(json.loads((tmp / "big.json").read_text(encoding="utf-8"))) + len(
        json.loads((tmp / "big.eval.json").read_text(encoding="utf-8")))
    return source.stat().st_size, t1 - t0, t2 - t1, lines, records


def novel_chunks(tmp: Path) -> tuple[int, int, int]:
    from persona_lora.train.data.extract import ExtractOptions, run_extract
    from persona_lora.train.data.novel_chunks import chunk_text
    from tests.openai_server import running_openai_server

    quote = re.compile(r"(\S{1,3})说：“([^”]*)”")
    text = "".join(f"第{c}章\n" + "".join(f"林婉说：“第{c}章第{i}句。”\n风吹过宫墙，第{i}段。\n" for i in range(40))
                   for c in range(1, 6))
    path = tmp / "novel.txt"
    path.write_text(text, encoding="utf-8")
    chunks = len(chunk_text(text, chunk_chars=1000, overlap_chars=100))
    with running_openai_server(models=["extractor"]) as server:
        server.script(lambda req: json.dumps({"dialogues": [{"speaker": s, "line": line} for s, line in
                                                            quote.findall(req.last_user)]}, ensure_ascii=False))
        sent = []
        for overwrite in (False, True):
            before = len(server.requests)
            run_extract(ExtractOptions(str(path), tmp / "novel.jsonl", format="novel", endpoint=server.url,
                                       model="extractor", chunk_chars=1000, overlap_chars=100,
                                       cache_dir=tmp / "cache", overwrite=overwrite), lambda *_: None)
            sent.append(len(server.requests) - before)
    return chunks, sent[0], sent[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=1.0, help="size of the generated script in MB (default 1)")
    args = ap.parse_args()
    print("script accuracy (speaker, line) against the answer keys")
    for name, precision, recall, n in accuracy():
        print(f"  {name:<8} {n:>3} lines  precision {precision:.1%}  recall {recall:.1%}")
    with tempfile.TemporaryDirectory() as tmp:
        size, extract_s, build_s, lines, records = time_script(args.mb, Path(tmp))
        print(f"script {size / 1e6:.2f} MB ({lines:,} dialogue records, {records:,} dataset records)")
        print(f"  extract {extract_s:.2f} s  build {build_s:.2f} s  total {extract_s + build_s:.2f} s  "
              f"(goal: under 10 s)")
        chunks, fresh, rerun = novel_chunks(Path(tmp))
        print(f"novel through the test server: {chunks} chunks; sent on a fresh run {fresh}, on a re-run {rerun} "
              "(goal: all, then 0)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
