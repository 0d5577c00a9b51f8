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

REPO = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = ("persona_lora", "train", "hub_tools", "demo", "model_cards", "evaluation")
MAX_MODULE_LINES = 500


def source_files() -> list[Path]:
    return sorted(p for d in PACKAGE_DIRS for p in (REPO / d).rglob("*.py") if "__pycache__" not in p.parts)


def test_no_module_over_500_lines():
    sizes = {str(p.relative_to(REPO)): len(p.read_text().splitlines()) for p in source_files()}
    long = {name: n for name, n in sizes.items() if n > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


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
    from persona_lora.cli import COMMANDS

    for command in COMMANDS:
        stem = command.name.replace("-", "_")
        assert command.configure.__name__ == f"configure_{stem}" and command.run.__name__ == f"run_{stem}", command


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
                   "persona_lora/demo/app.py", "persona_lora/hub_tools/merge.py", "persona_lora/artifact.py"):
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
