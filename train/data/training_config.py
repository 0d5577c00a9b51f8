"""DATA.train.yaml: the training config `data build` writes beside DATA.json, so what the build chose reaches
`persona-lora train` as settings rather than as a reminder to copy them.

It holds only the `data` section: the training file, the held-out scenes' file (`data.eval_path`, with
`data.eval_fraction: 0` so nothing else is held out) and the system prompt every record carries, which
`data.system_prompt` must repeat for the manifest, the demo and eval to prompt the persona as it was trained.
The base and the output folder are the user's to choose (flags or keys); the printed command names both. Paths are
written as `data build` was given them, so the command works from the folder the build ran in.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from persona_lora.train.data.dialogue_file import write_atomically


def adapter_folder_for(data_path: Path) -> Path:
    """runs/palace.json → runs/palace-adapter: where the printed command trains to."""
    return data_path.with_name(data_path.name.removesuffix(".json") + "-adapter")


def train_command(config_path: Path, data_path: Path) -> str:
    return (f"persona-lora train {config_path} --base BASE_MODEL --output-dir {adapter_folder_for(data_path)}")


def write_training_config(path: Path, *, data_path: Path, eval_path: Path | None, system_prompt: str | None,
                          character: str) -> None:
    """The `data` section training reads (the same YAML `persona-lora train CONFIG` takes), with a header that
    says how to run it."""
    data: dict = {"path": str(data_path)}
    if eval_path is not None:
        data.update(eval_path=str(eval_path), eval_fraction=0)
    if system_prompt:
        data["system_prompt"] = system_prompt
    held_out = ("# The held-out scenes are data.eval_path (eval loss and the card's sample answers come from them)."
                if eval_path is not None else
                "# No scene was held out (--eval-fraction 0): training holds out data.eval_fraction of the records.")
    header = [
        f"# Training config for {character}, written by `persona-lora data build` beside {data_path.name}.",
        "# Give the base model and the output folder (or add base.model and training.output_dir here):",
        f"#   {train_command(path, data_path)}",
        "# Paths are as `data build` was given them (relative to the folder it ran in).",
        held_out,
    ]
    if system_prompt:
        header.append("# data.system_prompt is the system prompt every record carries: keep the two the same.")
    header.append("# Every other key keeps its default: `persona-lora train --help-config` lists them.")
    body = yaml.safe_dump({"data": data}, allow_unicode=True, sort_keys=False, width=1000)
    write_atomically(path, "\n".join(header) + "\n" + body)
