"""The one formatting path (persona_lora/chat_format.py): every invariant, on single-turn (Alpaca-style), multi-turn and
system-prompt conversations, with the tiny DeepSeek-V2 base's tokenizer and the tiny llama's.

(a) the tokens before each answer are exactly what inference feeds (`encode_prompt` and the tokenizer's own
    `apply_chat_template(..., add_generation_prompt=True, tokenize=True)`);
(b) labels cover assistant content and its one EOS only;  (c) one EOS per answer, none elsewhere, one BOS;
(d) train_on all/last;  (e) system prompt precedence;  (f) over-long examples;  (g) no chat template;
(h) EOS inside an answer;  (i) conversation ending in a user turn;  (j) batched == one by one;  (k) render_marked.
Plus the tutorial's bugs this path avoids.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from persona_lora.chat_format import (
    IGNORE_INDEX,
    conversation_for,
    encode_example,
    encode_examples,
    encode_prompt,
    render_marked,
    segments,
)
from persona_lora.dataset.reading import load_records
from persona_lora.errors import ConfigError, DataError, ModelLoadError

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "data"
U, A, S = "user", "assistant", "system"
BIG = 10_000


def auto_tokenizer(path):
    from transformers import AutoTokenizer  # imported when used: collecting the tests stays fast

    return AutoTokenizer.from_pretrained(path)


def msgs(*pairs) -> list[dict]:
    return [{"role": r, "content": c} for r, c in pairs]


ALPACA = msgs((U, "你好，今日天气如何？"), (A, "回皇上，今日天气甚好。"))
MULTI = msgs((U, "Hello!"), (A, "本宫安好。"), (U, "What did you do today?"), (A, "I made tea 🍵 and read poems."),
             (U, "明日呢？"), (A, "明日去御花园赏梅。"))
SYSTEM = msgs((S, "假设你是皇帝身边的女人--甄嬛。"), (U, "你是谁？"), (A, "臣妾甄嬛。"), (U, "多大了？"), (A, "十七。"))
# Content chosen to stress token boundaries at every segment edge.
TRICKY = msgs((S, "  spaces around  "), (U, "ends with spaces   "), (A, "\nstarts with a newline"),
              (U, "x"), (A, "  two leading spaces, trailing ones  "), (U, "emoji 😀"), (A, "!!! 123 'quoted'"),
              (U, "?"), (A, "👩‍👩‍👧 family"))
CONVERSATIONS = {"alpaca": ALPACA, "multi": MULTI, "system": SYSTEM, "tricky": TRICKY}


@pytest.fixture(scope="module")
def llama_tokenizer(tiny_llama):
    return auto_tokenizer(tiny_llama)


@pytest.fixture(params=["deepseek_v2", "llama"])
def tok(request, tokenizer, llama_tokenizer):
    return tokenizer if request.param == "deepseek_v2" else llama_tokenizer


def chat_ids(tok, messages, add_generation_prompt=True) -> list[int]:
    """The tokenizer's own rendering as ids, whatever container transformers 5 returns it in."""
    out = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    if hasattr(out, "keys"):  # BatchEncoding / dict
        out = out["input_ids"]
    return list(out)


def assistant_turns(messages) -> list[int]:
    return [k for k, m in enumerate(messages) if m["role"] == A]


def spans(labels) -> list[tuple[int, int]]:
    """[start, end) of every run of trained labels."""
    out, start = [], None
    for i, lab in enumerate([*labels, IGNORE_INDEX]):
        if lab != IGNORE_INDEX and start is None:
            start = i
        elif lab == IGNORE_INDEX and start is not None:
            out.append((start, i))
            start = None
    return out


# ------------------------------------------------------------------------------------------------ (a) prompts
@pytest.mark.parametrize("name", CONVERSATIONS)
def test_tokens_before_each_answer_are_the_inference_prompt(tok, name):
    messages = CONVERSATIONS[name]
    enc = encode_example(tok, messages, max_length=BIG)
    turns = assistant_turns(messages)
    found = spans(enc.labels)
    assert len(found) == len(turns)
    for k, (start, _) in zip(turns, found):
        prompt = encode_prompt(tok, messages[:k])
        assert enc.input_ids[:start] == prompt
        assert prompt == chat_ids(tok, messages[:k], add_generation_prompt=True)
        assert chat_ids(tok, messages[:k], add_generation_prompt=True) == list(
            tok.apply_chat_template(messages[:k], add_generation_prompt=True, tokenize=True, return_dict=False))


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_whole_example_is_the_templates_rendering(tok, name):
    messages = CONVERSATIONS[name]
    enc = encode_example(tok, messages, max_length=BIG)
    assert enc.input_ids == chat_ids(tok, messages, add_generation_prompt=False)
    assert enc.truncated is False and len(enc.input_ids) == len(enc.labels)


# ------------------------------------------------------------------------------------------------ (b) labels
@pytest.mark.parametrize("name", CONVERSATIONS)
def test_labels_are_exactly_the_answers_and_their_eos(tok, name):
    messages = CONVERSATIONS[name]
    enc = encode_example(tok, messages, max_length=BIG)
    for i, lab in zip(enc.input_ids, enc.labels):
        assert lab in (IGNORE_INDEX, i)
    answers = [messages[k]["content"] for k in assistant_turns(messages)]
    found = spans(enc.labels)
    # template: "Assistant: " + content + eos, generation prompt "Assistant:" -> the answer is " " + content + eos
    assert [tok.decode(enc.input_ids[s:e]) for s, e in found] == [" " + a + tok.eos_token for a in answers]
    assert sum(e - s for s, e in found) == sum(lab != IGNORE_INDEX for lab in enc.labels)


# ------------------------------------------------------------------------------------------------ (c) special tokens
@pytest.mark.parametrize("name", CONVERSATIONS)
def test_one_eos_per_answer_and_one_bos(tok, name):
    messages = CONVERSATIONS[name]
    enc = encode_example(tok, messages, max_length=BIG)
    eos_at = [i for i, t in enumerate(enc.input_ids) if t == tok.eos_token_id]
    assert eos_at == [e - 1 for _, e in spans(enc.labels)]
    assert len(eos_at) == len(assistant_turns(messages))
    assert enc.input_ids[-1] == tok.eos_token_id and enc.labels[-1] == tok.eos_token_id
    assert enc.input_ids.count(tok.bos_token_id) == 1 and enc.input_ids[0] == tok.bos_token_id
    prompt = encode_prompt(tok, messages[:assistant_turns(messages)[-1]])
    assert prompt.count(tok.bos_token_id) == 1 and prompt[0] == tok.bos_token_id


@pytest.mark.parametrize("special", ["eos", "bos"])
def test_special_token_text_in_a_prompt_turn_is_refused(tokenizer, special):
    text = tokenizer.eos_token if special == "eos" else tokenizer.bos_token
    with pytest.raises(DataError):
        encode_example(tokenizer, msgs((U, f"hi {text} there"), (A, "ok")), max_length=BIG)


# ------------------------------------------------------------------------------------------------ (d) train_on
def test_train_on_all_and_last(tok):
    all_ = encode_example(tok, MULTI, max_length=BIG, train_on="all")
    last = encode_example(tok, MULTI, max_length=BIG, train_on="last")
    assert all_.input_ids == last.input_ids
    assert len(spans(all_.labels)) == 3
    assert spans(last.labels) == [spans(all_.labels)[-1]]
    s, e = spans(last.labels)[0]
    assert tok.decode(last.input_ids[s:e]) == " 明日去御花园赏梅。" + tok.eos_token
    # a single-turn conversation is the same either way
    assert encode_example(tok, ALPACA, max_length=BIG, train_on="last") == encode_example(tok, ALPACA, max_length=BIG)


def test_bad_train_on_and_overlong_are_config_errors(tokenizer):
    with pytest.raises(ConfigError, match="train_on"):
        encode_example(tokenizer, ALPACA, max_length=BIG, train_on="first")
    with pytest.raises(ConfigError, match="overlong"):
        encode_example(tokenizer, ALPACA, max_length=BIG, overlong="wrap")


# ------------------------------------------------------------------------------------------------ (e) system prompt
def test_system_prompt_precedence(tokenizer):
    own = conversation_for(SYSTEM, "configured")
    assert own == SYSTEM and own is not SYSTEM  # the record's own system wins, and the record is not modified
    assert conversation_for(ALPACA, "configured") == [{"role": S, "content": "configured"}, *ALPACA]
    assert conversation_for(ALPACA, "") == ALPACA
    assert conversation_for(ALPACA, None) == ALPACA
    assert len(ALPACA) == 2
    enc = encode_example(tokenizer, conversation_for(ALPACA, "configured"), max_length=BIG)
    assert tokenizer.decode(enc.input_ids).startswith(tokenizer.bos_token + "configured\n\nUser: 你好")
    enc = encode_example(tokenizer, conversation_for(SYSTEM, "configured"), max_length=BIG)
    text = tokenizer.decode(enc.input_ids)
    assert "configured" not in text and text.startswith(tokenizer.bos_token + "假设你是皇帝身边的女人--甄嬛。\n\n")
    enc = encode_example(tokenizer, conversation_for(ALPACA, ""), max_length=BIG)
    assert tokenizer.decode(enc.input_ids).startswith(tokenizer.bos_token + "User: ")


# ------------------------------------------------------------------------------------------------ (f) over-long
def full_and_tail(tok, messages):
    enc = encode_example(tok, messages, max_length=BIG)
    s, e = spans(enc.labels)[-1]
    assert e == len(enc.input_ids)
    return enc, e - s


def test_fits_exactly_is_not_truncated(tokenizer):
    full, _ = full_and_tail(tokenizer, SYSTEM)
    assert encode_example(tokenizer, SYSTEM, max_length=len(full.input_ids)) == full
    assert encode_example(tokenizer, SYSTEM, max_length=len(full.input_ids), overlong="drop") == full


def test_overlong_drop(tokenizer):
    full, _ = full_and_tail(tokenizer, SYSTEM)
    assert encode_example(tokenizer, SYSTEM, max_length=len(full.input_ids) - 1, overlong="drop") is None


def test_truncate_keeps_bos_and_the_whole_last_answer(tok):
    full, tail = full_and_tail(tok, MULTI)
    for max_length in range(tail + 2, len(full.input_ids)):
        enc = encode_example(tok, MULTI, max_length=max_length, overlong="truncate")
        assert enc.truncated is True
        assert len(enc.input_ids) <= max_length and len(enc.labels) == len(enc.input_ids)
        assert enc.input_ids[0] == tok.bos_token_id and enc.labels[0] == IGNORE_INDEX
        assert enc.input_ids[-tail:] == full.input_ids[-tail:] and enc.labels[-tail:] == full.labels[-tail:]
        assert enc.input_ids[-tail - 1] != enc.labels[-tail - 1]  # the span before the answer is prompt
        assert enc.input_ids.count(tok.bos_token_id) == 1


def test_truncate_fills_max_length_exactly(tok):
    full, tail = full_and_tail(tok, MULTI)
    for max_length in range(tail + 1, len(full.input_ids)):
        enc = encode_example(tok, MULTI, max_length=max_length, overlong="truncate")
        assert len(enc.input_ids) == max_length, max_length
        assert enc.input_ids[0] == tok.bos_token_id
        assert enc.input_ids[-tail:] == full.input_ids[-tail:] and enc.labels[-tail:] == full.labels[-tail:]


def test_last_answer_alone_too_long_is_none(tok):
    full, tail = full_and_tail(tok, MULTI)
    for max_length in (1, tail - 1):
        assert encode_example(tok, MULTI, max_length=max_length, overlong="truncate") is None
        assert encode_example(tok, MULTI, max_length=max_length, overlong="drop") is None


def test_no_room_for_bos_is_none(tokenizer):
    _, tail = full_and_tail(tokenizer, MULTI)
    assert encode_example(tokenizer, MULTI, max_length=tail, overlong="truncate") is None


def test_truncation_with_train_on_last(tokenizer):
    full, tail = full_and_tail(tokenizer, MULTI)
    enc = encode_example(tokenizer, MULTI, max_length=tail + 10, train_on="last")
    assert enc.truncated and enc.input_ids[0] == tokenizer.bos_token_id
    assert len(spans(enc.labels)) == 1 and enc.input_ids[-tail:] == full.input_ids[-tail:]


# ------------------------------------------------------------------------------------------------ (g)-(i) errors
def test_no_chat_template_is_a_model_load_error(tiny_base):
    bare = auto_tokenizer(tiny_base)
    bare.chat_template = None
    for call in (lambda: encode_example(bare, ALPACA, max_length=BIG), lambda: encode_prompt(bare, ALPACA[:1]),
                 lambda: encode_examples(bare, [ALPACA], max_length=BIG)):
        with pytest.raises(ModelLoadError, match="--chat-template"):
            call()


@pytest.mark.parametrize("answer", ["早安<｜end▁of▁sentence｜>", "早<｜end▁of▁sentence｜>安", "<｜end▁of▁sentence｜>"])
def test_eos_text_in_an_answer_is_a_data_error(tok, answer):
    with pytest.raises(DataError, match="end-of-sequence"):
        encode_example(tok, msgs((U, "hi"), (A, answer)), max_length=BIG)
    earlier = [*MULTI]
    earlier[1] = {"role": A, "content": answer}  # an earlier turn of a multi-turn conversation, too
    with pytest.raises(DataError, match="end-of-sequence"):
        encode_example(tok, earlier, max_length=BIG, train_on="last")


def test_ending_in_a_user_turn_is_a_data_error(tok):
    with pytest.raises(DataError, match="end with an assistant turn"):
        encode_example(tok, MULTI[:-1], max_length=BIG)
    with pytest.raises(DataError, match="end with an assistant turn"):
        encode_examples(tok, [ALPACA, ALPACA[:1]], max_length=BIG)
    # ...which is exactly the shape inference encodes
    assert encode_prompt(tok, MULTI[:-1]) == chat_ids(tok, MULTI[:-1])


def test_template_that_is_not_prefix_stable_is_refused(tiny_base):
    odd = auto_tokenizer(tiny_base)
    odd.chat_template = "{{ messages|length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(ConfigError, match="prefix-stable"):
        encode_example(odd, ALPACA, max_length=BIG)


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture
def chatml_tokenizer(tiny_base):
    tok = auto_tokenizer(tiny_base)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    return tok


def test_chatml_template_keeps_prompts_identical(chatml_tokenizer):
    enc = encode_example(chatml_tokenizer, MULTI, max_length=BIG)
    for k, (start, _) in zip(assistant_turns(MULTI), spans(enc.labels)):
        assert enc.input_ids[:start] == encode_prompt(chatml_tokenizer, MULTI[:k])


def test_chatml_template_with_im_end_as_eos(chatml_tokenizer):
    chatml_tokenizer.eos_token = "<|im_end|>"
    enc = encode_example(chatml_tokenizer, ALPACA, max_length=BIG)
    assert enc.input_ids.count(chatml_tokenizer.eos_token_id) == 2  # the user's and the assistant's turn end


# ------------------------------------------------------------------------------------------------ (j) batched
def test_batched_equals_one_by_one(tok):
    records = (load_records(str(EXAMPLES / "persona_zh.json")).records
               + load_records(str(EXAMPLES / "persona_multiturn.jsonl")).records)
    conversations = [conversation_for(r["messages"], "你是沈知微。") for r in records]
    conversations += list(CONVERSATIONS.values())
    for kwargs in ({"max_length": BIG}, {"max_length": 40}, {"max_length": 40, "overlong": "drop"},
                   {"max_length": 60, "train_on": "last"}):
        batched = encode_examples(tok, conversations, **kwargs)
        assert batched == [encode_example(tok, c, **kwargs) for c in conversations]
    assert any(e is None for e in encode_examples(tok, conversations, max_length=40, overlong="drop"))
    assert any(e is not None and e.truncated for e in encode_examples(tok, conversations, max_length=40))
    assert encode_examples(tok, [], max_length=BIG) == []


# ------------------------------------------------------------------------------------------------ (k) render_marked
@pytest.mark.parametrize("name", CONVERSATIONS)
@pytest.mark.parametrize("train_on", ["all", "last"])
def test_render_marked_wraps_exactly_the_trained_spans(tok, name, train_on):
    messages = CONVERSATIONS[name]
    enc = encode_example(tok, messages, max_length=BIG, train_on=train_on)
    marked = render_marked(tok, enc)
    wrapped = re.findall(r"⟦(.*?)⟧", marked, flags=re.S)
    assert wrapped == [tok.decode(enc.input_ids[s:e]) for s, e in spans(enc.labels)]
    assert marked.replace("⟦", "").replace("⟧", "") == tok.decode(enc.input_ids)
    assert render_marked(tok, enc, "<<", ">>").count("<<") == len(wrapped)


# ------------------------------------------------------------------------------------------------ segments
def test_segments_alternate_prompt_and_answer(tokenizer):
    parts = segments(tokenizer, SYSTEM)
    assert [trained for _, trained in parts] == [False, True, False, True]
    assert "".join(text for text, _ in parts) == tokenizer.apply_chat_template(SYSTEM, tokenize=False)
    assert parts[1][0] == " 臣妾甄嬛。" + tokenizer.eos_token
    with_prompt = segments(tokenizer, SYSTEM[:-1], add_generation_prompt=True)
    assert with_prompt[-1] == ("User: 多大了？\n\nAssistant:", False)


# ------------------------------------------------------------------------------------------------ the tutorial's bugs
def test_tutorial_sysrem_role_is_rejected_by_validation(tmp_path):
    # The tutorial's chat example used {"role": "sysrem", ...}: a typo that silently drops the system prompt.
    f = tmp_path / "tutorial.jsonl"
    f.write_text(json.dumps({"messages": [{"role": "sysrem", "content": "假设你是皇帝身边的女人--甄嬛。"},
                                          {"role": "user", "content": "你是谁？"},
                                          {"role": "assistant", "content": "臣妾甄嬛。"}]}, ensure_ascii=False) + "\n")
    with pytest.raises(DataError) as e:
        load_records(str(f))
    assert "did you mean 'system'" in str(e.value) and "sysrem" in str(e.value) and "tutorial.jsonl" in str(e.value)


def test_tutorial_formatting_bugs_are_avoided(tokenizer):
    system, question, answer = "假设你是皇帝身边的女人--甄嬛。", "你是谁？", "臣妾甄嬛。"
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    # The tutorial: hand-written prompt (stripped, so "Assistant: " loses its space), response + eos, then the
    # collator's pad (= eos) again; chat at inference with another format.
    prompt = f"<bos>{system}\nUser: {question}\nAssistant: ".replace("<bos>", "").strip()
    tutorial_ids = [bos, *tokenizer(prompt, add_special_tokens=False)["input_ids"],
                    *tokenizer(answer, add_special_tokens=False)["input_ids"], eos, eos]
    assert tutorial_ids.count(eos) == 2
    messages = conversation_for(msgs((U, question), (A, answer)), system)
    ours = encode_example(tokenizer, messages, max_length=BIG)
    assert ours.input_ids.count(eos) == 1
    start = spans(ours.labels)[0][0]
    # what we train on before the answer is what inference feeds; the tutorial's training prompt is not
    assert ours.input_ids[:start] == chat_ids(tokenizer, messages[:-1])
    assert tutorial_ids[: len(tutorial_ids) - 3] != chat_ids(tokenizer, messages[:-1])
