"""The one way every command writes an output folder (persona_lora/output_folder.py): checked before any work,
staged next to the target, renamed over it when complete, removed on failure and Ctrl-C, never replacing a
folder that is not ours."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from persona_lora.errors import UsageError
from persona_lora.output_folder import (
    MARKER,
    FilesTogether,
    OutputFolder,
    check_free_space,
    check_target,
    remove_abandoned,
    staging_path,
)


def entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_a_new_folder_appears_only_when_complete(tmp_path):
    target = check_target(tmp_path / "out", option="--out")
    with OutputFolder(target) as work:
        assert work == staging_path(tmp_path / "out") and work.parent == tmp_path and work.name.startswith(".out.")
        (work / "weights.bin").write_bytes(b"w")
        (work / "sub").mkdir()
        (work / "sub" / "x.txt").write_text("x")
        assert not (tmp_path / "out").exists()  # nothing under the final name while writing
        assert (work / MARKER).is_file()
    assert entries(tmp_path) == ["out"]
    assert entries(tmp_path / "out") == ["sub", "weights.bin"]  # the marker does not come along
    assert (tmp_path / "out" / "sub" / "x.txt").read_text() == "x"


def test_missing_parents_are_created_and_removed_again_on_failure(tmp_path):
    target = check_target(tmp_path / "a" / "b" / "out", option="--out")
    with pytest.raises(RuntimeError, match="boom"):
        with OutputFolder(target) as work:
            (work / "half.bin").write_bytes(b"half")
            raise RuntimeError("boom")
    assert entries(tmp_path) == []  # neither the staging folder nor the parents it created
    with OutputFolder(check_target(tmp_path / "a" / "b" / "out", option="--out")) as work:
        (work / "f").write_text("1")
    assert (tmp_path / "a" / "b" / "out" / "f").read_text() == "1"


def test_a_parent_that_existed_stays_when_the_write_fails(tmp_path):
    (tmp_path / "keep").mkdir()
    with pytest.raises(ValueError):
        with OutputFolder(check_target(tmp_path / "keep" / "out", option="--out")):
            raise ValueError
    assert entries(tmp_path) == ["keep"] and entries(tmp_path / "keep") == []


def test_ctrl_c_removes_the_staging_folder_and_propagates(tmp_path):
    target = check_target(tmp_path / "out", option="--out")
    with pytest.raises(KeyboardInterrupt):
        with OutputFolder(target) as work:
            (work / "half.bin").write_bytes(b"half")
            raise KeyboardInterrupt
    assert entries(tmp_path) == []


def test_ctrl_c_in_a_real_process_leaves_nothing(tmp_path):
    """SIGINT delivered to a process in the middle of writing: the folder it was staging is gone afterwards."""
    script = textwrap.dedent(f"""
        import os, signal, sys, time
        from pathlib import Path
        from persona_lora.output_folder import OutputFolder, check_target
        try:
            with OutputFolder(check_target(Path({str(tmp_path / "out")!r}), option="--out")) as work:
                (work / "half.bin").write_bytes(b"half")
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(30)
        except KeyboardInterrupt:
            sys.exit(130)
    """)
    done = subprocess.run([sys.executable, "-c", script], timeout=60)
    assert done.returncode == 130
    assert entries(tmp_path) == []


def test_an_empty_folder_is_used_and_a_non_empty_one_refused_untouched(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with OutputFolder(check_target(empty, option="--out")) as work:
        (work / "f").write_text("new")
    assert (empty / "f").read_text() == "new"

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match=r"--out .*busy exists and is not empty; pass --force \(nothing was changed\)"):
        check_target(busy, option="--out", occupied_hint="pass --force")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(UsageError, match="exists and is not a folder"):
        check_target(a_file, option="--out")
    with pytest.raises(UsageError, match="is a file, so the folder cannot be created there"):
        check_target(a_file / "sub", option="--out")
    assert (busy / "notes.txt").read_text() == "mine" and a_file.read_text() == "x"


def test_replace_refuses_what_is_not_ours_and_replaces_ours_only_at_the_end(tmp_path):
    def ours(folder: Path) -> bool:
        return (folder / "ours.json").is_file()

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("months of work")
    with pytest.raises(UsageError, match="--overwrite refused: --out .*foreign is not a run; nothing was changed"):
        check_target(foreign, option="--out", replace=True, ours=ours, foreign="is not a run")
    with pytest.raises(UsageError, match="--overwrite refused"):
        check_target(foreign, option="--out", replace=True)  # no `ours` test: nothing non-empty is replaced
    assert entries(foreign) == ["thesis.tex"]

    previous = tmp_path / "run"
    previous.mkdir()
    (previous / "ours.json").write_text("old")
    (previous / "old-only.txt").write_text("old")
    target = check_target(previous, option="--out", replace=True, ours=ours)
    assert target.replaces
    with pytest.raises(RuntimeError):  # a failed replacement leaves the previous folder as it was
        with OutputFolder(target) as work:
            (work / "ours.json").write_text("new")
            raise RuntimeError
    assert entries(previous) == ["old-only.txt", "ours.json"] and (previous / "ours.json").read_text() == "old"
    with OutputFolder(target) as work:
        (work / "ours.json").write_text("new")
        assert (previous / "ours.json").read_text() == "old"  # still there while the new one is written
    assert entries(previous) == ["ours.json"] and (previous / "ours.json").read_text() == "new"
    assert entries(tmp_path) == ["foreign", "run"]  # no replaced or staging folder left


def test_add_moves_files_into_an_existing_folder(tmp_path):
    folder = tmp_path / "dl"
    (folder / "sub").mkdir(parents=True)
    (folder / "README.md").write_text("my notes")
    (folder / "sub" / "a.txt").write_text("old")
    target = check_target(folder, option="--local-dir", add=True)
    assert target.adds
    with OutputFolder(target) as work:
        (work / "sub").mkdir()
        (work / "sub" / "a.txt").write_text("new")
        (work / "weights.bin").write_bytes(b"w")
    assert (folder / "README.md").read_text() == "my notes" and (folder / "sub" / "a.txt").read_text() == "new"
    assert (folder / "weights.bin").read_bytes() == b"w" and entries(tmp_path) == ["dl"]
    with pytest.raises(RuntimeError):
        with OutputFolder(check_target(folder, option="--local-dir", add=True)) as work:
            (work / "more.bin").write_bytes(b"m")
            raise RuntimeError
    assert entries(folder) == ["README.md", "sub", "weights.bin"] and entries(tmp_path) == ["dl"]


def test_a_full_disk_is_one_message_about_the_output_and_leaves_nothing(tmp_path):
    source = tmp_path / "source.bin"
    source.write_bytes(b"x" * 10)
    target = check_target(tmp_path / "out", option="--dry-run")
    with pytest.raises(UsageError) as e:
        with OutputFolder(target) as work:
            shutil.copyfile(source, work / "copy.bin")
            # what shutil raises when the destination disk fills: the source file as `filename`
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(source), str(work / "copy.bin"))
    msg = str(e.value)
    assert msg.startswith("the disk is full: --dry-run ") and str(tmp_path / "out") in msg
    assert "source.bin" not in msg and "nothing was left behind" in msg
    assert entries(tmp_path) == ["source.bin"]


def test_free_space_is_checked_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 << 30, 10 << 30, 1 << 20))
    with pytest.raises(UsageError, match=r"not enough disk space for --out .*: the export needs about 5.0 MB, "):
        check_free_space(tmp_path / "new" / "out", 5_000_000, option="--out", what="the export")
    assert entries(tmp_path) == []
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 << 30, 0, 10 << 30))
    check_free_space(tmp_path / "new" / "out", 5_000_000, option="--out", what="the export")


def test_a_staging_folder_left_by_a_killed_process_is_removed_but_not_a_live_or_foreign_one(tmp_path):
    target = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    abandoned = staging_path(target, dead_pid)
    abandoned.mkdir()
    (abandoned / MARKER).write_text("")
    (abandoned / "half.bin").write_bytes(b"half")
    live = staging_path(target, os.getppid())  # a process that runs: another command writing now
    live.mkdir()
    (live / MARKER).write_text("")
    foreign = staging_path(target, dead_pid + 1)  # the same pattern of name, but no marker: not ours
    foreign.mkdir()
    assert remove_abandoned(target) == [abandoned]
    assert not abandoned.exists() and live.is_dir() and foreign.is_dir()
    with OutputFolder(check_target(target, option="--out")) as work:
        (work / "f").write_text("1")
    assert (target / "f").read_text() == "1"


def test_keep_on_leaves_work_that_can_be_continued(tmp_path):
    class Interrupted(Exception):
        pass

    with pytest.raises(Interrupted):
        with OutputFolder(check_target(tmp_path / "out", option="--out"), keep_on=(Interrupted,)) as work:
            (work / "checkpoint").write_text("step 3")
            raise Interrupted
    assert (work / "checkpoint").read_text() == "step 3" and not (tmp_path / "out").exists()


def test_files_together_change_all_or_none(tmp_path):
    readme, png = tmp_path / "README.md", tmp_path / "loss.png"
    readme.write_text("old card")
    png.write_bytes(b"old png")
    with FilesTogether() as files:
        files.temp(readme).write_text("new card")
        files.temp(png).write_bytes(b"new png")
        assert readme.read_text() == "old card"
    assert readme.read_text() == "new card" and png.read_bytes() == b"new png"

    with pytest.raises(RuntimeError):
        with FilesTogether() as files:
            files.temp(png).write_bytes(b"newer png")
            raise RuntimeError
    assert png.read_bytes() == b"new png"

    blocked = tmp_path / "blocked"
    (blocked / "README.md").mkdir(parents=True)  # a folder where the card goes: refused by the file system
    (blocked / "loss.png").write_bytes(b"old png")
    with pytest.raises(OSError) as e:
        with FilesTogether() as files:
            files.temp(blocked / "README.md").write_text("new card")
            files.temp(blocked / "loss.png").write_bytes(b"new png")
    assert e.value.filename == str(blocked / "README.md")  # the file the user knows, not the temporary name
    assert (blocked / "loss.png").read_bytes() == b"old png"
    assert entries(blocked) == ["README.md", "loss.png"]
    assert entries(tmp_path) == ["README.md", "blocked", "loss.png"]


def test_a_writer_that_wants_an_empty_folder_takes_the_staging_folder(tmp_path, capsys):
    """`tiny-base` builds into the staging folder (its marker does not make it "not empty") and the finished base
    takes the name; the marker does not come along."""
    from persona_lora.cli import main

    out = tmp_path / "bases" / "tiny"
    assert main(["tiny-base", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert (out / "config.json").is_file() and list(out.glob("*.safetensors")) and not (out / MARKER).exists()
    assert entries(tmp_path / "bases") == ["tiny"]
    assert main(["tiny-base", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"OUT_DIR {out} exists and is not empty" in err and entries(tmp_path / "bases") == ["tiny"]


def test_the_vote_export_replaces_its_file_whole_or_not_at_all(tmp_path):
    from persona_lora.votes import _write_jsonl

    path = tmp_path / "votes.jsonl"
    _write_jsonl(path, [{"vote": "A"}])
    with pytest.raises(TypeError):
        _write_jsonl(path, [{"vote": "B"}, {"vote": object()}])  # fails half way through the rows
    assert path.read_text() == '{"vote": "A"}\n' and entries(tmp_path) == ["votes.jsonl"]
