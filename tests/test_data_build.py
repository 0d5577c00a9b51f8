"""`data build`: context and history, merging, aliases, the speakers table, filters (each counted), the split by
scene, the system prompt, DATA.card.md and the provenance training carries on."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from persona_lora.cli import main
from persona_lora.train.data.data_card import extraction_info, read_data_card
from persona_lora.train.data.dialogue_file import write_dialogue
from persona_lora.train.data.script_extract import Utterance

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "script"


def dialogue(tmp_path: Path, scenes: list[list[tuple[str, str]]], name: str = "d.jsonl") -> Path:
    """A dialogue file of `scenes`, each a list of (speaker, line); speaker "" makes a narration marker."""
    utterances = []
    for s, scene in enumerate(scenes):
        utterances.append(Utterance("scene", s, text=f"Scene {s}"))
        for speaker, line in scene:
            utterances.append(Utterance("speech", s, speaker=speaker, line=line) if speaker
                              else Utterance("narration", s, text=line))
    path = tmp_path / name
    write_dialogue(path, {"file": "play.txt", "sha256": "ab" * 32, "encoding": "UTF-8", "extractor": "script",
                          "settings": {}}, utterances)
    return path


def build(capsys, path: Path, out: Path, *extra: str) -> tuple[int, str, str]:
    code = main(["data", "build", str(path), "--out", str(out), *extra])
    stdout, stderr = capsys.readouterr()
    return code, stdout, stderr


def records(path: Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))


SCENE = [("Anne", "q1"), ("Cleo", "a1"), ("", "She turns."), ("Cleo", "a1b"), ("Bea", "q2"), ("Anne", "q3"),
         ("Cleo", "a2")]


@pytest.mark.parametrize("context, expected_last", [
    (4, {"instruction": "Bea: q2\nAnne: q3", "input": "", "output": "a2", "history": [["Anne: q1", "a1 a1b"]]}),
    (3, {"instruction": "Bea: q2\nAnne: q3", "input": "", "output": "a2"}),  # the window starts at an answer
    (1, {"instruction": "Anne: q3", "input": "", "output": "a2"}),
])
def test_context_history_labels_and_merging(tmp_path, capsys, context, expected_last):
    out = tmp_path / "data.json"
    code, stdout, _ = build(capsys, dialogue(tmp_path, [SCENE]), out, "--character", "Cleo", "--context",
                            str(context), "--eval-fraction", "0")
    assert code == 0
    got = records(out)
    assert got[0] == {"instruction": "Anne: q1", "input": "", "output": "a1 a1b"}  # two lines, one turn
    assert got[-1] == expected_last and len(got) == 2
    assert "2 turns of Cleo: 2 records kept" in stdout


def test_cjk_speakers_are_labelled_with_a_fullwidth_colon(tmp_path, capsys):
    out = tmp_path / "data.json"
    path = dialogue(tmp_path, [[("皇后", "起来吧。"), ("甄嬛", "谢娘娘。"), ("甄嬛", "臣妾告退。")]])
    assert build(capsys, path, out, "--character", "甄嬛", "--eval-fraction", "0")[0] == 0
    assert records(out) == [{"instruction": "皇后：起来吧。", "input": "", "output": "谢娘娘。臣妾告退。"}]


def test_lines_nobody_spoke_before_are_dropped_or_kept_by_flag(tmp_path, capsys):
    path = dialogue(tmp_path, [[("Cleo", "opening words"), ("Anne", "q"), ("Cleo", "answer")]])
    out = tmp_path / "data.json"
    code, stdout, _ = build(capsys, path, out, "--character", "Cleo", "--eval-fraction", "0")
    assert code == 0 and "dropped: no line before it (scene start) 1" in stdout and len(records(out)) == 1
    build(capsys, path, out, "--character", "Cleo", "--eval-fraction", "0", "--unprompted", "keep", "--overwrite")
    assert records(out)[0] == {"instruction": "(scene start)", "input": "", "output": "opening words"}


def test_aliases_from_flags_and_files_and_the_did_you_mean_line(tmp_path, capsys):
    path = dialogue(tmp_path, [[("皇后", "q1"), ("嬛嬛", "a1"), ("皇后", "q2"), ("莞嫔", "a2"), ("皇后", "q3"),
                                ("甄嬛", "a3"), ("华妃", "q4"), ("THOMAS", "x"), ("Thomas", "y")]])
    out = tmp_path / "data.json"
    code, stdout, _ = build(capsys, path, out, "--character", "甄嬛", "--eval-fraction", "0")
    assert code == 0 and len(records(out)) == 1
    # 嬛嬛 shares a character with 甄嬛; 莞嫔 (a title) has nothing in common with the name, so only a flag finds it
    assert re.search(r"did you mean: 嬛嬛 \(1 line\) — the same character as 甄嬛\? if so add: --alias 嬛嬛\n", stdout)
    assert "did you mean: Thomas (1 line) is THOMAS (1 line)? if so add: --alias Thomas=THOMAS" in stdout
    code, stdout, _ = build(capsys, path, out, "--character", "甄嬛", "--eval-fraction", "0", "--overwrite",
                            "--alias", "嬛嬛", "--alias", "莞嫔", "--alias", "Thomas=THOMAS")
    assert [r["output"] for r in records(out)] == ["a1", "a2", "a3"] and "did you mean" not in stdout
    assert re.search(r"甄嬛\s+3\s+33\.3%", stdout)  # the speakers table, after aliases
    for name, text in [("aliases.json", json.dumps({"甄嬛": ["嬛嬛", "莞嫔"]}, ensure_ascii=False)),
                       ("aliases.txt", "# who is who\n甄嬛：嬛嬛，莞嫔\n")]:
        (tmp_path / name).write_text(text, encoding="utf-8")
        assert build(capsys, path, out, "--character", "甄嬛", "--eval-fraction", "0", "--overwrite",
                     "--aliases", str(tmp_path / name))[0] == 0
        assert [r["output"] for r in records(out)] == ["a1", "a2", "a3"]
    code, _, err = build(capsys, path, out, "--character", "甄嬛", "--overwrite", "--alias", "嬛嬛",
                         "--alias", "嬛嬛=华妃")
    assert code == 2 and "'嬛嬛' is given as an alias of both '甄嬛' and '华妃'" in err


def test_did_you_mean_finds_titles_and_aliases_that_hold_the_name_strongest_first(tmp_path, capsys):
    out = tmp_path / "data.json"
    path = dialogue(tmp_path, [[("Emperor", "q"), ("Lady Hua", "a"), ("Emperor", "q2"), ("Lady Hua", "a2"),
                                ("Hu", "x"), ("Consort Hua", "y"), ("Emperor", "q3")]])
    code, _, err = build(capsys, path, out, "--character", "hua")
    # the name inside a title first (by lines), a close spelling after; the unrelated speaker with most lines not
    assert code == 2 and "closest: Lady Hua (2 lines), Consort Hua (1 line), Hu (1 line); fix:" in err
    code, stdout, _ = build(capsys, path, out, "--character", "Lady Hua", "--eval-fraction", "0")
    assert code == 0 and "did you mean: Consort Hua (1 line) — the same character as Lady Hua? if so add: " \
        "--alias 'Consort Hua'\n" in stdout  # `Hu` is no word of `Lady Hua`: not offered
    path = dialogue(tmp_path, [[("皇后", "起来吧。"), ("莞嫔（甄嬛）", "谢娘娘。"), ("皇后", "坐。"), ("嬛嬛", "是。"),
                                ("皇后", "去吧。"), ("嬛嬛", "臣妾告退。")]], name="zh.jsonl")
    code, _, err = build(capsys, path, tmp_path / "zh.json", "--character", "甄嬛")
    assert code == 2 and "closest: 莞嫔（甄嬛） (1 line), 嬛嬛 (2 lines); fix:" in err


def test_a_character_not_among_the_speakers_lists_the_closest(tmp_path, capsys):
    path = dialogue(tmp_path, [[("Eleanor", "hi"), ("Thomas", "yes"), ("Margaret", "no")]])
    out = tmp_path / "data.json"
    code, _, err = build(capsys, path, out, "--character", "Elenor")
    assert code == 2 and err.count("\n") == 1
    assert "--character Elenor: not among the 3 speakers" in err and "closest: Eleanor (1 line)" in err
    assert not out.exists()


def test_filters_each_counted(tmp_path, capsys):
    scene = [("Anne", "q1"), ("Cleo", "……"), ("Anne", "q2"), ("Cleo", "（叹气）"), ("Anne", "q3"), ("Cleo", "嗯"),
             ("Anne", "q4"), ("Cleo", "x" * 50), ("Anne", "q5"), ("Cleo", "kept answer")]
    path = dialogue(tmp_path, [scene, [("Anne", "q5"), ("Cleo", "kept answer")]])  # the same exchange again
    out = tmp_path / "data.json"
    code, stdout, _ = build(capsys, path, out, "--character", "Cleo", "--context", "1", "--max-chars", "40",
                            "--eval-fraction", "0")
    assert code == 0 and records(out) == [{"instruction": "Anne: q5", "input": "", "output": "kept answer"}]
    assert ("6 turns of Cleo: 1 records kept, dropped: only punctuation 1, only narration or stage directions 1, "
            "too short 1, too long 1, duplicate 1") in stdout
    card = read_data_card(out, __import__("persona_lora.hashing", fromlist=["x"]).sha256_file(out))
    assert card["counts"]["dropped"] == {"no line before it (scene start)": 0, "only punctuation": 1,
                                         "only narration or stage directions": 1, "too short": 1, "too long": 1,
                                         "duplicate": 1}


def test_the_split_is_by_scene(tmp_path, capsys):
    scenes = [[("Anne", f"s{s} q{i}") if i % 2 == 0 else ("Cleo", f"s{s} a{i}") for i in range(6)]
              for s in range(10)]
    out = tmp_path / "data.json"
    code, stdout, _ = build(capsys, dialogue(tmp_path, scenes), out, "--character", "Cleo", "--eval-fraction", "0.2")
    assert code == 0
    train, held = records(out), records(tmp_path / "data.eval.json")
    scene_of = lambda r: r["output"].split()[0]  # noqa: E731
    assert len(train) + len(held) == 30 and len(held) == 6
    assert not {scene_of(r) for r in train} & {scene_of(r) for r in held}
    assert all(scene_of(r) == q.split()[1] for r in held for q, _ in r.get("history", []))  # context stays
    assert all(scene_of(r) == r["instruction"].split()[1] for r in train + held)
    assert "(24 records, 8 scenes)" in stdout and "(6 records, 2 scenes)" in stdout
    again = tmp_path / "again.json"
    build(capsys, dialogue(tmp_path, scenes, "d2.jsonl"), again, "--character", "Cleo", "--eval-fraction", "0.2")
    assert records(tmp_path / "again.eval.json") == held  # seeded
    code, _, err = build(capsys, dialogue(tmp_path, [SCENE], "one.jsonl"), tmp_path / "one.json", "--character",
                         "Cleo")
    assert code == 2 and "records come from one scene only" in err and "--eval-fraction 0" in err


def test_system_prompt_and_character_sheet(tmp_path, capsys):
    path = dialogue(tmp_path, [SCENE])
    out = tmp_path / "data.json"
    build(capsys, path, out, "--character", "Cleo", "--eval-fraction", "0", "--system-prompt", "You are Cleo.")
    assert {r["system"] for r in records(out)} == {"You are Cleo."}
    sheet = tmp_path / "cleo.md"
    sheet.write_bytes("你是克莱奥。\n".encode("gbk"))
    build(capsys, path, out, "--character", "Cleo", "--eval-fraction", "0", "--character-sheet", str(sheet),
          "--overwrite")
    assert {r["system"] for r in records(out)} == {"你是克莱奥。"}
    code, _, err = build(capsys, path, out, "--character", "Cleo", "--overwrite", "--system-prompt", "x",
                         "--character-sheet", str(sheet))
    assert code == 2 and "keep one" in err


def test_existing_outputs_are_kept_without_overwrite(tmp_path, capsys):
    path = dialogue(tmp_path, [SCENE])
    card = tmp_path / "data.card.md"
    card.write_text("my notes", encoding="utf-8")
    code, _, err = build(capsys, path, tmp_path / "data.json", "--character", "Cleo", "--eval-fraction", "0")
    assert code == 2 and "data.card.md already exists" in err and card.read_text(encoding="utf-8") == "my notes"
    assert not (tmp_path / "data.json").exists()


def test_example_end_to_end_and_the_card_binds_the_bytes(tmp_path, capsys):
    from persona_lora.dataset.reading import load_records
    from persona_lora.hashing import sha256_file

    d, out = tmp_path / "palace.dialogue.jsonl", tmp_path / "palace.json"
    assert main(["data", "extract", str(EXAMPLES / "palace.txt"), "--out", str(d)]) == 0
    assert main(["data", "build", str(d), "--character", "林婉", "--alias", "婉婉", "--alias", "婉嫔", "--out",
                 str(out), "--system-prompt", "你是林婉。"]) == 0
    assert main(["data", "check", str(out)]) == 0 and main(["data", "check", str(tmp_path / "palace.eval.json")]) == 0
    capsys.readouterr()
    assert len(load_records(str(out)).records) + len(load_records(str(tmp_path / "palace.eval.json")).records) == 10
    block = read_data_card(out, sha256_file(out))
    assert block["source_sha256"] == sha256_file(EXAMPLES / "palace.txt") and block["extractor"] == "script"
    assert block["character"] == "林婉" and block["aliases"] == {"婉婉": "林婉", "婉嫔": "林婉"}
    assert read_data_card(tmp_path / "palace.eval.json", sha256_file(tmp_path / "palace.eval.json")) == block
    info = extraction_info(out, sha256_file(out))
    assert (info.source, info.extractor, info.character, info.card) == ("palace.txt", "script", "林婉",
                                                                        "palace.card.md")
    body = (tmp_path / "palace.card.md").read_text(encoding="utf-8")
    assert "| Source sha256 | `" + block["source_sha256"] in body and "## Filters" in body and "## Speakers" in body
    out.write_text(out.read_text(encoding="utf-8").replace("臣妾", "我"), encoding="utf-8")  # edited after build
    assert extraction_info(out, sha256_file(out)) is None


@pytest.mark.slow
def test_training_on_a_built_file_carries_the_provenance_into_manifest_and_card(tiny_base, tmp_path, capsys):
    from conftest import train_args

    from persona_lora.artifact import read_manifest
    from persona_lora.hashing import sha256_file

    d, data = tmp_path / "d.jsonl", tmp_path / "palace.json"
    assert main(["data", "extract", str(EXAMPLES / "palace.txt"), "--out", str(d)]) == 0
    assert main(["data", "build", str(d), "--character", "林婉", "--alias", "婉婉", "--alias", "婉嫔", "--out",
                 str(data)]) == 0
    run = tmp_path / "run"
    assert main(train_args(tiny_base, data, run, "--max-steps", "2", "--set", "training.samples=0")) == 0
    extraction = read_manifest(run).dataset.extraction
    assert extraction.source == "palace.txt" and extraction.character == "林婉"
    assert extraction.source_sha256 == sha256_file(EXAMPLES / "palace.txt")
    card = (run / "README.md").read_text(encoding="utf-8")
    assert "palace.txt" in card and extraction.source_sha256 in card and "palace.card.md" in card


def test_a_broken_dialogue_file_names_every_problem(tmp_path, capsys):
    path = tmp_path / "d.jsonl"
    path.write_text('{"kind": "speech", "speaker": "Anne", "line": "hi", "scene": 0}\n'
                    '{"kind": "speech", "speaker": "", "line": "x"}\nnot json\n[1]\n'
                    '{"kind": "song", "text": "la"}\n'
                    '{"kind": "speech", "speaker": "Cleo", "line": "ok", "scene": -1}\n',
                    encoding="utf-8")
    code, _, err = build(capsys, path, tmp_path / "data.json", "--character", "Cleo")
    assert code == 1 and "Traceback" not in err
    for problem in ("line 2: 'speaker' must be a non-empty string", "line 3: not JSON", "line 4: expected a JSON "
                    "object", "line 5: kind 'song' is not one of", "line 6: 'scene' must be a scene index"):
        assert problem in err
    for raw, message in [(b"", "is empty"), (b"\xff\xfe{}", "not UTF-8 (invalid byte at byte offset 0)"),
                         (b'{"kind": "scene", "text": "S", "scene": 0}\n', "holds no speech records")]:
        path.write_bytes(raw)
        code, _, err = build(capsys, path, tmp_path / "data.json", "--character", "Cleo")
        assert code == 1 and err.count("\n") == 1 and message in err
    assert not (tmp_path / "data.json").exists()
