"""The named steps every training recipe shares: SFT (`trainer.py`) and DPO/KTO (`preference_train.py`) call
these same public functions, so a change to how a run is set up, stopped or measured reaches both.

set up (device, host memory, packing check, base, tokenizer with its chat template) -> the loop's bookkeeping
(first Ctrl-C stops after the step with a checkpoint; tokens seen and eval seconds tallied by callbacks) -> the
loop's result as a value (`TrainResult`), which the manifest and card are built from.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from dataclasses import dataclass

from persona_lora.chat_format import require_chat_template
from persona_lora.errors import UsageError, VerificationError
from persona_lora.host_memory import keep_freed_memory
from persona_lora.model_loading import ResolvedBase, load_tokenizer, parse_dtype, resolve_base
from persona_lora.train.config import TrainConfig
from persona_lora.train.model_setup import check_packing, resolve_device, use_gradient_checkpointing

log = logging.getLogger(__name__)


@dataclass
class RunSetup:
    """What the run trains on and where."""

    base: ResolvedBase
    tokenizer: object
    template_source: str  # base | file
    device: str
    dtype: object  # torch.dtype
    gradient_checkpointing: bool
    rank: int
    world_size: int
    padding_side: str  # the tokenizer's own, restored before it is saved with the adapter


@dataclass
class TrainResult:
    """What the training loop did."""

    history: list[dict]
    wall_time_s: float
    tokens: int
    world_size: int
    resumed: bool
    interrupted: bool
    eval_time_s: float  # of wall_time_s, the eval passes
    planned_steps: int | None = None  # the optimizer steps the whole run is scheduled for ("step N of M")


def set_up(cfg: TrainConfig) -> RunSetup:
    device = resolve_device(cfg)
    keep_freed_memory(device)  # CPU steps reuse freed activation memory instead of faulting in new pages
    check_packing(cfg, device)
    rb = resolve_base(cfg.base.model, revision=cfg.base.revision, source=cfg.base.source)
    tokenizer = load_tokenizer(rb, chat_template_file=cfg.base.chat_template)
    require_chat_template(tokenizer, f"the tokenizer of {rb.id}")
    padding_side = tokenizer.padding_side
    # training batches are right-padded: real tokens at positions 0..n-1, as at inference
    tokenizer.padding_side = "right"
    return RunSetup(base=rb, tokenizer=tokenizer, template_source="file" if cfg.base.chat_template else "base",
                    device=device, dtype=parse_dtype(cfg.base.dtype, device),
                    gradient_checkpointing=use_gradient_checkpointing(cfg, device),
                    rank=int(os.environ.get("RANK", "0")), world_size=int(os.environ.get("WORLD_SIZE", "1")),
                    padding_side=padding_side)


def optimizer_steps(cfg: TrainConfig, train_examples: int, world_size: int) -> int:
    """The run's optimizer steps as transformers' Trainer counts them: max_steps, else epochs x updates per epoch
    (micro-batches over all processes, a partial accumulation at the epoch's end counting as an update)."""
    t = cfg.training
    if t.max_steps:
        return t.max_steps
    batches = math.ceil(train_examples / (t.batch_size * max(world_size, 1)))
    ga = t.gradient_accumulation_steps
    return math.ceil(t.epochs * max(batches // ga + int(batches % ga > 0), 1))


def first_step_with_update(cfg: TrainConfig, steps: int) -> int | None:
    """The first optimizer step (1-based) whose learning rate is above 0 on the run's schedule, None when there is
    none, 0 when the schedule cannot be built here (transformers then names the problem when the run starts).
    The schedule is transformers' own (`get_scheduler`, with Trainer's warm-up rounding), stepped on a dummy."""
    import torch
    from transformers import get_scheduler

    t = cfg.training
    if t.learning_rate <= 0:
        return None
    warmup = int(t.warmup_ratio) if t.warmup_ratio >= 1 else math.ceil(steps * t.warmup_ratio)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=t.learning_rate)
    try:
        schedule = get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=steps)
    except (ValueError, TypeError, KeyError):
        return 0
    for step in range(1, steps + 1):
        if schedule.get_last_lr()[0] > 0:
            return step
        optimizer.step()
        schedule.step()
    return None


def check_some_step_updates(cfg: TrainConfig, train_examples: int, world_size: int, print_fn=print) -> None:
    """Refuse, before the model loads or the folder is claimed, a run in which no step can change the adapter: all
    of its steps in the warm-up (learning rate 0 throughout: `--max-steps 1` with any warm-up), or learning rate 0.
    Such a run would write an adapter equal to where it started, presented as trained. `--allow-no-update` runs
    it anyway, with a warning."""
    t = cfg.training
    steps = optimizer_steps(cfg, train_examples, world_size)
    if first_step_with_update(cfg, steps) is not None:
        return
    if t.learning_rate <= 0:
        why, fix = "training.learning_rate is 0", "set training.learning_rate above 0"
    else:
        warmup = math.ceil(steps * t.warmup_ratio)
        why = (f"all {steps} optimizer step(s) fall in the warm-up (training.warmup_ratio {t.warmup_ratio}: {warmup} "
               f"warm-up step(s)), where the learning rate is 0")
        fix = f"raise --max-steps to {steps + 1} or more, or set training.warmup_ratio=0"
    if t.allow_no_update:
        print_fn(f"warning: no step of this run changes the adapter: {why} (--allow-no-update: running it anyway)")
        return
    raise UsageError(f"no step of this run would change the adapter: {why}, so it would write the adapter it started "
                     f"from as if trained. {fix[0].upper() + fix[1:]}; or pass --allow-no-update to run it anyway")


def trainable_fingerprint(model):
    """Per trainable tensor (this process's shard of a sharded one): its sum and sum of squares in float64, on the
    CPU. Any optimizer update that reaches the stored weights changes it; a few bytes per tensor to keep."""
    import torch

    rows = []
    for p in model.parameters():
        if p.requires_grad:
            local = p.to_local() if hasattr(p, "to_local") else p
            w = local.detach().to(torch.float64)
            rows.append(torch.stack([w.sum(), (w * w).sum()]).cpu())
    return torch.stack(rows) if rows else torch.zeros(0, 2, dtype=torch.float64)


def adapter_changed(before, after) -> bool:
    """Whether the trainable weights changed in any process (all of them agree on the answer)."""
    import torch

    changed = not torch.equal(before, after)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        flag = torch.tensor([int(changed)])
        if torch.distributed.get_backend() == "nccl":
            flag = flag.cuda()
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        changed = bool(flag.item())
    return changed


class RunAlreadyFinished(UsageError):
    """`--resume` of a run that finished: `--resume auto` (idempotent re-runs) treats it as done, not an error."""


class StopOnSignal:
    """First Ctrl-C: finish the current step, save a checkpoint, stop cleanly. A second one aborts."""

    def __init__(self):
        self.interrupted = False
        self.previous = None

    def __enter__(self):
        def handler(signum, frame):
            if self.interrupted:
                raise KeyboardInterrupt
            self.interrupted = True
            log.warning("interrupt received: saving a checkpoint after this step (Ctrl-C again to abort)")

        try:
            self.previous = signal.signal(signal.SIGINT, handler)
        except ValueError:  # not in the main thread
            self.previous = None
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def new_tally() -> dict:
    """What the callbacks count during the loop: tokens seen at its start and end, seconds of eval passes, and
    whether the trainable weights changed (None until the loop ends)."""
    return {"start": 0, "end": 0, "eval_s": 0.0, "weights": None, "changed": None}


def loop_result(trainer, tally: dict, started: float, *, resumed: bool, interrupted: bool) -> TrainResult:
    """The TrainResult of a finished `trainer.train()` that ran with `loop_callbacks(..., tally)`."""
    return TrainResult(history=trainer.state.log_history, wall_time_s=time.time() - started,
                       tokens=max(tally["end"] - tally["start"], 0), world_size=trainer.args.world_size,
                       resumed=resumed, interrupted=interrupted, eval_time_s=tally["eval_s"],
                       planned_steps=trainer.state.max_steps or None)


def loop_callbacks(stop: StopOnSignal, tally: dict, stop_after: int | None = None, allow_no_update: bool = False):
    """Ctrl-C, `stop_after` and the tallies; runs after transformers' DefaultFlowCallback, which has already
    decided by then whether this step ends the run. A run that finishes with the trainable weights exactly as they
    started is refused (VerificationError) unless `allow_no_update`: its adapter would be presented as trained."""
    from transformers import TrainerCallback

    class RunCallback(TrainerCallback):
        def on_train_begin(self, args, st, control, model=None, **kw):
            tally["start"] = st.num_input_tokens_seen or 0
            tally["weights"] = trainable_fingerprint(model) if model is not None else None

        def on_step_end(self, args, st, control, **kw):
            if stop.interrupted:
                control.should_save = True
                control.should_training_stop = True
            if stop_after is not None and st.global_step >= stop_after:  # `reproduce --max-steps`: the run's own
                control.should_training_stop = True  # schedule, cut short (a lower max_steps would change it)
            if control.should_training_stop:  # the last step run is always logged: the manifest's steps, final
                control.should_log = True  # loss and rewards are that step's, whatever logging_steps says

        def on_evaluate(self, args, st, control, metrics=None, **kw):
            tally["eval_s"] += float((metrics or {}).get("eval_runtime") or 0.0)

        def on_train_end(self, args, st, control, model=None, **kw):
            tally["end"] = st.num_input_tokens_seen or 0
            if tally.get("weights") is None or model is None or stop.interrupted or stop_after is not None:
                return  # an interrupted run keeps its checkpoint; `reproduce` judges a cut-short run by its losses
            tally["changed"] = adapter_changed(tally["weights"], trainable_fingerprint(model))
            if not tally["changed"]:
                message = (f"the adapter did not change in {st.global_step} step(s): every trainable weight is as it "
                           "started (learning rate 0, or gradients that were all 0)")
                if not allow_no_update:
                    raise VerificationError(f"{message}; nothing is written as trained. Check the learning rate, "
                                            "warm-up and the data's labelled tokens, or pass --allow-no-update")
                log.warning("%s (--allow-no-update: written anyway)", message)

    return [RunCallback()]
