"""Preference tuning on the demo's votes: votes and preference files become data (counted, with clear errors), and
`persona-lora train --method dpo|kto` tunes an adapter on the tiny base with TRL, with the reference on the same
base weights, into an ordinary adapter folder.

The training tests run the real CLI on CPU in float32: a short SFT run gives the init adapter, then DPO (or KTO)
runs a few steps, and the test measures, with its own forward passes, what the run was meant to do: the
chosen-minus-rejected log-probability margin of the training pairs went up, the base files did not change.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from persona_lora.cli import main
from persona_lora.errors import DataError, UsageError
from tests.conftest import REPO

SYSTEM = "sys prompt"


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def turn(role: str, text: str) -> list[dict]:
    return [{"role": role, "content": text}]


def persona_pairs(data: Path, out: Path, *, unpaired: bool = False) -> Path:
    """For every record: the persona's answer is chosen (desirable), another record's answer rejected."""
    recs = json.loads(data.read_text(encoding="utf-8"))
    rows = []
    for i, r in enumerate(recs):
        other = recs[(i + 5) % len(recs)]["output"]
        if unpaired:
            rows += [{"prompt": turn("user", r["instruction"]), "completion": turn("assistant", r["output"]),
                      "label": True},
                     {"prompt": turn("user", r["instruction"]), "completion": turn("assistant", other), "label": False}]
        else:
            rows.append({"prompt": turn("user", r["instruction"]), "chosen": turn("assistant", r["output"]),
                         "rejected": turn("assistant", other)})
    return write_jsonl(out, rows)


# ---------------------------------------------------------------------------------------------- votes -> data


def demo_votes(path: Path):
    """Votes as the demo writes them (`VoteStore.record`, the call behind the vote buttons)."""
    from persona_lora.votes import VoteStore

    store = VoteStore(path)
    kw = dict(base_id="tiny-base", adapter_name="ad", adapter_id="ad", system_prompt=SYSTEM)
    store.record(prompt="q1", answer_a="persona", answer_b="plain", a_side="adapter", vote="A", **kw)  # adapter won
    store.record(prompt="q1", answer_a="persona", answer_b="plain", a_side="base", vote="B", **kw)  # B (adapter) won
    store.record(prompt="q2", answer_a="x", answer_b="y", a_side="base", vote="tie", **kw)
    store.record(prompt="q3", answer_a="bad one", answer_b="bad two", a_side="adapter", vote="both_bad", **kw)
    store.record(prompt="q4", answer_a="same", answer_b="same", a_side="base", vote="A", **kw)
    store.record(prompt="q5", answer_a="left", answer_b="right", a_side="base", vote="A", left_id="sft",
                 left_name="sft", **kw)  # adapter against adapter: A was the first slot (sft), and it won
    return store


def test_votes_become_the_expected_pairs_and_counts(tmp_path, capsys):
    from persona_lora.train.preference_data import load_preferences

    demo_votes(tmp_path / "votes.sqlite")
    ps = load_preferences(str(tmp_path / "votes.sqlite"))
    prompt = lambda q: [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}]  # noqa: E731
    assert [(p["prompt"], p["chosen"], p["rejected"]) for p in ps.pairs] == [
        (prompt("q1"), "persona", "plain"), (prompt("q1"), "plain", "persona"), (prompt("q5"), "left", "right")]
    assert [(s["completion"], s["label"]) for s in ps.singles] == [("bad two", False), ("bad one", False)]
    assert ps.counts == {"votes": 6, "decisive votes (pairs)": 3,
                         "both-bad votes (2 undesirable examples each, KTO only)": 1, "ties (dropped)": 1,
                         "same answer on both sides (dropped)": 1, "an empty answer (dropped)": 0,
                         "prompts voted both ways (kept)": 1}
    assert len(ps.examples("dpo")) == 3
    kto = ps.examples("kto")
    assert len(kto) == 8 and sum(e["label"] for e in kto) == 3
    rates = {(r["model_a"], r["model_b"]): r for r in ps.win_rates}
    ad_base = rates[("ad", "base")]
    assert (ad_base["votes"], ad_base["a_wins"], ad_base["b_wins"]) == (5, 2, 1)
    assert rates[("ad", "sft")]["b_wins"] == 1  # win rates are per pair of models

    assert main(["data", "check", str(tmp_path / "votes.sqlite")]) == 0
    out = capsys.readouterr().out
    assert "a vote database of the demo" in out and "ties (dropped)" in out and "dpo 3 pairs; kto 8 examples" in out
    assert "ad vs sft" in out


def test_pairs_are_tokenized_by_the_one_formatting_path(tiny_base, tokenizer, tmp_path):
    from persona_lora.chat_format import conversation_for, encode_example, encode_prompt
    from persona_lora.train.preference_data import encode_preferences, load_preferences

    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": turn("user", "你是谁？"), "chosen": turn("assistant", "本宫"),
                                               "rejected": turn("assistant", "不知道")}])
    ex = load_preferences(str(path)).examples("dpo")
    enc = encode_preferences(tokenizer, ex, "dpo", system_prompt=SYSTEM, max_length=256)
    row = enc.rows[0]
    conv = conversation_for(turn("user", "你是谁？"), SYSTEM)
    assert row["prompt_ids"] == encode_prompt(tokenizer, conv)  # what the demo feeds
    sft = encode_example(tokenizer, conv + turn("assistant", "本宫"), max_length=256)
    assert row["prompt_ids"] + row["chosen_ids"] == sft.input_ids  # what SFT trains on
    assert [t for t in sft.labels if t != -100] == row["chosen_ids"] and row["chosen_ids"][-1] == tokenizer.eos_token_id
    short = encode_preferences(tokenizer, ex, "dpo", system_prompt=SYSTEM * 20, max_length=40)
    assert short.truncated == 1 and len(short.rows[0]["prompt_ids"]) + len(short.rows[0]["rejected_ids"]) <= 40
    assert short.rows[0]["prompt_ids"][0] == row["prompt_ids"][0]  # cut from the left, the first token kept
    dropped = encode_preferences(tokenizer, ex, "dpo", system_prompt=SYSTEM * 20, max_length=40, overlong="drop")
    assert dropped.rows == [] and dropped.dropped == {"longer than max_length=40 (overlong: drop)": 1}
    tiny = encode_preferences(tokenizer, ex, "dpo", system_prompt=None, max_length=3)
    assert tiny.rows == [] and tiny.dropped == {"answer + EOS alone exceeds max_length=3": 1}


def test_bad_preference_data_gets_file_line_field_and_fix(tmp_path):
    from persona_lora.train.preference_data import load_preferences

    good = {"prompt": turn("user", "q"), "chosen": turn("assistant", "a"), "rejected": turn("assistant", "b")}
    path = write_jsonl(tmp_path / "bad.jsonl", [
        good,
        {"prompt": "q", "chosen": turn("assistant", "a"), "rejected": turn("assistant", "b")},
        {"prompt": turn("user", "q"), "chosen": turn("assistant", "a")},
        {"prompt": turn("sysrem", "q"), "chosen": turn("assistant", "a"), "rejected": turn("assistant", "b")},
        {"prompt": turn("user", "q"), "chosen": turn("user", "a"), "rejected": turn("assistant", "")},
        "{not json",
        {"question": "q"},
    ])
    with pytest.raises(DataError) as e:
        load_preferences(str(path))
    msg = str(e.value)
    for expected in [
        "bad.jsonl, line 2, field 'prompt': expected a list of messages, got a string",
        "bad.jsonl, line 3, field 'rejected': required field is missing; fix: add it",
        "bad.jsonl, line 4, field 'prompt[0].role': unknown role 'sysrem'; did you mean 'system'?",
        "bad.jsonl, line 5, field 'chosen': expected one assistant message, got user",
        "bad.jsonl, line 5, field 'rejected[0].content': is empty",
        "bad.jsonl, line 6, column 2: invalid JSON",
        "bad.jsonl, line 7: a preference record needs prompt, chosen and rejected",
    ]:
        assert expected in msg, (expected, msg)
    assert len(e.value.problems) == 7

    kto = write_jsonl(tmp_path / "kto.jsonl", [{"prompt": turn("user", "q"), "completion": turn("assistant", "a"),
                                                "label": "yes"}])
    with pytest.raises(DataError, match=r"kto.jsonl, line 1, field 'label': expected true or false"):
        load_preferences(str(kto))
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [good, {"prompt": turn("user", "q"),
                                                          "completion": turn("assistant", "a"), "label": True}])
    with pytest.raises(DataError, match="mixed formats"):
        load_preferences(str(mixed))
    singles = write_jsonl(tmp_path / "singles.jsonl", [{"prompt": turn("user", "q"),
                                                        "completion": turn("assistant", "a"), "label": True}])
    with pytest.raises(DataError, match="use --method kto"):
        load_preferences(str(singles)).examples("dpo")
    import sqlite3

    with sqlite3.connect(tmp_path / "other.sqlite") as db:
        db.execute("CREATE TABLE t (x)")
    with pytest.raises(UsageError, match="not the demo's votes"):
        load_preferences(str(tmp_path / "other.sqlite"))


def test_training_refusals_name_the_option(tiny_base, tmp_path, capsys):
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": turn("user", "q"), "chosen": turn("assistant", "a"),
                                               "rejected": turn("assistant", "b")}])
    base = ["train", str(REPO / "configs" / "tiny-dpo.yaml"), "--base", str(tiny_base), "--data", str(data),
            "--output-dir", str(tmp_path / "o"), "--set", "base.device=cpu"]
    assert main([*base, "--init-adapter", str(tmp_path / "missing")]) == 1
    assert "--init-adapter" in capsys.readouterr().err
    assert main([*base, "--method", "sft", "--init-adapter", str(tmp_path)]) == 2
    assert "preference.init_adapter is set but preference.method is sft" in capsys.readouterr().err
    assert main([*base, "--set", "preference.init_adapter=null", "--resume"]) == 2
    assert "--resume is not supported with --method dpo" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------- training


def sha256_tree(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def answer_logps(model, rows: list[dict], answer: str) -> torch.Tensor:
    """Sum of log p(answer ids | prompt ids) per row, one row at a time (no padding involved)."""
    out = []
    with torch.no_grad():
        for r in rows:
            ids = torch.tensor([r["prompt_ids"] + r[answer]])
            logits = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
            targets = ids[0, 1:]
            picked = logits.gather(-1, targets[:, None])[:, 0]
            out.append(picked[len(r["prompt_ids"]) - 1:].sum())
    return torch.stack(out)


def margins(base: Path, adapter: Path | None, rows: list[dict], good: str, bad: str) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    from persona_lora.peft_compat import load_adapter

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        model = load_adapter(model, adapter)
    model.eval()
    return answer_logps(model, rows, good) - answer_logps(model, rows, bad)


@pytest.mark.parametrize("method", ["dpo", "kto"])
def test_the_reference_log_probs_are_the_init_adapters_not_the_bases(method, tiny_base, small_persona_data,
                                                                      tmp_path):
    """TRL's reference pass (`compute_ref_log_probs`, what the loss uses) on our trainer, against log-probs of the
    init adapter loaded by stock PEFT, row by row: equal to 1e-5 per answer token (float32 sums of ~100 tokens
    carry ~1e-5 of rounding), also after the policy has moved; and visibly not the base's (the adapter disabled)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from persona_lora.train.config import load_config
    from persona_lora.train.preference_train import (
        build_policy,
        check_init_base,
        preference_trainer,
        prepare_preferences,
        resolve_init,
    )
    from persona_lora.train.steps import set_up
    from persona_lora.train.synthetic import make_random_adapter

    init_dir = make_random_adapter(tiny_base, tmp_path / "init", "all", r=8, alpha=16, std=0.05, system_prompt=SYSTEM)
    data = persona_pairs(small_persona_data, tmp_path / "prefs.jsonl", unpaired=method == "kto")
    cfg = load_config(str(REPO / "configs" / "tiny-dpo.yaml"), {
        "base": {"model": str(tiny_base), "device": "cpu"}, "data": {"path": str(data), "system_prompt": None},
        "preference": {"method": method, "init_adapter": str(init_dir)},
        "training": {"output_dir": str(tmp_path / "o"), "batch_size": 2, "report_to": ["none"]}})
    init = resolve_init(cfg)
    setup = set_up(cfg)
    check_init_base(init, setup)
    run = prepare_preferences(cfg, setup.tokenizer)
    torch.manual_seed(0)
    model = build_policy(cfg, setup, init)
    trainer = preference_trainer(cfg, setup, model, run, tmp_path / "o", [])
    with torch.no_grad():  # the policy moves; the reference must not
        for name, p in model.peft_model.named_parameters():
            if ".default." in name and "lora_B" in name:
                p.add_(0.05)
    items = [trainer.train_dataset[i] for i in range(2)]
    batch = trainer.data_collator(items)
    ref = trainer.compute_ref_log_probs(trainer.model, batch)
    answers = ("chosen_ids", "rejected_ids") if method == "dpo" else ("completion_ids",)
    ref_logps = torch.cat(ref[:len(answers)]) if method == "dpo" else ref[0]

    base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    stock = PeftModel.from_pretrained(base, str(init_dir))
    stock.eval()
    expected = torch.cat([answer_logps(stock, items, a) for a in answers])
    with stock.disable_adapter():
        base_logps = torch.cat([answer_logps(stock, items, a) for a in answers])
    tokens = torch.tensor([float(len(item[a])) for a in answers for item in items])  # sums over this many tokens
    assert ((ref_logps - expected).abs() / tokens).max().item() < 1e-5, (ref_logps, expected)  # per token: fp32
    assert ((ref_logps - base_logps).abs() / tokens).min().item() > 1e-3, (ref_logps, base_logps)


@pytest.fixture(scope="module")
def sft_adapter(trained_adapter) -> Path:
    """The suite's SFT adapter (the `all` preset: LoRA on the fused experts too), which has learnt the 16 records'
    answers: preference tuning starts where SFT left off."""
    return trained_adapter


@pytest.mark.slow
def test_dpo_from_sft_raises_margins_keeps_base_and_loads_with_stock_peft(tiny_base, small_persona_data, sft_adapter,
                                                                          tokenizer, tmp_path, capsys, monkeypatch):
    import peft.utils.save_and_load as peft_saving
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from persona_lora.artifact import read_manifest
    from persona_lora.peft_compat import load_adapter
    from persona_lora.train.preference_data import encode_preferences, load_preferences

    asked_hub = []  # PEFT looks the base's config up on the hub when a checkpoint's base id is no local folder
    monkeypatch.setattr(peft_saving, "check_file_exists_on_hf_hub", lambda *a, **k: asked_hub.append(a))
    data = persona_pairs(small_persona_data, tmp_path / "pairs.jsonl")
    before = sha256_tree(tiny_base)
    out = tmp_path / "dpo"
    assert main(["train", str(REPO / "configs" / "tiny-dpo.yaml"), "--base", str(tiny_base), "--data", str(data),
                 "--init-adapter", str(sft_adapter), "--output-dir", str(out), "--max-steps", "8",
                 "--set", "base.device=cpu", "--set", "training.learning_rate=1e-3", "--set", "training.samples=1",
                 "--set", "data.system_prompt=null", "--set", "training.logging_steps=3"]) == 0
    printed = capsys.readouterr().out
    assert "reference: the init adapter, frozen" in printed and "checked on both adapters" in printed
    assert asked_hub == [], "saving the checkpoints asked the hub about the base"
    assert sha256_tree(tiny_base) == before
    assert not (out / "ref").exists() and sorted(p.name for p in out.iterdir() if p.is_file()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "loss.png", "persona_manifest.json"]

    m = read_manifest(out)
    sft = read_manifest(sft_adapter)
    assert m.kind == "adapter" and m.preference.method == "dpo" and m.preference.reference == "init-adapter"
    assert m.preference.init_adapter.id == sft_adapter.name and m.preference.init_adapter.method == "sft"
    assert m.preference.init_adapter.sha256 == hashlib.sha256(
        (sft_adapter / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert m.preference.data.counts == {"records": 16, "pairs": 16, "prompts voted both ways (kept)": 0}
    assert m.chat.system_prompt == sft.chat.system_prompt  # inherited
    assert [row.group for row in m.lora.coverage] == [row.group for row in sft.lora.coverage]
    steps = m.preference.history
    assert all(s.rewards_margins is not None and s.rewards_accuracies is not None for s in steps)
    # logged every 3 steps, and the last step (8) because it is the last: steps, loss and rewards are step 8's
    assert [s.step for s in steps] == [1, 3, 6, 8] and m.metrics.steps == 8
    assert m.metrics.final_train_loss == steps[-1].loss
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "## Preference tuning" in card and "the adapter it continued from, frozen" in card

    rows = encode_preferences(tokenizer, load_preferences(str(data)).examples("dpo"), "dpo",
                              system_prompt=sft.chat.system_prompt, max_length=256).rows
    start = margins(tiny_base, sft_adapter, rows, "chosen_ids", "rejected_ids")
    end = margins(tiny_base, out, rows, "chosen_ids", "rejected_ids")
    raised = (end > start).float().mean().item()
    print(f"DPO raised the margin on {raised:.0%} of the pairs")
    assert raised >= 0.8, (raised, start, end)

    # stock PEFT loads it as trained (the portable spelling), equal to persona-lora's own loading
    ids = torch.tensor([rows[0]["prompt_ids"]])
    ours = load_adapter(AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32), out)
    stock = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32), str(out))
    with torch.no_grad():
        assert (ours(input_ids=ids).logits - stock(input_ids=ids).logits).abs().max().item() < 1e-5


@pytest.mark.slow
def test_kto_from_sft_on_single_labels_raises_margins(tiny_base, small_persona_data, sft_adapter, tokenizer, tmp_path):
    from persona_lora.artifact import read_manifest
    from persona_lora.train.preference_data import encode_preferences, load_preferences

    data = persona_pairs(small_persona_data, tmp_path / "singles.jsonl", unpaired=True)
    before = sha256_tree(tiny_base)
    out = tmp_path / "kto"
    assert main(["train", str(REPO / "configs" / "tiny-dpo.yaml"), "--method", "kto", "--base", str(tiny_base),
                 "--data", str(data), "--init-adapter", str(sft_adapter), "--output-dir", str(out),
                 "--max-steps", "12", "--set", "base.device=cpu", "--set", "training.learning_rate=3e-4",
                 "--set", "training.samples=0", "--set", "data.system_prompt=null",
                 "--set", "training.logging_steps=5"]) == 0
    assert sha256_tree(tiny_base) == before
    m = read_manifest(out)
    assert m.preference.method == "kto" and m.preference.reference == "init-adapter"
    assert m.preference.data.counts == {"records": 32, "single judgements": 32, "desirable": 16, "undesirable": 16}
    assert any(s.kl is not None for s in m.preference.history)
    # logged every 5 steps and at the last (12): the recorded steps and final loss are step 12's
    assert [s.step for s in m.preference.history] == [1, 5, 10, 12] and m.metrics.steps == 12
    assert m.metrics.final_train_loss == m.preference.history[-1].loss

    singles = load_preferences(str(data)).examples("kto")
    rows = encode_preferences(tokenizer, singles, "kto", system_prompt=m.chat.system_prompt, max_length=256).rows
    pairs = [{"prompt_ids": a["prompt_ids"], "good": a["completion_ids"], "bad": b["completion_ids"]}
             for a, b in zip(rows[::2], rows[1::2])]
    start = margins(tiny_base, sft_adapter, pairs, "good", "bad")
    end = margins(tiny_base, out, pairs, "good", "bad")
    raised = (end > start).float().mean().item()
    print(f"KTO raised the margin on {raised:.0%} of the prompts")
    assert raised >= 0.8, (raised, start, end)


@pytest.mark.slow
def test_without_init_adapter_the_reference_is_the_disabled_adapter(tiny_base, tmp_path, capsys):
    """A fresh adapter: TRL's reference copy is removed (a zero-initialised LoRA is the base), and the votes of a
    demo database train it directly."""
    from persona_lora.artifact import read_manifest

    demo_votes(tmp_path / "votes.sqlite")
    out = tmp_path / "fresh"
    assert main(["train", str(REPO / "configs" / "tiny-dpo.yaml"), "--method", "kto", "--base", str(tiny_base),
                 "--data", str(tmp_path / "votes.sqlite"), "--output-dir", str(out), "--max-steps", "2",
                 "--set", "base.device=cpu", "--set", "preference.init_adapter=null", "--set", "lora.preset=all",
                 "--set", "training.batch_size=4", "--set", "training.samples=0"]) == 0
    printed = capsys.readouterr().out
    assert "reference: the base (adapter disabled)" in printed and "routed experts" in printed
    m = read_manifest(out)
    assert m.preference.reference == "base" and m.preference.init_adapter is None
    assert m.preference.data.kind == "votes" and m.preference.data.counts["ties (dropped)"] == 1
    assert {(r.model_a, r.model_b) for r in m.preference.data.win_rates} == {("ad", "base"), ("ad", "sft")}
    assert m.dataset.stats.dropped == {"ties (dropped)": 1, "same answer on both sides (dropped)": 1}
    assert "blind A/B votes of the persona-lora demo" in (out / "README.md").read_text(encoding="utf-8")


def test_coverage_check_catches_a_reference_adapter_peft_re_targeted(tiny_base):
    """TRL adds the reference with `add_adapter`, which runs PEFT's MoE rewrite: the check sees the difference."""
    from transformers import AutoModelForCausalLM

    from persona_lora import presets
    from persona_lora.errors import ConfigError
    from persona_lora.peft_compat import native_targets
    from persona_lora.train.preference_train import REF, adapter_coverage, check_both_adapters

    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    spec = presets.resolve(model, "attention+mlp")
    config = presets.lora_config_for(spec, r=4, alpha=8, dropout=0.0)
    from persona_lora.peft_compat import attach_new_adapter

    peft_model, _ = attach_new_adapter(model, config)
    asked = adapter_coverage(peft_model, "default")
    assert any(".mlp." in n for n in asked)
    with native_targets():
        peft_model.add_adapter(REF, config)
    check_both_adapters(peft_model, asked)  # switched off: the same coverage
    peft_model.delete_adapter(REF)
    peft_model.add_adapter(REF, presets.lora_config_for(spec, r=4, alpha=8, dropout=0.0))  # PEFT's rewrite runs
    with pytest.raises(ConfigError, match="coverage check failed for the 'ref' adapter"):
        check_both_adapters(peft_model, asked)


# ---------------------------------------------------------------------------------------------- adapter vs adapter

PAIR_N = 8  # new tokens per answer


@pytest.mark.slow  # an engine, a Gradio server
def test_adapter_against_adapter_equals_standalone_greedy_and_votes_record_the_pair(tiny_base, tmp_path):
    from gradio_client import Client

    from persona_lora.chat_format import conversation_for
    from persona_lora.demo.app import _Handlers, build_demo
    from persona_lora.demo.decode import shown_text
    from persona_lora.demo.engine import Engine, GenerationSettings
    from persona_lora.model_loading import load_base_model, load_tokenizer
    from persona_lora.peft_compat import load_adapter
    from persona_lora.train.samples import generate_greedy
    from persona_lora.train.synthetic import make_random_adapter
    from persona_lora.votes import VoteStore
    from tests.conftest import free_port

    paths = {name: make_random_adapter(tiny_base, tmp_path / name, "all", seed=seed, system_prompt=SYSTEM)
             for name, seed in (("one", 4), ("two", 5))}
    tok = load_tokenizer(str(tiny_base))
    conv = conversation_for(turn("user", "Who are you?"), SYSTEM)
    expected = {}
    for side in ("base", "one", "two"):
        model = load_base_model(str(tiny_base), device="cpu", dtype="float32")
        model = model if side == "base" else load_adapter(model, paths[side])
        expected[side] = shown_text(generate_greedy(model.eval(), tok, [conv], PAIR_N)[0], done=True)  # as shown
    assert len(set(expected.values())) == 3  # the adapters make a difference, or this proves nothing

    engine = Engine(str(tiny_base), device="cpu", dtype="float32", max_new_tokens_cap=64)
    try:
        for path in paths.values():
            engine.add_adapter(str(path))
        greedy = GenerationSettings(max_new_tokens=PAIR_N)
        assert engine.compare_pair("one", "two", "Who are you?", SYSTEM, greedy) == (expected["one"], expected["two"])
        assert engine.compare_pair("two", "one", "Who are you?", SYSTEM, greedy) == (expected["two"], expected["one"])
        assert engine.compare_pair("base", "two", "Who are you?", SYSTEM, greedy) == (expected["base"],
                                                                                       expected["two"])
        with pytest.raises(UsageError, match="same adapter"):
            engine.compare_pair("one", "one", "Who are you?", SYSTEM, greedy)

        store = VoteStore(tmp_path / "votes.sqlite")
        ui = _Handlers(engine, store, 200)
        *_, last = ui.on_ab_pair("Who are you?", "two", "one", SYSTEM, PAIR_N, 0, 1, 0)
        pending = last[2]
        assert pending["left_id"] == "one" and pending["adapter_id"] == "two"
        assert {pending["answer_a"], pending["answer_b"]} == {expected["one"], expected["two"]}
        vote_for_one = "A" if pending["answer_a"] == expected["one"] else "B"
        text = ui.vote_handler(vote_for_one)(pending)[1]
        assert "adapter ` one `" in text and "adapter ` two `" in text and "the base" not in text
        *_, last = ui.on_ab("Who are you?", "two", SYSTEM, PAIR_N, 0, 1, 0)  # the old handler: base vs adapter
        ui.vote_handler("tie")(last[2])
        row = store.votes()[0]
        assert (row["left_id"], row["adapter_id"], row["winner"]) == ("one", "two", "base")  # first slot won
        rates = {(r["against"], r["adapter_id"]): r for r in store.win_rates()}
        assert set(rates) == {("one", "two"), ("base", "two")}
        assert rates[("one", "two")]["base_wins"] == 1 and rates[("base", "two")]["ties"] == 1
        assert [r[:2] for r in ui.rates_rows()] == [["two", "tiny-base"], ["two", "one"]]

        app = build_demo(engine, votes=store, max_message_chars=200)
        _, url, _ = app.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
        try:
            c = Client(url, verbose=False)
            assert tuple(c.predict("Who are you?", "two", SYSTEM, PAIR_N, api_name="/compare")) == (
                expected["base"], expected["two"])  # the signature scripts use keeps working
            assert tuple(c.predict("Who are you?", "two", SYSTEM, PAIR_N, "one", api_name="/compare")) == (
                expected["one"], expected["two"])
        finally:
            app.close()
    finally:
        engine.close()


def demo_length_votes(path: Path, tokenizer, adapter_id: str, n: int = 6, tokens: int = 500) -> None:
    """Votes whose answers are as long as the demo writes them (close to its 512-token cap)."""
    from persona_lora.votes import VoteStore

    store = VoteStore(path)
    word = "本宫"
    per = len(tokenizer(word, add_special_tokens=False)["input_ids"])
    for i in range(n):
        long_a, long_b = word * (tokens // per) + f"{i}甲", word * (tokens // per) + f"{i}乙"
        store.record(base_id="tiny-base", adapter_name=adapter_id, adapter_id=adapter_id, system_prompt=SYSTEM,
                     prompt=f"q{i}", answer_a=long_a, answer_b=long_b, a_side="adapter", vote="A")


def test_the_dpo_config_keeps_demo_length_answers_and_says_what_a_shorter_max_length_drops(tiny_base, tokenizer,
                                                                                            tmp_path):
    from persona_lora.train.config import load_config
    from persona_lora.train.preference_train import formatting_note, prepare_preferences

    demo_length_votes(tmp_path / "votes.sqlite", tokenizer, "ad")
    overrides = {"base": {"model": str(tiny_base)}, "data": {"path": str(tmp_path / "votes.sqlite")},
                 "preference": {"init_adapter": None}}
    cfg = load_config(str(REPO / "configs" / "tiny-dpo.yaml"), overrides)
    run = prepare_preferences(cfg, tokenizer)
    assert len(run.train.rows) == 6 and run.train.dropped == {} and formatting_note(cfg, run) is None
    needed = run.train.needed_length
    assert 500 < needed <= cfg.data.max_length

    cfg.data.max_length = 400
    with pytest.raises(DataError, match=f"6 answer \\+ EOS alone exceeds max_length=400; set data.max_length={needed}"):
        prepare_preferences(cfg, tokenizer)
    demo_length_votes(tmp_path / "votes.sqlite", tokenizer, "ad", n=2, tokens=100)  # two short ones fit
    run = prepare_preferences(cfg, tokenizer)
    assert formatting_note(cfg, run) == (f"note: 6 of 8 examples dropped (6 answer + EOS alone exceeds max_length=400)"
                                         f"; set data.max_length={needed} (or more) to train on all of them")


@pytest.mark.parametrize("method", ["dpo", "kto"])
def test_a_preference_run_all_in_the_warm_up_is_refused_before_loading(method, tiny_base, tmp_path, capsys):
    demo_votes(tmp_path / "votes.sqlite")
    out = tmp_path / "o"
    assert main(["train", str(REPO / "configs" / "tiny-dpo.yaml"), "--method", method, "--base", str(tiny_base),
                 "--data", str(tmp_path / "votes.sqlite"), "--output-dir", str(out), "--max-steps", "1",
                 "--set", "base.device=cpu", "--set", "preference.init_adapter=null"]) == 2
    err = capsys.readouterr().err
    assert "no step of this run would change the adapter: all 1 optimizer step(s) fall in the warm-up" in err
    assert "--allow-no-update" in err and "Traceback" not in err and not out.exists()


def test_votes_judging_another_adapter_are_counted_per_adapter(tmp_path):
    from persona_lora.train.preference_data import PreferenceSet, votes_for_other_adapters

    def pair(origin, *models):
        return {"prompt": [], "chosen": "a", "rejected": "b", "origin": origin, "models": list(models)}

    mine, other = {"id": "sft", "sha256": "aa"}, {"id": "other", "sha256": "bb"}
    ps = PreferenceSet("votes", "v.sqlite", "0", pairs=[
        pair("v:1", mine), pair("v:2", other), pair("v:3", other, mine), pair("v:4", {"id": "sft", "sha256": "cc"}),
        pair("v:5", {"id": "sft", "sha256": None}), pair("v:6", {"id": "renamed", "sha256": "aa"})])
    # by weights when the vote records them (a renamed folder is the same adapter; same name, other weights is not)
    assert votes_for_other_adapters(ps, {"sft"}, "aa") == {"other": 1, "sft": 1}
    assert votes_for_other_adapters(ps, {"sft"}, None) == {"other": 1, "renamed": 1}  # by id alone


@pytest.mark.slow  # uses the trained SFT adapter
def test_votes_for_another_adapter_than_the_init_adapter_are_refused_unless_allowed(tiny_base, sft_adapter, tokenizer,
                                                                                     tmp_path, capsys):
    from persona_lora.votes import VoteStore

    votes = tmp_path / "votes.sqlite"
    store = VoteStore(votes)
    for adapter in (sft_adapter.name, "someone-else", "someone-else"):
        store.record(base_id="tiny-base", adapter_name=adapter, adapter_id=adapter, system_prompt=SYSTEM,
                     prompt="q", answer_a="persona", answer_b="plain", a_side="adapter", vote="A")
    args = ["train", str(REPO / "configs" / "tiny-dpo.yaml"), "--base", str(tiny_base), "--init-adapter",
            str(sft_adapter), "--data", str(votes), "--output-dir", str(tmp_path / "o"), "--dry-run",
            "--set", "base.device=cpu", "--set", "training.warmup_ratio=0"]  # one vote kept: one step, no warm-up
    assert main(args) == 2
    err = capsys.readouterr().err
    assert (f"2 vote(s) in votes.sqlite judged another adapter's answers than --init-adapter {sft_adapter} "
            "(someone-else: 2)") in err and "--allow-other-adapter" in err and "Traceback" not in err
    assert main([*args, "--allow-other-adapter"]) == 0
    assert "warning: 2 vote(s) in votes.sqlite judged another adapter's answers" in capsys.readouterr().out
    assert not (tmp_path / "o").exists()


@pytest.mark.slow  # uses the trained SFT adapter
@pytest.mark.parametrize("config", ["tiny-dpo.yaml", "deepseek-coder-v2-lite-huanhuan-dpo.yaml"])
def test_preference_configs_dry_run_with_the_tiny_base_swapped_in(config, tiny_base, sft_adapter, tmp_path, capsys):
    args = ["train", str(REPO / "configs" / config), "--base", str(tiny_base), "--init-adapter", str(sft_adapter),
            "--data", str(REPO / "examples" / "preferences" / "persona_pairs.jsonl"), "--output-dir",
            str(tmp_path / "o"), "--dry-run", "--set", "base.device=cpu"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "LoRA coverage:" in out and "routed experts" in out and "estimate:" in out and "pairs: 82" in out
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_init_adapter_from_the_hub_records_its_lineage_and_the_result_pushes_and_pulls(
        tiny_base, sft_adapter, hub_server, tmp_path, capsys):
    import shutil

    from persona_lora.artifact import read_manifest
    from tests.hub_fixtures import DEFAULT_USER

    sft = tmp_path / "tiny-sft"
    shutil.copytree(sft_adapter, sft, ignore=shutil.ignore_patterns("checkpoints", "logs"))
    repo = f"{DEFAULT_USER}/tiny-sft"
    assert main(["push", str(sft), repo]) == 0
    out = tmp_path / "tiny-dpo"
    assert main(["train", str(REPO / "configs" / "tiny-dpo.yaml"), "--base", str(tiny_base), "--init-adapter", repo,
                 "--data", str(REPO / "examples" / "preferences" / "persona_pairs.jsonl"), "--output-dir", str(out),
                 "--max-steps", "2", "--set", "base.device=cpu", "--set", "training.samples=0"]) == 0
    lineage = read_manifest(out).preference.init_adapter
    assert lineage.id == repo and len(lineage.commit or "") == 40
    assert lineage.commit == hub_server.repo(repo).resolve("main").sha
    assert lineage.sha256 == hashlib.sha256((sft / "adapter_model.safetensors").read_bytes()).hexdigest()
    card = (out / "README.md").read_text(encoding="utf-8")
    assert f"`{repo}` @ `{lineage.commit}` (sft)" in card
    capsys.readouterr()
    assert main(["push", str(out), f"{DEFAULT_USER}/tiny-dpo"]) == 0
    assert main(["pull", f"{DEFAULT_USER}/tiny-dpo", "--base", str(tiny_base)]) == 0
    pulled = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert read_manifest(pulled).preference.method == "dpo"


def test_votes_pushed_by_the_demo_load_back_from_the_hub(hub_server, tmp_path):
    from persona_lora.train.preference_data import load_preferences
    from tests.hub_fixtures import DEFAULT_USER

    store = demo_votes(tmp_path / "votes.sqlite")
    store.push_to_hub("ab-votes")
    ps = load_preferences(f"{DEFAULT_USER}/ab-votes")
    assert ps.source == "hub" and ps.kind == "pairs" and len(ps.pairs) == 3
    assert [p["chosen"] for p in ps.pairs] == [p["chosen"] for p in load_preferences(str(store.path)).pairs]


def test_a_vote_database_of_schema_1_reads_and_upgrades(tmp_path):
    """Databases written before the pair columns: read as base-vs-adapter votes, upgraded in place when the demo
    opens them."""
    import sqlite3

    from persona_lora.train.preference_data import load_preferences
    from persona_lora.votes import VoteStore, read_votes

    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE votes (id INTEGER PRIMARY KEY AUTOINCREMENT, created_at TEXT NOT NULL, base_id TEXT "
                   "NOT NULL, adapter_name TEXT NOT NULL, adapter_id TEXT NOT NULL, system_prompt TEXT NOT NULL "
                   "DEFAULT '', prompt TEXT NOT NULL, answer_a TEXT NOT NULL, answer_b TEXT NOT NULL, a_side TEXT NOT "
                   "NULL, vote TEXT NOT NULL, winner TEXT NOT NULL, settings TEXT NOT NULL DEFAULT '{}')")
        db.execute("INSERT INTO votes (created_at, base_id, adapter_name, adapter_id, prompt, answer_a, answer_b, "
                   "a_side, vote, winner) VALUES ('t', 'b', 'ad', 'ad', 'q', 'good', 'bad', 'adapter', 'A', 'adapter')")
    before = path.read_bytes()
    assert read_votes(path)[0]["left_id"] is None and path.read_bytes() == before  # reading writes nothing
    assert [(p["chosen"], p["rejected"]) for p in load_preferences(str(path)).pairs] == [("good", "bad")]
    store = VoteStore(path)
    store.record(base_id="b", adapter_name="ad", adapter_id="ad", prompt="q2", answer_a="x", answer_b="y",
                 a_side="base", vote="B", left_id="other")
    assert [(v["left_id"], v["winner"]) for v in store.votes()] == [(None, "adapter"), ("other", "adapter")]
    assert {(r["against"], r["adapter_wins"]) for r in store.win_rates()} == {("base", 1), ("other", 1)}
