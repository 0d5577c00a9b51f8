"""The adapter-folder contract (persona_lora/artifact.py): one reader, one validation policy, one writer.

Every command reads folders through this module, so what it accepts and refuses is what every command does.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from persona_lora.artifact import (
    MANIFEST_NAME,
    SCHEMA,
    BaseModelInfo,
    Manifest,
    MergeInfo,
    folder_kind,
    is_ours,
    read_manifest,
    require_adapter_files,
    write_manifest,
)
from persona_lora.errors import ManifestError, ModelLoadError

FIXTURES = Path(__file__).parent / "fixtures" / "cards"
WRITTEN_BY_EARLIER_CODE = ["attention_hub", "local_data", "merged", "abs_base"]


def manifest_dict(name: str) -> dict:
    return json.loads((FIXTURES / name / MANIFEST_NAME).read_text(encoding="utf-8"))


@pytest.mark.parametrize("name", WRITTEN_BY_EARLIER_CODE)
def test_manifests_of_the_earlier_format_load_and_round_trip(tmp_path, name):
    folder = shutil.copytree(FIXTURES / name, tmp_path / name)
    m = read_manifest(folder)
    original = manifest_dict(name)
    assert m.kind == original["kind"] and m.base_model.id == original["base_model"]["id"]
    assert m.metrics is None or len(m.metrics.history) == len(original["metrics"]["history"])
    write_manifest(folder, m)
    again = read_manifest(folder)
    assert again == m
    written = json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))
    assert list(written)[0] == "schema"
    assert_survives(original, written, "")


def assert_survives(old, new, where: str) -> None:
    """Every value of `old` is in `new`; what `new` adds is only the null of a field `old` did not have."""
    if isinstance(old, dict):
        assert isinstance(new, dict), where
        for key, value in old.items():
            assert key in new, f"{where}.{key} was dropped"
            assert_survives(value, new[key], f"{where}.{key}")
        for key in set(new) - set(old):
            assert new[key] in (None, [], {}), f"{where}.{key} appeared with a value"
    elif isinstance(old, list):
        assert isinstance(new, list) and len(new) == len(old), where
        for i, (a, b) in enumerate(zip(old, new)):
            assert_survives(a, b, f"{where}[{i}]")
    else:
        assert new == old and type(new) is type(old) or (isinstance(old, int) and isinstance(new, float)), where


def test_every_problem_is_reported_at_once_naming_file_and_field(tmp_path):
    folder = shutil.copytree(FIXTURES / "attention_hub", tmp_path / "a")
    data = manifest_dict("attention_hub")
    data["kind"] = "checkpoint"
    data["lora"]["r"] = "eight"
    data["samples"] = "none"
    data["metrics"]["history"][0]["loss"] = [1]
    (folder / MANIFEST_NAME).write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(ManifestError) as e:
        read_manifest(folder)
    msg = str(e.value)
    assert str(folder / MANIFEST_NAME) in msg
    for field in ('"kind"', '"lora.r"', '"samples"', '"metrics.history[0].loss"'):
        assert field in msg, field
    assert not is_ours(folder)


def test_required_fields_and_schema_versions(tmp_path):
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({"schema": SCHEMA, "kind": "adapter"}))
    with pytest.raises(ManifestError, match='"name" is missing(?s:.*)"base_model" is missing'):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({"schema": "persona-lora/manifest@9", "kind": "adapter",
                                                      "name": "x", "base_model": {"id": "b"}}))
    with pytest.raises(ManifestError, match="manifest@9.*upgrade persona-lora"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(ManifestError, match="corrupt JSON"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST_NAME).unlink()
    with pytest.raises(ManifestError, match="is missing"):
        read_manifest(tmp_path)
    assert not is_ours(tmp_path)


def test_unknown_fields_are_named_not_silently_dropped(tmp_path, caplog):
    data = manifest_dict("merged")
    data["mood"] = "happy"
    data["merge"]["colour"] = "blue"
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING, logger="persona_lora.artifact"):
        m = read_manifest(tmp_path)
    assert m.merge.layout == "original per-expert"
    assert any("mood" in r.getMessage() and "merge.colour" in r.getMessage() for r in caplog.records)


def test_writer_builds_from_typed_parts(tmp_path):
    m = Manifest(kind="merged", name="m", base_model=BaseModelInfo(id="org/base", source="hf"),
                 merge=MergeInfo(adapter="org/adapter", dtype="bfloat16"))
    write_manifest(tmp_path, m)
    data = json.loads((tmp_path / MANIFEST_NAME).read_text())
    assert data["schema"] == SCHEMA and data["merge"]["adapter"] == "org/adapter"
    assert "dataset" not in data and data["files"] == {}  # absent sections stay absent
    assert read_manifest(tmp_path) == m and is_ours(tmp_path)
    assert not list(tmp_path.glob("*.tmp"))  # written through a temporary sibling


def test_folder_kinds(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="adapter_model.safetensors is missing"):
        require_adapter_files(adapter)
    (adapter / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(ModelLoadError, match="pickled adapter_model.bin is not accepted"):
        require_adapter_files(adapter)
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    assert require_adapter_files(adapter) == adapter and folder_kind(adapter) == "adapter"
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ModelLoadError, match="only has pickled weights"):
        folder_kind(model)
    (model / "model.safetensors").write_bytes(b"")
    assert folder_kind(model) == "model"


def test_the_recorded_config_keeps_nulls(tmp_path):
    """`config` holds the run's config as run: its unset keys are JSON nulls, which must read back."""
    m = Manifest(kind="adapter", name="m", base_model=BaseModelInfo(id="b"),
                 config={"name": None, "base": {"model": "b", "revision": None}, "lora": {"preset": "all"}})
    write_manifest(tmp_path, m)
    assert read_manifest(tmp_path).config == m.config
