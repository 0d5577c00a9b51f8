"""`data extract --format script` against the answer keys of our example scripts, each convention, the encodings
a user's file comes in, and the bad inputs (one clear line each, nothing written)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from persona_lora.cli import main
from persona_lora.errors import SourceFileError
from persona_lora.train.data.script_extract import extract_script
from persona_lora.train.data.source_text import decode_source_bytes, read_source_text

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "script"


def speeches(text: str) -> list[tuple[str, str]]:
    return [(u.speaker, u.line) for u in extract_script(text) if u.kind == "speech"]


def precision_recall(got: list[tuple], key: list[tuple]) -> tuple[float, float]:
    """Of (speaker, line) pairs, as multisets."""
    from collections import Counter

    hits = sum((Counter(got) & Counter(key)).values())
    return hits / max(len(got), 1), hits / max(len(key), 1)


@pytest.mark.parametrize("name", ["palace", "garden"])
def test_example_scripts_match_their_answer_keys_line_for_line(name, tmp_path):
    out = tmp_path / "d.jsonl"
    assert main(["data", "extract", str(EXAMPLES / f"{name}.txt"), "--out", str(out), "--format", "script"]) == 0
    key = [json.loads(line) for line in (EXAMPLES / f"{name}.key.jsonl").read_text(encoding="utf-8").splitlines()]
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert records[0]["kind"] == "source" and records[0]["extractor"] == "script"
    got = [{k: r[k] for k in ("speaker", "line", "scene", "source_line")} for r in records if r["kind"] == "speech"]
    precision, recall = precision_recall([(g["speaker"], g["line"]) for g in got],
                                         [(k["speaker"], k["line"]) for k in key])
    assert (precision, recall) == (1.0, 1.0)
    assert got == key  # every line, speaker, scene, source line and the order


def test_each_convention_and_what_is_kept_as_markers():
    text = "\n".join([
        "第一场 御花园 日 外",             # scene heading
        "（桃花开了。）",                   # stage direction
        "甲：全角冒号。",                   # full-width colon
        "乙:半角冒号。",                    # half-width colon
        "【丙】方括号。",                   # lenticular brackets
        "【丁】",                           # brackets alone: the speech below
        "第一行，",
        "第二行。",
        "甲（低头）：带动作。",             # a parenthetical before the colon
        "乙：话里（笑）有动作。",           # a parenthetical inside the speech
        "",
        "他们走远了。",                     # narration after a blank line: not speech
        "他说：“这是小说写法。”",           # prose with a quote: not a label
        "1-2 养心殿 夜 内",                 # another heading style: a new scene
        "MARY: Latin name.",
        "",
        "JOHN (V.O.)",                      # screenplay cue
        "(quietly)",
        "First line",
        "and the second.",
        "",
        "INT. HALL - DAY",
        "THE END.",
    ])
    got = extract_script(text)
    assert [(u.speaker, u.line, u.scene) for u in got if u.kind == "speech"] == [
        ("甲", "全角冒号。", 0), ("乙", "半角冒号。", 0), ("丙", "方括号。", 0), ("丁", "第一行，第二行。", 0),
        ("甲", "带动作。", 0), ("乙", "话里有动作。", 0), ("MARY", "Latin name.", 1),
        ("JOHN", "First line and the second.", 1)]
    by_speech = {u.line: u.directions for u in got if u.kind == "speech"}
    assert by_speech["带动作。"] == ["低头"] and by_speech["话里有动作。"] == ["笑"]
    assert by_speech["First line and the second."] == ["V.O.", "quietly"]
    markers = [(u.kind, u.text) for u in got if u.kind != "speech"]
    assert markers == [("scene", "第一场 御花园 日 外"), ("direction", "桃花开了。"), ("narration", "他们走远了。"),
                       ("narration", "他说：“这是小说写法。”"), ("scene", "1-2 养心殿 夜 内"),
                       ("scene", "INT. HALL - DAY"), ("narration", "THE END.")]
    assert [u.scene for u in got if u.kind == "scene"] == [0, 1, 2]


def test_quotes_around_a_whole_speech_are_removed_and_inner_ones_kept():
    assert speeches("A: “Hello.”\nB: He said “no”.") == [("A", "Hello."), ("B", "He said “no”.")]


# ----------------------------------------------------------------------------------------------- encodings

SCRIPT = "第一场\n甄嬛：臣妾遵旨。\n皇后：退下吧。\n"


@pytest.mark.parametrize("raw, encoding", [
    (SCRIPT.encode("utf-8"), "UTF-8"),
    (b"\xef\xbb\xbf" + SCRIPT.encode("utf-8"), "UTF-8 with BOM"),
    (SCRIPT.encode("gbk"), "GBK"),
    (SCRIPT.encode("gb18030") + "\n𠀀\n".encode("gb18030"), "GB18030"),  # 𠀀: not in GBK
    (SCRIPT.replace("\n", "\r\n").encode("utf-8"), "UTF-8"),
])
def test_encodings_are_detected_and_named(tmp_path, raw, encoding):
    path = tmp_path / "s.txt"
    path.write_bytes(raw)
    source = read_source_text(path)
    assert source.encoding == encoding
    assert source.text.startswith("第一场\n甄嬛：臣妾遵旨。\n皇后：退下吧。\n")
    assert speeches(source.text) == [("甄嬛", "臣妾遵旨。"), ("皇后", "退下吧。")]


@pytest.mark.parametrize("raw, message", [
    (b"", "is empty"),
    (b" \n\n", "is empty"),
    (b"abc\x00def", "binary file, not text \\(NUL byte at byte offset 3\\)"),
    ("Caf\u00e9 au lait: oui".encode("latin-1"), "not UTF-8 \\(invalid byte 0xe9 at byte offset 3\\) and not "
                                                 "GB18030/GBK"),
    ("甄嬛：是。".encode("utf-16"), "UTF-16/UTF-32 byte-order mark \\(byte offset 0\\)"),
    (b"\xef\xbb\xbfok \xff\xfe", "starts with a UTF-8 byte-order mark but is not UTF-8 \\(invalid byte 0xff at "
                                 "byte offset 6\\)"),
    (bytes(range(1, 9)) * 50, "looks binary"),
])
def test_undecodable_files_are_refused_naming_the_offset(raw, message):
    with pytest.raises(SourceFileError, match=message):
        decode_source_bytes(raw, "s.txt")


# ----------------------------------------------------------------------------------------------- the command


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_bad_inputs_get_one_clear_line_and_nothing_is_written(tmp_path, capsys):
    out = tmp_path / "d.jsonl"
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    binary = tmp_path / "pic.png"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    prose = tmp_path / "prose.txt"
    prose.write_text("夜深了，风吹过长长的宫墙。\n她站在窗前，很久没有说话。\n", encoding="utf-8")
    cases = [
        (empty, ["--format", "script"], "is empty"),
        (binary, [], "binary file, not text \\(NUL byte at byte offset 8\\)"),
        (prose, ["--format", "script"], "no speaker-labelled lines found; tried `NAME：line`.*`【NAME】line`.*"
                                        "screenplay.*the first lines are: '夜深了"),
        (prose, [], "reads as prose .*--format novel --endpoint URL --model NAME"),
        (tmp_path / "missing.txt", [], "does not exist"),
    ]
    import re

    for path, extra, message in cases:
        code, _, err = run_cli(capsys, "data", "extract", str(path), "--out", str(out), *extra)
        assert code in (1, 2), (path, err)
        assert err.count("\n") == 1 and re.search(message, err), err  # one line, naming the problem
        assert "Traceback" not in err and not out.exists()


def test_an_existing_output_is_kept_without_overwrite(tmp_path, capsys):
    out = tmp_path / "d.jsonl"
    out.write_text("mine\n", encoding="utf-8")
    code, _, err = run_cli(capsys, "data", "extract", str(EXAMPLES / "palace.txt"), "--out", str(out))
    assert code == 2 and "already exists" in err and "--overwrite" in err
    assert out.read_text(encoding="utf-8") == "mine\n"
    code, stdout, _ = run_cli(capsys, "data", "extract", str(EXAMPLES / "palace.txt"), "--out", str(out),
                              "--overwrite")
    assert code == 0 and "21 lines by 6 speakers in 3 scenes" in stdout
    assert json.loads(out.read_text(encoding="utf-8").splitlines()[0])["sha256"] == \
        read_source_text(EXAMPLES / "palace.txt").sha256


def test_auto_takes_a_script_as_a_script(tmp_path, capsys):
    out = tmp_path / "d.jsonl"
    code, stdout, _ = run_cli(capsys, "data", "extract", str(EXAMPLES / "garden.txt"), "--out", str(out))
    assert code == 0 and "9 lines by 4 speakers in 2 scenes" in stdout
