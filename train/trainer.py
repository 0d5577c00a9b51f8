"""Train a LoRA adapter and write the adapter folder (PEFT files + manifest + card).

We use transformers' `Trainer` rather than TRL's `SFTTrainer`: our formatting path already yields
`input_ids`/`labels` (multi-turn masks included) and SFTTrainer would only re-derive them; Trainer gives us
checkpoints, resume, length-grouped batches, eval, gradient accumulation, TensorBoard and `accelerate launch`
data parallelism as they are.

`run_training` is a sequence of named steps whose outputs are values:
set up (device, base, tokenizer) -> claim the output folder -> prepare the data -> build the adapted model ->
train (Ctrl-C saves a checkpoint) -> finalise (adapter files, sample answers, manifest, card).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from persona_lora import presets
from persona_lora.artifact import write_manifest
from persona_lora.chat_format import IGNORE_INDEX
from persona_lora.errors import TrainingInterrupted, UsageError
from persona_lora.peft_compat import native_targets
from persona_lora.progress import verbose
from persona_lora.train import fsdp
from persona_lora.train.answer_logits import answer_logits_trainer
from persona_lora.train.compiled_layers import compile_timer_callback
from persona_lora.train.config import TrainConfig
from persona_lora.train.dry_run import dry_run_report
from persona_lora.train.length_batches import LENGTH_BUCKETS, batch_order, length_bucket_trainer
from persona_lora.train.model_setup import (
    AdaptedModel,
    build_adapted_model,
    save_adapter,
)
from persona_lora.train.prepare import PreparedData, eval_file_line, prepare_data
from persona_lora.train.progress import (
    interrupted_at,
    replace_library_output,
    resume_command,
    summary_lines,
    train_progress_callback,
)
from persona_lora.train.provenance import build_manifest, run_changes
from persona_lora.train.run_folder import (
    CHECKPOINTS,
    LOGS,
    OutputPlan,
    abandon_output,
    claim_output,
    complete_output,
    plan_output,
)
from persona_lora.train.samples import sample_answers
from persona_lora.train.steps import (
    RunAlreadyFinished,
    RunSetup,
    StopOnSignal,
    TrainResult,
    check_some_step_updates,
    loop_callbacks,
    loop_result,
    new_tally,
    set_up,
)

log = logging.getLogger(__name__)


def check_resume(cfg: TrainConfig, plan: OutputPlan, draft) -> list[str]:
    """What a resume changes about the run (refused unless --allow-changes, then recorded), and whether there is
    anything to resume: a finished run is not extended by a resume that changes nothing."""
    previous = plan.previous
    if plan.resume_from is None or previous is None:
        if plan.resume_from is not None:
            log.warning("%s records no manifest of the run being resumed; its settings cannot be compared",
                        plan.out)
        return []
    step = int(plan.resume_from.name.split("-")[-1])
    changes = run_changes(previous, draft)
    if changes and not cfg.training.allow_changes:
        raise UsageError("--resume would continue the run in " + str(plan.out) + " with other settings than it was "
                         "started with:" + "".join(f"\n  - {c}" for c in changes) + "\nResume with the same "
                         "data and settings, or pass --allow-changes to record these changes in the manifest and card")
    if not changes and previous.run is not None and previous.run.finished:
        raise RunAlreadyFinished(f"the run in {plan.out} already finished (step {step}); nothing to resume. To train "
                                 "it further, raise --max-steps or --epochs and pass --allow-changes")
    return (previous.run.changes if previous.run else []) + [f"at step {step}: {c}" for c in changes]


def training_arguments(cfg: TrainConfig, out: Path, setup: RunSetup, has_eval: bool):
    import torch
    from transformers import TrainingArguments

    t = cfg.training
    device, dtype = setup.device, setup.dtype
    report = [r for r in t.report_to if r != "none"]
    if "tensorboard" in report:
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(out / LOGS)  # read by transformers TensorBoardCallback
    return TrainingArguments(
        output_dir=str(out / CHECKPOINTS),
        num_train_epochs=t.epochs,
        max_steps=t.max_steps if t.max_steps is not None else -1,  # -1: Trainer runs the epochs
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
        prediction_loss_only=True,  # eval passes report the loss; gathering their logits would only cost time
        eval_steps=t.eval_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        report_to=report or "none",
        train_sampling_strategy="group_by_length" if batch_order(t) == LENGTH_BUCKETS else "random",
        include_num_input_tokens_seen="non_padding",
        bf16=dtype == torch.bfloat16 and device.startswith("cuda"),
        fp16=dtype == torch.float16 and device.startswith("cuda"),
        use_cpu=device == "cpu",
        remove_unused_columns=False,
        dataloader_num_workers=t.dataloader_workers,
        disable_tqdm=not verbose(),  # train/progress.py draws the progress line; tqdm's bar only at -v
        log_level="warning",
        ddp_find_unused_parameters=False,
    )


def _collator(cfg: TrainConfig, tokenizer, device: str):
    if cfg.training.packing:
        from transformers import DataCollatorWithFlattening

        return DataCollatorWithFlattening()
    from transformers import DataCollatorForSeq2Seq

    return DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=IGNORE_INDEX,
                                  pad_to_multiple_of=8 if device.startswith("cuda") else None)


def _to_dataset(examples: list):
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": [e.input_ids for e in examples], "labels": [e.labels for e in examples],
                              "length": [len(e.input_ids) for e in examples]})


def train_loop(cfg: TrainConfig, setup: RunSetup, data: PreparedData, model: AdaptedModel, out: Path,
               resume_from: Path | None, stop_after: int | None = None) -> tuple[object, TrainResult]:
    """Run transformers' Trainer; returns (trainer, result). `stop_after` ends it after that optimizer step."""
    from transformers import Trainer

    model.peft_model.config.pad_token_id = setup.tokenizer.pad_token_id
    stop, tally = StopOnSignal(), new_tally()
    Trainer = length_bucket_trainer(answer_logits_trainer(Trainer))  # noqa: N806
    if model.sharded:  # sharded while loading: accelerate must not wrap it again; checkpoints keep the optimizer
        fsdp.switch_off_accelerate_fsdp()
        Trainer = fsdp.sharded_trainer(Trainer)  # noqa: N806
    args = training_arguments(cfg, out, setup, bool(data.eval))
    trainer = Trainer(
        model=model.peft_model,
        args=args,
        train_dataset=_to_dataset(data.train),
        eval_dataset=_to_dataset(data.eval) if data.eval else None,
        data_collator=_collator(cfg, setup.tokenizer, setup.device),
        processing_class=setup.tokenizer,
        callbacks=[*loop_callbacks(stop, tally, stop_after, cfg.training.allow_no_update), train_progress_callback(),
                   *([compile_timer_callback()] if cfg.training.compile else [])],
    )
    replace_library_output(trainer)
    started = time.time()
    with stop, native_targets():
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    return trainer, loop_result(trainer, tally, started, resumed=resume_from is not None,
                                interrupted=stop.interrupted)


def finalise(cfg: TrainConfig, setup: RunSetup, data: PreparedData, model: AdaptedModel, result: TrainResult,
             out: Path, started: float, changes: list[str], write: bool = True, extend_manifest=None) -> None:
    """Adapter files, sample answers, manifest and card, written by rank 0 (`write`). With a sharded base every
    rank comes here: gathering the adapter and answering the sample prompts are collectives. `extend_manifest`
    adds a method's own section (preference tuning) before the manifest and card are written."""
    state = fsdp.adapter_state_dict(model.peft_model) if model.sharded else None
    if write:
        save_adapter(model.peft_model, out, setup.base, model.spec, state_dict=state)
    if write and setup.template_source == "file":
        setup.tokenizer.padding_side = setup.padding_side
        setup.tokenizer.save_pretrained(out)
    samples = []
    if cfg.training.samples and not result.interrupted:
        held_out = data.eval_conversations or data.train_conversations
        samples = sample_answers(model.peft_model, setup.tokenizer, held_out, cfg.training.samples,
                                 cfg.training.sample_max_new_tokens)
    if not write:
        return
    manifest = build_manifest(cfg, setup, data, model, result, samples, out, changes)
    manifest.run.total_wall_time_s = round(time.time() - started, 2)
    manifest.training.sharding = fsdp.SHARDING if model.sharded else "none"
    if extend_manifest is not None:
        extend_manifest(manifest)
    write_manifest(out, manifest)
    from persona_lora.model_cards.cards import write_card

    write_card(out)


def run_training(cfg: TrainConfig, *, dry_run: bool = False, print_fn=print,
                 stop_after: int | None = None) -> Path | None:
    """Train and write the adapter folder; with dry_run, print the plan and return None. `stop_after` stops after
    that many optimizer steps with the schedule of the whole run (`reproduce --max-steps` compares a prefix)."""
    import torch

    if cfg.preference.method != "sft":  # `train --method dpo|kto` runs train/preference_train.py instead
        raise UsageError(f"preference.method {cfg.preference.method} is trained by `persona-lora train`; this path "
                         "(SFT, and `reproduce`) does not run preference tuning")
    started = time.time()
    # PEFT's checkpoint saves load a card stub without metadata; that warning is noise for our users
    logging.getLogger("huggingface_hub.repocard").setLevel(logging.ERROR)
    setup = set_up(cfg)
    if setup.rank != 0:  # only rank 0 prints and writes the folder
        print_fn = lambda *a, **k: None  # noqa: E731
    if dry_run:  # refuses what the run would refuse before its plan is printed
        fsdp.check_launch(cfg)
        data = prepare_data(cfg, setup.tokenizer)
        check_some_step_updates(cfg, len(data.train), setup.world_size, print_fn)
        model = build_adapted_model(cfg, setup.base, setup.device, meta=True)
        print_fn(dry_run_report(cfg, data, model, setup.device, setup.dtype))
        return None
    plan = plan_output(cfg)  # only looks: nothing is created or removed before the data and model are checked
    fsdp.all_ranks_planned(setup.device)
    data = prepare_data(cfg, setup.tokenizer)
    check_some_step_updates(cfg, len(data.train), setup.world_size, print_fn)
    torch.manual_seed(cfg.training.seed)
    sharded = fsdp.decide(cfg, setup.device, lambda: one_device_plan(cfg, setup, data))
    model = build_adapted_model(cfg, setup.base, setup.device, sharded=sharded)
    draft = build_manifest(cfg, setup, data, model, None, [], plan.out)
    try:
        changes = check_resume(cfg, plan, draft)
    except RunAlreadyFinished as e:
        if cfg.training.resume != "auto":
            raise
        print_fn(f"{e}; nothing to do")
        return plan.out
    out = plan.work
    try:
        if setup.rank == 0:
            # adapter + optimizer state per kept checkpoint, in fp32: what the folder will need at most
            claim_output(plan, model.trainable * (4 + 12 * cfg.training.save_total_limit))
            draft.run.changes = changes
            write_manifest(out, draft)  # the folder is recognisably this run's from its first step on
        print_fn("LoRA coverage:\n" + presets.format_coverage(model.coverage, model.trainable, model.total))
        if model.dropout_note:
            print_fn(f"note: {model.dropout_note}")
        if eval_line := eval_file_line(data):
            print_fn(eval_line)
        if plan.resume_from:
            print_fn(f"resuming from {plan.resume_from}")
        trainer, result = train_loop(cfg, setup, data, model, out, plan.resume_from, stop_after)
        if model.sharded and not trainer.is_world_process_zero():
            finalise(cfg, setup, data, model, result, out, started, changes, write=False)
        if trainer.is_world_process_zero():
            finalise(cfg, setup, data, model, result, out, started, changes)
            if result.interrupted:
                where = (f"the new run is kept in {out}, the previous one in {plan.out} is untouched"
                         if plan.replaces else f"the adapter in {out} is from the last step reached (its card says so)")
                raise TrainingInterrupted(
                    f"{interrupted_at(result)}: checkpoint saved under {out / CHECKPOINTS}; {where}. Continue "
                    f"with:\n  {resume_command(out, output_dir_flag=plan.replaces)}")
            out = complete_output(plan)
            for line in summary_lines(out, cfg.base.model, result):
                print_fn(line)
        elif result.interrupted:
            raise TrainingInterrupted("interrupted")
    except BaseException as e:
        abandon_output(plan, e)  # a failed replacement leaves nothing; an interrupted one is kept to continue
        raise
    return out


def one_device_plan(cfg: TrainConfig, setup: RunSetup, data: PreparedData):
    """The dry run's memory plan of one unsharded device, from a meta-device model (for `training.fsdp: auto`)."""
    from persona_lora.train.memory_plan import run_plan

    meta = build_adapted_model(cfg, setup.base, setup.device, meta=True)
    return run_plan(cfg, data, meta, setup.device, setup.dtype, devices=1, sharded=False)
