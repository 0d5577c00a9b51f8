"""The folders persona-lora writes and reads, and the manifest that makes them self-describing.

An adapter folder is the contract between training, cards, hub tools, merge and the demo: PEFT's own files
(`adapter_config.json`, `adapter_model.safetensors`), the card (`README.md`, `loss.png`), tokenizer files only
where training changed the tokenizer, and `persona_manifest.json`, the provenance of the run. A merged-model
folder is an ordinary transformers model folder with the same manifest (kind "merged", plus a `merge` section).

This module is the one definition of that contract:
- the manifest as typed sections (`Manifest` and the dataclasses below); writers build it from these parts and
  `write_manifest` serialises it; `read_manifest` is the one reader, with one validation policy (every problem of
  a manifest reported at once, naming the file and the field);
- the file names, and the checks "is this an adapter folder", "which kind of folder is this" and "was this
  written by persona-lora" (`require_adapter_files`, `folder_kind`, `is_ours`);
- `schema_markdown()`, from which docs/ARCHITECTURE.md's schema section is generated (a test compares them).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

from persona_lora import __version__
from persona_lora.artifact_preference import PreferenceInfo
from persona_lora.errors import ManifestError, ModelLoadError
from persona_lora.typed_json import from_json, schema_markdown, to_json

log = logging.getLogger(__name__)

MANIFEST_NAME = "persona_manifest.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
CARD_NAME = "README.md"
LOSS_CURVE = "loss.png"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
    "tokenizer.model", "added_tokens.json", "vocab.json", "merges.txt",
)
SCHEMA_PREFIX = "persona-lora/manifest@"
SCHEMA_VERSION = 1
SCHEMA = f"{SCHEMA_PREFIX}{SCHEMA_VERSION}"
KINDS = ("adapter", "merged")  # a new kind of artifact is one more entry here and a card template
LIBRARIES = ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "safetensors", "tokenizers",
             "huggingface_hub")


def _f(default: Any = None, help: str = "", **meta):
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **meta})
    if isinstance(default, type):  # a section that is always present: its empty instance
        return field(default_factory=default, metadata={"help": help, **meta})
    return field(default=default, metadata={"help": help, **meta})


def _required(help: str):
    return field(metadata={"help": help})


# ------------------------------------------------------------------------------------------------ sections


@dataclass
class BaseModelInfo:
    """The base model the adapter was trained on (for a merged folder: the adapter's base)."""

    id: str = _required("hub id, or the folder's name for a local base (never an absolute path)")
    source: str | None = _f(None, "local | hf | modelscope")
    revision: str | None = _f(None, "hub revision asked for")
    config_sha256: str | None = _f(None, "sha256 of the base's config.json: merge, pull and the demo check it")
    model_type: str | None = _f(None, "transformers model_type, e.g. deepseek_v2")
    architectures: list[str] | None = _f(None, "transformers architectures")
    num_parameters: int | None = _f(None, "parameters of the base")
    license: str | None = _f(None, "the base's license from its card, when it has one")


@dataclass
class TokenStats:
    """Token counts of the encoded examples, through the one formatting path."""

    total: int | None = _f(None, "tokens of all kept examples")
    trained: int | None = _f(None, "tokens with a label (assistant answers and their EOS)")
    train_split: int | None = _f(None, "tokens of the training split")
    mean_length: float | None = _f(None, "mean tokens per example")
    max_length: int | None = _f(None, "longest example in tokens")


@dataclass
class DatasetStats:
    """What became of the records: nothing is dropped or truncated without being counted here."""

    records: int | None = _f(None, "records read (of the file, and of the eval file when one was given)")
    kept: int | None = _f(None, "records encoded into examples")
    dropped: dict[str, int] = _f({}, "records dropped, by reason")
    truncated: int | None = _f(None, "examples cut from the left of the prompt to fit max_length")
    train_examples: int | None = _f(None, "examples in the training split")
    eval_examples: int | None = _f(None, "examples held out for eval loss")
    tokens: TokenStats | None = _f(None, "token counts")


@dataclass
class ExtractionInfo:
    """How the training file was made from a script or novel (`data extract` + `data build`): its DATA.card.md."""

    source: str | None = _f(None, "the script or novel's file name")
    source_sha256: str | None = _f(None, "sha256 of the script or novel's bytes")
    extractor: str | None = _f(None, "script | novel")
    model: str | None = _f(None, "novel: the model that extracted the dialogue")
    prompt_version: str | None = _f(None, "novel: the extraction prompt's version")
    character: str | None = _f(None, "the character whose lines are the answers")
    card: str | None = _f(None, "the data card's file name (DATA.card.md)")


@dataclass
class EvalFileInfo:
    """The held-out records' own file (`data.eval_path`, e.g. the DATA.eval.json `data build` splits off by scene)."""

    name: str | None = _f(None, "file name or hub id (never an absolute path)")
    source: str | None = _f(None, "local | hub")
    sha256: str | None = _f(None, "sha256 of the file bytes (hub: of the canonical JSON of the rows)")
    records: int | None = _f(None, "records in the file")
    also_in_training: int | None = _f(None, "of them, records also in the training file (a scene split has none)")


@dataclass
class DatasetInfo:
    """The training data."""

    name: str | None = _f(None, "file name or hub id (never an absolute path)")
    source: str | None = _f(None, "local | hub")
    hub_id: str | None = _f(None, "hub dataset id")
    sha256: str | None = _f(None, "sha256 of the file bytes (hub: of the canonical JSON of the rows)")
    license: str | None = _f(None, "dataset license, when known")
    language: list[str] = _f([], "dataset languages, for the card")
    stats: DatasetStats | None = _f(None, "counts")
    extraction: ExtractionInfo | None = _f(None, "made by `data extract` + `data build`: from what, how")
    eval_file: EvalFileInfo | None = _f(None, "the held-out records' own file, when training took one")


@dataclass
class ChatInfo:
    """How conversations became tokens; inference and the demo format prompts exactly this way."""

    system_prompt: str | None = _f(None, "system prompt put before records without their own")
    chat_template: str | None = _f(None, "the Jinja chat template used")
    template_source: str | None = _f(None, "base (the base tokenizer's) | file (given with --chat-template)")
    train_on: str | None = _f(None, "all | last: which assistant turns were trained")
    overlong: str | None = _f(None, "truncate | drop")
    max_length: int | None = _f(None, "maximum tokens per example")


@dataclass
class CoverageRow:
    """One coverage group (attention, dense MLP, shared experts, routed experts, …)."""

    group: str = _required("coverage group")
    asked: bool | None = _f(None, "the preset asked for it")
    applied: bool | None = _f(None, "LoRA was attached to it")
    modules: int | None = _f(None, "adapted modules (or fused expert tensors)")
    params: int | None = _f(None, "LoRA parameters in the group")


@dataclass
class LoraInfo:
    """The LoRA asked for and the LoRA applied (they must be equal; the trainer checks)."""

    preset: str | None = _f(None, "coverage preset: attention | attention+mlp | all")
    asked_target_modules: list[str] | None = _f(None, "explicit leaf names asked instead of a preset")
    r: int | None = _f(None, "rank")
    alpha: int | None = _f(None, "alpha (scaling = alpha / r)")
    dropout: float | None = _f(None, "dropout asked for")
    dropout_note: str | None = _f(None, "where dropout could not be applied, and why")
    coverage: list[CoverageRow] = _f([], "per group: asked, applied, modules, parameters")
    target_modules: list[str] = _f([], "full names of the adapted linear modules")
    target_parameters: list[str] = _f([], "fused expert parameters adapted (PEFT target_parameters)")
    trainable_params: int | None = _f(None, "trainable (LoRA) parameters")
    total_params: int | None = _f(None, "all parameters of the adapted model")


@dataclass
class TrainingInfo:
    """Every hyperparameter of the run."""

    learning_rate: float | None = _f(None, "peak learning rate")
    lr_scheduler: str | None = _f(None, "schedule name")
    warmup_ratio: float | None = _f(None, "warmup fraction")
    weight_decay: float | None = _f(None, "AdamW weight decay")
    max_grad_norm: float | None = _f(None, "gradient clipping norm")
    epochs: float | None = _f(None, "passes over the data")
    max_steps: int | None = _f(None, "optimizer step limit (-1: none)")
    per_device_batch_size: int | None = _f(None, "examples per device per step")
    gradient_accumulation_steps: int | None = _f(None, "micro-batches per optimizer step")
    effective_batch_size: int | None = _f(None, "examples per optimizer step over all devices")
    max_length: int | None = _f(None, "maximum tokens per example")
    seed: int | None = _f(None, "seed for init, shuffling and the eval split")
    dtype: str | None = _f(None, "weights dtype")
    device: str | None = _f(None, "device trained on")
    load_in_4bit: bool | None = _f(None, "QLoRA (4-bit base)")
    gradient_checkpointing: bool | None = _f(None, "activation checkpointing")
    eval_fraction: float | None = _f(None, "fraction held out for eval loss")
    group_by_length: bool | None = _f(None, "length-grouped batches")
    packing: bool | None = _f(None, "padding-free packing")
    batch_order: str | None = _f(None, "how batches are formed: length buckets | random | sequential | packed")
    world_size: int | None = _f(None, "processes (data parallel, or FSDP with the base sharded: see sharding)")
    sharding: str | None = _f(None, "how the base was split across the processes: none | fsdp2 per decoder layer")


@dataclass
class HistoryEntry:
    """One logged point: a train entry carries `loss`, an eval entry `eval_loss`."""

    step: int | None = _f(None, "optimizer step", omit_none=True)
    epoch: float | None = _f(None, "epoch", omit_none=True)
    loss: float | None = _f(None, "train loss", omit_none=True)
    eval_loss: float | None = _f(None, "eval loss", omit_none=True)
    learning_rate: float | None = _f(None, "learning rate", omit_none=True)
    grad_norm: float | None = _f(None, "gradient norm", omit_none=True)


@dataclass
class Metrics:
    """Losses over the run."""

    history: list[HistoryEntry] = _f([], "train and eval loss per logged step")
    final_train_loss: float | None = _f(None, "last train loss")
    first_train_loss: float | None = _f(None, "first train loss")
    final_eval_loss: float | None = _f(None, "last eval loss")
    best_eval_loss: float | None = _f(None, "lowest eval loss")
    steps: int | None = _f(None, "optimizer steps done")


@dataclass
class Sample:
    """A greedy answer of the base and of the adapter to a held-out prompt, recorded at the end of training."""

    prompt: str = _required("the user turn")
    base: str | None = _f(None, "the base model's answer")
    adapter: str | None = _f(None, "the adapter's answer")


@dataclass
class EnvironmentInfo:
    """Where the run happened."""

    python: str | None = _f(None, "Python version")
    platform: str | None = _f(None, "OS and machine")
    hardware: str | None = _f(None, "CPU cores or GPUs")
    libraries: dict[str, str] = _f({}, "versions of the libraries that shape the result")


@dataclass
class RunInfo:
    """How the run went: its state, time and throughput, and what changed when it was resumed."""

    state: str | None = _f(None, "running (written before the first step) | interrupted | finished")
    wall_time_s: float | None = _f(None, "time in the training loop")
    total_wall_time_s: float | None = _f(None, "time of the whole command")
    trained_tokens: int | None = _f(None, "non-padding tokens seen in training")
    tokens_per_second: float | None = _f(None, "trained_tokens / wall_time_s")
    eval_time_s: float | None = _f(None, "of wall_time_s, the eval passes")
    step_tokens_per_second: float | None = _f(None, "trained_tokens / (wall_time_s - eval_time_s): the training "
                                                     "steps alone")
    resumed: bool | None = _f(None, "continued from a checkpoint")
    interrupted: bool | None = _f(None, "stopped early by Ctrl-C: the weights are from the last step reached")
    planned_steps: int | None = _f(None, "optimizer steps the run was scheduled for (metrics.steps of them done)",
                                   omit_none=True)
    changes: list[str] = _f([], "settings changed when the run was resumed (--allow-changes), with the step")

    @property
    def finished(self) -> bool:
        """A run that ran to its end (manifests written before `state` existed: final and not interrupted)."""
        return self.state == "finished" or (self.state is None and self.wall_time_s is not None
                                            and not self.interrupted)


@dataclass
class FilesInfo:
    """Extra files of the folder."""

    loss_curve: str | None = _f(None, "the loss curve image, a file name inside the folder", omit_none=True)


@dataclass
class MergeBase:
    """The base the weights were actually merged into."""

    id: str | None = _f(None, "hub id or folder name")
    source: str | None = _f(None, "local | hf | modelscope")
    revision: str | None = _f(None, "hub revision")
    config_sha256: str | None = _f(None, "sha256 of its config.json")


@dataclass
class MergeInfo:
    """How a merged folder was made (kind "merged" only)."""

    adapter: str | None = _f(None, "the merged adapter: its hub id when pulled, else its name")
    dtype: str | None = _f(None, "dtype of the merged weights")
    layout: str | None = _f(None, "checkpoint layout, the base's: original per-expert | fused (transformers 5)")
    base: MergeBase | None = _f(None, "the base merged into")
    forced_base_mismatch: bool | None = _f(None, "merged with --force into a base of another config")
    lora_layers: int | None = _f(None, "LoRA layers merged")
    tensors_changed: int | None = _f(None, "checkpoint tensors changed")
    created_at: str | None = _f(None, "when the merge ran (UTC)")


@dataclass
class Manifest:
    """`persona_manifest.json`: the provenance of an adapter (or merged) folder."""

    kind: str = _required(f"what the folder holds: {' | '.join(KINDS)}")
    name: str = _required("the artifact's name (the output folder's by default)")
    base_model: BaseModelInfo = _required("the base model")
    schema: str = _f(SCHEMA, f"format version, {SCHEMA!r}")
    created_at: str | None = _f(None, "when it was written (UTC, ISO 8601)")
    persona_lora_version: str | None = _f(None, "the persona-lora that wrote it")
    license: str | None = _f(None, "the adapter's license (default: the base's)")
    dataset: DatasetInfo | None = _f(None, "training data")
    chat: ChatInfo | None = _f(None, "prompt formatting")
    lora: LoraInfo | None = _f(None, "LoRA asked and applied")
    training: TrainingInfo | None = _f(None, "hyperparameters")
    metrics: Metrics | None = _f(None, "losses")
    samples: list[Sample] = _f([], "base vs adapter answers on held-out prompts")
    environment: EnvironmentInfo | None = _f(None, "python, platform, hardware, library versions")
    run: RunInfo | None = _f(None, "time and throughput")
    files: FilesInfo = _f(FilesInfo, "extra files")
    merge: MergeInfo | None = _f(None, "merge details (kind merged)")
    preference: PreferenceInfo | None = _f(None, "preference tuning (dpo, kto): method, reference, lineage, data")
    config: dict[str, Any] | None = _f(None, "the resolved training config the run used (every section and key; "
                                             "local paths reduced to names), so it can be run again")

    def interrupted_at(self) -> str | None:
        """`interrupted at step 32 of 220` for a run stopped by Ctrl-C (None otherwise): the card's first lines and
        the demo's info line say it in these words, so an unfinished adapter is never taken for a finished one."""
        if self.run is None or not (self.run.interrupted or self.run.state == "interrupted"):
            return None
        done = self.metrics.steps if self.metrics is not None else None
        planned = self.run.planned_steps or (self.training.max_steps if self.training is not None
                                             and (self.training.max_steps or 0) > 0 else None)
        if done is None:
            return "interrupted"
        return f"interrupted at step {done}" + (f" of {planned}" if planned else "")

    def to_dict(self) -> dict:
        """The JSON object written to disk (and what cards render after scrubbing)."""
        out = to_json(self)
        return {"schema": out.pop("schema"), **out}  # the format version first, as a reader looks for it


# ------------------------------------------------------------------------------------------------ read / write


def manifest_path(folder: str | Path) -> Path:
    return Path(folder) / MANIFEST_NAME


def parse_manifest(data: Any, path: Path) -> Manifest:
    """Check a parsed manifest against the types above; every problem at once, naming `path` and the field."""
    problems: list[str] = []
    unknown: list[str] = []
    if not isinstance(data, dict):
        raise ManifestError(f"{path}: expected a JSON object, found {type(data).__name__}; restore it or train again")
    schema = data.get("schema")
    if isinstance(schema, str) and schema.startswith(SCHEMA_PREFIX) and schema != SCHEMA:
        raise ManifestError(f"{path} has schema {schema!r}; this persona-lora ({__version__}) reads {SCHEMA!r}: "
                            "upgrade persona-lora to read it")
    if schema != SCHEMA:
        problems.append(f'"schema" is {schema!r}, expected "{SCHEMA}"')
    if data.get("kind") not in KINDS:
        problems.append(f'"kind" is {data.get("kind")!r}, expected {" or ".join(repr(k) for k in KINDS)}')
    manifest = from_json(Manifest, data, "", problems, unknown)
    if manifest is not None and manifest.base_model is not None and not manifest.base_model.id.strip():
        problems.append('"base_model.id" is empty: the folder cannot say what it was trained on')
    if problems:
        raise ManifestError(f"{path}: invalid persona-lora manifest:" + "".join(f"\n  - {p}" for p in problems)
                            + "\nRestore the file from the run folder (or the hub), or train again to write it.")
    if unknown:
        log.warning("%s: ignoring fields this persona-lora does not know: %s", path, ", ".join(unknown))
    return manifest


def read_manifest(folder: str | Path) -> Manifest:
    """The folder's manifest, validated; `ManifestError` naming the file and the fix otherwise."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ManifestError(f"{folder}: no such folder; give the folder `persona-lora train` or `merge` wrote")
    path = manifest_path(folder)
    if not path.is_file():
        raise ManifestError(
            f"{path} is missing: this folder was not written by `persona-lora train`/`merge` (or the file was "
            "deleted); train again, or pull the adapter again"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ManifestError(f"{path}: not UTF-8 text ({e.reason}); restore it from the run folder or train again") \
            from None
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path}: corrupt JSON (line {e.lineno}, column {e.colno}: {e.msg}); restore it from the "
                            "run folder or train again") from None
    except OSError as e:
        raise ManifestError(f"{path}: cannot be read ({e.strerror}); check its permissions") from None
    return parse_manifest(data, path)


def write_manifest(folder: str | Path, manifest: Manifest) -> Path:
    """Write atomically (a temporary sibling, then a rename): a reader never sees half a manifest."""
    path = manifest_path(folder)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def is_ours(folder: str | Path) -> bool:
    """Whether `folder` holds a manifest persona-lora wrote (readable, of our schema). The one test used before
    anything replaces or trusts a folder as one of ours."""
    try:
        read_manifest(folder)
    except ManifestError:
        return False
    return True


# ------------------------------------------------------------------------------------------------ folder kinds


def require_adapter_files(folder: str | Path) -> Path:
    """`folder` as a Path once it holds PEFT's two files (safetensors only); `ModelLoadError` naming what is
    missing otherwise."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelLoadError(f"{folder} is not a folder; give the adapter folder `persona-lora train` wrote")
    if not (folder / ADAPTER_CONFIG).is_file():
        raise ModelLoadError(f"{folder} is not an adapter folder: {ADAPTER_CONFIG} is missing")
    if not (folder / ADAPTER_WEIGHTS).is_file():
        pickled = " (pickled adapter_model.bin is not accepted: re-save it with safetensors)" if (
            folder / "adapter_model.bin").exists() else ""
        raise ModelLoadError(f"{folder} is not an adapter folder: {ADAPTER_WEIGHTS} is missing{pickled}")
    return folder


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def is_pickle(path: str) -> bool:
    """A file whose loading runs code (torch/pickle formats): never pushed or pulled unless named, never loaded."""
    return PurePosixPath(path).suffix.lower() in PICKLE_SUFFIXES


def folder_kind(folder: str | Path) -> str:
    """'adapter' (PEFT files) or 'model' (transformers folder: config.json + *.safetensors); else ModelLoadError."""
    folder = Path(folder)
    if (folder / ADAPTER_CONFIG).is_file():
        return "adapter"
    if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
        return "model"
    pickled = sorted(p.name for p in folder.iterdir() if p.is_file() and is_pickle(p.name)) if folder.is_dir() else []
    hint = (f" It only has pickled weights ({', '.join(pickled)}): re-save with "
            "save_pretrained(..., safe_serialization=True).") if pickled else ""
    raise ModelLoadError(
        f"{folder} is neither an adapter folder (no {ADAPTER_CONFIG}) nor a model folder (config.json + "
        f"*.safetensors); give the folder `persona-lora train` or `merge` wrote.{hint}"
    )


def read_adapter_config(folder: str | Path) -> dict | None:
    """PEFT's `adapter_config.json` as a dict (None when the folder has none, as merged folders do)."""
    path = Path(folder) / ADAPTER_CONFIG
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path}: corrupt ({e}); PEFT cannot load this adapter either. Restore the file from "
                             "the run folder or pull the adapter again.") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object; restore it from the run folder.")
    return data


def write_adapter_config(folder: str | Path, config: dict) -> Path:
    """Write PEFT's adapter_config.json as PEFT writes it (sorted keys, indent 2), atomically."""
    path = Path(folder) / ADAPTER_CONFIG
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------------------------------------ provenance


def now_iso() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def environment() -> EnvironmentInfo:
    """Library versions and hardware of this process."""
    from importlib.metadata import PackageNotFoundError, version

    libs = {}
    for name in LIBRARIES:
        try:
            libs[name] = version(name)
        except PackageNotFoundError:
            pass
    import torch

    if torch.cuda.is_available():
        hardware = f"{torch.cuda.device_count()}× {torch.cuda.get_device_name(0)}"
    else:
        hardware = f"CPU ({os.cpu_count()} cores)"
    return EnvironmentInfo(python=sys.version.split()[0], platform=f"{platform.system()}-{platform.machine()}",
                           hardware=hardware, libraries=libs)


SCHEMA_DOC_START = "<!-- manifest-schema:start (generated by `make schema-docs`; do not edit) -->"
SCHEMA_DOC_END = "<!-- manifest-schema:end -->"


def schema_doc() -> str:
    """The schema section of docs/ARCHITECTURE.md, generated from the types above."""
    title = (f"Schema `{SCHEMA}`, generated from `persona_lora/artifact.py`. Fields not marked required may be "
             "absent or null; readers treat both as unknown.")
    return schema_markdown(Manifest, title)


def with_schema_doc(text: str) -> str:
    """`text` (a markdown document) with the part between the schema markers replaced by `schema_doc()`."""
    start, end = text.index(SCHEMA_DOC_START), text.index(SCHEMA_DOC_END)
    return text[: start + len(SCHEMA_DOC_START)] + "\n" + schema_doc() + text[end:]


def write_schema_doc(path: str | Path) -> None:
    """Regenerate the schema section of the document at `path` (`make schema-docs`)."""
    path = Path(path)
    path.write_text(with_schema_doc(path.read_text(encoding="utf-8")), encoding="utf-8")


def adapter_model_type(folder: Path, base_dir: Path | None = None) -> str | None:
    """The base's model_type, from the adapter's manifest or else from a base config folder."""
    if (folder / MANIFEST_NAME).is_file():
        model_type = read_manifest(folder).base_model.model_type
        if model_type:
            return model_type
    if base_dir is not None:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(base_dir).model_type
    return None
