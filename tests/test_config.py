"""Config loading and validation: every problem at once, each naming the key and the fix; every shipped config
loads, and the big ones dry-run on the tiny base."""

from __future__ import annotations

import re

import pytest
import yaml

from persona_lora.cli import main
from persona_lora.errors import ConfigError
from persona_lora.train.config import config_from_dict, load_config, parse_set
from tests.conftest import REPO

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def test_there_are_configs_and_each_is_headed_by_its_command():
    names = {p.name for p in CONFIGS}
    assert {"tiny.yaml", "deepseek-coder-v2-lite-huanhuan.yaml", "deepseek-coder-v2-lite-huanhuan-qlora.yaml"} <= names
    for p in CONFIGS:
        assert p.read_text(encoding="utf-8").splitlines()[0] == f"# persona-lora train configs/{p.name}"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_loads_and_validates(path):
    cfg = load_config(path)
    assert cfg.training.learning_rate >= 1e-4, "LoRA wants a LoRA-sized learning rate"
    assert cfg.data.system_prompt


# preference-tuning configs need preference data and an SFT adapter: tests/test_preference.py dry-runs them
SFT_CONFIGS = [p for p in CONFIGS if "preference" not in yaml.safe_load(p.read_text(encoding="utf-8"))]


@pytest.mark.parametrize("path", [p for p in SFT_CONFIGS if p.name != "tiny.yaml"], ids=lambda p: p.name)
def test_big_configs_dry_run_with_the_tiny_base_swapped_in(path, tiny_base, small_persona_data, capsys, tmp_path):
    args = ["train", str(path), "--base", str(tiny_base), "--data", str(small_persona_data),
            "--output-dir", str(tmp_path / "o"), "--dry-run"]
    if yaml.safe_load(path.read_text())["base"].get("load_in_4bit"):
        args += ["--set", "base.load_in_4bit=false"]  # bitsandbytes needs CUDA; the rest of the plan is checked
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "LoRA coverage:" in out and "estimate:" in out


def test_all_problems_are_reported_at_once_with_keys_and_fixes():
    with pytest.raises(ConfigError) as e:
        config_from_dict(
            {
                "base": {"modle": "x"},
                "data": {"max_length": "long", "train_on": "some"},
                "lora": {"r": 0},
                "training": {"learning_rate": "fast", "overwrite": True, "resume": "auto", "batch_size": -1},
                "trainer": {},
            }
        )
    msg = str(e.value)
    expected = [
        "base.modle: unknown key; did you mean base.model?",
        "data.max_length: expected an integer",
        "data.train_on: 'some' is not one of all, last",
        "lora.r: must be >= 1",
        "training.learning_rate: expected a number",
        "training.batch_size: must be >= 1",
        "trainer: unknown section; did you mean training?",
        "training.overwrite and training.resume are both set",
        "base.model is required: set it in the config or with --base",
        "data.path is required: set it in the config or with --data",
        "training.output_dir is required: set it in the config or with --output-dir",
    ]
    for needle in expected:
        assert needle in msg, (needle, msg)
    assert len(e.value.problems) == len(expected)


def test_conflicting_lora_options_name_both():
    with pytest.raises(ConfigError, match="lora.preset and lora.target_modules are both set"):
        config_from_dict({"lora": {"preset": "all", "target_modules": ["q_proj"]}})


REQUIRED = {"base": {"model": "b"}, "data": {"path": "d.json"}, "training": {"output_dir": "o"}}


@pytest.mark.parametrize(("text", "needle"), [
    ("- base\n- data\n", "the top level must be a mapping"),
    ("training:\n  epochs: 1\n  epochs: 2\n", "duplicate key 'epochs' (first at line 2)"),
    ("base:\n  model: b\nbase:\n  model: c\n", "duplicate key 'base'"),
    ("training: [unclosed\n", "is not valid YAML"),
])
def test_yaml_problems_are_config_errors(tmp_path, text, needle):
    path = tmp_path / "c.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=re.escape(needle)):
        load_config(path)


def test_non_utf8_config_and_unparsable_set(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes("base:\n  model: 本宫\n".encode("gb18030"))
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(path)
    with pytest.raises(ConfigError, match="--set 'data.system_prompt=: x'"):
        parse_set(["data.system_prompt=: x"])


@pytest.mark.parametrize(("override", "needle"), [
    ({"training": {"max_steps": 0}}, "training.max_steps: must be >= 1, got 0"),
    ({"training": {"max_steps": -5}}, "training.max_steps: must be >= 1, got -5"),
    ({"training": {"lr_scheduler": "cosin"}}, "training.lr_scheduler: 'cosin' is not a transformers schedule; did you "
                                              "mean 'cosine'?"),
    ({"base": {"dtype": "int8"}}, "base.dtype: 'int8' is not one of auto, float32, bfloat16, float16"),
])
def test_unknown_values_and_step_counts_fail_at_load_time(override, needle):
    data = {k: dict(v) for k, v in REQUIRED.items()}
    for section, values in override.items():
        data.setdefault(section, {}).update(values)
    with pytest.raises(ConfigError, match=re.escape(needle)):
        config_from_dict(data)
    config_from_dict(REQUIRED)  # and the required keys alone make a valid config


def test_set_overrides_parse_yaml_scalars():
    parsed = parse_set(["training.learning_rate=1e-4", "lora.target_modules=[q_proj, o_proj]", "data.system_prompt=",
                        "lora.preset=null"])
    assert (parsed["lora"] == {"target_modules": ["q_proj", "o_proj"], "preset": None}
            and parsed["data"] == {"system_prompt": None})
    cfg = config_from_dict({**parsed, "base": {"model": "b"}, "data": {**parsed["data"], "path": "d.json"},
                            "training": {**parsed["training"], "output_dir": "o"}})
    assert cfg.training.learning_rate == 1e-4 and cfg.lora.target_modules == ["q_proj", "o_proj"]
    with pytest.raises(ConfigError, match="expected section.key=value"):
        parse_set(["learning_rate=1"])


def test_cli_config_errors_exit_2_without_traceback(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  epochs: many\n  lr: 1\n")
    assert main(["train", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "training.epochs: expected a number" in err and "training.lr: unknown key" in err and "Traceback" not in err
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "broken.yaml").write_text("training: [\n")
    assert main(["train", str(tmp_path / "broken.yaml")]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def test_leaf_target_list_means_every_linear_layer(tiny_base, small_persona_data, tmp_path, capsys):
    """The usual leaf-name list (with lora_dropout 0.1) trains what it means, experts included."""
    args = [
        "train", "--base", str(tiny_base), "--data", str(small_persona_data),
        "--output-dir", str(tmp_path / "o"), "--dry-run",
        "--set", "lora.preset=null",
        "--set", "lora.target_modules=[q_proj, kv_a_proj_with_mqa, kv_b_proj, o_proj, gate_proj, up_proj, down_proj]",
        "--set", "lora.dropout=0.1",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    for group in ("attention", "dense MLP", "shared experts", "routed experts"):
        assert group in out
    assert "0 on the fused routed experts" in out


def test_help_config_lists_every_key(capsys):
    assert main(["train", "--help-config"]) == 0
    out = capsys.readouterr().out
    assert "training.learning_rate" in out and "lora.preset" in out and "base.load_in_4bit" in out


def test_every_shipped_config_names_its_adapter_as_its_output_folder():
    """One name per adapter: the card (config `name`), the demo's picker and the DPO lineage (the folder's name)
    and the README's hub ids must not call the same adapter two things."""
    from pathlib import Path

    paths = sorted((REPO / "configs").glob("*.yaml"))
    assert len(paths) >= 5
    for path in paths:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
        assert cfg["name"] == Path(cfg["training"]["output_dir"]).name, path.name
