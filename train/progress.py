"""What `persona-lora train` shows while it trains and when it stops, for SFT and DPO/KTO alike.

Trainer's own output (a tqdm bar interleaved with dicts of quoted numbers, `learning_rate: '0'` at warm-up) is
replaced by `TrainProgress`, a TrainerCallback drawing one `persona_lora.progress.ProgressLine`: step/total,
epoch, loss, learning rate in scientific notation, tokens/s, elapsed < ETA; an evaluation prints a lasting line.
`replace_library_output` takes transformers' ProgressCallback/PrinterCallback off a Trainer (kept at `-v`).
The run ends with `summary_lines` (what was run, where it is, the commands that come next) or, after Ctrl-C,
with `resume_command`: the command line the user typed, made to resume.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from persona_lora.progress import ProgressLine, format_count, format_duration, format_lr, invocation, verbose


def _loss(value) -> str:
    return f"{float(value):.4f}"


def train_progress_callback(label: str = "train", stream=None):
    """A TrainerCallback that draws the run's progress line (built lazily: transformers is imported late)."""
    from transformers import TrainerCallback

    class TrainProgress(TrainerCallback):
        def __init__(self):
            self.line: ProgressLine | None = None
            self.loss = self.lr = None
            self.tokens_at_start = 0
            self.extra: list[str] = []

        def on_train_begin(self, args, state, control, **kw):
            if not state.is_world_process_zero:
                return
            # at -v transformers' own bar is shown too: plain lines then, so the two never overwrite each other
            self.line = ProgressLine(label, state.max_steps or None, stream=stream, live=False if verbose() else None)
            self.tokens_at_start = state.num_input_tokens_seen or 0

        def fields(self, state) -> list[str]:
            out = [f"epoch {state.epoch:.2f}" if state.epoch is not None else ""]
            out.append(f"loss {_loss(self.loss)}" if self.loss is not None else "")
            out += self.extra
            out.append(f"lr {format_lr(self.lr)}" if self.lr is not None else "")
            tokens = (state.num_input_tokens_seen or 0) - self.tokens_at_start
            if tokens > 0 and self.line is not None:
                out.append(f"{format_count(tokens / max(self.line.elapsed(), 1e-9))} tokens/s")
            return out

        def on_step_end(self, args, state, control, **kw):
            # a step that logs is shown by on_log with its new loss (in a log file, one line for it, not two)
            if self.line is not None and not (control.should_log and not self.line.live):
                self.line.update(state.global_step, self.fields(state))

        def on_log(self, args, state, control, logs=None, **kw):
            if self.line is None or not logs:
                return
            if "eval_loss" in logs:
                seconds = logs.get("eval_runtime")
                took = f" ({format_duration(seconds)})" if seconds is not None else ""
                self.line.note(f"eval at step {state.global_step}: loss {_loss(logs['eval_loss'])}{took}")
                return
            if "loss" in logs:
                self.loss = logs["loss"]
                self.lr = logs.get("learning_rate", self.lr)
                acc = logs.get("rewards/accuracies")  # DPO: how often the chosen answer is preferred
                self.extra = [f"reward acc {float(acc):.2f}"] if acc is not None else []
                self.line.update(state.global_step, self.fields(state), force=True)

        def on_train_end(self, args, state, control, **kw):
            if self.line is not None:
                self.line.close()
                self.line = None

    return TrainProgress()


def replace_library_output(trainer) -> None:
    """Take transformers' tqdm bar and dict printer off `trainer`: `TrainProgress` says the same, readably.
    At `-v` they stay (and the live line becomes plain lines beside them)."""
    if verbose():
        return
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)


def resume_command(out: Path, *, output_dir_flag: bool = False) -> str:
    """The command that continues this run: the command line as typed, `--resume [VALUE]`/`--overwrite` replaced
    by `--resume` (plus `--output-dir OUT` when the interrupted run lives beside the one it was to replace)."""
    argv = invocation()
    words = argv[argv.index("train") + 1:] if argv and "train" in argv else ["CONFIG.yaml"]
    kept, i = [], 0
    while i < len(words):
        word = words[i]
        name = word.split("=", 1)[0]
        i += 1
        if name == "--overwrite":
            continue
        if name == "--resume":
            if "=" not in word and i < len(words) and words[i] in ("true", "auto", "false"):
                i += 1
            continue
        if name == "--output-dir" and output_dir_flag:
            i += 0 if "=" in word else 1
            continue
        kept.append(word)
    kept.append("--resume")
    if output_dir_flag:
        kept += ["--output-dir", str(out)]
    return "persona-lora train " + " ".join(shlex.quote(w) for w in kept)


def _last(history: list[dict], key: str):
    return next((h[key] for h in reversed(history) if h.get(key) is not None), None)


def steps_done(result) -> int | None:
    """The last optimizer step the loop logged (the last step run is always logged)."""
    steps = [h["step"] for h in result.history if h.get("step") is not None]
    return max(steps) if steps else None


def interrupted_at(result) -> str:
    """`interrupted at step 32 of 220`: how far an interrupted run got, as the card and the demo also say it."""
    done, planned = steps_done(result), result.planned_steps
    if done is None:
        return "interrupted"
    return f"interrupted at step {done}" + (f" of {planned}" if planned else "")


def summary_lines(out: Path, base: str, result) -> list[str]:
    """The closing lines of a finished run: what it did, where it is, and the commands that come next."""
    steps = steps_done(result)
    resumed = getattr(result, "resumed", False)  # the time and the rate are this invocation's
    if steps is None:
        parts = ["trained"]
    else:
        parts = [f"resumed, reached step {steps}" if resumed else f"trained {steps} steps"]
    parts[0] += f" in {format_duration(result.wall_time_s)}"
    train_loss, eval_loss = _last(result.history, "loss"), _last(result.history, "eval_loss")
    if train_loss is not None:
        parts.append(f"train loss {_loss(train_loss)}")
    if eval_loss is not None:
        parts.append(f"eval loss {_loss(eval_loss)}")
    if result.wall_time_s:
        parts.append(f"{format_count(result.tokens / result.wall_time_s)} tokens/s")
    folder, base_q = shlex.quote(str(out)), shlex.quote(str(base))
    evals = shlex.quote(f"{out}-eval")
    return [
        "done: " + ", ".join(parts),
        f"adapter written to {out} (its model card: {out / 'README.md'})",
        "next:",
        f"  persona-lora demo --base {base_q} --adapter {folder}    # base and adapter side by side",
        f"  persona-lora eval {folder} --base {base_q} --out {evals}    # base vs adapter on held-out prompts",
        f"  persona-lora card {folder} --eval {evals}    # the card again, with those figures",
        f"  persona-lora push {folder} OWNER/NAME    # publish it on the Hugging Face Hub",
    ]
