"""What long commands print: the live line on a terminal, plain lines in a log, the closing summary of a training
run, and the command that resumes an interrupted one."""

from __future__ import annotations

import io
from types import SimpleNamespace

from persona_lora import progress
from persona_lora.progress import ProgressLine, format_duration, format_lr
from persona_lora.train.progress import interrupted_at, resume_command, summary_lines


class Tty(io.StringIO):
    def isatty(self):
        return True


def test_live_line_is_rewritten_in_place_and_notes_go_above_it():
    out = Tty()
    line = ProgressLine("train", 10, stream=out)
    assert line.live
    line.update(1, ["loss 9.2049", f"lr {format_lr(0.0)}"])
    line.update(2, ["loss 8.1000", f"lr {format_lr(2e-3)}"])
    line.note("eval at step 2: loss 7.5000")
    line.close()
    text = out.getvalue()
    assert text.startswith("\rtrain 1/10 · loss 9.2049 · lr 0.00e+00 · ")
    assert "\rtrain 2/10 · loss 8.1000 · lr 2.00e-03 · " in text
    # the note clears the live line, stands on its own line, and the live line is drawn again below it
    assert "\r\x1b[Keval at step 2: loss 7.5000\ntrain 2/10 · loss 8.1000" in text
    assert text.endswith("\n") and text.count("\n") == 2
    assert "{" not in text and "'" not in text  # no dicts, no quoted numbers


def test_plain_lines_in_a_log_only_at_log_points_and_never_carriage_returns():
    out = io.StringIO()  # not a TTY: a log file or CI
    line = ProgressLine("train", 10, stream=out, every_s=3600)
    assert not line.live
    for step in range(1, 11):
        line.update(step, [f"loss {10 - step:.4f}"], force=step % 5 == 0)
    line.close()
    lines = out.getvalue().splitlines()
    assert [x.split(" · ")[0] for x in lines] == ["train 5/10", "train 10/10"]
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()
    assert " < " in lines[0] and " < " not in lines[1]  # an ETA while there is work left, none at the end


def test_formats():
    assert format_lr(0.002) == "2.00e-03" and format_lr(0) == "0.00e+00"
    assert format_duration(5) == "5s" and format_duration(185) == "3m05s" and format_duration(3720) == "1h02m"
    assert format_duration(None) == "?"


def test_resume_command_is_the_typed_command_made_to_resume(monkeypatch):
    monkeypatch.setattr(progress, "_invocation", ["-v", "train", "configs/tiny.yaml", "--max-steps", "40",
                                                  "--resume", "auto", "--overwrite", "--set", "a.b=c d"])
    assert resume_command(None) == "persona-lora train configs/tiny.yaml --max-steps 40 --set 'a.b=c d' --resume"
    monkeypatch.setattr(progress, "_invocation", ["train", "c.yaml", "--output-dir", "runs/x", "--resume=true"])
    assert (resume_command("runs/x.new", output_dir_flag=True)
            == "persona-lora train c.yaml --resume --output-dir runs/x.new")
    monkeypatch.setattr(progress, "_invocation", None)  # called as a library: a usage line
    assert resume_command(None) == "persona-lora train CONFIG.yaml --resume"


def test_summary_and_interrupted_step():
    history = [{"step": 1, "loss": 9.2}, {"step": 10, "loss": 3.25}, {"step": 10, "eval_loss": 4.5}]
    result = SimpleNamespace(history=history, wall_time_s=65.0, tokens=6500, planned_steps=220)
    from pathlib import Path

    lines = summary_lines(Path("runs/tiny adapter"), "runs/tiny-base", result)
    assert lines[0] == "done: trained 10 steps in 1m05s, train loss 3.2500, eval loss 4.5000, 100 tokens/s"
    assert "adapter written to runs/tiny adapter" in lines[1]
    assert any(x.strip().startswith("persona-lora demo --base runs/tiny-base --adapter 'runs/tiny adapter'")
               for x in lines)
    assert [x.split()[1] for x in lines[3:]] == ["demo", "eval", "card", "push"]
    assert interrupted_at(result) == "interrupted at step 10 of 220"


def test_the_trainer_callback_prints_one_line_per_logging_step_and_eval_lines():
    """Driven as transformers' Trainer drives a callback: in a log, a logging step gives one line with its loss
    and learning rate, an evaluation its own line, and nothing looks like a dict."""
    from persona_lora.train.progress import train_progress_callback

    out = io.StringIO()
    callback = train_progress_callback(stream=out)
    state = SimpleNamespace(is_world_process_zero=True, max_steps=4, num_input_tokens_seen=0, epoch=0.0,
                            global_step=0)
    callback.on_train_begin(None, state, SimpleNamespace(should_log=False))
    for step in range(1, 5):
        state.global_step, state.epoch, state.num_input_tokens_seen = step, step / 2, step * 100
        logs = step in (1, 4)
        callback.on_step_end(None, state, SimpleNamespace(should_log=logs))
        if logs:
            callback.on_log(None, state, None, logs={"loss": 2.0 / step, "learning_rate": 0.0 if step == 1 else 1e-4,
                                                     "grad_norm": 1.0})
    callback.on_log(None, state, None, logs={"eval_loss": 0.75, "eval_runtime": 3.0})
    callback.on_train_end(None, state, None)
    lines = out.getvalue().splitlines()
    assert len(lines) == 3, lines
    assert lines[0].startswith("train 1/4 · epoch 0.50 · loss 2.0000 · lr 0.00e+00 · ")
    assert lines[1].startswith("train 4/4 · epoch 2.00 · loss 0.5000 · lr 1.00e-04 · ")
    assert lines[2] == "eval at step 4: loss 0.7500 (3s)"
    assert "{" not in out.getvalue() and "grad_norm" not in out.getvalue()
