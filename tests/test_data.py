"""Dataset loading and validation (persona_lora/dataset/reading.py) and `persona-lora data check` without a tokenizer.

Every bad input must give a DataError whose message names the place (file and line/record) and the problem;
every accepted format must normalize to exactly the same message list.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pytest

from persona_lora.cli import main
from persona_lora.dataset.reading import MAX_LISTED_PROBLEMS, dataset_stats, load_records
from persona_lora.errors import DataError

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "data"
PERSONA = EXAMPLES / "persona_zh.json"
MULTITURN = EXAMPLES / "persona_multiturn.jsonl"


def jl(*records) -> str:
    """JSON Lines text from records (dicts, or raw strings written as they are)."""
    return "".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in records)


def msgs(*pairs) -> list[dict]:
    return [{"role": r, "content": c} for r, c in pairs]


GOOD = {"instruction": "你好", "output": "免礼。"}
U, A, S = "user", "assistant", "system"

# (id, file name, content, substrings the message must contain: place first, then the problem)
BAD_CASES = [
    ("malformed-json", "bad.json", '[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c" "output": "d"}\n]',
     ["bad.json, line 3, column", "invalid JSON", "Expecting ',' delimiter"]),
    ("jsonl-named-json", "bad.json", jl(GOOD, GOOD), ["bad.json, line 2", "rename it to .jsonl"]),
    ("malformed-jsonl-line", "bad.jsonl", jl(GOOD, '{"instruction": "x", "output": }', GOOD),
     ["bad.jsonl, line 2, column", "invalid JSON"]),
    ("array-in-jsonl", "bad.jsonl", json.dumps([GOOD, GOOD], indent=1),
     ["bad.jsonl", "one JSON array, not JSON Lines"]),
    ("top-level-object", "bad.json", json.dumps({"data": [GOOD]}),
     ["bad.json", "top level is a JSON object", "under 'data'"]),
    ("top-level-string", "bad.json", '"hello"', ["bad.json", "top level is a string", "array of records"]),
    ("record-not-object", "bad.json", json.dumps([GOOD, "oops"]),
     ["bad.json, record 2 (line 1)", "expected a record object", "got a string"]),
    ("output-number", "bad.json", json.dumps([GOOD, {"instruction": "几岁了", "output": 42}], indent=2),
     ["bad.json, record 2 (line 6), field 'output'", "expected a string, got a number (42)"]),
    ("output-null", "bad.jsonl", jl({"instruction": "a", "output": None}),
     ["bad.jsonl, line 1, field 'output'", "required field is null"]),
    ("messages-not-list", "bad.jsonl", jl({"messages": "hi"}),
     ["bad.jsonl, line 1, field 'messages'", "expected a list of turns, got a string"]),
    ("messages-empty", "bad.jsonl", jl({"messages": []}), ["bad.jsonl, line 1, field 'messages'", "list is empty"]),
    ("content-not-string", "bad.jsonl",
     jl({"messages": [{"role": U, "content": ["a", "b"]}, {"role": A, "content": "x"}]}),
     ["bad.jsonl, line 1, field 'messages[0].content'", "expected a string, got a list"]),
    ("content-empty", "bad.jsonl", jl({"messages": msgs((U, "hi"), (A, "   "))}),
     ["bad.jsonl, line 1, field 'messages[1].content'", "empty"]),
    ("turn-not-object", "bad.jsonl", jl({"messages": ["hi", {"role": A, "content": "x"}]}),
     ["bad.jsonl, line 1, field 'messages[0]'", "expected an object"]),
    ("history-not-pairs", "bad.jsonl", jl({**GOOD, "history": [["问", "答"], ["只有一半"]]}),
     ["bad.jsonl, line 1, field 'history[1]'", "[user, assistant] pair"]),
    ("history-not-list", "bad.jsonl", jl({**GOOD, "history": "earlier"}),
     ["bad.jsonl, line 1, field 'history'", "expected a list of [user, assistant] pairs"]),
    ("missing-output", "bad.jsonl", jl(GOOD, {"instruction": "a"}),
     ["bad.jsonl, line 2, field 'output'", "required field is missing"]),
    ("misspelled-field", "bad.jsonl", jl({"instruction": "a", "ouput": "b"}),
     ["bad.jsonl, line 1, field 'output'", "rename 'ouput' to 'output'"]),
    ("empty-instruction", "bad.jsonl", jl({"instruction": "  \n", "output": "b"}),
     ["bad.jsonl, line 1, field 'instruction'", "is empty (or only whitespace)"]),
    ("empty-output", "bad.json", json.dumps([{"instruction": "a", "output": ""}]),
     ["bad.json, record 1 (line 1), field 'output'", "is empty"]),
    ("input-wrong-type", "bad.jsonl", jl({**GOOD, "input": {"a": 1}}),
     ["bad.jsonl, line 1, field 'input'", "expected a string, got an object"]),
    ("unknown-role", "bad.jsonl", jl({"messages": msgs(("sysrem", "你是微嫔"), (U, "hi"), (A, "yo"))}),
     ["bad.jsonl, line 1, field 'messages[0].role'", "unknown role 'sysrem'; did you mean 'system'?"]),
    ("unknown-sharegpt-from", "bad.jsonl",
     jl({"conversations": [{"from": "human", "value": "hi"}, {"from": "gtp", "value": "yo"}]}),
     ["bad.jsonl, line 1, field 'conversations[1].from'", "unknown role 'gtp'; did you mean 'gpt'?"]),
    ("role-missing", "bad.jsonl", jl({"messages": [{"content": "hi"}, {"role": A, "content": "yo"}]}),
     ["bad.jsonl, line 1, field 'messages[0].role'", "is missing"]),
    ("two-user-turns", "bad.jsonl", jl(GOOD, {"messages": msgs((U, "a"), (U, "b"), (A, "c"))}),
     ["bad.jsonl, line 2, fields 'messages[0]' and 'messages[1]'", "two user turns in a row"]),
    ("no-assistant-turn", "bad.jsonl", jl({"messages": msgs((S, "sys"), (U, "a"))}),
     ["bad.jsonl, line 1", "no assistant turn"]),
    ("ends-with-user", "bad.jsonl", jl({"messages": msgs((U, "a"), (A, "b"), (U, "c"))}),
     ["bad.jsonl, line 1, field 'messages[2]'", "ends with a user turn"]),
    ("starts-with-assistant", "bad.jsonl", jl({"messages": msgs((A, "b"), (U, "c"), (A, "d"))}),
     ["bad.jsonl, line 1, field 'messages[0]'", "starts with an assistant turn"]),
    ("system-not-first", "bad.jsonl", jl({"messages": msgs((U, "a"), (S, "sys"), (A, "b"))}),
     ["bad.jsonl, line 1, field 'messages[1]'", "system message may only come first"]),
    ("mixed-formats", "bad.jsonl", jl(GOOD, GOOD, {"messages": msgs((U, "a"), (A, "b"))}),
     ["mixed formats in one file", "1 record in chat 'messages' (role/content), first at bad.jsonl, line 3", "Alpaca",
      "messages"]),
    ("record-mixes-formats", "bad.jsonl", jl({**GOOD, "messages": msgs((U, "a"), (A, "b"))}),
     ["bad.jsonl, line 1", "mixes formats"]),
    ("no-known-format", "bad.jsonl", jl({"instrucion": "a", "answer": "b"}),
     ["bad.jsonl, line 1", "no known format", "rename 'instrucion' to 'instruction'"]),
    ("empty-file", "bad.json", "", ["bad.json", "the file is empty"]),
    ("whitespace-file", "bad.jsonl", "  \n\n ", ["bad.jsonl", "the file is empty"]),
    ("blank-lines-and-spaces-jsonl", "bad.jsonl", "\n\t\n", ["bad.jsonl", "the file is empty"]),
    ("empty-array", "bad.json", "[ ]", ["bad.json", "the array is empty"]),
    ("csv", "data.csv", "instruction,output\na,b\n", ["data.csv", "unsupported file type '.csv'", ".json", ".jsonl"]),
    ("txt", "notes.txt", "hello", ["notes.txt", "unsupported file type '.txt'", ".json", ".jsonl"]),
    ("non-utf8-gbk", "bad.jsonl", b'{"instruction": "hi", "output": "ok"}\n' + jl(GOOD).encode("gbk"),
     ["bad.jsonl, line 2", "not valid UTF-8: byte 0xc4 at byte offset 55 (column 18)", "iconv -f GB18030"]),
    ("utf16", "bad.json", json.dumps([GOOD]).encode("utf-16"), ["bad.json", "UTF-16"]),
]


@pytest.mark.parametrize("name, content, expected", [c[1:] for c in BAD_CASES], ids=[c[0] for c in BAD_CASES])
def test_bad_input_names_place_and_problem(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    with pytest.raises(DataError) as info:
        load_records(str(path))
    message = str(info.value)
    for part in expected:
        assert part in message, f"{part!r} not in:\n{message}"
    assert all("fix:" in p or "did you mean" in p for p in info.value.problems), info.value.problems


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "persona.jsonl"
    (tmp_path / "persona.json").write_text("[]")
    with pytest.raises(DataError) as info:
        load_records(str(missing))
    assert f"file not found: {missing}" in str(info.value)
    assert "persona.json" in str(info.value)  # the near miss is suggested


def test_missing_relative_path_is_not_taken_for_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"file not found: data/train\.json"):
        load_records("data/train.json")


def test_directory_is_refused_and_its_files_listed(tmp_path):
    (tmp_path / "a.jsonl").write_text(jl(GOOD))
    with pytest.raises(DataError) as info:
        load_records(str(tmp_path))
    assert f"{tmp_path} is a directory" in str(info.value)
    assert "a.jsonl" in str(info.value)


def test_all_problems_are_collected(tmp_path):
    path = tmp_path / "many.jsonl"
    path.write_text(jl(GOOD, {"instruction": "a", "output": 3}, GOOD, "{not json", {**GOOD, "history": "x"}))
    with pytest.raises(DataError) as info:
        load_records(str(path))
    problems = info.value.problems
    assert len(problems) == 3, problems
    assert [p.split(":")[0].split(",")[1].strip() for p in problems] == ["line 2", "line 4", "line 5"]
    assert str(info.value).startswith(f"{path}: 3 problems found")


def test_problem_list_in_message_is_capped(tmp_path):
    path = tmp_path / "big.jsonl"
    path.write_text(jl(*[{"instruction": "a", "output": i} for i in range(MAX_LISTED_PROBLEMS + 12)]))
    with pytest.raises(DataError) as info:
        load_records(str(path))
    assert len(info.value.problems) == MAX_LISTED_PROBLEMS + 12
    message = str(info.value)
    assert f"{MAX_LISTED_PROBLEMS + 12} problems found" in message
    assert message.count("\n  - ") == MAX_LISTED_PROBLEMS
    assert message.endswith("... and 12 more")


def test_unknown_keys_warn_once(tmp_path, caplog):
    path = tmp_path / "extra.jsonl"
    path.write_text(jl({**GOOD, "id": 1}, {**GOOD, "id": 2, "tag": "x"}, GOOD))
    with caplog.at_level(logging.WARNING, logger="persona_lora.dataset.reading"):
        ds = load_records(str(path))
    assert len(ds.records) == 3
    warnings = [r.getMessage() for r in caplog.records if r.name == "persona_lora.dataset.reading"]
    assert len(warnings) == 1
    assert "extra.jsonl" in warnings[0] and "'id' (2 records)" in warnings[0] and "'tag' (1 record)" in warnings[0]


# ----------------------------------------------------------------------------------------------- good paths

ALPACA_FULL = [
    {"instruction": "你是谁？", "input": "", "output": "本宫沈知微。"},
    {"instruction": "评价这道点心。", "input": "桂花糕", "output": "甜而不腻。"},
    {"instruction": "介绍自己", "input": "  ", "output": "本宫微嫔。", "system": "你是微嫔。"},
    {"instruction": "还记得吗？", "output": "记得。", "history": [["你好", "免礼。"], ["喝茶吗", "好。"]],
     "system": ""},
]
ALPACA_EXPECTED = [
    msgs((U, "你是谁？"), (A, "本宫沈知微。")),
    msgs((U, "评价这道点心。\n桂花糕"), (A, "甜而不腻。")),
    msgs((S, "你是微嫔。"), (U, "介绍自己"), (A, "本宫微嫔。")),
    msgs((U, "你好"), (A, "免礼。"), (U, "喝茶吗"), (A, "好。"), (U, "还记得吗？"), (A, "记得。")),
]


def test_alpaca_json_array(tmp_path):
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(ALPACA_FULL, ensure_ascii=False, indent=2), encoding="utf-8")
    ds = load_records(str(path))
    assert [r["messages"] for r in ds.records] == ALPACA_EXPECTED
    assert [r["origin"] for r in ds.records] == [f"alpaca.json:record {i}" for i in range(1, 5)]
    assert (ds.name, ds.source, ds.format, ds.hub_id) == ("alpaca.json", "local", "alpaca", None)
    assert ds.path == str(path.resolve())
    assert ds.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_alpaca_jsonl_with_bom_and_blank_lines(tmp_path):
    path = tmp_path / "alpaca.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + (jl(*ALPACA_FULL[:2]) + "\n\n" + jl(*ALPACA_FULL[2:])).encode("utf-8"))
    ds = load_records(str(path))
    assert [r["messages"] for r in ds.records] == ALPACA_EXPECTED
    assert [r["origin"] for r in ds.records] == ["alpaca.jsonl:1", "alpaca.jsonl:2", "alpaca.jsonl:5", "alpaca.jsonl:6"]


def test_messages_format(tmp_path):
    path = tmp_path / "chat.jsonl"
    conversation = msgs((S, "你是微嫔。"), (U, "你好"), (A, "免礼。"), (U, "喝茶吗"), (A, "好。"))
    path.write_text(jl({"messages": conversation}, {"messages": msgs((U, "早"), (A, "晨安。"))}), encoding="utf-8")
    ds = load_records(str(path))
    assert ds.format == "messages"
    assert ds.records == [{"messages": conversation, "origin": "chat.jsonl:1"},
                          {"messages": msgs((U, "早"), (A, "晨安。")), "origin": "chat.jsonl:2"}]


def test_sharegpt_format(tmp_path):
    path = tmp_path / "sharegpt.json"
    data = [
        {"conversations": [{"from": "system", "value": "你是微嫔。"}, {"from": "human", "value": "你好"},
                           {"from": "gpt", "value": "免礼。"}]},
        {"system": "宫中。",
         "conversations": [{"from": "user", "value": "早"}, {"from": "assistant", "value": "晨安。"}]},
    ]
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    ds = load_records(str(path))
    assert ds.format == "sharegpt"
    assert [r["messages"] for r in ds.records] == [
        msgs((S, "你是微嫔。"), (U, "你好"), (A, "免礼。")),
        msgs((S, "宫中。"), (U, "早"), (A, "晨安。")),
    ]


HUB_SET = "tester/persona-set"


def test_hub_dataset_is_loaded_through_datasets_and_validated(hub_server):
    """A dataset repo on the (local) Hub, read by the real `datasets` client at the revision asked for."""
    hub_server.add_repo(HUB_SET, {"train.jsonl": jl({"instruction": "旧", "output": "旧答。"})}, repo_type="dataset")
    rows = jl(GOOD, {"instruction": "早", "input": None, "output": "晨安。"})
    hub_server.commit_files(HUB_SET, {"train.jsonl": rows}, repo_type="dataset", branch="v1")
    ds = load_records(HUB_SET, revision="v1", split="train")
    assert (ds.source, ds.name, ds.hub_id, ds.path) == ("hub", HUB_SET, HUB_SET, None)
    assert [r["messages"] for r in ds.records] == [msgs((U, "你好"), (A, "免礼。")), msgs((U, "早"), (A, "晨安。"))]
    assert ds.records[1]["origin"] == f"{HUB_SET}:record 2"
    assert ds.sha256 == load_records(HUB_SET, revision="v1").sha256  # canonical, deterministic
    assert f"/api/datasets/{HUB_SET}/revision/v1" in hub_server.paths_requested("GET")
    main_branch = load_records(HUB_SET)
    assert [r["messages"] for r in main_branch.records] == [msgs((U, "旧"), (A, "旧答。"))]
    assert main_branch.sha256 != ds.sha256


def test_data_check_reads_a_hub_dataset(hub_server, capsys):
    hub_server.add_repo(HUB_SET, {"data/train.jsonl": jl(GOOD, GOOD, {"instruction": "早", "output": "晨安。"})},
                        repo_type="dataset")
    assert main(["data", "check", HUB_SET]) == 0
    out = capsys.readouterr().out
    assert f"OK: {HUB_SET} is valid" in out and "records                3" in out and "duplicate" in out


def test_hub_failure_is_a_clear_data_error(hub_server, fast_retries):
    url = hub_server.url
    for missing in ("nobody/no-such-dataset", HUB_SET):  # no such repo; then the hub is down
        with pytest.raises(DataError) as info:
            load_records(missing)
        message = str(info.value)
        assert f"{missing}: could not load hub dataset (split 'train')" in message
        assert "check the id" in message and "network" in message
        assert f"HF_ENDPOINT (now {url})" in message
        hub_server.stop()


def test_hub_rows_are_validated_like_files(hub_server):
    hub_server.add_repo("tester/set", {"data.jsonl": jl(GOOD, {"instruction": "a", "output": None})},
                        repo_type="dataset")
    with pytest.raises(DataError, match=r"tester/set, record 2, field 'output': required field is null"):
        load_records("tester/set")


def test_dataset_stats():
    records = [
        {"messages": msgs((S, "s"), (U, "ab"), (A, "cde")), "origin": "x:1"},
        {"messages": msgs((U, "f"), (A, "gh"), (U, "i"), (A, "jkl")), "origin": "x:2"},
        {"messages": msgs((U, "f"), (A, "gh"), (U, "i"), (A, "jkl")), "origin": "x:3"},
    ]
    assert dataset_stats(records) == {
        "records": 3, "turns": 10, "assistant_turns": 5, "user_chars": 2 + 2 * 2, "assistant_chars": 3 + 5 * 2,
        "records_with_system": 1, "multi_turn_records": 2, "duplicate_records": 1,
    }


# ----------------------------------------------------------------------------------------------- sample data


def test_persona_sample_loads_cleanly():
    ds = load_records(str(PERSONA))
    raw = json.loads(PERSONA.read_text(encoding="utf-8"))
    assert len(ds.records) == len(raw) >= 160
    instructions = [r["instruction"] for r in raw]
    assert len(set(instructions)) == len(instructions)
    assert all(len(r["output"]) < 60 for r in raw)
    assert 8 <= sum(bool(r.get("input")) for r in raw) <= 15
    assert 4 <= sum(bool(r.get("system")) for r in raw) <= 8
    assert all("本宫" in r["output"] or "臣妾" in r["output"] for r in raw[:3])


def test_multiturn_sample_loads_cleanly():
    ds = load_records(str(MULTITURN))
    assert ds.format == "messages" and len(ds.records) >= 20
    for rec in ds.records:
        exchanges = sum(m["role"] == "assistant" for m in rec["messages"])
        assert 2 <= exchanges <= 3, rec["origin"]
    assert any(rec["messages"][0]["role"] == "system" for rec in ds.records)


# ----------------------------------------------------------------------------------------------- data check CLI


def test_data_check_valid_prints_stats(capsys):
    assert main(["data", "check", str(PERSONA)]) == 0
    out = capsys.readouterr().out
    assert "OK: persona_zh.json is valid" in out
    n = len(json.loads(PERSONA.read_text(encoding="utf-8")))
    assert f"records                {n}" in out
    assert "with a system prompt" in out and "assistant chars" in out


def test_data_check_invalid_lists_errors_on_stderr(tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text(jl(GOOD, {"instruction": "a", "output": 3}, {"instruction": "a"}))
    assert main(["data", "check", str(path)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "persona-lora data: error:" in captured.err and "2 problems found" in captured.err
    assert "bad.jsonl, line 2, field 'output': expected a string, got a number (3)" in captured.err
    assert "bad.jsonl, line 3, field 'output': required field is missing" in captured.err


def test_data_check_usage_errors_exit_2(capsys):
    assert main(["data"]) == 2
    assert main(["data", "check", str(PERSONA), "--max-length", "10"]) == 2
    assert "--max-length needs --base" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["data", "check"])
    assert info.value.code == 2


@pytest.mark.parametrize("record", [
    '{"instruction": "hi \\ud800 there", "output": "ok"}',
    '{"instruction": "hi", "output": "ok", "system": "\\udfff"}',
    '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b\\ud83d"}]}',
    '{"instruction": "hi", "output": "ok", "history": [["x\\ud800", "y"]]}',
])
def test_text_no_tokenizer_can_encode_is_named_by_data_check(tmp_path, record):
    """A lone surrogate passes JSON parsing but crashes the tokenizer: data check names the record instead."""
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "fine", "output": "fine"}\n' + record + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.jsonl, line 2, field .*lone surrogate \\ud[89a-f]"):
        load_records(str(path))
