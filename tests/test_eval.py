"""`persona-lora eval`: base vs adapters over a prompt set, report.json and report.html, resume, forgetting guard,
the judge, and the card's Evaluation section.

Adapters are made directly (training is slow): LoRA with the `attention` and `all` presets on the tiny DeepSeek-V2
base, lora_B randomised with fixed seeds so their answers differ from the base's. One evaluation of both adapters
on a few prompts (some holding markup) runs once per module; the tests read its folder, or copy it and continue
it (a copy with every row done loads no model). The figures a trained adapter must show (lower loss on its
training records, its own held-out split rebuilt from its manifest) use the session's trained adapter (`slow`).
Judge tests talk to the in-process OpenAI-protocol server (tests/openai_server.py) through the real client.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest

from persona_lora.cli import main

SYSTEM = "你是沈知微，宫中的微嫔。"
N_TOKENS = "6"
MARKUP_PROMPT = "<script>alert('p')</script>你是谁？"
MARKUP_REFERENCE = "<img src=x onerror=alert('r')>本宫乃沈知微。"
RECORDS = [
    {"instruction": MARKUP_PROMPT, "output": MARKUP_REFERENCE},
    {"instruction": "今日天气如何？", "output": "回娘娘，今日晴好，宜赏花。"},
    {"instruction": "你喜欢什么花？", "output": "臣妾最爱海棠，清雅不俗。"},
    {"instruction": "What is 2 + 2?", "input": "Answer briefly.", "output": "本宫算来，是四。"},
]


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def adapters(tiny_base, tmp_path_factory) -> dict[str, Path]:
    from persona_lora.train.synthetic import make_random_adapter

    root = tmp_path_factory.mktemp("eval-adapters")
    return {name: make_random_adapter(tiny_base, root / name, preset, seed=seed, r=8, alpha=16, std=std,
                                      system_prompt=SYSTEM)
            for name, preset, seed, std in (("attn", "attention", 1, 0.05), ("all", "all", 2, 0.05),
                                            ("wild", "attention", 3, 1.0))}


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("eval-data") / "markup.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in RECORDS), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def guard_file(tmp_path_factory) -> Path:
    from persona_lora.evaluation.sets import GUARD_FILE

    path = tmp_path_factory.mktemp("eval-guard") / "guard.jsonl"
    lines = GUARD_FILE.read_text(encoding="utf-8").splitlines()
    path.write_text("\n".join([lines[0], lines[30], lines[40]]) + "\n", encoding="utf-8")
    return path


def eval_args(base, adapters, data, out, guard, *extra) -> list[str]:
    return ["eval", *map(str, adapters), "--base", str(base), "--data", str(data), "--out", str(out),
            "--max-new-tokens", N_TOKENS, "--guard-data", str(guard), "--guard", "full", "--batch-size", "3",
            "--markers", "本宫,臣妾", *extra]


@pytest.fixture(scope="module")
def run_dir(tiny_base, adapters, data_file, guard_file, tmp_path_factory) -> Path:
    """One evaluation of two adapters (every row done)."""
    out = tmp_path_factory.mktemp("eval-run") / "out"
    assert main(eval_args(tiny_base, [adapters["attn"], adapters["all"]], data_file, out, guard_file)) == 0
    return out


def report_of(out: Path) -> dict:
    return json.loads((out / "report.json").read_text(encoding="utf-8"))


def continued(run_dir: Path, tmp_path: Path) -> Path:
    """A copy of the module's evaluation folder: rerunning the same command there only adds what is missing."""
    out = tmp_path / "out"
    shutil.copytree(run_dir, out)
    return out


def without_run(report: dict) -> dict:
    return {k: v for k, v in report.items() if k not in ("run", "created_at")}


# ---------------------------------------------------------------------------------------------- the report


@pytest.mark.slow
def test_two_adapters_in_one_report(run_dir):
    r = report_of(run_dir)
    assert r["models"] == ["base", "attn", "all"]
    assert r["data"]["evaluated"] == len(RECORDS) == len(r["rows"])
    for row in r["rows"]:
        assert set(row["answers"]) == {"base", "attn", "all"}
        assert all(isinstance(row["answers"][m], str) for m in r["models"])
        assert all(row["loss"][m] > 0 for m in r["models"])
    assert len({tuple(row["answers"].values()) for row in r["rows"]}) > 1
    assert any(row["answers"]["base"] != row["answers"]["attn"] for row in r["rows"])
    for m in r["models"]:
        s = r["summary"][m]
        assert s["prompts"] == s["scored"] == len(RECORDS)
        assert s["perplexity"] == pytest.approx(math.exp(s["loss"]), rel=1e-4)
        assert 0 < s["distinct_1"] <= 1 and 0 < s["distinct_2"] <= 1
        assert 0 <= s["marker_rate"] <= 1 and s["answer_tokens"]["max"] <= int(N_TOKENS)
        assert s["guard"]["prompts"] == 3
    # token-weighted: the summary loss is the rows' NLL over their tokens
    rows = [json.loads(x) for x in (run_dir / "rows.jsonl").read_text(encoding="utf-8").splitlines()]
    base = [x for x in rows if x["set"] == "main" and x["model"] == "base"]
    assert r["summary"]["base"]["loss"] == pytest.approx(sum(x["nll"] for x in base) / sum(x["tokens"] for x in base))
    assert len(r["guard_rows"]) == 3 and all(isinstance(g["answers"]["all"], str) for g in r["guard_rows"])
    assert r["rows"][0]["prompt"] == MARKUP_PROMPT and r["rows"][0]["reference"] == MARKUP_REFERENCE
    assert r["rows"][3]["prompt"] == "What is 2 + 2?\nAnswer briefly."  # Alpaca input, joined as training joins it
    assert r["settings"]["system_prompt"] == SYSTEM and r["settings"]["markers"] == ["本宫", "臣妾"]
    assert r["forgetting"]["adapters"]["attn"]["delta"] == pytest.approx(
        r["summary"]["attn"]["guard"]["loss"] - r["summary"]["base"]["guard"]["loss"], abs=1e-5)


class _Cells(HTMLParser):
    """The text of every element carrying data-* attributes, keyed by those attributes."""

    def __init__(self):
        super().__init__()
        self.cells: dict[tuple, dict] = {}
        self._open: list[tuple | None] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        key = tuple(sorted((k, v) for k, v in a.items() if k.startswith("data-") and k != "data-value"))
        self._open.append(key or None)
        if key:
            self.cells[key] = {"value": a.get("data-value"), "text": ""}

    def handle_endtag(self, tag):
        if self._open:
            self._open.pop()

    def handle_data(self, data):
        for key in reversed(self._open):
            if key:
                self.cells[key]["text"] += data
                return


@pytest.mark.slow
def test_json_and_html_agree(run_dir):
    from persona_lora.evaluation.table import summary_table

    r = report_of(run_dir)
    parser = _Cells()
    parser.feed((run_dir / "report.html").read_text(encoding="utf-8"))
    cells = parser.cells
    table = summary_table(r)
    assert {row["key"] for row in table} >= {"loss", "perplexity", "guard_loss", "marker_rate", "distinct_1"}
    for row in table:
        for c in row["cells"]:
            got = cells[(("data-metric", row["key"]), ("data-model", c["model"]))]
            assert got["text"] == c["text"]
            assert (float(got["value"]) if got["value"] else None) == c["value"]
    loss = cells[(("data-metric", "loss"), ("data-model", "attn"))]
    assert float(loss["value"]) == r["summary"]["attn"]["loss"]
    assert loss["text"] == f"{r['summary']['attn']['loss']:.4f}"
    for row in r["rows"]:
        i = str(row["index"])
        assert cells[(("data-field", "prompt"), ("data-row", i))]["text"] == row["prompt"]
        assert cells[(("data-field", "reference"), ("data-row", i))]["text"] == row["reference"]
        for m in r["models"]:
            assert cells[(("data-model", m), ("data-row", i))]["text"] == row["answers"][m]


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.css = ""

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        if self.tags and self.tags[-1][0] == "style":
            self.css += data


def _loads_nothing(page: str) -> None:
    """No element that runs or fetches anything: no scripts, frames, images, links, event handlers, URLs."""
    parser = _Tags()
    parser.feed(page)
    names = {tag for tag, _ in parser.tags}
    assert not names & {"script", "iframe", "img", "link", "object", "embed", "a", "base", "form"}, names
    for tag, attrs in parser.tags:
        for name, value in attrs.items():
            assert name not in ("src", "href", "srcdoc", "action") and not name.startswith("on"), (tag, name)
            assert "url(" not in (value or "") and "://" not in (value or ""), (tag, name, value)
    assert "url(" not in parser.css and "@import" not in parser.css


@pytest.mark.slow
def test_html_escapes_prompts_and_answers_that_hold_markup(run_dir):
    from persona_lora.evaluation.html_report import render_html

    page = (run_dir / "report.html").read_text(encoding="utf-8")
    _loads_nothing(page)
    assert "&lt;script&gt;alert(&#39;p&#39;)&lt;/script&gt;你是谁？" in page
    assert "&lt;img src=x onerror=alert(&#39;r&#39;)&gt;本宫乃沈知微。" in page
    # answers (and model names) holding markup are escaped too
    r = report_of(run_dir)
    r["rows"][1]["answers"]["attn"] = '<script>steal()</script><b onmouseover="x()">hi</b>'
    r["guard_rows"][0]["answers"]["base"] = "<iframe srcdoc='x'></iframe>"
    r["adapters"][0]["warnings"] = ["<svg onload=alert(1)>"]
    page = render_html(r)
    _loads_nothing(page)
    assert "&lt;script&gt;steal()&lt;/script&gt;&lt;b onmouseover=&#34;x()&#34;&gt;hi&lt;/b&gt;" in page
    assert "&lt;iframe srcdoc=&#39;x&#39;&gt;&lt;/iframe&gt;" in page and "&lt;svg onload=alert(1)&gt;" in page


def test_a_page_from_a_report_holding_markup_escapes_it_and_loads_nothing():
    from persona_lora.evaluation.html_report import render_html

    bad = '<script>alert(1)</script><img src=x onerror="alert(2)">'
    summary = {"loss": 1.5, "perplexity": 4.4817, "marker_rate": 0.5, "distinct_1": 0.9}
    report = {
        "schema": "persona-lora/eval@1", "created_at": "now", "persona_lora_version": "0", "models": ["base", bad],
        "base": {"id": bad}, "adapters": [{"name": bad, "warnings": [bad]}],
        "data": {"name": bad, "split": "all", "evaluated": 1, "available": 1, "sha256": "0", "sample_seed": None},
        "guard": None, "forgetting": None, "guard_rows": [],
        "settings": {"max_new_tokens": 4, "system_prompt": bad, "chat_template": "x", "markers": [bad]},
        "summary": {"base": summary, bad: {**summary, "loss": 2.0}},
        "rows": [{"index": 0, "origin": bad, "prompt": bad, "reference": bad, "answers": {"base": bad, bad: bad},
                  "loss": {"base": 1.5, bad: 2.0}}],
    }
    page = render_html(report)
    _loads_nothing(page)
    assert "<script>" not in page and page.count("&lt;script&gt;alert(1)&lt;/script&gt;") >= 8


@pytest.mark.slow
def test_resume_after_an_interrupted_run_gives_the_same_report(run_dir, tiny_base, adapters, data_file, guard_file,
                                                               tmp_path, monkeypatch, capsys):
    from persona_lora.evaluation import store

    out = tmp_path / "out"
    args = eval_args(tiny_base, [adapters["attn"], adapters["all"]], data_file, out, guard_file)
    real_append, calls = store.RowStore.append, []

    def append_then_interrupt(self, rows):
        calls.append(len(rows))
        if len(calls) == 3:
            raise KeyboardInterrupt  # Ctrl-C while the third batch was being computed
        real_append(self, rows)

    monkeypatch.setattr(store.RowStore, "append", append_then_interrupt)
    assert main(args) == 130
    assert (f"{sum(calls[:2])} finished rows kept in {out / 'rows.jsonl'}: rerun the same command to continue"
            in capsys.readouterr().err)
    monkeypatch.setattr(store.RowStore, "append", real_append)
    kept = (out / "rows.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(kept) == sum(calls[:2]) and not (out / "report.json").exists()
    with open(out / "rows.jsonl", "a", encoding="utf-8") as f:
        f.write('{"kind": "answer", "set": "main", "ind')  # a kill in the middle of writing a row
    assert main(args) == 0
    err = capsys.readouterr().err
    assert f"continuing the evaluation in {out} ({len(kept)} rows done)" in err
    assert without_run(report_of(out)) == without_run(report_of(run_dir))
    assert report_of(out)["run"]["resumed"] is True


def test_an_evaluation_interrupted_before_its_first_row_says_nothing_was_written(tiny_base, adapters, data_file,
                                                                                 guard_file, tmp_path, monkeypatch,
                                                                                 capsys):
    from persona_lora.evaluation import store

    def interrupt(self, rows):
        raise KeyboardInterrupt  # Ctrl-C while the first batch was being computed

    monkeypatch.setattr(store.RowStore, "append", interrupt)
    out = tmp_path / "out"
    assert main(eval_args(tiny_base, [adapters["attn"]], data_file, out, guard_file, "--guard", "off")) == 130
    err = capsys.readouterr().err
    assert f"interrupted before any row finished; nothing was written to {out}" in err and "rows.jsonl" not in err
    assert not out.exists()


@pytest.mark.slow
def test_a_rerun_with_other_settings_or_into_a_foreign_folder_is_refused(run_dir, tiny_base, adapters, data_file,
                                                                          guard_file, tmp_path, capsys):
    out = continued(run_dir, tmp_path)
    args = eval_args(tiny_base, [adapters["attn"], adapters["all"]], data_file, out, guard_file)
    args[args.index("--max-new-tokens") + 1] = "7"
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "holds an evaluation with other settings (max_new_tokens: 6 -> 7)" in err and "--overwrite" in err
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert main(eval_args(tiny_base, [adapters["attn"]], data_file, foreign, guard_file)) == 2
    assert "not an evaluation folder" in capsys.readouterr().err and (foreign / "notes.txt").read_text() == "keep me"


@pytest.mark.slow
def test_batched_answers_equal_one_prompt_at_a_time(run_dir, tiny_base, adapters, data_file, guard_file, tmp_path):
    out = tmp_path / "one"
    assert main(eval_args(tiny_base, [adapters["attn"], adapters["all"]], data_file, out, guard_file,
                          "--batch-size", "1", "--guard", "off")) == 0
    one, batched = report_of(out), report_of(run_dir)
    for a, b in zip(one["rows"], batched["rows"]):
        assert a["answers"] == b["answers"]
        for m in one["models"]:
            assert a["loss"][m] == pytest.approx(b["loss"][m], rel=1e-4)


@pytest.mark.slow
def test_loss_is_trainings_loss_on_the_answer_tokens(run_dir, tiny_base):
    """The reported loss of a row equals transformers' own loss with the labels of the one formatting path."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from persona_lora.chat_format import conversation_for, encode_example

    r = report_of(run_dir)
    tok = AutoTokenizer.from_pretrained(tiny_base)
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()
    row = r["rows"][2]
    conv = conversation_for([{"role": "user", "content": row["prompt"]},
                             {"role": "assistant", "content": row["reference"]}], SYSTEM)
    enc = encode_example(tok, conv, max_length=256, train_on="last")
    with torch.no_grad():
        loss = model(input_ids=torch.tensor([enc.input_ids]), labels=torch.tensor([enc.labels])).loss.item()
    assert row["loss"]["base"] == pytest.approx(loss, rel=1e-4)


# ---------------------------------------------------------------------------------------------- forgetting guard


@pytest.mark.slow
def test_fail_if_forgetting_exits_non_zero_when_the_guard_loss_rises(tiny_base, adapters, data_file, tmp_path,
                                                                     capsys):
    from persona_lora.evaluation.sets import GUARD_FILE

    # A random adapter on a random base lowers the loss on most prompts (towards uniform) and raises it on some:
    # the shipped guard set (loss only) shows which, and a guard of the worst one must trip the check.
    first = tmp_path / "all-guard"
    args = ["eval", str(adapters["wild"]), "--base", str(tiny_base), "--data", str(data_file), "-n", "1",
            "--max-new-tokens", "2", "--guard", "loss"]
    assert main([*args, "--out", str(first), "--fail-if-forgetting", "100"]) == 0
    rows = report_of(first)["guard_rows"]
    assert len(rows) == len(GUARD_FILE.read_text(encoding="utf-8").splitlines())
    worst = max(range(len(rows)), key=lambda i: rows[i]["loss"]["wild"] - rows[i]["loss"]["base"])
    assert rows[worst]["loss"]["wild"] > rows[worst]["loss"]["base"]
    guard = tmp_path / "worst.jsonl"
    guard.write_text(GUARD_FILE.read_text(encoding="utf-8").splitlines()[worst] + "\n", encoding="utf-8")
    out = tmp_path / "worst"
    args = [*args, "--guard-data", str(guard), "--out", str(out)]
    assert main([*args, "--fail-if-forgetting", "0"]) == 3
    f = report_of(out)["forgetting"]
    assert f["adapters"]["wild"]["exceeded"] is True and f["adapters"]["wild"]["delta"] > 0
    assert "wild forgot: its loss on the guard prompts is" in capsys.readouterr().err
    allowed = f"{f['adapters']['wild']['delta'] + 0.01:.4f}"
    assert main([*args, "--fail-if-forgetting", allowed]) == 0  # continues the same rows: no model is loaded
    assert report_of(out)["forgetting"]["adapters"]["wild"]["exceeded"] is False
    assert report_of(out)["guard_rows"][0]["answers"]["wild"] is None  # --guard loss: no answers


def test_option_conflicts_are_named(tmp_path, capsys):
    base = ["eval", "x", "--base", "b", "--out", str(tmp_path / "o")]
    assert main([*base, "--guard", "off", "--fail-if-forgetting", "0.1"]) == 2
    assert "--fail-if-forgetting needs the guard" in capsys.readouterr().err
    assert main([*base, "--judge-endpoint", "http://127.0.0.1:1/v1"]) == 2
    assert "--judge-model is missing" in capsys.readouterr().err
    assert main([*base, "--judge-key-env", "K"]) == 2
    assert "only apply with --judge-endpoint" in capsys.readouterr().err
    assert main([*base, "-n", "0", "--fail-if-forgetting", "-1"]) == 2
    err = capsys.readouterr().err
    assert "-n must be at least 1" in err and "--fail-if-forgetting must be a difference in loss >= 0" in err
    assert main([*base, "--max-new-tokens", "100000000"]) == 2
    err = capsys.readouterr().err
    assert "--max-new-tokens 100000000 is more than 4096 tokens per answer" in err and "give at most 4096" in err
    assert not (tmp_path / "o").exists()


def test_the_adapter_decodes_through_the_lora_aware_experts_path_with_the_same_answers(tiny_base, adapters,
                                                                                        data_file, tmp_path):
    """LoRA on the fused experts runs the LoRA-aware forward (as in the demo), not PEFT's ParamWrapper, which
    rebuilds every expert weight per pass; the answers are the ones PEFT's own path gives."""
    from persona_lora.evaluation.plan import EvalOptions, make_plan
    from persona_lora.evaluation.scoring import Models
    from persona_lora.model_loading import load_tokenizer, resolve_base
    from persona_lora.peft_compat import outermost_param_wrappers

    base = resolve_base(str(tiny_base), source="local")
    options = EvalOptions(adapters=[str(adapters["all"])], base=str(tiny_base), out=tmp_path / "o",
                          data=str(data_file), device="cpu", dtype="float32")
    plan = make_plan(options, base, load_tokenizer(base).chat_template)
    models = Models(plan)
    assert models.experts_forward.startswith("LoRA-aware")
    prompts = [models.prompt_ids(it.prompt_messages) for it in plan.main.items[:3]]
    with models.use("all"):
        fast = [a.text for a in models.generate(prompts, 6)]
        for wrapper in outermost_param_wrappers(models.model):
            del wrapper.forward  # back to PEFT's ParamWrapper.forward
        stock = [a.text for a in models.generate(prompts, 6)]
    assert fast == stock


def test_the_shipped_guard_set_is_valid_and_bilingual():
    from persona_lora.evaluation.sets import guard_set

    s = guard_set(None)
    assert 45 <= len(s.items) <= 60
    chinese = [it for it in s.items if re.search(r"[\u4e00-\u9fff]", it.prompt)]
    assert 20 <= len(chinese) <= len(s.items) - 20
    assert all(it.reference.strip() and it.conversation[0]["role"] == "user" for it in s.items)


# ---------------------------------------------------------------------------------------------- held-out split


def _manifest(data: Path, seed: int, fraction: float):
    from persona_lora.artifact import BaseModelInfo, DatasetInfo, Manifest
    from persona_lora.hashing import sha256_file

    return Manifest(kind="adapter", name="p", base_model=BaseModelInfo(id="b"),
                    dataset=DatasetInfo(name=data.name, source="local", sha256=sha256_file(data)),
                    config={"data": {"path": data.name, "eval_fraction": fraction, "markers": ["本宫"]},
                            "training": {"seed": seed}})


def test_held_out_split_is_the_one_training_held_out(tokenizer, small_persona_data, tmp_path, monkeypatch):
    from persona_lora.errors import DataError, UsageError
    from persona_lora.evaluation.sets import main_set
    from persona_lora.train.config import config_from_dict
    from persona_lora.train.prepare import prepare_data

    cfg = config_from_dict({"base": {"model": "b"}, "training": {"output_dir": "o", "seed": 7},
                            "data": {"path": str(small_persona_data), "eval_fraction": 0.25, "system_prompt": SYSTEM}})
    trained = prepare_data(cfg, tokenizer)
    manifest = _manifest(small_persona_data, 7, 0.25)
    folder = tmp_path / "adapter"
    held = main_set(data=str(small_persona_data), split="held-out", n=None, seed=0, system_prompt=SYSTEM,
                    reference=("p", folder, manifest))
    assert [it.conversation for it in held.items] == trained.eval_conversations
    assert held.info["sha256_matches_training"] is True and held.info["seed"] == 7
    train = main_set(data=str(small_persona_data), split="train", n=None, seed=0, system_prompt=SYSTEM,
                     reference=("p", folder, manifest))
    assert [it.conversation for it in train.items] == trained.train_conversations
    # without --data: the file is found by its recorded name (here: in the working folder) and proven by its sha
    monkeypatch.chdir(small_persona_data.parent)
    again = main_set(data=None, split=None, n=None, seed=0, system_prompt=SYSTEM, reference=("p", folder, manifest))
    assert [it.origin for it in again.items] == [it.origin for it in held.items]
    # other data: the split is refused, naming both hashes
    other = tmp_path / "other.jsonl"
    other.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": "d"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"is not the data adapter p was trained on \(sha256"):
        main_set(data=str(other), split="held-out", n=None, seed=0, system_prompt=None,
                 reference=("p", folder, manifest))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match="was trained on small_persona.json .* not found here"):
        main_set(data=None, split=None, n=None, seed=0, system_prompt=None, reference=("p", folder, manifest))


def test_n_samples_with_the_seed_in_file_order(small_persona_data):
    from persona_lora.evaluation.sets import main_set

    a = main_set(data=str(small_persona_data), split=None, n=5, seed=3, system_prompt=None, reference=None)
    b = main_set(data=str(small_persona_data), split=None, n=5, seed=3, system_prompt=None, reference=None)
    c = main_set(data=str(small_persona_data), split=None, n=5, seed=4, system_prompt=None, reference=None)
    assert [it.origin for it in a.items] == [it.origin for it in b.items] != [it.origin for it in c.items]
    lines = [int(it.origin.split("record ")[1]) for it in a.items]
    assert lines == sorted(lines) and a.info["sample_seed"] == 3 and a.info["available"] == 16


@pytest.mark.slow
def test_trained_adapter_beats_the_base_on_its_records_and_its_held_out_split_is_rebuilt(
        trained_adapter, tiny_base, small_persona_data, tmp_path):
    from persona_lora.artifact import read_manifest

    out = tmp_path / "train"
    assert main(["eval", str(trained_adapter), "--base", str(tiny_base), "--data", str(small_persona_data),
                 "--split", "train", "-n", "6", "--max-new-tokens", "4", "--guard", "off", "--out", str(out)]) == 0
    r = report_of(out)
    assert r["summary"]["tiny-adapter"]["loss"] < r["summary"]["base"]["loss"]
    assert r["adapters"][0]["held_out"] is False and "not held-out figures" in r["adapters"][0]["warnings"][0]
    assert r["settings"]["markers"] == ["本宫", "臣妾"]  # data.markers of configs/tiny.yaml, from the manifest

    out = tmp_path / "held"
    assert main(["eval", str(trained_adapter), "--base", str(tiny_base), "--data", str(small_persona_data),
                 "--split", "held-out", "--max-new-tokens", "4", "--guard", "off", "--out", str(out)]) == 0
    r = report_of(out)
    samples = [s.prompt for s in read_manifest(trained_adapter).samples]  # training's samples: its held-out prompts
    assert sorted(row["prompt"] for row in r["rows"]) == sorted(samples) and r["data"]["evaluated"] == 2
    assert r["data"]["sha256_matches_training"] is True and r["adapters"][0]["held_out"] is True


# ---------------------------------------------------------------------------------------------- judge


def _judge_args(run_dir, tiny_base, adapters, data_file, guard_file, out, server, *extra):
    args = eval_args(tiny_base, [adapters["attn"], adapters["all"]], data_file, out, guard_file)
    return [*args, "--judge-endpoint", server.url, "--judge-model", "judge", *extra]


def _shown(content: str, label: str) -> str:
    return re.search(rf"Answer {label}:\n<<<\n(.*?)\n>>>", content, re.S).group(1)


@pytest.mark.slow
def test_judge_sees_both_orders_and_the_win_rate_follows(run_dir, tiny_base, adapters, data_file, guard_file,
                                                         tmp_path, openai_server, monkeypatch):
    r = report_of(run_dir)
    base_answers = {row["answers"]["base"] for row in r["rows"]}

    def prefer_the_adapter(req) -> str:  # a judge that always picks the answer the base did not give
        a = _shown(req.last_user, "A")
        return "The other one is better.\nVerdict: B" if a in base_answers else "Verdict: A"

    openai_server.models = ["judge"]
    openai_server.api_key = "sk-judge-secret"
    openai_server.script(prefer_the_adapter)
    monkeypatch.setenv("JUDGE_KEY", "sk-judge-secret")
    out = continued(run_dir, tmp_path)
    assert main(_judge_args(run_dir, tiny_base, adapters, data_file, guard_file, out, openai_server,
                            "--judge-key-env", "JUDGE_KEY")) == 0
    assert len(openai_server.requests) == 2 * 2 * len(RECORDS)  # both orders, both adapters, every prompt
    first = openai_server.requests[0]
    assert first.params["temperature"] == 0 and SYSTEM in first.last_user and MARKUP_REFERENCE in first.last_user
    assert {_shown(first.last_user, "A"), _shown(first.last_user, "B")} == {r["rows"][0]["answers"]["base"],
                                                                             r["rows"][0]["answers"]["attn"]}
    j = report_of(out)
    differ = sum(row["answers"]["base"] != row["answers"]["attn"] for row in r["rows"])
    judge = j["summary"]["attn"]["judge"]
    assert judge["wins"] == differ and judge["losses"] == 0 and judge["invalid"] == 0
    assert judge["win_rate"] == pytest.approx((differ + 0.5 * (len(RECORDS) - differ)) / len(RECORDS), abs=1e-4)
    low, high = judge["wilson_95"]
    assert 0 <= low <= judge["win_rate"] <= high <= 1
    assert j["rows"][0]["judge"]["attn"]["base_first"] in ("A", "B", "tie")
    assert "Judge: win rate against the base" in (out / "report.html").read_text(encoding="utf-8")
    assert without_run({k: v for k, v in j.items() if k not in ("summary", "rows")}) == \
        without_run({k: v for k, v in r.items() if k not in ("summary", "rows")})
    # a rerun asks nothing again
    assert main(_judge_args(run_dir, tiny_base, adapters, data_file, guard_file, out, openai_server,
                            "--judge-key-env", "JUDGE_KEY")) == 0
    assert len(openai_server.requests) == 2 * 2 * len(RECORDS)


@pytest.mark.slow
def test_a_judge_answering_garbage_is_counted_invalid_not_a_crash(run_dir, tiny_base, adapters, data_file,
                                                                  guard_file, tmp_path, openai_server):
    openai_server.models = ["judge"]
    openai_server.script("Both answers have merits; I cannot decide. Verdict: maybe")
    openai_server.fail("garbage", times=3)  # a 200 whose body is an HTML error page
    out = continued(run_dir, tmp_path)
    assert main(_judge_args(run_dir, tiny_base, adapters, data_file, guard_file, out, openai_server)) == 0
    for name in ("attn", "all"):
        judge = report_of(out)["summary"][name]["judge"]
        assert judge["invalid"] == len(RECORDS) and judge["win_rate"] is None and judge["wilson_95"] is None
    rows = [json.loads(x) for x in (out / "rows.jsonl").read_text(encoding="utf-8").splitlines()]
    judged = [x for x in rows if x["kind"] == "judge"]
    assert len(judged) == 2 * 2 * len(RECORDS) and all(x["verdict"] is None for x in judged)


@pytest.mark.slow
def test_judge_key_errors_name_the_variable_and_never_show_the_key(run_dir, tiny_base, adapters, data_file,
                                                                   guard_file, tmp_path, openai_server, monkeypatch,
                                                                   capsys):
    openai_server.models = ["judge"]
    openai_server.api_key = "sk-right"
    out = continued(run_dir, tmp_path)
    args = _judge_args(run_dir, tiny_base, adapters, data_file, guard_file, out, openai_server,
                       "--judge-key-env", "JUDGE_KEY")
    monkeypatch.delenv("JUDGE_KEY", raising=False)
    assert main(args) == 2
    assert "--judge-key-env JUDGE_KEY: the environment variable JUDGE_KEY is not set" in capsys.readouterr().err
    monkeypatch.setenv("JUDGE_KEY", "sk-wrong-and-secret")
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "refused the key (HTTP 401)" in err and "sk-wrong-and-secret" not in err
    assert "sk-wrong-and-secret" not in (out / "rows.jsonl").read_text(encoding="utf-8")
    openai_server.api_key = None
    openai_server.fail("404")
    assert main(_judge_args(run_dir, tiny_base, adapters, data_file, guard_file, out, openai_server)) == 1
    assert "check --judge-model judge" in capsys.readouterr().err


@pytest.mark.slow
def test_the_judge_is_never_called_unless_asked(run_dir, tiny_base, adapters, data_file, guard_file, tmp_path,
                                                openai_server):
    out = continued(run_dir, tmp_path)
    assert main(eval_args(tiny_base, [adapters["attn"], adapters["all"]], data_file, out, guard_file)) == 0
    assert openai_server.requests == [] and "judge" not in report_of(out)["summary"]["attn"]


@pytest.mark.parametrize("client", ["openai", "httpx"])
def test_the_judge_speaks_the_protocol_with_either_client(client, openai_server, monkeypatch):
    import sys

    from persona_lora.evaluation.judge import Judge, JudgeError

    if client == "httpx":
        monkeypatch.setitem(sys.modules, "openai", None)  # as where the openai package is not installed
    openai_server.models = ["judge"]
    openai_server.api_key = "sk-k"
    openai_server.script("Both fine, B more in character.\nVerdict: B")
    monkeypatch.setenv("K", "sk-k")
    judge = Judge(openai_server.url, "judge", "K", None)
    got = judge.judge(system_prompt=SYSTEM, prompt="p", reference="r", base="b-answer", adapter="a-answer",
                      order="adapter-first")
    assert got == {"verdict": "B", "winner": "base", "raw": "Both fine, B more in character.\nVerdict: B"}
    req = openai_server.requests[-1]
    assert req.model == "judge" and req.params["temperature"] == 0
    assert req.last_user.index("a-answer") < req.last_user.index("b-answer")  # adapter shown as A
    openai_server.fail("garbage", times=1)
    assert judge.judge(system_prompt=None, prompt="p", reference="r", base="b", adapter="a",
                       order="base-first")["verdict"] is None
    monkeypatch.setenv("K", "sk-leaked")
    with pytest.raises(JudgeError, match=r"refused the key \(HTTP 401\)") as e:
        Judge(openai_server.url, "judge", "K", None).ask("x")
    assert "sk-leaked" not in str(e.value)


def test_verdicts_are_read_strictly_and_the_rubric_is_filled_once():
    from persona_lora.evaluation.judge import fill, parse_verdict, winner

    assert parse_verdict("A is concise.\nVerdict: B") == "B"
    assert parse_verdict("**Verdict:** tie") == "tie" and parse_verdict('{"verdict": "A"}') == "A"
    assert parse_verdict("A") == "A" and parse_verdict(" b. ") == "B"
    for garbage in ("", None, "I cannot decide", "Verdict: maybe", "<html>502</html>", 3):
        assert parse_verdict(garbage) is None
    assert winner("A", "base-first") == "base" and winner("A", "adapter-first") == "adapter"
    assert winner("B", "base-first") == "adapter" and winner("tie", "adapter-first") == "tie"
    text = fill("{prompt}|{answer_a}|{answer_b}|{system_prompt}", system_prompt=None, prompt="p {answer_b}",
                reference="r", answer_a="a", answer_b="b")
    assert text == "p {answer_b}|a|b|(none)"


def test_metrics():
    from persona_lora.evaluation import metrics

    assert metrics.units("Hello, 世界! hello") == ["hello", ",", "世", "界", "!", "hello"]
    assert metrics.distinct_n(["a b a b"], 1) == 0.5 and metrics.distinct_n(["a b a b"], 2) == pytest.approx(2 / 3,
                                                                                                            abs=1e-4)
    assert metrics.distinct_n(["a"], 2) is None
    assert metrics.marker_rate(["本宫知道", "好", "臣妾"], ["本宫", "臣妾"]) == pytest.approx(0.6667, abs=1e-4)
    assert metrics.marker_rate(["x"], []) is None
    assert metrics.outcome(["adapter", "tie"]) == "win" and metrics.outcome(["adapter", "base"]) == "tie"
    assert metrics.outcome([None, "base"]) == "loss" and metrics.outcome([None, None]) == "invalid"
    w = metrics.win_rate(["win", "win", "tie", "loss", "invalid"])
    assert (w["wins"], w["ties"], w["losses"], w["invalid"], w["win_rate"]) == (2, 1, 1, 1, 0.625)
    assert metrics.length_stats([3, 1, 2]) == {"mean": 2.0, "median": 2, "min": 1, "max": 3}


# ---------------------------------------------------------------------------------------------- the card


@pytest.mark.slow
def test_card_eval_adds_the_section_and_model_index_and_only_for_these_weights(run_dir, adapters, tmp_path, capsys):
    from huggingface_hub import ModelCard

    from tests.test_cards import tables_are_well_formed

    folder = tmp_path / "attn"
    shutil.copytree(adapters["attn"], folder)
    assert main(["card", str(folder)]) == 0
    plain = (folder / "README.md").read_text(encoding="utf-8")
    assert "## Evaluation" not in plain
    assert main(["card", str(folder), "--eval", str(run_dir)]) == 0
    text = (folder / "README.md").read_text(encoding="utf-8")
    r = report_of(run_dir)
    section = text.split("## Evaluation", 1)[1].split("\n## ", 1)[0]
    assert f"{len(RECORDS)} prompts from records of `markup.jsonl`" in section
    assert f"at most {N_TOKENS} new tokens" in section and f"system prompt `{SYSTEM}`" in section
    assert f"| Loss on the reference answers | {r['summary']['base']['loss']:.4f} | " \
           f"{r['summary']['attn']['loss']:.4f} |" in section
    assert "Forgetting guard: 3 general prompts" in section
    tables_are_well_formed(text)
    results = ModelCard.load(folder / "README.md").data.eval_results
    loss = next(x for x in results if x.metric_name == "Evaluation loss")
    assert loss.metric_value == round(r["summary"]["attn"]["loss"], 4) and loss.dataset_name == "markup.jsonl"
    assert {x.metric_name for x in results} == {"Evaluation loss", "Evaluation perplexity", "Forgetting-guard loss"}
    assert main(["card", str(folder)]) == 0  # without --eval: exactly the card without the section
    assert (folder / "README.md").read_text(encoding="utf-8") == plain
    assert main(["card", str(adapters["wild"]), "--eval", str(run_dir)]) == 2
    assert "evaluated other weights (attn, all)" in capsys.readouterr().err
    assert main(["card", str(folder), "--eval", str(tmp_path)]) == 2
    assert "no report.json there" in capsys.readouterr().err
