"""`persona-lora data check --base` and `data preview`: token statistics and the exact training text.

These go through the one formatting path (persona_lora/chat_format.py) and the base's tokenizer
(persona_lora/model_loading.py). The base here is a folder holding only a tiny byte-level BPE tokenizer trained inside
the test, with DeepSeek-V2's special tokens and chat template, plus a minimal config.json.
"""

from __future__ import annotations

import json
import re
import sys

import pytest

from persona_lora.cli import main
from persona_lora.train.data.cli import MARK_CLOSE, MARK_OPEN, mark_trained, trained_spans

EOS = "<｜end▁of▁sentence｜>"
BOS = "<｜begin▁of▁sentence｜>"
RECORDS = [
    {"messages": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "免礼。"}]},
    {"messages": [{"role": "system", "content": "你是微嫔。"}, {"role": "user", "content": "喝茶吗"},
                  {"role": "assistant", "content": "好。"}, {"role": "user", "content": "什么茶"},
                  {"role": "assistant", "content": "碧螺春。"}]},
]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A 'base model' folder with just a tokenizer: enough for everything `data` does with --base."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from persona_lora.chat_templates import BOS_TOKEN, DEEPSEEK_V2, EOS_TOKEN

    out = tmp_path_factory.mktemp("base")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=[BOS_TOKEN, EOS_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["User: 你好\n\nAssistant: 免礼。", "喝茶吗 什么茶 碧螺春"], trainer=trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN,
                            chat_template=DEEPSEEK_V2).save_pretrained(out)
    (out / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return out


@pytest.fixture
def chat_file(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in RECORDS), encoding="utf-8")
    return path


def _lengths(base_dir, system_prompt=None):
    from persona_lora.chat_format import conversation_for, encode_example
    from persona_lora.model_loading import load_tokenizer

    tok = load_tokenizer(str(base_dir))
    return [len(encode_example(tok, conversation_for(r["messages"], system_prompt), max_length=10**6).input_ids)
            for r in RECORDS]


def test_check_with_base_prints_token_lengths(base_dir, chat_file, capsys):
    assert main(["data", "check", str(chat_file), "--base", str(base_dir)]) == 0
    out = capsys.readouterr().out
    lengths = sorted(_lengths(base_dir))
    assert "OK: chat.jsonl is valid" in out
    assert f"min {lengths[0]}  mean {sum(lengths) / 2:.1f}  p95 {lengths[-1]}  max {lengths[-1]}" in out
    assert "0 of 2 records longer than 1024 tokens" in out


def test_check_counts_records_over_max_length(base_dir, chat_file, capsys):
    lengths = sorted(_lengths(base_dir))
    limit = lengths[0]  # the shorter record fits exactly, the longer one does not
    assert main(["data", "check", str(chat_file), "--base", str(base_dir), "--max-length", str(limit)]) == 0
    assert f"1 of 2 records longer than {limit} tokens (training truncates or drops them)" in capsys.readouterr().out


def test_preview_marks_exactly_the_trained_spans(base_dir, chat_file, capsys):
    assert main(["data", "preview", str(chat_file), "--base", str(base_dir), "-n", "2"]) == 0
    legend, out = capsys.readouterr().out.split("\n", 1)
    assert f"{MARK_OPEN}…{MARK_CLOSE} marks the tokens trained on" in legend
    spans = re.findall(f"{MARK_OPEN}(.*?){MARK_CLOSE}", out, flags=re.S)
    assert [s.strip() for s in spans] == ["免礼。" + EOS, "好。" + EOS, "碧螺春。" + EOS]
    assert f"{BOS}User: 你好\n\nAssistant:{MARK_OPEN}" in out
    assert f"{BOS}你是微嫔。\n\nUser: 喝茶吗" in out
    assert "chat.jsonl:1" in out and "chat.jsonl:2" in out
    assert "\033[" not in out  # no colour when stdout is not a terminal


def test_preview_json_lines(base_dir, chat_file, capsys):
    assert main(["data", "preview", str(chat_file), "--base", str(base_dir), "--json", "-n", "5",
                 "--system-prompt", "宫中。"]) == 0
    lines = capsys.readouterr().out.strip().split("\n")
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["origin"] == "chat.jsonl:1" and first["truncated"] is False
    assert first["text"] == f"{BOS}宫中。\n\nUser: 你好\n\nAssistant: 免礼。{EOS}"  # configured prompt prepended
    assert second["text"].startswith(f"{BOS}你是微嫔。\n\n")  # the record's own system message wins
    for obj in (first, second):
        assert len(obj["input_ids"]) == len(obj["labels"])
        assert all(label in (-100, tid) for tid, label in zip(obj["input_ids"], obj["labels"]))


def test_preview_truncates_like_training(base_dir, chat_file, capsys):
    assert main(["data", "preview", str(chat_file), "--base", str(base_dir), "--json", "--max-length", "12"]) == 0
    objs = [json.loads(line) for line in capsys.readouterr().out.strip().split("\n")]
    assert all(len(o["input_ids"]) <= 12 and o["truncated"] for o in objs if "input_ids" in o)


def test_preview_colours_on_a_terminal(base_dir, chat_file, capsys, monkeypatch):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert main(["data", "preview", str(chat_file), "--base", str(base_dir), "-n", "1"]) == 0
    out = capsys.readouterr().out
    assert "\033[1;32m 免礼。" in out and MARK_OPEN not in out.split("\n", 1)[1]


def test_preview_usage_errors(chat_file, capsys):
    assert main(["data", "preview", str(chat_file), "--base", "x", "-n", "0"]) == 2
    assert "-n must be at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["data", "preview", str(chat_file)])  # --base is required


def test_trained_spans_and_markers_without_a_tokenizer():
    class Chars:
        def decode(self, ids, skip_special_tokens=False):
            return "".join(chr(i) for i in ids)

    ids = [ord(c) for c in "ab cd"]
    labels = [-100, -100, ord(" "), ord("c"), -100]
    assert trained_spans(ids, labels) == [(False, ids[:2]), (True, ids[2:4]), (False, ids[4:])]
    assert mark_trained(Chars(), ids, labels) == f"ab{MARK_OPEN} c{MARK_CLOSE}d"
    assert mark_trained(Chars(), ids, labels, color=True) == "ab\033[1;32m c\033[0md"
