"""Typed training config: one dataclass per concern, help text on every field, all problems reported at once.

A YAML file holds sections `base`, `data`, `lora`, `training`, `preference` (plus top-level `name`, `license`);
CLI flags and `--set section.key=value` override it. Errors name the key (`training.learning_rate`) and the fix.

The field table below is the one description of the config: its types and metadata (`choices`, `min`, `max`) are
what `persona_lora.typed_json` checks a YAML file against (the same reader as the manifest's, reading values as
text a person typed), its help texts are `train --help-config`, and a field's `flag` metadata makes it a flag of
`persona-lora train` (`cli_flags`), with the same help: the flags, the help and the overrides cannot drift.
"""

from __future__ import annotations

import difflib
import enum
from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from persona_lora.dtypes import WEIGHT_DTYPES
from persona_lora.errors import ConfigError
from persona_lora.hub_ids import SOURCES
from persona_lora.typed_json import TEXT_WORDING, Reading, field_types, from_json, to_json, unwrap_optional


class TriState(enum.StrEnum):
    """A setting that is on, off, or left to the run (`auto`). String-valued, so YAML, `--set`, the printed config
    and the manifest's config section spell it `true`/`false`/`auto` as they always did (YAML's bare `true` and
    `false` are read as these too)."""

    FALSE = "false"
    TRUE = "true"
    AUTO = "auto"


def _f(default, help: str, **kw):
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class BaseConfig:
    model: str | None = _f(None, "local folder, Hugging Face id or ModelScope id of the base model",
                           required=True, flag="--base")
    revision: str | None = _f(None, "hub revision (branch, tag or commit) of the base model")
    source: str = _f(
        "auto", "where `model` lives: auto (local folder if it exists, else Hugging Face), local, hf, modelscope",
        choices=SOURCES,
    )
    dtype: str = _f(
        "auto", "weights dtype: auto (bf16 on a CUDA GPU that supports it, else fp32), float32, bfloat16, float16",
        choices=("auto", *WEIGHT_DTYPES),
    )
    load_in_4bit: bool = _f(False, "QLoRA: load the base in 4-bit NF4 with bitsandbytes (CUDA only)")
    trust_remote_code: bool = _f(
        False, "run the model repo's own Python code; leave false unless you trust it (DeepSeek-V2 is native)"
    )
    chat_template: str | None = _f(
        None, "Jinja file with a chat template, for bases whose tokenizer has none (it is then saved with the adapter)"
    )
    device: str = _f("auto", "auto (cuda if available), cpu, cuda, cuda:N")


@dataclass
class DataConfig:
    path: str | None = _f(
        None, "dataset: .json/.jsonl file (Alpaca, messages or ShareGPT records) or a hub dataset id",
        required=True, flag="--data",
    )
    revision: str | None = _f(None, "hub dataset revision")
    system_prompt: str | None = _f(
        None, "system prompt for records without their own `system`; stored in the manifest and used by the demo"
    )
    max_length: int = _f(512, "maximum tokens per example (prompt + answer)", min=8)
    train_on: str = _f(
        "all", "which assistant turns of a multi-turn record are trained: all, last", choices=("all", "last")
    )
    overlong: str = _f(
        "truncate", "over-long examples: truncate (cut the prompt from the left, keep the answer and EOS) or drop",
        choices=("truncate", "drop"),
    )
    eval_fraction: float = _f(0.05, "fraction of records held out for eval loss (0 disables eval; 0 when "
                                    "data.eval_path is set)", min=0.0, max=0.5)
    eval_path: str | None = _f(
        None, "held-out records in their own file (e.g. the DATA.eval.json `data build` splits off by scene): the "
        "eval set instead of data.eval_fraction of data.path", flag="--eval-data", metavar="EVAL.json",
    )
    language: list[str] = _f([], "dataset languages for the card, e.g. [zh]")
    markers: list[str] = _f([], "persona markers, words the persona uses (e.g. [本宫, 臣妾]): `persona-lora eval` "
                                "reports the share of answers holding one")


@dataclass
class LoraConfigSection:
    preset: str | None = _f(
        "attention+mlp", "coverage preset: attention | attention+mlp | all (MoE: all adds the routed experts); on "
        "MLA models each also as <preset>-no-kv-b, without kv_b_proj (what vLLM serves as trained)",
        flag="--lora-preset", replaces="target_modules",
    )
    target_modules: list[str] | None = _f(
        None,
        "explicit leaf names instead of a preset (e.g. [q_proj, o_proj, gate_proj, up_proj, down_proj]); "
        "gate/up/down mean every MLP incl. experts",
    )
    r: int = _f(16, "LoRA rank (higher: more capacity and memory)", min=1)
    alpha: int = _f(32, "LoRA alpha (scaling = alpha / r)", min=1)
    dropout: float = _f(
        0.05, "LoRA dropout on linear layers (fused experts get 0: PEFT refuses dropout there)", min=0.0, max=0.9
    )


@dataclass
class TrainingConfig:
    output_dir: str | None = _f(None, "the adapter folder to write (checkpoints go to its checkpoints/)",
                                required=True, flag="--output-dir")
    epochs: float = _f(3.0, "number of passes over the training records", min=0.0, flag="--epochs")
    max_steps: int | None = _f(None, "stop after this many optimizer steps (unset: run all epochs)", min=1,
                               flag="--max-steps")
    batch_size: int = _f(8, "examples per device per step", min=1)
    gradient_accumulation_steps: int = _f(1, "micro-batches per optimizer step", min=1)
    learning_rate: float = _f(2e-4, "peak learning rate (LoRA wants ~1e-4..2e-3; 1e-5 barely moves it)", min=0.0)
    lr_scheduler: str = _f(
        "cosine", "learning-rate schedule (transformers name): cosine, linear, constant, constant_with_warmup, …"
    )
    warmup_ratio: float = _f(0.03, "fraction of steps for linear warmup", min=0.0, max=0.5)
    weight_decay: float = _f(0.0, "AdamW weight decay", min=0.0)
    max_grad_norm: float = _f(1.0, "gradient clipping norm", min=0.0)
    seed: int = _f(42, "seed for init, shuffling and the eval split")
    gradient_checkpointing: TriState = _f(
        TriState.AUTO, "auto (on for CUDA, off on CPU), true, false; non-reentrant, works with LoRA"
    )
    group_by_length: bool = _f(True, "batch examples of similar length to cut padding")
    packing: bool = _f(
        False,
        "pack examples padding-free; needs flash-attention 2 on CUDA "
        "(SDPA would let packed examples attend to each other)",
    )
    logging_steps: int = _f(10, "log train loss every N steps", min=1)
    eval_steps: int = _f(50, "eval loss every N steps", min=1)
    save_steps: int = _f(50, "checkpoint every N steps", min=1)
    save_total_limit: int = _f(2, "keep the last K checkpoints", min=1)
    report_to: list[str] = _f(["tensorboard"], "logging integrations (tensorboard, wandb, none)")
    resume: TriState = _f(
        TriState.FALSE, "continue from the latest checkpoint: false, true (error if none), auto (if any); the bare "
        "flag means true", flag="--resume"
    )
    overwrite: bool = _f(False, "replace an existing non-empty output_dir (a persona-lora run; replaced only once the "
                                "new run has finished)", flag="--overwrite")
    allow_changes: bool = _f(False, "let --resume continue with other data or settings than the run started with "
                                    "(the changes are recorded in the manifest and card)", flag="--allow-changes")
    allow_no_update: bool = _f(False, "train even when no step can change the adapter (every step in the warm-up at "
                                      "learning rate 0, or learning_rate 0): warned, and recorded as run",
                             flag="--allow-no-update")
    samples: int = _f(4, "base-vs-adapter sample answers on held-out prompts at the end (0: none)", min=0)
    sample_max_new_tokens: int = _f(64, "max new tokens per sample answer", min=1)
    dataloader_workers: int = _f(0, "DataLoader worker processes", min=0)
    compile: bool = _f(False, "run the decoder layers under torch.compile (dynamic shapes); the first steps compile "
                              "(minutes on a CPU, which needs a C++ compiler), and the time it cost is printed",
                       flag="--compile")
    fsdp: TriState = _f(
        TriState.FALSE, "shard the frozen base across processes per decoder layer (FSDP2; launch with torchrun or "
        "accelerate launch): false, true, auto (on with more than one process when the base does not fit one device)"
    )


@dataclass
class PreferenceConfig:
    method: str = _f("sft", "sft (supervised, the default), dpo (pairs: prompt/chosen/rejected or the demo's votes) or "
                            "kto (single judgements: prompt/completion/label, or votes); with dpo/kto --data takes a "
                            "vote database or a preference file", choices=("sft", "dpo", "kto"), flag="--method")
    init_adapter: str | None = _f(None, "dpo/kto: continue from this adapter (folder or hub id[@revision]); its base "
                                        "is checked against base.model, its chat template and system prompt inherited; "
                                        "it is the frozen reference", flag="--init-adapter", metavar="DIR_OR_ID")
    allow_other_adapter: bool = _f(False, "dpo/kto: train on votes cast for another adapter than init_adapter "
                                          "(each vote records the adapter it judged; by default they are refused)",
                                 flag="--allow-other-adapter")
    beta: float = _f(0.1, "dpo/kto: how far the tuned adapter may move from the reference (lower: further)", min=0.0)
    desirable_weight: float = _f(1.0, "kto: weight of the desirable examples' loss", min=0.0)
    undesirable_weight: float = _f(1.0, "kto: weight of the undesirable examples' loss", min=0.0)


@dataclass
class TrainConfig:
    name: str | None = _f(None, "adapter name for the card (default: the output folder's name)")
    license: str | None = _f(None, "license of the adapter for the card (default: the base's when known)")
    base: BaseConfig = field(default_factory=BaseConfig, metadata={"help": "base model"})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "dataset and formatting"})
    lora: LoraConfigSection = field(default_factory=LoraConfigSection, metadata={"help": "LoRA coverage and size"})
    training: TrainingConfig = field(default_factory=TrainingConfig, metadata={"help": "optimisation and checkpoints"})
    preference: PreferenceConfig = field(default_factory=PreferenceConfig,
                                         metadata={"help": "preference tuning (dpo, kto) after SFT"})

    def to_dict(self) -> dict:
        """Plain YAML/JSON values (a tri-state as its word): what the dry run prints and the manifest records."""
        return to_json(self)


SECTIONS = {"base": BaseConfig, "data": DataConfig, "lora": LoraConfigSection, "training": TrainingConfig,
            "preference": PreferenceConfig}


def _unknown_key(where: str, key: str, known: list[str]) -> str:
    """An unknown key as a config problem: what it may be a typo of, else what is known there."""
    near = difflib.get_close_matches(key, known, n=1)
    if not where:
        hint = f"; did you mean {near[0]}?" if near else f"; sections are {', '.join(SECTIONS)}"
        return f"{key}: unknown section{hint}"
    hint = f"; did you mean {where}.{near[0]}?" if near else f"; known keys: {', '.join(known)}"
    return f"{where}.{key}: unknown key{hint}"


# A config is text a person typed (YAML, `--set`): numbers and flags may come spelled as strings, and an unknown key
# is a mistake to report, not a field to skip.
CONFIG_READING = Reading(wording=TEXT_WORDING, from_text=True, unknown=_unknown_key)


def config_from_dict(data: dict, source: str | None = None) -> TrainConfig:
    """Validate a config mapping; every problem (types, limits, unknown keys, conflicts) in one ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError("the config must be a YAML mapping with sections base, data, lora, training", source)
    problems: list[str] = []
    cfg = from_json(TrainConfig, data, "", problems, [], CONFIG_READING)
    problems += eval_source_checks(cfg, data.get("data"))
    problems += cross_checks(cfg)
    if problems:
        raise ConfigError(problems, source)
    return cfg


def eval_source_checks(cfg: TrainConfig, data_section) -> list[str]:
    """With data.eval_path the held-out set is that file, so nothing is carved out of data.path: data.eval_fraction
    becomes 0 unless it was given, and given above 0 it contradicts the file (which held-out set?)."""
    if not cfg.data.eval_path:
        return []
    given = isinstance(data_section, dict) and data_section.get("eval_fraction") is not None
    if given and cfg.data.eval_fraction > 0:
        return [f"data.eval_path ({cfg.data.eval_path}) and data.eval_fraction {cfg.data.eval_fraction:g} both "
                "choose the held-out set; keep the file and set data.eval_fraction: 0 (--set data.eval_fraction=0), "
                "or drop data.eval_path to hold out a fraction of data.path"]
    cfg.data.eval_fraction = 0.0
    if cfg.preference.method != "sft":
        return [f"data.eval_path is for SFT records; preference.method {cfg.preference.method} holds out "
                "data.eval_fraction of its pairs: drop data.eval_path (--eval-data)"]
    return []


def cross_checks(cfg: TrainConfig) -> list[str]:
    """Conflicts between options, each naming both and the fix."""
    p = []
    if cfg.training.overwrite and cfg.training.resume != TriState.FALSE:
        p.append("training.overwrite and training.resume are both set: "
                 "overwrite deletes the checkpoints resume needs; choose one")
    if cfg.lora.preset and cfg.lora.target_modules:
        p.append("lora.preset and lora.target_modules are both set; "
                 "choose one (set lora.preset: null to use target_modules)")
    known = preset_names()
    if cfg.lora.preset and cfg.lora.preset not in known:
        near = difflib.get_close_matches(cfg.lora.preset, known, n=1)
        hint = f"did you mean {near[0]!r}? " if near else ""
        p.append(f"lora.preset {cfg.lora.preset!r} is not known; {hint}choose one of {', '.join(known)}")
    if not cfg.lora.preset and not cfg.lora.target_modules:
        p.append("lora.preset is empty and lora.target_modules is not set; "
                 "choose a preset (attention, attention+mlp, all)")
    if cfg.training.max_steps is None and cfg.training.epochs <= 0:
        p.append("training.epochs is 0 and training.max_steps is not set: nothing to train")
    schedulers = scheduler_names()
    if cfg.training.lr_scheduler not in schedulers:
        near = difflib.get_close_matches(cfg.training.lr_scheduler, schedulers, n=1)
        hint = f"did you mean {near[0]!r}? " if near else ""
        p.append(f"training.lr_scheduler: {cfg.training.lr_scheduler!r} is not a transformers schedule; {hint}"
                 f"known: {', '.join(schedulers)}")
    for section, cls in SECTIONS.items():
        for f in fields(cls):
            if f.metadata.get("required") and getattr(getattr(cfg, section), f.name) is None:
                p.append(f"{section}.{f.name} is required: set it in the config or with {f.metadata['flag']}")
    if cfg.preference.method == "sft" and cfg.preference.init_adapter:
        p.append("preference.init_adapter is set but preference.method is sft; continuing from an adapter is for "
                 "--method dpo or kto (drop --init-adapter, or choose a method)")
    if cfg.training.fsdp == TriState.TRUE and cfg.base.load_in_4bit:
        p.append("training.fsdp and base.load_in_4bit are both set: a 4-bit base cannot be sharded (and 4-bit loading "
                 "does not shrink the fused experts); choose one")
    if cfg.training.fsdp == TriState.TRUE and cfg.preference.method != "sft":
        p.append(f"training.fsdp: true with preference.method {cfg.preference.method}: preference runs do not shard "
                 "the base; set training.fsdp: false (or auto) and run them on devices that hold the base whole")
    if cfg.base.load_in_4bit and cfg.base.dtype == "float32":
        p.append("base.load_in_4bit with base.dtype float32: 4-bit compute wants bfloat16/float16 (or auto)")
    return p


def preset_names() -> list[str]:
    """Every preset name of any architecture (whether it fits the base is checked once the base is known)."""
    from persona_lora.presets import PRESETS

    return list(dict.fromkeys(name for family in PRESETS.values() for name in family))


def scheduler_names() -> list[str]:
    """The learning-rate schedules transformers' Trainer knows (checked at load time, dry runs included)."""
    from transformers import SchedulerType

    return [s.value for s in SchedulerType]


def parse_set(assignments: list[str]) -> dict:
    """`--set training.learning_rate=1e-4` -> nested dict (values parsed as YAML scalars)."""
    out: dict = {}
    for a in assignments:
        if "=" not in a or "." not in a.split("=", 1)[0]:
            raise ConfigError(f"--set {a!r}: expected section.key=value, e.g. --set training.learning_rate=1e-4")
        key, raw = a.split("=", 1)
        section, name = key.split(".", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {a!r}: the value is not a YAML scalar or list ({e.problem}); quote it, e.g. "
                              f"--set '{key}=\"...\"'") from None
        out.setdefault(section, {})[name] = value
    return out


def merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for k, v in override.items():
        out[k] = merge(out.get(k) or {}, v) if isinstance(v, dict) and isinstance(out.get(k), (dict, type(None))) else v
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, but a key given twice in one mapping is an error, not the later one silently winning."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at line {seen[key] + 1}); keep one of them",
                    key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def load_config(path: str | Path | None, overrides: dict | None = None) -> TrainConfig:
    """Read a YAML config (or start from defaults), apply overrides, validate everything at once."""
    data: dict = {}
    source = None
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist", None)
        try:
            data = yaml.load(p.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
        except UnicodeDecodeError as e:
            raise ConfigError(f"{p} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); save it "
                              "as UTF-8", None) from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{p} is not valid YAML: {e}", None) from None
        except OSError as e:
            raise ConfigError(f"{p} cannot be read ({e.strerror})", None) from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: the top level must be a mapping with sections base, data, lora, training; it is "
                              f"a {type(data).__name__}", None)
    return config_from_dict(merge(data, overrides or {}), source)


@dataclass(frozen=True)
class CliFlag:
    """A flag of `persona-lora train`: its option and the config key it sets. Type, choices and help are the
    key's own, so the flag, `--help-config` and the override are one description."""

    option: str
    section: str
    field: Field
    type: Any  # the field's value type (`X` of `X | None`)

    @property
    def key(self) -> str:
        return f"{self.section}.{self.field.name}"

    @property
    def dest(self) -> str:
        """The argparse attribute the flag's value lands in (argparse's own naming)."""
        return self.option.lstrip("-").replace("-", "_")


def cli_flags() -> list[CliFlag]:
    """Every config field with a `flag`, in the field table's order."""
    out = []
    for section, cls in SECTIONS.items():
        types = field_types(cls)
        out += [CliFlag(f.metadata["flag"], section, f, unwrap_optional(types[f.name])[0])
                for f in fields(cls) if "flag" in f.metadata]
    return out


def field_help(cls=TrainConfig) -> dict[str, str]:
    """Flat `section.key -> help`, with the flag that also sets the key (used by `train --help-config`)."""
    out = {}
    for f in fields(cls):
        for key, g in ([(f"{f.name}.{g.name}", g) for g in fields(SECTIONS[f.name])] if f.name in SECTIONS
                       else [(f.name, f)]):
            flag = g.metadata.get("flag")
            out[key] = g.metadata.get("help", "") + (f" [{flag}]" if flag else "")
    return out


__all__ = ["TrainConfig", "TriState", "load_config", "parse_set", "config_from_dict", "field_help", "cli_flags",
           "MISSING"]
