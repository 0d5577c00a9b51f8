"""The manifest of a finished (or interrupted) training run, built from the run's typed parts.

Cards, hub tools, merge and the demo read only the manifest (and PEFT's own files), so everything they say
about a run comes from here: base, data and what became of it, formatting, LoRA asked and applied, every
hyperparameter, losses, samples, library versions, time.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

from persona_lora import __version__
from persona_lora.artifact import (
    BaseModelInfo,
    ChatInfo,
    CoverageRow,
    DatasetInfo,
    EvalFileInfo,
    FilesInfo,
    HistoryEntry,
    LoraInfo,
    Manifest,
    Metrics,
    RunInfo,
    Sample,
    TrainingInfo,
    environment,
    now_iso,
)
from persona_lora.train.config import TrainConfig
from persona_lora.train.data.data_card import extraction_info

if TYPE_CHECKING:
    from persona_lora.train.model_setup import AdaptedModel
    from persona_lora.train.prepare import PreparedData
    from persona_lora.train.steps import RunSetup, TrainResult

HISTORY_KEYS = ("step", "epoch", "loss", "eval_loss", "learning_rate", "grad_norm")


def metrics_from_history(history: list[dict]) -> Metrics:
    """Trainer's log history -> train/eval loss points and the summary figures."""
    rows = []
    for h in history:
        row = {k: h[k] for k in HISTORY_KEYS if k in h}
        if "loss" in row or "eval_loss" in row:
            rows.append(HistoryEntry(**row))
    train = [r.loss for r in rows if r.loss is not None]
    evals = [r.eval_loss for r in rows if r.eval_loss is not None]
    return Metrics(
        history=rows,
        final_train_loss=train[-1] if train else None,
        first_train_loss=train[0] if train else None,
        final_eval_loss=evals[-1] if evals else None,
        best_eval_loss=min(evals) if evals else None,
        # the last step run: every run logs its last step, and Trainer's closing summary row carries it too
        steps=max((h["step"] for h in history if isinstance(h.get("step"), int)), default=0),
    )


def base_model_info(setup: RunSetup, num_parameters: int) -> BaseModelInfo:
    rb = setup.base
    model_type = architectures = license_ = None
    try:
        bc = json.loads((rb.path / "config.json").read_text())
        model_type, architectures = bc.get("model_type"), bc.get("architectures")
        license_ = _base_license(rb.path)
    except (OSError, ValueError):
        pass
    return BaseModelInfo(id=rb.id, source=rb.source, revision=rb.revision, config_sha256=rb.config_sha256,
                         model_type=model_type, architectures=architectures, num_parameters=num_parameters,
                         license=license_)


def build_manifest(cfg: TrainConfig, setup: RunSetup, data: PreparedData, model: AdaptedModel,
                   result: TrainResult | None, samples: list[Sample], out: Path,
                   changes: list[str] | None = None) -> Manifest:
    """The run's manifest; with `result` None, the one written before the first step (state "running"), which
    makes the folder recognisably ours and lets a resume compare its settings."""
    from persona_lora.train.length_batches import batch_order  # imports torch: not at module level

    t = cfg.training
    base = base_model_info(setup, model.total - model.trainable)
    metrics = metrics_from_history(result.history) if result is not None else None
    loaded = data.loaded
    if result is None:
        run = RunInfo(state="running", changes=list(changes or []))
    else:
        run = RunInfo(
            state="interrupted" if result.interrupted else "finished",
            wall_time_s=round(result.wall_time_s, 2),
            trained_tokens=result.tokens,
            tokens_per_second=round(result.tokens / result.wall_time_s, 1) if result.wall_time_s > 0 else None,
            eval_time_s=round(result.eval_time_s, 2),
            step_tokens_per_second=(round(result.tokens / (result.wall_time_s - result.eval_time_s), 1)
                                    if result.wall_time_s > result.eval_time_s else None),
            resumed=result.resumed,
            interrupted=result.interrupted,
            planned_steps=result.planned_steps,
            changes=list(changes or []),
        )
    world_size = result.world_size if result is not None else setup.world_size
    config = cfg.to_dict()  # as run, but without this machine's paths: the manifest is published with the adapter
    config["base"]["model"] = setup.base.id
    config["data"]["path"] = getattr(loaded, "hub_id", None) or loaded.name
    held = data.eval_loaded
    if held is not None:
        config["data"]["eval_path"] = getattr(held, "hub_id", None) or held.name
    config["training"]["output_dir"] = out.name
    if config["base"]["chat_template"]:
        config["base"]["chat_template"] = Path(config["base"]["chat_template"]).name
    for key in ("resume", "overwrite", "allow_changes"):  # how this invocation treated the folder, not the run
        config["training"].pop(key, None)
    return Manifest(
        kind="adapter",
        name=cfg.name or out.resolve().name,
        created_at=now_iso(),
        persona_lora_version=__version__,
        license=cfg.license or base.license,
        base_model=base,
        dataset=DatasetInfo(name=loaded.name, source=loaded.source, hub_id=getattr(loaded, "hub_id", None),
                            sha256=loaded.sha256, license=None, language=list(cfg.data.language), stats=data.stats,
                            extraction=extraction_info(getattr(loaded, "path", None), loaded.sha256),
                            eval_file=None if held is None else EvalFileInfo(
                                name=getattr(held, "hub_id", None) or held.name, source=held.source,
                                sha256=held.sha256, records=len(held.records),
                                also_in_training=data.also_in_training)),
        chat=ChatInfo(system_prompt=cfg.data.system_prompt, chat_template=setup.tokenizer.chat_template,
                      template_source=setup.template_source, train_on=cfg.data.train_on,
                      overlong=cfg.data.overlong, max_length=cfg.data.max_length),
        lora=LoraInfo(
            preset=cfg.lora.preset, asked_target_modules=cfg.lora.target_modules, r=cfg.lora.r, alpha=cfg.lora.alpha,
            dropout=cfg.lora.dropout, dropout_note=model.dropout_note,
            coverage=[CoverageRow(**{k: v for k, v in row.items() if k != "names"}) for row in model.coverage],
            target_modules=model.spec.target_modules, target_parameters=model.spec.target_parameters,
            trainable_params=model.trainable, total_params=model.total,
        ),
        training=TrainingInfo(
            learning_rate=t.learning_rate, lr_scheduler=t.lr_scheduler, warmup_ratio=t.warmup_ratio,
            weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm, epochs=t.epochs, max_steps=t.max_steps,
            per_device_batch_size=t.batch_size, gradient_accumulation_steps=t.gradient_accumulation_steps,
            effective_batch_size=t.batch_size * t.gradient_accumulation_steps * world_size,
            max_length=cfg.data.max_length, seed=t.seed, dtype=str(setup.dtype).replace("torch.", ""),
            device=setup.device, load_in_4bit=cfg.base.load_in_4bit,
            gradient_checkpointing=setup.gradient_checkpointing, eval_fraction=cfg.data.eval_fraction,
            group_by_length=t.group_by_length, packing=t.packing, world_size=world_size,
            batch_order=batch_order(t),
        ),
        metrics=metrics,
        samples=samples,
        environment=environment(),
        run=run,
        files=FilesInfo(loss_curve="loss.png" if metrics is not None and metrics.history else None),
        config=config,
    )


# What defines a run: resuming with any of these changed trains a different run than the manifest would describe.
RUN_DEFINING = (
    "base_model.config_sha256", "dataset.sha256", "dataset.eval_file.sha256", "chat.system_prompt",
    "chat.chat_template", "chat.train_on",
    "chat.overlong", "chat.max_length", "lora.preset", "lora.asked_target_modules", "lora.r", "lora.alpha",
    "lora.dropout", "training.learning_rate", "training.lr_scheduler", "training.warmup_ratio",
    "training.weight_decay", "training.max_grad_norm", "training.epochs", "training.max_steps",
    "training.per_device_batch_size", "training.gradient_accumulation_steps", "training.seed", "training.dtype",
    "training.eval_fraction", "training.group_by_length", "training.packing", "training.world_size",
    "training.batch_order",
)


def run_changes(previous: Manifest, current: Manifest) -> list[str]:
    """`path: old -> new` for every run-defining setting that differs between two manifests of one run."""
    old, new = previous.to_dict(), current.to_dict()
    out = []
    for path in RUN_DEFINING:
        a, b = _lookup(old, path), _lookup(new, path)
        if a is not None and a != b:
            out.append(f"{path}: {' -> '.join(_shown(a, b))}")
    return out


def _shown(a, b) -> tuple[str, str]:
    """Both values as a change line shows them: short ones whole; long texts (a system prompt, a chat template) by
    length and the few characters from where they first differ, so the line says what changed."""
    if not (isinstance(a, str) and isinstance(b, str)) or max(len(a), len(b)) <= 60:
        return repr(a), repr(b)
    if all(re.fullmatch(r"[0-9a-f]{64}", v) for v in (a, b)):  # a sha256 (data, base config): its first digits
        return f"sha256 {a[:12]}…", f"sha256 {b[:12]}…"
    at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    start = max(at - 10, 0)

    def part(text: str) -> str:
        piece = text[start:start + 30]
        return (f"({len(text)} chars; from char {at + 1}: {'…' if start else ''}{piece!r}"
                f"{'…' if start + 30 < len(text) else ''})")

    return part(a), part(b)


def _lookup(d: dict, path: str):
    for key in path.split("."):
        d = d.get(key) if isinstance(d, dict) else None
    return d


def _base_license(path: Path) -> str | None:
    """The base's license from its README's YAML header, when it has one."""
    readme = path / "README.md"
    if not readme.is_file():
        return None
    try:
        from huggingface_hub import ModelCard

        return ModelCard.load(readme).data.to_dict().get("license")
    except Exception:  # a README without a YAML header is normal
        return None
