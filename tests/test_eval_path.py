"""A separate held-out file (`data.eval_path`, `train --eval-data`), as `data build` writes it (DATA.eval.json,
split by scene) together with the training config that names it (DATA.train.yaml): read as the eval set, recorded
in the manifest and card, used by `eval`'s held-out split and by `reproduce`; and the system prompt of the build
carried into training, or a warning naming both when they differ."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
from pathlib import Path

import pytest

from persona_lora.cli import main
from persona_lora.errors import ConfigError, DataError, UsageError
from persona_lora.train.config import config_from_dict, load_config
from persona_lora.train.data.dialogue_file import write_dialogue
from persona_lora.train.data.script_extract import Utterance
from tests.conftest import train_args

SYSTEM = "You are Cleo, the palace archivist."
# Eight scenes of our own lines; Cleo answers in each, so a scene split holds out whole scenes.
SCENES = [[("Anne", f"Where is scroll {s}?"), ("Cleo", f"Scroll {s} is on shelf {s}."),
           ("Bea", f"Who read scroll {s} last?"), ("Cleo", f"The minister, on day {s}.")] for s in range(8)]


def build(folder: Path, *extra: str) -> Path:
    """`data build` on SCENES into `folder` with a quarter of the records held out by scene; the training file."""
    utterances = []
    for s, scene in enumerate(SCENES):
        utterances.append(Utterance("scene", s, text=f"Scene {s}"))
        utterances += [Utterance("speech", s, speaker=who, line=line) for who, line in scene]
    dialogue = folder / "palace.dialogue.jsonl"
    write_dialogue(dialogue, {"file": "palace.txt", "sha256": "cd" * 32, "encoding": "UTF-8", "extractor": "script",
                              "settings": {}}, utterances)
    out = folder / "palace.json"
    assert main(["data", "build", str(dialogue), "--character", "Cleo", "--out", str(out), "--eval-fraction",
                 "0.25", "--overwrite", *extra]) == 0
    return out


def built(tmp_path: Path, capsys, *extra: str) -> tuple[Path, str]:
    """build(), and what it printed."""
    capsys.readouterr()
    out = build(tmp_path, *extra)
    return out, capsys.readouterr().out


def cfg_for(data: Path, **data_keys):
    return config_from_dict({"base": {"model": "b"}, "training": {"output_dir": "o"},
                             "data": {"path": str(data), **data_keys}})


def conversations(path: Path, system: str | None = None) -> list[list[dict]]:
    from persona_lora.chat_format import conversation_for
    from persona_lora.dataset.reading import load_records

    return [conversation_for(r["messages"], system) for r in load_records(str(path)).records]


# ---------------------------------------------------------------------------------------------- build → config


def test_build_writes_the_training_config_train_reads(tmp_path, capsys):
    data, stdout = built(tmp_path, capsys, "--system-prompt", SYSTEM)
    config, held = tmp_path / "palace.train.yaml", tmp_path / "palace.eval.json"
    assert held.is_file() and config.is_file()
    command = f"persona-lora train {config} --base BASE_MODEL --output-dir {tmp_path / 'palace-adapter'}"
    assert f"then: {command}" in stdout and command in config.read_text(encoding="utf-8")
    assert f"the training config {config} sets data.path, data.eval_path (the held-out scenes), data.system_prompt" \
        in stdout
    cfg = load_config(config, {"base": {"model": "b"}, "training": {"output_dir": "o"}})
    assert (cfg.data.path, cfg.data.eval_path, cfg.data.eval_fraction) == (str(data), str(held), 0.0)
    assert cfg.data.system_prompt == SYSTEM
    # the config is refused like the other outputs: nothing the user made is replaced without --overwrite
    code = main(["data", "build", str(tmp_path / "palace.dialogue.jsonl"), "--character", "Cleo", "--out",
                 str(data)])
    assert code == 2 and f"{config}" in capsys.readouterr().err
    code = main(["data", "build", str(tmp_path / "palace.dialogue.jsonl"), "--character", "Cleo", "--out",
                 str(tmp_path / "other.eval.json")])  # would hold out into other.eval.eval.json
    assert code == 2 and "give a .json file name not ending in .eval.json" in capsys.readouterr().err


def test_a_build_without_held_out_scenes_or_system_prompt_says_so_in_its_config(tmp_path, capsys):
    data, stdout = built(tmp_path, capsys, "--eval-fraction", "0")
    text = (tmp_path / "palace.train.yaml").read_text(encoding="utf-8")
    assert "No scene was held out" in text and "eval_path" not in text and "system_prompt" not in text
    assert "sets data.path\n" in stdout and not (tmp_path / "palace.eval.json").exists()


def test_the_built_config_runs_as_printed(tiny_base, tmp_path, capsys):
    data, stdout = built(tmp_path, capsys, "--system-prompt", SYSTEM)
    command = stdout.split("then: ")[1].split()
    assert command[:2] == ["persona-lora", "train"]
    args = [a.replace("BASE_MODEL", str(tiny_base)) for a in command[2:]]
    assert main(["train", *args, "--dry-run", "--set", "base.device=cpu"]) == 0
    text = capsys.readouterr().out
    assert f"eval_path: {tmp_path / 'palace.eval.json'}" in text
    assert "eval set: 4 records read from palace.eval.json (data.eval_path), 4 eval examples; none also in " \
           "palace.json" in text
    assert "12 train / 4 eval examples" in text and not (tmp_path / "palace-adapter").exists()


# ---------------------------------------------------------------------------------------------- prepare


def test_the_eval_file_is_the_eval_set_and_the_training_file_is_all_trained(tokenizer, tmp_path, capsys, caplog):
    from persona_lora.train.prepare import prepare_data

    data, _ = built(tmp_path, capsys)
    held = tmp_path / "palace.eval.json"
    prepared = prepare_data(cfg_for(data, eval_path=str(held)), tokenizer)
    assert prepared.eval_conversations == conversations(held)
    assert prepared.train_conversations == conversations(data)
    assert (prepared.stats.records, prepared.stats.train_examples, prepared.stats.eval_examples) == (16, 12, 4)
    assert prepared.eval_loaded.name == "palace.eval.json" and prepared.also_in_training == 0
    assert "also in" not in caplog.text

    # a record in both files: trained on, so its eval loss is no held-out figure; warned with the count
    both = tmp_path / "both.eval.json"
    both.write_text(json.dumps(json.loads(held.read_text(encoding="utf-8"))
                               + json.loads(data.read_text(encoding="utf-8"))[:2], ensure_ascii=False),
                    encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        prepared = prepare_data(cfg_for(data, eval_path=str(both)), tokenizer)
    assert prepared.also_in_training == 2 and prepared.stats.eval_examples == 6
    assert "2 of the 6 records of both.eval.json are also in palace.json (first: both.eval.json:record 5" \
        in caplog.text


def test_bad_eval_files_and_contradicting_options_are_one_clear_error(tokenizer, tmp_path, capsys):
    from persona_lora.train.prepare import prepare_data

    data, _ = built(tmp_path, capsys)
    with pytest.raises(DataError, match=r"^data.eval_path .*missing\.eval\.json: 1 problem found\n  - file not found"):
        prepare_data(cfg_for(data, eval_path=str(tmp_path / "missing.eval.json")), tokenizer)
    wrong = tmp_path / "wrong.eval.json"
    wrong.write_text('{"instruction": "not an array"}', encoding="utf-8")
    with pytest.raises(DataError, match=r"^data.eval_path .*wrong.eval.json: 1 problem found"):
        prepare_data(cfg_for(data, eval_path=str(wrong)), tokenizer)
    copy = tmp_path / "copy.json"
    shutil.copy(data, copy)
    with pytest.raises(DataError, match=r"has the same records as data.path .* nothing would be held out"):
        prepare_data(cfg_for(data, eval_path=str(copy)), tokenizer)
    with pytest.raises(ConfigError, match=r"data.eval_path .* and data.eval_fraction 0.1 both choose the held-out "
                                          r"set; keep the file and set data.eval_fraction: 0"):
        cfg_for(data, eval_path="x.json", eval_fraction=0.1)
    assert cfg_for(data, eval_path="x.json", eval_fraction=0).data.eval_fraction == 0.0
    assert cfg_for(data, eval_path="x.json").data.eval_fraction == 0.0  # not given: nothing carved out of data.path
    assert cfg_for(data).data.eval_fraction == 0.05
    with pytest.raises(ConfigError, match="data.eval_path is for SFT records; preference.method dpo"):
        config_from_dict({"base": {"model": "b"}, "training": {"output_dir": "o"}, "preference": {"method": "dpo"},
                          "data": {"path": str(data), "eval_path": "x.json"}})
    # the flag, with the eval fraction of a config: named, not guessed
    code = main(train_args(Path("no-base"), data, tmp_path / "o", "--eval-data", str(tmp_path / "palace.eval.json")))
    assert code == 2 and "data.eval_fraction 0.125 both choose the held-out set" in capsys.readouterr().err


def test_a_built_system_prompt_that_differs_from_the_config_is_warned_never_replaced(tokenizer, tmp_path, capsys,
                                                                                     caplog):
    from persona_lora.train.prepare import prepare_data

    data, _ = built(tmp_path, capsys, "--system-prompt", SYSTEM)
    with caplog.at_level(logging.WARNING):
        prepared = prepare_data(cfg_for(data), tokenizer)
    assert f"palace.json was built with the system prompt {SYSTEM!r} (its palace.card.md), but data.system_prompt " \
           "is not set" in caplog.text and "palace.train.yaml" in caplog.text
    assert prepared.train_conversations[0][0] == {"role": "system", "content": SYSTEM}  # the records' own
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        prepare_data(cfg_for(data, system_prompt="You are someone else."), tokenizer)
    assert "but data.system_prompt is 'You are someone else.'" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        prepare_data(cfg_for(data, system_prompt=SYSTEM), tokenizer)
    assert "system prompt" not in caplog.text


# ---------------------------------------------------------------------------------------------- a trained run


@pytest.fixture(scope="module")
def run(tiny_base, tmp_path_factory):
    """An adapter trained by `persona-lora train DATA.train.yaml` on a built dataset with its held-out file."""
    folder = tmp_path_factory.mktemp("eval-path")
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        build(folder, "--system-prompt", SYSTEM)
        adapter = folder / "palace-adapter"
        assert main(["train", str(folder / "palace.train.yaml"), "--base", str(tiny_base), "--output-dir",
                     str(adapter), "--max-steps", "4", "--set", "base.device=cpu", "--set", "training.batch_size=4",
                     "--set", "training.logging_steps=1", "--set", "training.eval_steps=2", "--set",
                     "training.samples=0", "--set", "training.report_to=[none]", "--set", "lora.r=4",
                     "--set", "lora.preset=attention", "--set", "data.max_length=128"]) == 0
    assert "eval set: 4 records read from palace.eval.json" in printed.getvalue()
    return folder, adapter


@pytest.mark.slow
def test_the_manifest_and_card_record_the_eval_file_and_the_provenance(run):
    from persona_lora.artifact import read_manifest
    from persona_lora.hashing import sha256_file

    folder, adapter = run
    m = read_manifest(adapter)
    held = m.dataset.eval_file
    assert (held.name, held.source, held.records, held.also_in_training) == ("palace.eval.json", "local", 4, 0)
    assert held.sha256 == sha256_file(folder / "palace.eval.json")
    assert m.config["data"]["eval_path"] == "palace.eval.json" and m.config["data"]["eval_fraction"] == 0
    assert m.dataset.stats.eval_examples == 4 and m.dataset.stats.train_examples == 12
    assert m.chat.system_prompt == SYSTEM  # from the built config: the demo and eval prompt as trained
    assert m.dataset.extraction.character == "Cleo" and m.dataset.extraction.card == "palace.card.md"
    assert any(h.eval_loss is not None for h in m.metrics.history)
    card = (adapter / "README.md").read_text(encoding="utf-8")
    assert "palace.eval.json" in card and held.sha256 in card and "palace.card.md" in card


@pytest.mark.slow
def test_evals_held_out_split_is_the_recorded_eval_file_proven_by_its_sha(run, tmp_path, monkeypatch):
    from persona_lora.artifact import read_manifest
    from persona_lora.evaluation.sets import main_set

    folder, adapter = run
    m = read_manifest(adapter)
    reference = ("palace-adapter", adapter, m)
    held = main_set(data=None, split="held-out", n=None, seed=0, system_prompt=SYSTEM, reference=reference)
    assert [it.conversation for it in held.items] == conversations(folder / "palace.eval.json", SYSTEM)
    assert held.info["held_out_file"] is True and held.info["name"] == "palace.eval.json"
    # --data may name the training file (the eval file is looked for beside it) or the eval file itself
    for given in ("palace.json", "palace.eval.json"):
        again = main_set(data=str(folder / given), split="held-out", n=None, seed=0, system_prompt=SYSTEM,
                         reference=reference)
        assert [it.origin for it in again.items] == [it.origin for it in held.items]
    train = main_set(data=str(folder / "palace.json"), split="train", n=None, seed=0, system_prompt=SYSTEM,
                     reference=reference)
    assert len(train.items) == 12
    # changed after training: refused, naming the file and the fix
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    shutil.copytree(adapter, moved / "palace-adapter")
    shutil.copy(folder / "palace.eval.json", moved / "palace.eval.json")
    edited = json.loads((moved / "palace.eval.json").read_text(encoding="utf-8"))
    edited[0]["output"] += " (edited)"
    (moved / "palace.eval.json").write_text(json.dumps(edited), encoding="utf-8")
    monkeypatch.chdir(moved)
    moved_ref = ("palace-adapter", moved / "palace-adapter", m)
    with pytest.raises(DataError, match=r"held out palace.eval.json \(sha256 .*has changed since .* give the "
                                        r"held-out file with --data palace.eval.json"):
        main_set(data=None, split="held-out", n=None, seed=0, system_prompt=None, reference=moved_ref)
    (moved / "palace.eval.json").unlink()
    with pytest.raises(UsageError, match=r"held out the file palace.eval.json .* not found here; give the held-out "
                                         r"file with --data palace.eval.json"):
        main_set(data=None, split="held-out", n=None, seed=0, system_prompt=None, reference=moved_ref)
    other = moved / "other.json"
    other.write_text('[{"instruction": "a", "output": "b"}]', encoding="utf-8")
    with pytest.raises(DataError, match="is neither the training file nor the held-out file"):
        main_set(data=str(other), split="held-out", n=None, seed=0, system_prompt=None, reference=moved_ref)


@pytest.mark.slow
def test_reproduce_takes_the_eval_file_as_an_input_and_checks_it(run, tiny_base, tmp_path, capsys):
    from persona_lora.errors import VerificationError
    from persona_lora.train.reproduce.run import open_adapter, plan_reproduction

    folder, adapter = run
    original = open_adapter(str(adapter))
    plan = plan_reproduction(original, data=str(folder / "palace.json"), base=str(tiny_base),
                             out=tmp_path / "plan")
    assert plan.config.data.eval_path == str(folder / "palace.eval.json")  # found beside the training file
    assert plan.inputs["eval_data"]["used"]["sha256"] == plan.inputs["eval_data"]["recorded"]["sha256"]
    elsewhere = tmp_path / "data"
    elsewhere.mkdir()
    shutil.copy(folder / "palace.json", elsewhere / "palace.json")
    with pytest.raises(UsageError, match=r"held out a local file 'palace.eval.json' \(4 records, sha256 .*give "
                                         r"that file \(or a copy\) with --eval-data PATH"):
        plan_reproduction(original, data=str(elsewhere / "palace.json"), base=str(tiny_base), out=tmp_path / "p2")
    changed = elsewhere / "changed.eval.json"
    changed.write_text(json.dumps(json.loads((folder / "palace.eval.json").read_text(encoding="utf-8"))[:3]),
                       encoding="utf-8")
    with pytest.raises(VerificationError, match=r"dataset.eval_file.sha256: changed.eval.json has 3 records"):
        plan_reproduction(original, data=str(elsewhere / "palace.json"), base=str(tiny_base), out=tmp_path / "p3",
                          eval_data=str(changed))
    # the whole run again: same losses, eval losses on the eval file included
    out = tmp_path / "again"
    code = main(["reproduce", str(adapter), "--data", str(elsewhere / "palace.json"), "--eval-data",
                 str(folder / "palace.eval.json"), "--base", str(tiny_base), "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0 and "eval loss" in printed and "verdict: reproduced" in printed
