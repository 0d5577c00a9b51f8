"""What an adapter's manifest says about the run that made it, in the form `reproduce` needs.

A manifest written since the resolved config was recorded holds it whole (`config`); older ones hold the same
settings spread over their `training`, `lora`, `chat` and `dataset` sections, and the log and eval intervals only
implicitly, in the steps of the loss history. Both become one config dict here. Whatever the comparison or the
input checks cannot do without is required, and a manifest that lacks it is refused naming each missing field,
rather than trained with a guess that would make the verdict meaningless.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from persona_lora.artifact import Manifest
from persona_lora.errors import ManifestError


def lookup(data: dict, path: str):
    """`data["a"]["b"]` for "a.b"; None where any part is absent."""
    for key in path.split("."):
        data = data.get(key) if isinstance(data, dict) else None
    return data


def _missing(folder: Path, fields: list[str], why: str) -> ManifestError:
    return ManifestError(f"{folder / 'persona_manifest.json'} lacks what reproduce needs: {', '.join(fields)} "
                         f"({why}); an adapter written by a current `persona-lora train` records all of it")


def original_history(m: Manifest, folder: Path) -> list[int]:
    """The steps with a recorded train loss (the ones a reproduction is compared on); every field the comparison
    and the input checks need must be there."""
    needed = ["base_model.config_sha256", "dataset.sha256"]
    absent = [f for f in needed if lookup(m.to_dict(), f) is None]
    steps = sorted({e.step for e in (m.metrics.history if m.metrics else []) if e.loss is not None and e.step})
    if not steps:
        absent.append("metrics.history")
    if m.dataset is not None and not (m.dataset.name or m.dataset.hub_id):
        absent.append("dataset.name")
    if absent:
        raise _missing(folder, absent, "the base and data are checked against them and the losses compared with it")
    return steps


def _logging_steps(train_steps: list[int]) -> int:
    """The training.logging_steps an older manifest ran with, from its history: Trainer logs step 1, then every
    multiple of logging_steps and nothing else, so their greatest common divisor gives the same log points."""
    later = [s for s in train_steps if s > 1]
    return math.gcd(*later) if later else 1


def _eval_steps(eval_steps: list[int]) -> int:
    """training.eval_steps from the eval points: multiples of it, plus one forced at the last step."""
    if not eval_steps:
        return 50  # no eval points: eval_steps never mattered
    return math.gcd(*eval_steps[:-1]) if len(eval_steps) > 1 else eval_steps[0]


# section keys of an older manifest (without `config`) -> the config key they hold
_FROM_SECTIONS = {
    "training.learning_rate": "training.learning_rate", "training.lr_scheduler": "training.lr_scheduler",
    "training.warmup_ratio": "training.warmup_ratio", "training.weight_decay": "training.weight_decay",
    "training.max_grad_norm": "training.max_grad_norm", "training.epochs": "training.epochs",
    "training.per_device_batch_size": "training.batch_size",
    "training.gradient_accumulation_steps": "training.gradient_accumulation_steps", "training.seed": "training.seed",
    "training.group_by_length": "training.group_by_length", "training.eval_fraction": "data.eval_fraction",
    "chat.train_on": "data.train_on", "chat.overlong": "data.overlong", "chat.max_length": "data.max_length",
    "lora.r": "lora.r", "lora.alpha": "lora.alpha", "lora.dropout": "lora.dropout",
}
# absent in an older manifest means the feature did not exist yet, i.e. off
_OFF_WHEN_ABSENT = {"training.packing": ("training.packing", False),
                    "training.load_in_4bit": ("base.load_in_4bit", False),
                    "training.dtype": ("base.dtype", "auto"), "training.device": ("base.device", "auto")}


def config_dict(m: Manifest, folder: Path, train_steps: list[int]) -> tuple[dict, str]:
    """The run's config as a dict: the manifest's own `config`, or for manifests written before it was recorded,
    rebuilt from the training/lora/chat/dataset sections (a missing field is named)."""
    if m.config is not None:
        cfg = json.loads(json.dumps(m.config))
        for section in ("base", "data", "lora", "training"):
            if not isinstance(cfg.get(section), dict):
                raise _missing(folder, [f"config.{section}"], "the run's configuration")
        return cfg, "config from the manifest"
    data = m.to_dict()
    cfg: dict = {"name": m.name, "license": m.license, "base": {}, "data": {}, "lora": {}, "training": {}}

    def put(key: str, value) -> None:
        section, name = key.split(".")
        cfg[section][name] = value

    absent = [path for path in _FROM_SECTIONS if lookup(data, path) is None]
    if lookup(data, "lora.preset") is None and lookup(data, "lora.asked_target_modules") is None:
        absent.append("lora.preset")
    if absent:
        raise _missing(folder, absent, "it has no `config` section, so the run's settings are rebuilt from these")
    for path, key in _FROM_SECTIONS.items():
        put(key, lookup(data, path))
    for path, (key, default) in _OFF_WHEN_ABSENT.items():
        value = lookup(data, path)
        put(key, default if value is None else value)
    put("base.model", m.base_model.id)
    put("training.output_dir", m.name)  # where it was written; a reproduction writes elsewhere
    put("base.revision", m.base_model.revision)
    put("lora.preset", m.lora.preset)
    put("lora.target_modules", m.lora.asked_target_modules)
    put("data.path", m.dataset.hub_id or m.dataset.name)
    put("data.system_prompt", m.chat.system_prompt)
    put("data.language", list(m.dataset.language))
    max_steps = m.training.max_steps
    put("training.max_steps", None if max_steps is None or max_steps < 0 else max_steps)
    checkpointing = m.training.gradient_checkpointing
    put("training.gradient_checkpointing", "auto" if checkpointing is None else str(checkpointing).lower())
    put("training.logging_steps", _logging_steps(train_steps))
    put("training.eval_steps", _eval_steps(sorted({e.step for e in m.metrics.history if e.eval_loss is not None
                                                    and e.step})))
    put("training.samples", len(m.samples))
    return cfg, "config rebuilt from the manifest's sections (it predates the recorded config)"
