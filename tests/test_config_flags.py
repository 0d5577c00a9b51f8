"""train's flags come from the config's field table, tri-states are enums that read and write as the same words,
and the one validator reads a config as text a person typed but a manifest as the JSON persona-lora wrote."""

from __future__ import annotations

import argparse
import json

import pytest
import yaml

from persona_lora.cli import main
from persona_lora.errors import ConfigError
from persona_lora.train.cli import configure_train, overrides_from_args
from persona_lora.train.config import TriState, cli_flags, config_from_dict, field_help

REQUIRED = {"base": {"model": "b"}, "data": {"path": "d.json"}, "training": {"output_dir": "o"}}

# The flags `persona-lora train` has always had (besides --set, --dry-run and --help-config), with their keys.
FLAGS = {"--base": "base.model", "--data": "data.path", "--output-dir": "training.output_dir",
         "--max-steps": "training.max_steps", "--epochs": "training.epochs", "--lora-preset": "lora.preset",
         "--resume": "training.resume", "--overwrite": "training.overwrite",
         "--allow-changes": "training.allow_changes", "--method": "preference.method",
         "--init-adapter": "preference.init_adapter"}


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="persona-lora train")
    configure_train(parser)
    return parser.parse_args(list(argv))


def test_every_flag_sets_its_key_and_help_config_names_it():
    table = {f.option: f.key for f in cli_flags()}
    assert FLAGS.items() <= table.items()
    help_config = field_help()
    for flag in cli_flags():
        assert help_config[flag.key].endswith(f"[{flag.option}]")
        section, name = flag.key.split(".")
        if flag.type is bool:
            argv, want = [flag.option], True
        elif flag.type in (int, float):
            argv, want = [flag.option, "7"], flag.type(7)
        elif "choices" in flag.field.metadata:
            argv, want = [flag.option, flag.field.metadata["choices"][-1]], flag.field.metadata["choices"][-1]
        elif flag.type is TriState:
            argv, want = [flag.option, "auto"], "auto"
        else:
            argv, want = [flag.option, "x"], "x"
        assert overrides_from_args(parse(*argv))[section][name] == want, flag.option
    assert overrides_from_args(parse()) == {}, "a flag not given overrides nothing"


def test_help_shows_each_flag_with_its_key(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for option, key in FLAGS.items():
        assert option in out and f"[{key}]" in out


def test_resume_flag_bare_or_with_a_word_and_a_flag_beats_set():
    assert overrides_from_args(parse("--resume"))["training"]["resume"] == "true"
    assert overrides_from_args(parse("--resume", "auto"))["training"]["resume"] == "auto"
    o = overrides_from_args(parse("--set", "training.epochs=2", "--epochs", "5"))
    assert o["training"]["epochs"] == 5.0
    with pytest.raises(SystemExit):
        parse("--resume", "maybe")


def test_lora_preset_flag_replaces_the_configs_target_modules():
    o = overrides_from_args(parse("--lora-preset", "all"))
    assert o["lora"] == {"preset": "all", "target_modules": None}
    o = overrides_from_args(parse("--lora-preset", "all", "--set", "lora.target_modules=[q_proj]"))
    assert o["lora"]["target_modules"] == ["q_proj"], "an explicit --set is kept (and then named as a conflict)"


@pytest.mark.parametrize("spelled", [True, "true"])
def test_tri_states_read_yaml_words_and_write_them_back(spelled):
    cfg = config_from_dict({**REQUIRED, "training": {"output_dir": "o", "gradient_checkpointing": spelled,
                                                     "fsdp": "auto"}})
    assert cfg.training.gradient_checkpointing is TriState.TRUE and cfg.training.fsdp is TriState.AUTO
    assert cfg.training.resume is TriState.FALSE  # the default
    written = cfg.to_dict()["training"]
    assert (written["gradient_checkpointing"], written["fsdp"], written["resume"]) == ("true", "auto", "false")
    assert all(type(written[k]) is str for k in ("gradient_checkpointing", "fsdp", "resume"))
    assert "gradient_checkpointing: 'true'" in yaml.safe_dump(cfg.to_dict())
    assert json.loads(json.dumps(cfg.to_dict())) == cfg.to_dict()
    assert config_from_dict(cfg.to_dict()).to_dict() == cfg.to_dict(), "what is written reads back the same"
    with pytest.raises(ConfigError, match="'True' is not one of false, true, auto"):  # the words are lower case
        config_from_dict({**REQUIRED, "training": {"output_dir": "o", "fsdp": "True"}})


def test_every_problem_at_once_names_its_key():
    with pytest.raises(ConfigError) as e:
        config_from_dict({**REQUIRED, "base": None, "data": "x",
                          "training": {"output_dir": "o", "resume": "sometimes", "epochs": None, "report_to": [1]}})
    problems = e.value.problems
    assert "data: must be a mapping of keys, got 'x'" in problems
    assert "training.resume: 'sometimes' is not one of false, true, auto" in problems
    assert "training.epochs: expected a number, got None" in problems
    assert "training.report_to[0]: expected a string, got 1" in problems
    assert "base.model is required: set it in the config or with --base" in problems, "`base:` is an empty section"
    assert "data.path is required: set it in the config or with --data" in problems
    assert len(problems) == 6, problems


def test_text_spellings_are_numbers_in_a_config_but_not_in_a_manifest(tmp_path):
    from persona_lora.artifact import parse_manifest
    from persona_lora.errors import ManifestError

    cfg = config_from_dict({**REQUIRED, "training": {"output_dir": "o", "learning_rate": "1e-4", "max_steps": "9",
                                                     "report_to": "tensorboard, wandb"}})
    assert (cfg.training.learning_rate, cfg.training.max_steps) == (1e-4, 9)
    assert cfg.training.report_to == ["tensorboard", "wandb"]
    manifest = {"schema": "persona-lora/manifest@1", "kind": "adapter", "name": "a", "base_model": {"id": "b"},
                "training": {"learning_rate": "1e-4", "max_steps": 3.0}}
    with pytest.raises(ManifestError) as e:
        parse_manifest(manifest, tmp_path / "m.json")
    assert "\"training.learning_rate\" is a string ('1e-4'), expected number" in str(e.value)
    assert '"training.max_steps" is a number (3.0), expected integer' in str(e.value)
