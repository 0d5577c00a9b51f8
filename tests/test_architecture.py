"""The shape of the code base: one import package, one home for PEFT internals, small modules, generated docs.

These hold the architecture in place as the code grows: each test names the rule it guards, and fails with the
files that break it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests import import_graph

REPO = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = ("persona_lora", "train", "hub_tools", "demo", "model_cards", "evaluation")
LONG_MODULE_LINES = 500  # reported in docs/ARCHITECTURE.md, not refused: splitting a module must not make a cycle


def source_files() -> list[Path]:
    return sorted(p for d in PACKAGE_DIRS for p in (REPO / d).rglob("*.py") if "__pycache__" not in p.parts)


def test_the_import_graph_keeps_the_layers():
    """The shared base imports no stage, stages import each other only along the declared edges, no module cycle
    (function-level and TYPE_CHECKING imports count), no reach-in to another module's private names."""
    problems = import_graph.check(REPO)
    assert not problems, "\n".join(problems)


def _planted(root: Path, plant: dict[str, str]) -> Path:
    """A copy of the package's sources under `root`, with text appended to some modules."""
    root.mkdir(parents=True)
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    for f in source_files():
        rel = str(f.relative_to(REPO))
        dest = root / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(f.read_text(encoding="utf-8") + plant.get(rel, ""), encoding="utf-8")
    return root


def _planted_line(path: str, text: str) -> int:
    """The line number the planted import gets in `path`."""
    before = len((REPO / path).read_text(encoding="utf-8").splitlines())
    return before + 1 + next(i for i, line in enumerate(text.split("\n")) if "import" in line)


@pytest.mark.parametrize("plant, expected", [
    ({"persona_lora/artifact.py": "\n\ndef late():\n    from persona_lora.train.trainer import run_training\n"},
     "persona_lora.artifact:{line} imports persona_lora.train.trainer (the shared base may not import a stage)"),
    ({"persona_lora/hub_ids.py": "\nif False:\n    from persona_lora.dataset import reading\n"},
     "import cycle between persona_lora.dataset.reading, persona_lora.hub_ids"),
    ({"demo/app.py": "\nfrom persona_lora.votes import _planted\n"},
     "persona_lora.demo.app:{line} imports persona_lora.votes._planted: another module's private name"),
    ({"demo/app.py": "\nfrom persona_lora.train.trainer import run_training\n"},
     "undeclared stage edge demo -> train: persona_lora.demo.app:{line} -> persona_lora.train.trainer"),
], ids=["back-edge", "cycle", "private", "stage-edge"])
def test_the_checker_fails_on_a_planted_violation(tmp_path, plant, expected):
    assert import_graph.check(_planted(tmp_path / "clean", {})) == []
    problems = import_graph.check(_planted(tmp_path / "planted", plant))
    ((path, text),) = plant.items()
    assert any(expected.format(line=_planted_line(path, text)) in p for p in problems), problems


def test_architecture_doc_draws_the_layers_and_lists_every_module():
    """docs/ARCHITECTURE.md: the layer picture is the one the checker holds, every module has its line in the
    module map (and no line names a module that is gone), and long modules are reported there."""
    doc = (REPO / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    assert import_graph.LAYERS_START in doc and doc == import_graph.with_layer_picture(doc), (
        "docs/ARCHITECTURE.md's layer picture is stale: run `make arch-docs`")
    listed = set(re.findall(r"`((?:persona_lora|train|hub_tools|demo|model_cards|evaluation)/[\w/]+\.py)`", doc))
    files = {str(p.relative_to(REPO)) for p in source_files() if p.name != "__init__.py"}
    files -= {"hub_tools/space/templates/app.py"}
    assert not files - listed, f"modules without a line in docs/ARCHITECTURE.md: {sorted(files - listed)}"
    assert not listed - files - {"hub_tools/space/templates/app.py"}, f"gone: {sorted(listed - files)}"
    long = import_graph.long_modules(REPO, LONG_MODULE_LINES)
    assert doc == import_graph.with_size_report(doc, long), "the long-module report is stale: run `make arch-docs`"


def test_peft_internals_only_in_the_compat_module():
    """PEFT's private modules and class-name comparisons live in persona_lora/peft_compat.py only, so moving the
    PEFT pin means auditing one module."""
    pattern = re.compile(r"^\s*(from|import) peft\.(tuners|utils)\b"
                         r"|__name__\s*==\s*['\"](ParamWrapper|Linear|LoraLayer)",
                         re.M)
    offenders = [str(p.relative_to(REPO)) for p in source_files()
                 if p.name != "peft_compat.py" and pattern.search(p.read_text())]
    assert not offenders, f"PEFT internals used outside persona_lora/peft_compat.py: {offenders}"


def test_no_top_level_imports_of_the_repository_folders():
    """Everything imports `persona_lora.<stage>`: a bare `import train` would pick up a user's own train.py."""
    pattern = re.compile(r"^\s*(from|import) (train|demo|hub_tools|model_cards|evaluation)\b", re.M)
    files = source_files() + sorted((REPO / "tests").glob("*.py")) + sorted((REPO / "bench").glob("*.py"))
    offenders = [str(p.relative_to(REPO)) for p in files if pattern.search(p.read_text())]
    assert not offenders, offenders


def test_architecture_doc_schema_is_generated_from_the_types():
    from persona_lora.artifact import with_schema_doc

    doc = (REPO / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    assert doc == with_schema_doc(doc), "docs/ARCHITECTURE.md's manifest schema is stale: run `make schema-docs`"


def test_every_command_follows_the_naming_convention():
    """`configure_<cmd>` / `run_<cmd>`, in a module named `cli` of the stage or of its subpackage."""
    from persona_lora.cli import COMMANDS

    for command in COMMANDS:
        stem = command.name.replace("-", "_")
        assert command.configure.__name__ == f"configure_{stem}" and command.run.__name__ == f"run_{stem}", command
        assert command.configure.__module__ == command.run.__module__, command
        assert command.run.__module__.endswith(".cli"), command


@pytest.mark.slow
def test_python_m_runs_from_a_folder_with_a_train_py_and_a_demo_package(tmp_path):
    (tmp_path / "train.py").write_text("raise SystemExit('the user train.py was imported')\n")
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "__init__.py").write_text("raise SystemExit('the user demo package was imported')\n")
    (tmp_path / "model_cards.py").write_text("raise SystemExit('the user model_cards.py was imported')\n")
    for argv in (["--help"], ["data", "check", str(REPO / "examples" / "data" / "persona_zh.json")]):
        done = subprocess.run([sys.executable, "-m", "persona_lora", *argv], cwd=tmp_path, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        assert "was imported" not in done.stdout + done.stderr
    assert "OK: persona_zh.json is valid" in done.stdout


@pytest.mark.slow
def test_wheel_holds_one_top_level_package_with_templates_and_sample_data(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for folder in (*PACKAGE_DIRS, "examples"):
        shutil.copytree(REPO / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, capture_output=True, timeout=600)
    (wheel,) = (tmp_path / "dist").glob("persona_lora-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"persona_lora"}, top
    for needed in ("persona_lora/model_cards/templates/adapter_card.md",
                   "persona_lora/model_cards/templates/merged_card.md",
                   "persona_lora/sample_data/persona_zh.json", "persona_lora/train/trainer.py",
                   "persona_lora/demo/app.py", "persona_lora/hub_tools/merge/run.py", "persona_lora/artifact.py",
                   "persona_lora/hub_tools/space/templates/app.py", "persona_lora/hubs/pull.py"):
        assert needed in names, needed

    # installed from the wheel alone, the package finds its templates and sample data
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    probe = ("import persona_lora, persona_lora.model_cards.cards as c, persona_lora.train.tiny_base as t;"
             "print(persona_lora.__file__); print(c.TEMPLATES_DIR.is_dir()); print(len(t.corpus_texts()))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    origin, templates, corpus = done.stdout.split()
    assert origin.startswith(str(target)) and templates == "True" and int(corpus) > 100
