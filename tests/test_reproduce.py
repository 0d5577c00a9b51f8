"""`persona-lora reproduce`: an adapter trained again from its manifest alone comes out the same, and what would
make it another run (other data, another base, a record missing a field) is refused, naming what differs.

The slow tests train on the tiny DeepSeek-V2 base (6 steps, one module-scoped original); the fast ones check the
refusals and the verdict on manifests written by hand, without training.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
from pathlib import Path

import pytest

from persona_lora.artifact import MANIFEST_NAME, SCHEMA, parse_manifest, read_manifest
from persona_lora.cli import main
from persona_lora.hashing import sha256_file
from persona_lora.train.reproduce.record import config_dict
from persona_lora.train.reproduce.run import REPORT_NAME, Original, Plan, compare, decide
from tests.conftest import train_args
from tests.hub_fixtures import DEFAULT_USER

ORIGINAL_RUN = ("--max-steps", "6", "--set", "training.logging_steps=1", "--set", "training.eval_steps=2",
                "--set", "training.samples=0", "--set", "training.report_to=[none]", "--set", "lora.r=4",
                "--set", "lora.alpha=8", "--set", "lora.preset=attention")


def _tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _report(folder: Path) -> dict:
    return json.loads((folder / REPORT_NAME).read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def original(tiny_base, small_persona_data, tmp_path_factory) -> Path:
    """An adapter trained by `persona-lora train`: 6 steps, a loss every step, an eval loss every 2."""
    out = tmp_path_factory.mktemp("originals") / "tiny-persona"
    assert main(train_args(tiny_base, small_persona_data, out, *ORIGINAL_RUN)) == 0
    return out


def _hand_written(folder: Path, base: Path, data: Path) -> Path:
    """A manifest-only folder recording a run on `base` and `data` (what reproduce reads before training)."""
    folder.mkdir(parents=True)
    manifest = {
        "schema": SCHEMA, "kind": "adapter", "name": "tiny-persona",
        "base_model": {"id": base.name, "source": "local", "config_sha256": sha256_file(base / "config.json"),
                       "model_type": "deepseek_v2"},
        "dataset": {"name": data.name, "source": "local", "sha256": sha256_file(data), "stats": {"records": 16}},
        "chat": {"train_on": "all", "overlong": "truncate", "max_length": 256, "template_source": "base"},
        "lora": {"preset": "attention", "r": 4, "alpha": 8, "dropout": 0.0},
        "training": {"learning_rate": 2e-3, "lr_scheduler": "cosine", "warmup_ratio": 0.03, "weight_decay": 0.0,
                     "max_grad_norm": 1.0, "epochs": 20.0, "max_steps": 4, "per_device_batch_size": 8,
                     "gradient_accumulation_steps": 1, "seed": 42, "dtype": "float32", "device": "cpu",
                     "eval_fraction": 0.125, "group_by_length": True, "packing": False, "world_size": 1},
        "metrics": {"history": [{"step": 1, "loss": 9.3}, {"step": 2, "loss": 9.4}, {"step": 2, "eval_loss": 6.7},
                                {"step": 3, "loss": 6.6}, {"step": 4, "loss": 6.7}, {"step": 4, "eval_loss": 6.4}]},
        "environment": {"libraries": {"torch": "2.13.0", "transformers": "5.24.0"}},
        "config": {"name": "tiny-persona", "base": {"model": base.name, "device": "cpu"},
                   "data": {"path": data.name, "max_length": 256, "eval_fraction": 0.125},
                   "lora": {"preset": "attention", "r": 4, "alpha": 8, "dropout": 0.0},
                   "training": {"output_dir": "tiny-persona", "max_steps": 4, "batch_size": 8, "learning_rate": 2e-3,
                                "logging_steps": 1, "eval_steps": 2, "samples": 0}},
    }
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return folder


def _edit_manifest(folder: Path, edit) -> None:
    path = folder / MANIFEST_NAME
    data = json.loads(path.read_text(encoding="utf-8"))
    edit(data)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")


# ------------------------------------------------------------------------------------------------ reproduced


@pytest.mark.slow
def test_a_fresh_adapter_reproduces_in_full_and_in_its_first_steps(original, tiny_base, small_persona_data,
                                                                   tmp_path, capsys):
    before = _tree_digest(original)
    assert main(["reproduce", str(original), "--base", str(tiny_base), "--data", str(small_persona_data)]) == 0
    out = original.parent / f"{original.name}-reproduced"  # the default: a new folder next to the adapter
    report = _report(out)
    printed = capsys.readouterr().out
    assert report["verdict"] == "reproduced" and report["reasons"] == []
    assert [r["step"] for r in report["train_loss"]] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in report["eval_loss"]] == [2, 4, 6]
    assert all(abs(r["diff"]) <= 1e-4 for r in report["train_loss"] + report["eval_loss"])
    assert report["max_abs_diff"] <= 1e-4 and report["libraries"] == {} and report["config_from"].startswith("config")
    assert printed.strip().splitlines()[-1] == f"verdict: {report['summary']}"
    assert report["summary"].startswith("reproduced — max |Δ loss| ")
    assert "(steps 1-6, 6 optimizer updates, cpu as trained)" in printed
    assert (out / "adapter_model.safetensors").is_file() and read_manifest(out).name == read_manifest(original).name
    assert _tree_digest(original) == before  # the original adapter is only read

    # the first 5 steps, on the run's own schedule (a run of max_steps 5 would decay the learning rate sooner)
    quick = tmp_path / "quick"
    assert main(["reproduce", str(original), "--base", str(tiny_base), "--data", str(small_persona_data),
                 "--max-steps", "5", "--out", str(quick)]) == 0
    report = _report(quick)
    assert report["verdict"] == "reproduced" and report["steps_compared"] == [1, 5] and report["max_steps"] == 5
    assert [r["step"] for r in report["train_loss"]] == [1, 2, 3, 4, 5]
    assert report["steps_run"] == 5 and report["updates_compared"] == 4 and "4 optimizer updates" in report["summary"]
    assert read_manifest(quick).metrics.steps == 5
    assert _tree_digest(original) == before


@pytest.mark.slow
def test_a_manifest_without_the_recorded_config_is_rebuilt_from_its_sections(original, tiny_base,
                                                                            small_persona_data, tmp_path):
    from persona_lora.train.config import config_from_dict

    m = read_manifest(original)
    recorded, _ = config_dict(m, original, [1, 2, 3, 4, 5, 6])
    older = copy.deepcopy(m)
    older.config = None
    rebuilt, source = config_dict(older, original, [1, 2, 3, 4, 5, 6])
    assert "sections" in source
    a, b = config_from_dict(recorded).to_dict(), config_from_dict(rebuilt).to_dict()
    for key in ("device", "load_in_4bit"):
        assert a["base"][key] == b["base"][key], key
    assert b["base"]["dtype"] == m.training.dtype == "float32"  # what "auto" resolved to, as recorded
    for key in ("system_prompt", "max_length", "train_on", "overlong", "eval_fraction"):
        assert a["data"][key] == b["data"][key], key
    assert a["lora"] == b["lora"]
    for key in ("epochs", "max_steps", "batch_size", "gradient_accumulation_steps", "learning_rate", "lr_scheduler",
                "warmup_ratio", "weight_decay", "max_grad_norm", "seed", "group_by_length", "packing",
                "logging_steps", "eval_steps"):
        assert a["training"][key] == b["training"][key], key

    # and such a manifest reproduces
    folder = tmp_path / "older"
    shutil.copytree(original, folder, ignore=shutil.ignore_patterns("checkpoints", "logs"))
    _edit_manifest(folder, lambda d: d.pop("config"))
    assert main(["reproduce", str(folder), "--base", str(tiny_base), "--data", str(small_persona_data),
                 "--max-steps", "2", "--out", str(tmp_path / "again")]) == 0
    assert _report(tmp_path / "again")["verdict"] == "reproduced"


@pytest.mark.slow
def test_an_adapter_pulled_from_the_hub_reproduces_from_its_id(original, tiny_base, small_persona_data, hub_server,
                                                               tmp_path):
    from persona_lora.hub_tools.push import push_folder

    repo = f"{DEFAULT_USER}/tiny-persona"
    push_folder(original, repo)
    out = tmp_path / "from-hub"
    assert main(["reproduce", repo, "--base", str(tiny_base), "--data", str(small_persona_data), "--max-steps", "2",
                 "--out", str(out)]) == 0
    report = _report(out)
    assert report["verdict"] == "reproduced" and report["steps_compared"] == [1, 2]
    assert report["adapter"]["hub_id"] == repo and report["adapter"]["commit"] == hub_server.head(repo)


@pytest.mark.slow
def test_losses_logged_every_few_steps_are_compared_over_their_steps_and_too_few_updates_are_inconclusive(
        original, tiny_base, small_persona_data, tmp_path, capsys):
    """An original that logged at steps 1 and 6 only (logging_steps 5): its step-6 loss is Trainer's mean over steps
    2-6. The reproduction logs every step and compares that mean; cut short before step 6, only step 1 (before any
    update) is comparable, and the verdict is inconclusive, naming the --max-steps that would do."""
    folder = tmp_path / "sparse"
    shutil.copytree(original, folder, ignore=shutil.ignore_patterns("checkpoints", "logs"))
    losses = {h.step: h.loss for h in read_manifest(original).metrics.history if h.loss is not None}

    def sparse(d):
        d["metrics"]["history"] = [{"step": 1, "loss": losses[1]},
                                   {"step": 6, "loss": sum(losses[s] for s in range(2, 7)) / 5}]
        d["config"]["training"]["logging_steps"] = 5

    _edit_manifest(folder, sparse)
    args = ["reproduce", str(folder), "--base", str(tiny_base), "--data", str(small_persona_data)]
    assert main([*args, "--max-steps", "3", "--out", str(tmp_path / "short")]) == 1
    report = _report(tmp_path / "short")
    printed = capsys.readouterr().out
    assert report["verdict"] == "inconclusive" and report["updates_compared"] == 0 and report["steps_run"] == 3
    assert [r["step"] for r in report["train_loss"]] == [1]
    assert "reproduce with --max-steps 6 or more" in report["reasons"][-1] and "steps 1, 6" in report["reasons"][-1]
    assert printed.strip().splitlines()[-1].startswith("verdict: inconclusive — ")

    assert main([*args, "--out", str(tmp_path / "full")]) == 0
    report = _report(tmp_path / "full")
    assert report["verdict"] == "reproduced" and report["updates_compared"] == 5
    assert [(r["step"], r["steps"]) for r in report["train_loss"]] == [(1, [1, 1]), (6, [2, 6])]
    assert abs(report["train_loss"][1]["diff"]) <= 1e-4


# ------------------------------------------------------------------------------------------------ refused


@pytest.mark.slow
def test_changed_data_is_refused_naming_count_and_sha_and_allowed_it_is_different(original, tiny_base,
                                                                                  small_persona_data, tmp_path,
                                                                                  capsys):
    records = json.loads(small_persona_data.read_text(encoding="utf-8"))
    records[3]["output"] += "。"
    changed = tmp_path / small_persona_data.name
    changed.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    out = tmp_path / "out"
    args = ["reproduce", str(original), "--base", str(tiny_base), "--data", str(changed), "--out", str(out)]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "dataset.sha256" in err and "16 records" in err and "--allow-changes" in err
    assert sha256_file(changed)[:12] in err and sha256_file(small_persona_data)[:12] in err
    assert not out.exists()

    assert main([*args, "--allow-changes", "--max-steps", "3"]) == 1  # trained, but on another run's data
    report = _report(out)
    printed = capsys.readouterr().out
    assert report["verdict"] == "different"
    assert any(r.startswith("dataset.sha256:") for r in report["reasons"])
    assert report["inputs"]["data"]["used"]["sha256"] == sha256_file(changed)
    assert printed.strip().splitlines()[-1].startswith("verdict: different — ") and "dataset.sha256" in printed


def test_a_base_of_another_config_is_refused(tiny_base, tiny_llama, small_persona_data, tmp_path, capsys):
    adapter = _hand_written(tmp_path / "adapter", tiny_base, small_persona_data)
    out = tmp_path / "out"
    assert main(["reproduce", str(adapter), "--base", str(tiny_llama), "--data", str(small_persona_data),
                 "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "base_model.config_sha256" in err and "model_type llama, trained on deepseek_v2" in err
    assert sha256_file(tiny_llama / "config.json")[:12] in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("remove, named", [
    (lambda d: (d.pop("config"), d["training"].pop("seed"), d["chat"].pop("train_on")), "training.seed, chat.train_on"),
    (lambda d: d["metrics"].update(history=[]), "metrics.history"),
    (lambda d: d["dataset"].pop("sha256"), "dataset.sha256"),
    (lambda d: d["base_model"].pop("config_sha256"), "base_model.config_sha256"),
])
def test_a_manifest_missing_a_field_names_it(tiny_base, small_persona_data, tmp_path, capsys, remove, named):
    adapter = _hand_written(tmp_path / "adapter", tiny_base, small_persona_data)
    _edit_manifest(adapter, remove)
    assert main(["reproduce", str(adapter), "--base", str(tiny_base), "--data", str(small_persona_data),
                 "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert f"lacks what reproduce needs: {named}" in err and MANIFEST_NAME in err and "Traceback" not in err


def test_local_inputs_must_be_given_and_the_output_is_never_the_adapter(tiny_base, small_persona_data, tmp_path,
                                                                       capsys):
    adapter = _hand_written(tmp_path / "adapter", tiny_base, small_persona_data)
    assert main(["reproduce", str(adapter), "--data", str(small_persona_data)]) == 2
    err = capsys.readouterr().err
    assert "local base folder 'tiny-base'" in err and "--base PATH" in err
    assert main(["reproduce", str(adapter), "--base", str(tiny_base)]) == 2
    err = capsys.readouterr().err
    assert "local file 'small_persona.json' (16 records" in err and "--data PATH" in err
    for out in (adapter, adapter / "inside"):
        assert main(["reproduce", str(adapter), "--base", str(tiny_base), "--data", str(small_persona_data),
                     "--out", str(out)]) == 2
        assert "never writes into the adapter" in capsys.readouterr().err
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    assert main(["reproduce", str(adapter), "--base", str(tiny_base), "--data", str(small_persona_data),
                 "--out", str(taken)]) == 2
    assert "not empty" in capsys.readouterr().err and (taken / "notes.txt").read_text() == "mine"


# ------------------------------------------------------------------------------------------------ the verdict


def test_verdict_thresholds():
    assert decide(0.0, [], [], []) == ("reproduced", [])
    assert decide(9e-5, [], [], []) == ("reproduced", [])
    assert decide(5e-3, [], [], [])[0] == "close"
    assert decide(5e-5, [], [], [], same_device=False)[0] == "close"  # another device type: at best close
    assert decide(5e-5, [], ["training.world_size: 4 -> 1"], [])[0] == "close"
    assert decide(0.5, [], [], [])[0] == "different"
    assert decide(0.0, ["dataset.sha256: …"], [], []) == ("different", ["dataset.sha256: …"])
    verdict, reasons = decide(0.0, [], [], [7])
    assert verdict == "different" and "step(s) 7" in reasons[0]
    assert decide(0.0, [], [], [], updates=1) == ("inconclusive", [])  # equal, but after one update at most
    assert decide(0.0, [], [], [], updates=2) == ("reproduced", [])
    assert decide(0.0, ["dataset.sha256: …"], [], [], updates=0)[0] == "different"  # changed inputs still say so


def test_each_logged_loss_is_compared_with_the_mean_over_its_steps(tiny_base, small_persona_data, tmp_path):
    folder = _hand_written(tmp_path / "adapter", tiny_base, small_persona_data)
    _edit_manifest(folder, lambda d: d["metrics"].update(history=[{"step": 1, "loss": 9.0}, {"step": 4, "loss": 7.0}]))
    original = read_manifest(folder)
    data = original.to_dict()
    data["metrics"]["history"] = [{"step": s, "loss": v} for s, v in [(1, 9.0), (2, 8.0), (3, 7.0), (4, 6.0)]]
    reproduced = parse_manifest(data, folder / MANIFEST_NAME)
    from persona_lora.train.config import config_from_dict

    plan = Plan(config=config_from_dict(original.config), config_from="config from the manifest",
                out=tmp_path / "out", stop_after=None, compare_upto=4)
    report = compare(Original(folder, original, folder.name), plan, reproduced)
    assert report["train_loss"][1] == {"step": 4, "steps": [2, 4], "original": 7.0, "reproduced": 7.0, "diff": 0.0}
    assert report["verdict"] == "reproduced" and report["updates_compared"] == 3

    data["metrics"]["history"] = data["metrics"]["history"][:3]  # step 4 never ran: its window is incomplete
    report = compare(Original(folder, original, folder.name), plan, parse_manifest(data, folder / MANIFEST_NAME))
    assert report["verdict"] == "different" and report["missing_steps"] == [4]


def test_library_versions_are_reported_not_refused(tiny_base, small_persona_data, tmp_path):
    folder = _hand_written(tmp_path / "adapter", tiny_base, small_persona_data)
    original = read_manifest(folder)
    data = original.to_dict()
    data["environment"]["libraries"]["torch"] = "2.14.0"
    reproduced = parse_manifest(data, folder / MANIFEST_NAME)
    from persona_lora.train.config import config_from_dict

    plan = Plan(config=config_from_dict(original.config), config_from="config from the manifest",
                out=tmp_path / "out", stop_after=None, compare_upto=None)
    report = compare(Original(folder, original, folder.name), plan, reproduced)
    assert report["verdict"] == "reproduced"
    assert report["libraries"] == {"torch": {"original": "2.13.0", "reproduced": "2.14.0"}}


def test_a_long_history_prints_its_ends_and_its_largest_difference_and_the_verdict_last():
    from persona_lora.train.reproduce.cli import format_report

    rows = [{"step": s, "original": 2.0, "reproduced": 2.0, "diff": 0.0} for s in range(1, 101)]
    rows[49] = {"step": 50, "original": 2.0, "reproduced": 2.003, "diff": 0.003}
    report = {"train_loss": rows, "eval_loss": [], "notes": [], "summary": "close — …",
              "libraries": {"torch": {"original": "2.12.0", "reproduced": "2.13.0"}}}
    text = format_report(report, "out/reproduce.json")
    lines = text.splitlines()
    assert "step 1 " in text and "step 100" in text and "step 50 " in text and "+3.0e-03" in text
    assert "step 30 " not in text and lines.count("  …") == 2 and len(lines) < 50
    assert "libraries (reported, not refused): torch 2.12.0 -> 2.13.0" in text
    assert lines[-2:] == ["written: out/reproduce.json", "verdict: close — …"]
