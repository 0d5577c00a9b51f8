"""Train a LoRA adapter and write the adapter folder (PEFT files + manifest + card).

We use transformers' `Trainer` rather than TRL's `SFTTrainer`: our formatting path already yields
`input_ids`/`labels` (multi-turn masks included) and SFTTrainer would only re-derive them; Trainer gives us
checkpoints, resume, length-grouped batches, eval, gradient accumulation, TensorBoard and `accelerate launch`
data parallelism as they are. Steps, in order: check the output folder -> tokenizer -> data (validate, split,
encode, report drops/truncations) -> model + LoRA (coverage checked) -> train (Ctrl-C saves a checkpoint) ->
save adapter -> sample answers -> manifest -> card.
"""

from __future__ import annotations

import logging
import math
import os
import random
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from persona_lora import __version__
from persona_lora.errors import ConfigError, DataError, UsageError
from persona_lora.train import presets
from persona_lora.train.adapters import attach_new_adapter, native_targets
from persona_lora.train.chat_format import IGNORE_INDEX, conversation_for, encode_examples, encode_prompt, require_chat_template
from persona_lora.train.config import TrainConfig
from persona_lora.train.manifest import MANIFEST_NAME, SCHEMA, environment, now_iso, write_manifest
from persona_lora.train.model_loading import ResolvedBase, load_base_model, load_tokenizer, parse_dtype, resolve_base

log = logging.getLogger(__name__)
CHECKPOINTS = "checkpoints"
LOGS = "logs"
OUR_MARKERS = (MANIFEST_NAME, "adapter_config.json", CHECKPOINTS)


@dataclass
class PreparedData:
    train: list  # list[Encoded]
    eval: list
    eval_conversations: list[list[dict]]
    train_conversations: list[list[dict]]
    stats: dict
    loaded: object  # LoadedDataset


@dataclass
class RunState:
    interrupted: bool = False
    tokens_at_start: int = 0
    tokens_at_end: int = 0
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- output folder


def prepare_output_dir(cfg: TrainConfig) -> tuple[Path, Path | None]:
    """Return (output_dir, checkpoint to resume or None); never silently overwrite anything."""
    out = Path(cfg.training.output_dir)
    ckpt = latest_checkpoint(out)
    resume = cfg.training.resume
    if resume == "true" and ckpt is None:
        raise UsageError(f"--resume: no checkpoint found in {out / CHECKPOINTS}; start without --resume")
    if resume in ("true", "auto") and ckpt is not None:
        return out, ckpt
    if out.exists() and any(out.iterdir()):
        if not cfg.training.overwrite:
            raise UsageError(
                f"output folder {out} exists and is not empty; pass --overwrite to replace it, "
                f"--resume to continue its latest checkpoint, or choose another --output-dir"
            )
        if not any((out / m).exists() for m in OUR_MARKERS):
            raise UsageError(f"--overwrite refused: {out} does not look like a persona-lora run folder (no {MANIFEST_NAME}, adapter or checkpoints); remove it yourself if you mean it")
        log.warning("--overwrite: removing %s", out)
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out, None


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint (Trainer writes trainer_state.json last)."""
    root = out / CHECKPOINTS
    if not root.is_dir():
        return None
    done = [p for p in root.glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
    return max(done, key=lambda p: int(p.name.split("-")[-1]), default=None)


# ---------------------------------------------------------------- data


def prepare_data(cfg: TrainConfig, tokenizer) -> PreparedData:
    """Load, validate, split (seeded) and encode; drops and truncations are counted, never silent."""
    from persona_lora.train.data import load_records

    loaded = load_records(cfg.data.path, revision=cfg.data.revision)
    convs = [conversation_for(r["messages"], cfg.data.system_prompt) for r in loaded.records]
    order = list(range(len(convs)))
    random.Random(cfg.training.seed).shuffle(order)
    n_eval = int(round(len(convs) * cfg.data.eval_fraction)) if cfg.data.eval_fraction > 0 else 0
    if cfg.data.eval_fraction > 0 and len(convs) >= 2:
        n_eval = max(1, min(n_eval, len(convs) - 1))
    eval_idx, train_idx = sorted(order[:n_eval]), sorted(order[n_eval:])
    encoded = encode_examples(tokenizer, convs, max_length=cfg.data.max_length, train_on=cfg.data.train_on, overlong=cfg.data.overlong)
    dropped: dict[str, int] = {}
    reason = (
        f"longer than max_length={cfg.data.max_length} (overlong: drop)"
        if cfg.data.overlong == "drop"
        else f"final answer + EOS alone exceeds max_length={cfg.data.max_length}"
    )
    for i, enc in enumerate(encoded):
        if enc is None:
            dropped[reason] = dropped.get(reason, 0) + 1
            log.warning("record %s dropped: %s", loaded.records[i].get("origin", i), reason)
    train = [encoded[i] for i in train_idx if encoded[i] is not None]
    evals = [encoded[i] for i in eval_idx if encoded[i] is not None]
    if not train:
        raise DataError(f"no training examples left after formatting ({sum(dropped.values())} dropped: {reason}); raise data.max_length", loaded.name)
    kept = [e for e in encoded if e is not None]
    lengths = [len(e.input_ids) for e in kept]
    stats = {
        "records": len(convs),
        "kept": len(kept),
        "dropped": dropped,
        "truncated": sum(e.truncated for e in kept),
        "train_examples": len(train),
        "eval_examples": len(evals),
        "tokens": {
            "total": sum(lengths),
            "trained": sum(sum(1 for t in e.labels if t != IGNORE_INDEX) for e in kept),
            "train_split": sum(len(e.input_ids) for e in train),
            "mean_length": round(sum(lengths) / len(lengths), 1),
            "max_length": max(lengths),
        },
    }
    if stats["truncated"]:
        log.warning("%d example(s) truncated from the left of the prompt to fit max_length=%d (answers and EOS kept)", stats["truncated"], cfg.data.max_length)
    return PreparedData(train, evals, [convs[i] for i in eval_idx], [convs[i] for i in train_idx], stats, loaded)


# ---------------------------------------------------------------- model


def use_gradient_checkpointing(cfg: TrainConfig, device: str) -> bool:
    if cfg.training.gradient_checkpointing == "auto":
        return device.startswith("cuda")
    return cfg.training.gradient_checkpointing == "true"


def resolve_device(cfg: TrainConfig) -> str:
    import torch

    if cfg.base.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.base.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"base.device {cfg.base.device!r} but no CUDA device is available; use auto or cpu")
    return cfg.base.device


def check_packing(cfg: TrainConfig, device: str) -> None:
    """Packing puts several examples in one row; only flash-attention separates them by position_ids. With SDPA
    (measured here on the tiny DeepSeek-V2) the second example's logits differ by ~6 from its unpacked logits:
    the examples attend to each other. So packing is refused unless flash-attention 2 will be used."""
    from persona_lora.train.model_loading import attention_implementation

    if cfg.training.packing and not (device.startswith("cuda") and attention_implementation() == "flash_attention_2"):
        raise UsageError(
            "training.packing needs flash-attention 2 on a CUDA GPU (pip install flash-attn): with SDPA the packed "
            "examples would attend to each other; set training.packing: false (length-grouped batches cut padding instead)"
        )


def build_peft_model(cfg: TrainConfig, rb: ResolvedBase, device: str, *, meta: bool = False):
    """Base model + LoRA with the asked coverage. `meta=True` builds on the meta device (no weights) for dry runs."""
    import torch

    if meta:
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(rb.path, trust_remote_code=cfg.base.trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.base.trust_remote_code)
    else:
        model = load_base_model(rb, dtype=cfg.base.dtype, device=device, load_in_4bit=cfg.base.load_in_4bit, trust_remote_code=cfg.base.trust_remote_code)
    if cfg.base.load_in_4bit and not meta:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=use_gradient_checkpointing(cfg, device), gradient_checkpointing_kwargs={"use_reentrant": False})
    elif use_gradient_checkpointing(cfg, device) and not meta:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.config.use_cache = False
    spec = presets.resolve(model, cfg.lora.preset, cfg.lora.target_modules)
    lcfg = presets.lora_config_for(spec, r=cfg.lora.r, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout)
    peft_model, note = attach_new_adapter(model, lcfg, dropout=cfg.lora.dropout)
    table = presets.check_coverage(peft_model, spec)
    return peft_model, spec, table, note


def save_adapter(peft_model, out: Path, rb: ResolvedBase) -> None:
    """PEFT's files, with the base recorded by its hub id (never a local absolute path). PEFT's own stub card
    is dropped when there was no card before: ours replaces it right after."""
    had_card = (out / "README.md").exists()
    peft_model.peft_config["default"].base_model_name_or_path = rb.id
    # save_embedding_layers=False: embeddings are never adapted, and "auto" would look the base id up online
    peft_model.save_pretrained(out, save_embedding_layers=False)
    if not had_card:
        (out / "README.md").unlink(missing_ok=True)


def count_params(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


# ---------------------------------------------------------------- trainer pieces


class _StopOnSignal:
    """First Ctrl-C: finish the current step, save a checkpoint, stop cleanly. A second one aborts."""

    def __init__(self, state: RunState):
        self.state = state
        self.previous = None

    def __enter__(self):
        def handler(signum, frame):
            if self.state.interrupted:
                raise KeyboardInterrupt
            self.state.interrupted = True
            log.warning("interrupt received: saving a checkpoint after this step (Ctrl-C again to abort)")

        try:
            self.previous = signal.signal(signal.SIGINT, handler)
        except ValueError:  # not in the main thread
            self.previous = None
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def _callbacks(state: RunState):
    from transformers import TrainerCallback

    class RunCallback(TrainerCallback):
        def on_train_begin(self, args, st, control, **kw):
            state.tokens_at_start = st.num_input_tokens_seen or 0

        def on_step_end(self, args, st, control, **kw):
            if state.interrupted:
                control.should_save = True
                control.should_training_stop = True

        def on_train_end(self, args, st, control, **kw):
            state.tokens_at_end = st.num_input_tokens_seen or 0

    return [RunCallback()]


def training_arguments(cfg: TrainConfig, out: Path, device: str, has_eval: bool, dtype):
    import torch
    from transformers import TrainingArguments

    t = cfg.training
    report = [r for r in t.report_to if r != "none"]
    if "tensorboard" in report:
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(out / LOGS)  # read by transformers TensorBoardCallback
    return TrainingArguments(
        output_dir=str(out / CHECKPOINTS),
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=t.eval_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        report_to=report or "none",
        train_sampling_strategy="group_by_length" if t.group_by_length and not t.packing else "random",
        include_num_input_tokens_seen="non_padding",
        bf16=dtype == torch.bfloat16 and device.startswith("cuda"),
        fp16=dtype == torch.float16 and device.startswith("cuda"),
        use_cpu=device == "cpu",
        remove_unused_columns=False,
        dataloader_num_workers=t.dataloader_workers,
        disable_tqdm=False,
        log_level="warning",
        ddp_find_unused_parameters=False,
    )


def _collator(cfg: TrainConfig, tokenizer, device: str):
    if cfg.training.packing:
        from transformers import DataCollatorWithFlattening

        return DataCollatorWithFlattening()
    from transformers import DataCollatorForSeq2Seq

    return DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=IGNORE_INDEX, pad_to_multiple_of=8 if device.startswith("cuda") else None)


def _to_dataset(examples: list):
    from datasets import Dataset

    return Dataset.from_dict(
        {"input_ids": [e.input_ids for e in examples], "labels": [e.labels for e in examples], "length": [len(e.input_ids) for e in examples]}
    )


# ---------------------------------------------------------------- samples


def generate_greedy(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int) -> list[str]:
    """Greedy answers to each conversation's prompt, formatted by the one formatting path."""
    import torch

    answers = []
    device = next(model.parameters()).device
    for conv in conversations:
        ids = torch.tensor([encode_prompt(tokenizer, conv)], device=device)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        answers.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return answers


def sample_answers(peft_model, tokenizer, conversations: list[list[dict]], n: int, max_new_tokens: int) -> list[dict]:
    """Base vs adapter greedy answers on held-out prompts (the last user turn of each conversation)."""
    prompts = []
    for conv in conversations[:n]:
        last_user = max(i for i, m in enumerate(conv) if m["role"] == "user")
        prompts.append(conv[: last_user + 1])
    if not prompts:
        return []
    peft_model.eval()
    peft_model.config.use_cache = True
    with peft_model.disable_adapter():
        base = generate_greedy(peft_model, tokenizer, prompts, max_new_tokens)
    tuned = generate_greedy(peft_model, tokenizer, prompts, max_new_tokens)
    return [{"prompt": p[-1]["content"], "base": b, "adapter": a} for p, b, a in zip(prompts, base, tuned)]


# ---------------------------------------------------------------- manifest


def metrics_from_history(history: list[dict]) -> dict:
    rows = []
    for h in history:
        row = {k: h[k] for k in ("step", "epoch", "loss", "eval_loss", "learning_rate", "grad_norm") if k in h}
        if "loss" in row or "eval_loss" in row:
            rows.append(row)
    train = [r["loss"] for r in rows if "loss" in r]
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    return {
        "history": rows,
        "final_train_loss": train[-1] if train else None,
        "first_train_loss": train[0] if train else None,
        "final_eval_loss": evals[-1] if evals else None,
        "best_eval_loss": min(evals) if evals else None,
        "steps": max((r["step"] for r in rows), default=0),
    }


def build_manifest(cfg, out, rb, tokenizer, data, spec, table, note, trainable, total, dtype, device, history, samples, wall, tokens, state, world_size, template_source, base_num_params):
    t = cfg.training
    model_type = None
    architectures = None
    license_ = None
    try:
        import json

        bc = json.loads((rb.path / "config.json").read_text())
        model_type, architectures = bc.get("model_type"), bc.get("architectures")
        license_ = _base_license(rb.path)
    except (OSError, ValueError):
        pass
    return {
        "schema": SCHEMA,
        "kind": "adapter",
        "name": cfg.name or out.resolve().name,
        "created_at": now_iso(),
        "persona_lora_version": __version__,
        "license": cfg.license or license_,
        "base_model": {
            "id": rb.id,
            "source": rb.source,
            "revision": rb.revision,
            "config_sha256": rb.config_sha256,
            "model_type": model_type,
            "architectures": architectures,
            "num_parameters": base_num_params,
            "license": license_,
        },
        "dataset": {
            "name": data.loaded.name,
            "source": data.loaded.source,
            "hub_id": getattr(data.loaded, "hub_id", None),
            "sha256": data.loaded.sha256,
            "license": None,
            "language": cfg.data.language,
            "stats": data.stats,
        },
        "chat": {
            "system_prompt": cfg.data.system_prompt,
            "chat_template": tokenizer.chat_template,
            "template_source": template_source,
            "train_on": cfg.data.train_on,
            "overlong": cfg.data.overlong,
            "max_length": cfg.data.max_length,
        },
        "lora": {
            "preset": cfg.lora.preset,
            "asked_target_modules": cfg.lora.target_modules,
            "r": cfg.lora.r,
            "alpha": cfg.lora.alpha,
            "dropout": cfg.lora.dropout,
            "dropout_note": note,
            "coverage": [{k: v for k, v in row.items() if k != "names"} for row in table],
            "target_modules": spec.target_modules,
            "target_parameters": spec.target_parameters,
            "trainable_params": trainable,
            "total_params": total,
        },
        "training": {
            "learning_rate": t.learning_rate,
            "lr_scheduler": t.lr_scheduler,
            "warmup_ratio": t.warmup_ratio,
            "weight_decay": t.weight_decay,
            "max_grad_norm": t.max_grad_norm,
            "epochs": t.epochs,
            "max_steps": t.max_steps,
            "per_device_batch_size": t.batch_size,
            "gradient_accumulation_steps": t.gradient_accumulation_steps,
            "effective_batch_size": t.batch_size * t.gradient_accumulation_steps * world_size,
            "max_length": cfg.data.max_length,
            "seed": t.seed,
            "dtype": str(dtype).replace("torch.", ""),
            "device": device,
            "load_in_4bit": cfg.base.load_in_4bit,
            "gradient_checkpointing": use_gradient_checkpointing(cfg, device),
            "eval_fraction": cfg.data.eval_fraction,
            "group_by_length": t.group_by_length,
            "packing": t.packing,
            "world_size": world_size,
        },
        "metrics": metrics_from_history(history),
        "samples": samples,
        "environment": environment(),
        "run": {
            "wall_time_s": round(wall, 2),
            "trained_tokens": tokens,
            "tokens_per_second": round(tokens / wall, 1) if wall > 0 else None,
            "resumed": state.notes.count("resumed") > 0,
            "interrupted": state.interrupted,
        },
        "files": {"loss_curve": "loss.png"} if metrics_from_history(history)["history"] else {},
    }


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


# ---------------------------------------------------------------- dry run


def dry_run_report(cfg: TrainConfig, data: PreparedData, table, trainable: int, total: int, device: str, dtype, note) -> str:
    import yaml

    t = cfg.training
    tokens_epoch = data.stats["tokens"]["train_split"]
    steps_epoch = math.ceil(len(data.train) / (t.batch_size * t.gradient_accumulation_steps))
    steps = t.max_steps if t.max_steps > 0 else math.ceil(steps_epoch * t.epochs)
    tokens = tokens_epoch * (t.epochs if t.max_steps <= 0 else t.max_steps / max(steps_epoch, 1))
    bytes_per = {"torch.float32": 4, "torch.bfloat16": 2, "torch.float16": 2}.get(str(dtype), 4)
    weight_gb = total * (0.55 if cfg.base.load_in_4bit else bytes_per) / 1e9
    lora_gb = trainable * (4 + 4 + 8) / 1e9  # fp32 master weights + grads + Adam moments
    lines = [
        "resolved config:",
        yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True).rstrip(),
        "",
        f"dataset {data.loaded.name}: {data.stats['records']} records, {data.stats['kept']} kept, dropped {data.stats['dropped'] or 0}, "
        f"{data.stats['truncated']} truncated; {data.stats['train_examples']} train / {data.stats['eval_examples']} eval examples",
        f"tokens: {data.stats['tokens']['total']:,} total, {data.stats['tokens']['trained']:,} trained (labels), mean {data.stats['tokens']['mean_length']}, max {data.stats['tokens']['max_length']}",
        "",
        "LoRA coverage:",
        presets.format_coverage(table, trainable, total),
    ]
    if note:
        lines.append(f"note: {note}")
    lines += [
        "",
        f"estimate: {steps:,} optimizer steps, ~{tokens:,.0f} training tokens on {device} ({str(dtype).replace('torch.', '')})",
        f"memory: ~{weight_gb:.2f} GB weights + ~{lora_gb:.3f} GB LoRA params/grads/optimizer + activations (batch {t.batch_size} x up to {data.stats['tokens']['max_length']} tokens)",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------- main entry


def run_training(cfg: TrainConfig, *, dry_run: bool = False, print_fn=print) -> Path | None:
    """Train and write the adapter folder; with dry_run, print the plan and return None."""
    import torch

    t0 = time.time()
    # PEFT's checkpoint saves load a card stub without metadata; that warning is noise for our users
    logging.getLogger("huggingface_hub.repocard").setLevel(logging.ERROR)
    device = resolve_device(cfg)
    check_packing(cfg, device)
    rb = resolve_base(cfg.base.model, revision=cfg.base.revision, source=cfg.base.source)
    tokenizer = load_tokenizer(rb, chat_template_file=cfg.base.chat_template)
    require_chat_template(tokenizer, f"the tokenizer of {rb.id}")
    template_source = "file" if cfg.base.chat_template else "base"
    saved_padding_side, tokenizer.padding_side = tokenizer.padding_side, "right"  # training batches: real tokens at positions 0..n-1, as at inference
    rank = int(os.environ.get("RANK", "0"))
    if rank != 0:  # under `accelerate launch`/torchrun only rank 0 checks, prints and writes the folder
        print_fn = lambda *a, **k: None  # noqa: E731
    if dry_run:
        pass
    elif rank == 0:
        out, resume_from = prepare_output_dir(cfg)
    else:
        out = Path(cfg.training.output_dir)
        resume_from = latest_checkpoint(out) if cfg.training.resume in ("true", "auto") else None
    data = prepare_data(cfg, tokenizer)
    dtype = parse_dtype(cfg.base.dtype, device)
    if dry_run:
        peft_model, spec, table, note = build_peft_model(cfg, rb, device, meta=True)
        trainable, total = count_params(peft_model)
        print_fn(dry_run_report(cfg, data, table, trainable, total, device, dtype, note))
        return None

    torch.manual_seed(cfg.training.seed)
    peft_model, spec, table, note = build_peft_model(cfg, rb, device)
    trainable, total = count_params(peft_model)
    base_params = total - trainable
    print_fn("LoRA coverage:\n" + presets.format_coverage(table, trainable, total))
    if note:
        print_fn(f"note: {note}")

    from transformers import Trainer

    peft_model.config.pad_token_id = tokenizer.pad_token_id
    state = RunState()
    if resume_from:
        state.notes.append("resumed")
        print_fn(f"resuming from {resume_from}")
    args = training_arguments(cfg, out, device, bool(data.eval), dtype)
    trainer = Trainer(
        model=peft_model,
        args=args,
        train_dataset=_to_dataset(data.train),
        eval_dataset=_to_dataset(data.eval) if data.eval else None,
        data_collator=_collator(cfg, tokenizer, device),
        processing_class=tokenizer,
        callbacks=_callbacks(state),
    )
    t_train = time.time()
    with _StopOnSignal(state), native_targets():
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    train_wall = time.time() - t_train
    if state.interrupted:
        print_fn(f"interrupted: checkpoint saved under {out / CHECKPOINTS}; continue with --resume")

    if trainer.is_world_process_zero():
        save_adapter(peft_model, out, rb)
        if template_source == "file":
            tokenizer.padding_side = saved_padding_side
            tokenizer.save_pretrained(out)
        samples = []
        if cfg.training.samples and not state.interrupted:
            held_out = data.eval_conversations or data.train_conversations
            samples = sample_answers(peft_model, tokenizer, held_out, cfg.training.samples, cfg.training.sample_max_new_tokens)
        tokens = max(state.tokens_at_end - state.tokens_at_start, 0)
        manifest = build_manifest(
            cfg, out, rb, tokenizer, data, spec, table, note, trainable, total, dtype, device,
            trainer.state.log_history, samples, train_wall, tokens, state, args.world_size, template_source, base_params,
        )
        manifest["run"]["total_wall_time_s"] = round(time.time() - t0, 2)
        write_manifest(out, manifest)
        _write_card(out)
        print_fn(f"adapter written to {out}")
    return out


def _write_card(out: Path) -> None:
    """The card (README.md + loss.png) from the manifest; the card module owns the format."""
    try:
        from persona_lora.model_cards.cards import write_card
    except ImportError:  # pragma: no cover - the package ships model_cards
        log.warning("model_cards is not installed; no card written")
        return
    write_card(out)


__all__ = ["run_training", "prepare_data", "prepare_output_dir", "latest_checkpoint", "ConfigError"]
