"""The named steps every training recipe shares: SFT (`trainer.py`) and DPO/KTO (`preference_train.py`) call
these same public functions, so a change to how a run is set up, stopped or measured reaches both.

set up (device, host memory, packing check, base, tokenizer with its chat template) -> the loop's bookkeeping
(first Ctrl-C stops after the step with a checkpoint; tokens seen and eval seconds tallied by callbacks) -> the
loop's result as a value (`TrainResult`), which the manifest and card are built from.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass

from persona_lora.chat_format import require_chat_template
from persona_lora.errors import UsageError
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
    """What the callbacks count during the loop: tokens seen at its start and end, seconds of eval passes."""
    return {"start": 0, "end": 0, "eval_s": 0.0}


def loop_result(trainer, tally: dict, started: float, *, resumed: bool, interrupted: bool) -> TrainResult:
    """The TrainResult of a finished `trainer.train()` that ran with `loop_callbacks(..., tally)`."""
    return TrainResult(history=trainer.state.log_history, wall_time_s=time.time() - started,
                       tokens=max(tally["end"] - tally["start"], 0), world_size=trainer.args.world_size,
                       resumed=resumed, interrupted=interrupted, eval_time_s=tally["eval_s"])


def loop_callbacks(stop: StopOnSignal, tally: dict, stop_after: int | None = None):
    """Ctrl-C, `stop_after` and the tallies; runs after transformers' DefaultFlowCallback, which has already
    decided by then whether this step ends the run."""
    from transformers import TrainerCallback

    class RunCallback(TrainerCallback):
        def on_train_begin(self, args, st, control, **kw):
            tally["start"] = st.num_input_tokens_seen or 0

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

        def on_train_end(self, args, st, control, **kw):
            tally["end"] = st.num_input_tokens_seen or 0

    return [RunCallback()]
