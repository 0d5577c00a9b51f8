"""Regression tests for the ways a user's work was lost or misdescribed: each case names what used to happen.

Nothing the user made is ever lost: a failed `--overwrite` leaves the previous run, `--overwrite` never touches a
folder persona-lora did not write, `pull` never replaces local files or leaves rejected ones behind, and a resume
never changes what the manifest says the run was.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import zipfile
from pathlib import Path

import pytest

from persona_lora.artifact import MANIFEST_NAME
from persona_lora.cli import main
from tests.conftest import REPO

pytestmark = pytest.mark.slow  # each case trains a few steps of the tiny model


def tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def run_args(base, data, out, *extra):
    return ["train", "--base", str(base), "--data", str(data), "--output-dir", str(out), "--max-steps", "4",
            "--set", "lora.preset=attention", "--set", "training.samples=0", "--set", "training.report_to=[none]",
            "--set", "training.save_steps=2", "--set", "training.eval_steps=100",
            "--set", "training.save_total_limit=3", *extra]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    records = json.loads((REPO / "examples" / "data" / "persona_zh.json").read_text(encoding="utf-8"))[:12]
    path = tmp_path_factory.mktemp("loss-data") / "d.json"
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def finished_run(tiny_base, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("loss-runs") / "run"
    assert main(run_args(tiny_base, data, out)) == 0
    return out


def test_a_failing_overwrite_leaves_the_previous_run(finished_run, tiny_base, tmp_path, capsys):
    """Was: `train --overwrite` removed the previous run before validating, so a typo left an empty folder."""
    out = shutil.copytree(finished_run, tmp_path / "run")
    before = tree(out)
    assert main(run_args(tiny_base, tmp_path / "typo.json", out, "--overwrite")) == 1
    assert "file not found" in capsys.readouterr().err
    assert main(run_args(tiny_base, REPO / "examples" / "data" / "persona_zh.json", out, "--overwrite",
                         "--set", "training.lr_scheduler=cosin")) == 2
    assert tree(out) == before and not list(tmp_path.glob(".run.*"))


def test_overwrite_replaces_only_once_the_new_run_finished(finished_run, tiny_base, data, tmp_path):
    out = shutil.copytree(finished_run, tmp_path / "run")
    assert main(run_args(tiny_base, data, out, "--overwrite", "--max-steps", "2")) == 0
    m = json.loads((out / MANIFEST_NAME).read_text())
    assert m["metrics"]["steps"] == 2 and m["run"]["state"] == "finished"
    assert not list(tmp_path.glob(".run.*")), "no replacement or replaced folder is left behind"


def test_overwrite_never_deletes_a_folder_persona_lora_did_not_write(tiny_base, data, tmp_path, capsys):
    """Was: any folder holding a `checkpoints/` subfolder counted as a run of ours and lost its other files."""
    folder = tmp_path / "mine"
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "checkpoints" / "notes.txt").write_text("my own checkpoints")
    (folder / "thesis.tex").write_text("months of work")
    before = tree(folder)
    assert main(run_args(tiny_base, data, folder, "--overwrite")) == 2
    assert "--overwrite refused" in capsys.readouterr().err
    assert tree(folder) == before


def test_pull_never_replaces_local_files_and_leaves_nothing_rejected(hub_server, finished_run, tiny_llama, tmp_path,
                                                                     capsys):
    """Was: `pull --local-dir` replaced files already there, and files that failed verification stayed."""
    from persona_lora.hub_tools.push import push_folder

    push_folder(finished_run, "tester/run")
    target = tmp_path / "dl"
    target.mkdir()
    (target / "README.md").write_text("my notes")
    assert main(["pull", "tester/run", "--local-dir", str(target)]) == 2
    assert "--force" in capsys.readouterr().err and tree(target) == {"README.md": tree(target)["README.md"]}
    assert (target / "README.md").read_text() == "my notes"

    empty = tmp_path / "dl2"
    assert main(["pull", "tester/run", "--local-dir", str(empty), "--base", str(tiny_llama)]) == 1
    assert "refused and its files removed again" in capsys.readouterr().err
    assert not empty.exists(), "a refused pull leaves nothing, not even the hub client's .cache/ bookkeeping"
    assert not list(tmp_path.glob(".dl2.*")), "nor its staging folder"
    assert main(["pull", "tester/run", "--local-dir", str(target), "--force"]) == 0
    assert (target / "README.md").read_text() != "my notes"


def test_resume_refuses_other_data_and_a_finished_run_is_not_extended(finished_run, tiny_base, data, tmp_path,
                                                                       capsys):
    """Was: `--resume` accepted another dataset and the manifest then described the whole run with it; `--resume
    auto` on a finished run trained one more step and rewrote the manifest."""
    out = shutil.copytree(finished_run, tmp_path / "run")
    before = tree(out)
    assert main(run_args(tiny_base, data, out, "--resume", "auto")) == 0
    assert "already finished" in capsys.readouterr().out
    assert tree(out) == before

    other = tmp_path / "other.json"
    records = json.loads(data.read_text(encoding="utf-8"))
    records[0]["output"] = "改过的回答。"
    other.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    assert main(run_args(tiny_base, other, out, "--resume", "--max-steps", "6")) == 2
    err = capsys.readouterr().err
    assert "dataset.sha256" in err and "training.max_steps: 4 -> 6" in err and "--allow-changes" in err
    assert tree(out) == before
    assert main(run_args(tiny_base, other, out, "--resume", "--max-steps", "6", "--allow-changes")) == 0
    m = json.loads((out / MANIFEST_NAME).read_text())
    assert m["metrics"]["steps"] == 6 and m["dataset"]["sha256"] == hashlib.sha256(other.read_bytes()).hexdigest()
    assert any("at step 4: dataset.sha256" in c for c in m["run"]["changes"])
    assert any("training.max_steps: 4 -> 6" in c for c in m["run"]["changes"])
    assert "resumed with changed settings" in (out / "README.md").read_text()


def test_a_damaged_checkpoint_falls_back_to_the_one_before(finished_run, tiny_base, data, tmp_path, caplog):
    """Was: a checkpoint with a truncated optimizer state ended the resume with a traceback."""
    out = shutil.copytree(finished_run, tmp_path / "run")
    optimizer = out / "checkpoints" / "checkpoint-4" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:100])
    with pytest.raises(zipfile.BadZipFile):
        zipfile.ZipFile(optimizer)
    with caplog.at_level("WARNING", logger="persona_lora.train.run_folder"):
        assert main(run_args(tiny_base, data, out, "--resume", "--max-steps", "6", "--allow-changes")) == 0
    assert any("checkpoint-4 cannot be resumed from" in r.getMessage() for r in caplog.records)
    m = json.loads((out / MANIFEST_NAME).read_text())
    assert m["metrics"]["steps"] == 6 and any(c.startswith("at step 2:") for c in m["run"]["changes"])
