"""End-to-end training on the tiny DeepSeek-V2 base through the real CLI, plus resume, interrupt and failures.

Runs are on the CPU in float32 (`train_args`), so losses and weights compare exactly across runs and torch builds.
Every test that trains or spawns an interpreter is `slow`; the refusals before training are not.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from persona_lora.artifact import MANIFEST_NAME
from persona_lora.cli import main
from persona_lora.peft_compat import is_legacy_spelling
from tests.conftest import REPO, cuda_available, free_port, train_args


def sha256_files(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def manifest(out: Path) -> dict:
    return json.loads((out / MANIFEST_NAME).read_text(encoding="utf-8"))


def adapter_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def max_weight_diff(a: Path, b: Path) -> float:
    wa, wb = adapter_weights(a), adapter_weights(b)
    assert wa.keys() == wb.keys()
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


def checkpoints(out: Path) -> list[str]:
    return sorted((p.name for p in (out / "checkpoints").glob("checkpoint-*")), key=lambda n: int(n.split("-")[1]))


def greedy(model, tokenizer, messages, n=40):
    from persona_lora.chat_format import encode_prompt

    ids = torch.tensor([encode_prompt(tokenizer, messages)])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


# ------------------------------------------------------------------ the main path


@pytest.mark.slow
def test_training_writes_a_complete_adapter_folder(trained_adapter):
    names = {p.name for p in trained_adapter.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", MANIFEST_NAME, "loss.png", "checkpoints",
            "logs"} <= names
    assert not (trained_adapter / "tokenizer.json").exists(), "tokenizer files only when training changed the tokenizer"
    assert list((trained_adapter / "logs").rglob("events.out.tfevents*")), "TensorBoard logs by default"
    cfg = json.loads((trained_adapter / "adapter_config.json").read_text())
    assert not cfg["base_model_name_or_path"].startswith("/"), "no absolute local path in the adapter config"
    assert {"mlp.experts.gate_up_proj", "mlp.experts.down_proj"} <= set(cfg["target_parameters"])
    assert not is_legacy_spelling(cfg, "deepseek_v2"), "the portable spelling stock PEFT loads as trained"


@pytest.mark.slow
def test_manifest_records_the_run(trained_adapter, tiny_base, small_persona_data):
    m = json.loads((trained_adapter / MANIFEST_NAME).read_text())
    assert m["kind"] == "adapter" and m["name"] == "tiny-adapter"
    assert m["base_model"]["id"] == "tiny-base" and m["base_model"]["model_type"] == "deepseek_v2"
    assert m["base_model"]["config_sha256"] == hashlib.sha256((tiny_base / "config.json").read_bytes()).hexdigest()
    assert m["dataset"]["sha256"] == hashlib.sha256(small_persona_data.read_bytes()).hexdigest()
    stats = m["dataset"]["stats"]
    assert (stats["records"] == 16 and stats["kept"] == 16 and stats["train_examples"] == 14
            and stats["eval_examples"] == 2)
    assert m["chat"]["system_prompt"].startswith("你是沈知微") and "Assistant:" in m["chat"]["chat_template"]
    groups = {row["group"]: row for row in m["lora"]["coverage"]}
    assert set(groups) == {"attention", "dense MLP", "shared experts", "routed experts"}
    assert all(r["asked"] and r["applied"] and r["params"] > 0 for r in groups.values())
    assert m["lora"]["trainable_params"] == sum(r["params"] for r in groups.values())
    t = m["training"]
    assert (t["learning_rate"] == 2e-3 and t["per_device_batch_size"] == 8 and t["dtype"] == "float32"
            and t["seed"] == 42 and t["batch_order"] == "length buckets")
    hist = m["metrics"]["history"]
    assert any("eval_loss" in h for h in hist) and any("loss" in h for h in hist)
    assert m["metrics"]["final_train_loss"] < m["metrics"]["first_train_loss"] / 4, "loss went down"
    run = m["run"]
    assert run["trained_tokens"] > 0 and run["tokens_per_second"] > 0 and run["wall_time_s"] > 0
    assert 0 < run["eval_time_s"] < run["wall_time_s"]  # the run has eval passes (see history above)
    assert run["step_tokens_per_second"] == pytest.approx(
        run["trained_tokens"] / (run["wall_time_s"] - run["eval_time_s"]), rel=0.01)
    assert {"torch", "transformers", "peft"} <= set(m["environment"]["libraries"])
    assert len(m["samples"]) == 2 and all(s["base"] != s["adapter"] for s in m["samples"])


@pytest.mark.slow
def test_base_unchanged_adapter_changed_and_reloads_in_persona(trained_adapter, tiny_base, small_persona_data):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from persona_lora.chat_format import conversation_for
    from persona_lora.dataset.reading import load_records
    from persona_lora.peft_compat import load_adapter

    weights = load_file(str(trained_adapter / "adapter_model.safetensors"))
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b), "LoRA B starts at zero; every one must have moved"

    tok = AutoTokenizer.from_pretrained(tiny_base)
    model = load_adapter(AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32), trained_adapter)
    model.eval()
    m = json.loads((trained_adapter / MANIFEST_NAME).read_text())
    records = load_records(str(small_persona_data)).records
    hits = 0
    for rec in records[:6]:
        conv = conversation_for(rec["messages"], m["chat"]["system_prompt"])
        answer = greedy(model, tok, conv[:-1])
        hits += answer.startswith(conv[-1]["content"][:6])
        with model.disable_adapter():
            assert not greedy(model, tok, conv[:-1]).startswith(conv[-1]["content"][:6])
    assert hits >= 4, f"only {hits}/6 training prompts answered as trained"


@pytest.mark.slow
def test_base_files_bit_identical_after_training_and_overwrite_replaces_the_run(tiny_base, small_persona_data,
                                                                                 tmp_path):
    before = sha256_files(tiny_base)
    out = tmp_path / "out"
    args = train_args(tiny_base, small_persona_data, out, "--set", "training.samples=0",
                      "--set", "training.report_to=none", "--set", "training.save_steps=1")
    assert main([*args, "--max-steps", "2"]) == 0
    assert sha256_files(tiny_base) == before
    assert checkpoints(out) == ["checkpoint-1", "checkpoint-2"]
    (out / "notes.txt").write_text("from the first run")
    first = adapter_weights(out)

    # a run folder of ours: replaced (one step without warm-up, so that it updates the adapter)
    assert main([*args, "--max-steps", "1", "--set", "training.warmup_ratio=0", "--overwrite"]) == 0
    assert not (out / "notes.txt").exists() and checkpoints(out) == ["checkpoint-1"]
    m = manifest(out)
    assert m["metrics"]["steps"] == 1 and m["run"]["resumed"] is False
    assert any(not torch.equal(first[k], w) for k, w in adapter_weights(out).items()), "new weights were written"
    assert sha256_files(tiny_base) == before


@pytest.mark.slow
def test_gradient_checkpointing_recomputes_layers_and_trains_the_same(tiny_base, small_persona_data, tmp_path,
                                                                      monkeypatch):
    """Both GPU configs turn gradient checkpointing on; it runs on the CPU too: every decoder layer runs twice per
    step (forward, then again in backward) and the weights come out as without it."""
    from transformers.models.deepseek_v2 import modeling_deepseek_v2

    # counted inside the layer: the checkpointed layer's own `forward` must stay as transformers wrapped it
    attention = modeling_deepseek_v2.DeepseekV2Attention
    calls = {"n": 0}
    real_forward = attention.forward

    def counting(self, *args, **kwargs):
        calls["n"] += 1
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(attention, "forward", counting)
    runs = {}
    for mode in ("false", "true"):
        calls["n"] = 0
        out = tmp_path / mode
        args = train_args(tiny_base, small_persona_data, out, "--max-steps", "3", "--set", "training.samples=0",
                          "--set", "training.report_to=none", "--set", f"training.gradient_checkpointing={mode}")
        assert main(args) == 0
        runs[mode] = (out, calls["n"], manifest(out))
    (plain, plain_calls, plain_m), (ckpt, ckpt_calls, ckpt_m) = runs["false"], runs["true"]
    layers = json.loads((tiny_base / "config.json").read_text())["num_hidden_layers"]
    # each of the 3 steps runs every layer once more (the recomputation); any other pass happens in both runs
    assert plain_calls >= 3 * layers and ckpt_calls - plain_calls == 3 * layers, (plain_calls, ckpt_calls)
    assert ckpt_m["training"]["gradient_checkpointing"] is True
    assert plain_m["training"]["gradient_checkpointing"] is False
    assert [h["loss"] for h in ckpt_m["metrics"]["history"] if "loss" in h] == pytest.approx(
        [h["loss"] for h in plain_m["metrics"]["history"] if "loss" in h], rel=1e-5)
    assert max_weight_diff(plain, ckpt) < 1e-5


@pytest.mark.slow
def test_a_run_ending_between_logging_steps_records_its_last_step(tiny_base, small_persona_data, tmp_path):
    """configs/tiny.yaml logs every 10 steps; a 3-step run still records step 3 (its loss is the mean of steps 2-3,
    Trainer's own average since the last log) as its steps and final loss, in the manifest and the card."""
    out = tmp_path / "out"
    assert main(train_args(tiny_base, small_persona_data, out, "--max-steps", "3", "--set", "lora.preset=attention",
                           "--set", "training.samples=0", "--set", "training.report_to=none")) == 0
    m = manifest(out)
    losses = [(h["step"], h["loss"]) for h in m["metrics"]["history"] if "loss" in h]
    assert [step for step, _ in losses] == [1, 3]
    assert m["metrics"]["steps"] == 3 and m["metrics"]["final_train_loss"] == losses[-1][1] != losses[0][1]
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "| Optimizer steps | 3 |" in card and f"| Final train loss | {losses[-1][1]:.4f} |" in card


def test_a_run_whose_steps_all_fall_in_the_warm_up_is_refused_before_loading(tiny_base, small_persona_data,
                                                                              tmp_path, capsys):
    out = tmp_path / "out"
    assert main(train_args(tiny_base, small_persona_data, out, "--max-steps", "1")) == 2
    err = capsys.readouterr().err
    assert "no step of this run would change the adapter: all 1 optimizer step(s) fall in the warm-up" in err
    assert "Raise --max-steps to 2 or more, or set training.warmup_ratio=0" in err and "--allow-no-update" in err
    assert "Traceback" not in err and not out.exists()
    assert main(train_args(tiny_base, small_persona_data, out, "--set", "training.learning_rate=0")) == 2
    assert "training.learning_rate is 0" in capsys.readouterr().err and not out.exists()


@pytest.mark.slow
def test_allow_no_update_runs_it_and_says_so(tiny_base, small_persona_data, tmp_path, capsys, caplog):
    out = tmp_path / "out"
    assert main(train_args(tiny_base, small_persona_data, out, "--max-steps", "1", "--allow-no-update",
                           "--set", "lora.preset=attention", "--set", "training.samples=0",
                           "--set", "training.report_to=none")) == 0
    assert "warning: no step of this run changes the adapter" in capsys.readouterr().out
    assert "the adapter did not change in 1 step(s)" in caplog.text
    weights = adapter_weights(out)
    assert all(not w.any() for k, w in weights.items() if "lora_B" in k), "LoRA B is still its zero init"


def test_a_loop_that_left_the_weights_as_they_were_is_refused_at_its_end():
    """The end-of-loop check on its own: the callbacks see the model Trainer hands them at begin and end."""
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from persona_lora.errors import VerificationError
    from persona_lora.train.steps import StopOnSignal, loop_callbacks, new_tally

    model = torch.nn.Linear(3, 2)
    model.bias.requires_grad_(False)
    args, state = TrainingArguments(output_dir="unused", report_to="none"), TrainerState(global_step=4)
    for allow in (False, True):
        tally = new_tally()
        (callback,) = loop_callbacks(StopOnSignal(), tally, allow_no_update=allow)
        callback.on_train_begin(args, state, TrainerControl(), model=model)
        with torch.no_grad():
            model.bias += 1  # not trainable: not the adapter
        if allow:
            callback.on_train_end(args, state, TrainerControl(), model=model)
            assert tally["changed"] is False
        else:
            with pytest.raises(VerificationError, match="did not change in 4 step"):
                callback.on_train_end(args, state, TrainerControl(), model=model)
    tally = new_tally()
    (callback,) = loop_callbacks(StopOnSignal(), tally)
    callback.on_train_begin(args, state, TrainerControl(), model=model)
    with torch.no_grad():
        model.weight[0, 0] += 1e-6
    callback.on_train_end(args, state, TrainerControl(), model=model)
    assert tally["changed"] is True


# ------------------------------------------------------------------ output folder safety


def test_existing_output_dir_is_never_overwritten_silently(tiny_base, small_persona_data, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(train_args(tiny_base, small_persona_data, out, "--max-steps", "1")) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert main(train_args(tiny_base, small_persona_data, out, "--max-steps", "1", "--overwrite")) == 2
    assert "does not look like a persona-lora run folder" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine"


def test_resume_without_checkpoint_is_a_clear_error(tiny_base, small_persona_data, tmp_path, capsys):
    assert main(train_args(tiny_base, small_persona_data, tmp_path / "new", "--resume")) == 2
    assert "no checkpoint found" in capsys.readouterr().err


# ------------------------------------------------------------------ crash, kill -9, Ctrl-C


def _spawn(args: list[str], env_extra: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-m", "persona_lora", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(pred, proc, timeout=240):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if pred():
            return True
        if proc.poll() is not None:
            raise AssertionError("training ended before the expected point:\n" + proc.stdout.read()[-3000:])
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("timed out")


def _steps(history, key="loss"):
    return [h["step"] for h in history if key in h]


RESUME_RUN = ("--max-steps", "12", "--set", "training.save_steps=4", "--set", "training.logging_steps=2",
              "--set", "training.eval_steps=6", "--set", "training.samples=0", "--set", "training.report_to=none")


@pytest.mark.slow
def test_resume_after_kill_9_continues_from_the_checkpoint(tiny_base, small_persona_data, tmp_path):
    """Killed after a checkpoint, then `--resume`: the run goes on from the checkpoint's step with its optimizer
    and schedule state, and ends where an uninterrupted run ends."""
    from persona_lora.train.run_folder import latest_checkpoint

    out, ref = tmp_path / "out", tmp_path / "uninterrupted"
    args = train_args(tiny_base, small_persona_data, out, *RESUME_RUN)
    proc = _spawn(args, {"OMP_NUM_THREADS": "1"})  # one thread, as in this process: the same arithmetic
    _wait_for(lambda: (out / "checkpoints" / "checkpoint-4" / "trainer_state.json").exists(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "adapter_model.safetensors").exists(), "a killed run has no final adapter yet"
    checkpoint = latest_checkpoint(out)
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["global_step"] == int(checkpoint.name.split("-")[1]) < 12

    assert main([*args, "--resume"]) == 0
    assert main(train_args(tiny_base, small_persona_data, ref, *RESUME_RUN)) == 0
    got, want = manifest(out), manifest(ref)
    # this process trained only the steps after the checkpoint (a restart from step 0 would have trained all 12)
    assert got["run"]["trained_tokens"] == want["run"]["trained_tokens"] - state["num_input_tokens_seen"] > 0
    assert got["run"]["resumed"] is True and want["run"]["resumed"] is False and got["metrics"]["steps"] == 12
    # the same steps logged once each, at the same points of the learning-rate schedule, with the same losses
    hist, ref_hist = got["metrics"]["history"], want["metrics"]["history"]
    assert [(h["step"], sorted(h)) for h in hist] == [(h["step"], sorted(h)) for h in ref_hist]
    assert _steps(hist) == [1, 2, 4, 6, 8, 10, 12] and _steps(hist, "eval_loss") == [6, 12]
    for h, r in zip(hist, ref_hist):
        for key in ("learning_rate", "loss", "eval_loss", "grad_norm"):
            if key in r:
                assert h[key] == pytest.approx(r[key], rel=1e-5), (h["step"], key)
    # the optimizer's moments came back too: the final weights are the uninterrupted run's
    assert max_weight_diff(out, ref) < 1e-5
    # save_total_limit (2 in configs/tiny.yaml): only the newest checkpoints are kept
    assert checkpoints(ref) == ["checkpoint-8", "checkpoint-12"] == checkpoints(out)


@pytest.mark.slow
def test_ctrl_c_leaves_a_usable_adapter_and_resume_auto_continues(tiny_base, small_persona_data, tmp_path):
    """`--resume auto` (what the quickstart runs) starts a new folder from scratch; Ctrl-C saves a checkpoint and
    an adapter that loads and answers; `--resume auto` then continues from that checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from persona_lora.peft_compat import load_adapter
    from persona_lora.train.run_folder import latest_checkpoint

    out = tmp_path / "out"
    args = train_args(tiny_base, small_persona_data, out, "--max-steps", "24", "--resume", "auto",
                      "--set", "training.save_steps=3", "--set", "training.logging_steps=1",
                      "--set", "training.samples=0", "--set", "training.report_to=none")
    proc = _spawn(args)
    _wait_for(lambda: (out / "checkpoints" / "checkpoint-3" / "trainer_state.json").exists(), proc)
    proc.send_signal(signal.SIGINT)
    text, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, text[-2000:]  # interrupted: not a success
    assert re.search(r"interrupted at step \d+ of 24: checkpoint saved", text), text[-2000:]
    # the exact command that continues it: the command as run, with --resume
    i = args.index("--resume")
    assert "persona-lora train " + " ".join(args[1:i] + args[i + 2:]) + " --resume\n" in text, text[-2000:]
    assert "{'loss'" not in text and "Loading weights" not in text and "FutureWarning" not in text
    m = manifest(out)
    steps = m["metrics"]["steps"]
    assert m["run"]["interrupted"] is True and m["run"]["resumed"] is False and 3 < steps < 24
    assert latest_checkpoint(out).name == f"checkpoint-{steps}"
    seen_at_interrupt = json.loads((latest_checkpoint(out) / "trainer_state.json").read_text())["num_input_tokens_seen"]
    assert "interrupted" in (out / "README.md").read_text(encoding="utf-8").lower()

    # the adapter holds the weights of the step reached, and loads and answers
    saved, at_step = adapter_weights(out), adapter_weights(latest_checkpoint(out))
    assert saved.keys() == at_step.keys() and all(torch.equal(saved[k], at_step[k]) for k in saved)
    tok = AutoTokenizer.from_pretrained(tiny_base)
    model = load_adapter(AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32), out).eval()
    question = [{"role": "system", "content": m["chat"]["system_prompt"]}, {"role": "user", "content": "你是谁？"}]
    answer = greedy(model, tok, question, n=12)
    with model.disable_adapter():
        base_answer = greedy(model, tok, question, n=12)
    assert answer and answer != base_answer

    assert main(args) == 0
    m2 = manifest(out)
    assert m2["metrics"]["steps"] == 24 and m2["run"]["resumed"] is True and not m2["run"]["interrupted"]
    hist = m2["metrics"]["history"]
    assert hist[:len(m["metrics"]["history"])] == m["metrics"]["history"], "the history goes on from the checkpoint"
    assert _steps(hist) == list(range(1, 25))
    # only the steps after the checkpoint were trained (a restart would have trained all 24 again)
    seen_at_end = json.loads((latest_checkpoint(out) / "trainer_state.json").read_text())["num_input_tokens_seen"]
    assert m2["run"]["trained_tokens"] == seen_at_end - seen_at_interrupt > 0


# ------------------------------------------------------------------ dry run and failures


def test_dry_run_prints_plan_without_training(tiny_base, small_persona_data, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(train_args(tiny_base, small_persona_data, out, "--dry-run")) == 0
    text = capsys.readouterr().out
    for needle in ("resolved config:", "16 records", "LoRA coverage:", "routed experts", "trainable", "estimate:",
                   "memory:"):
        assert needle in text
    assert not out.exists()


@pytest.mark.parametrize(
    "override, needle",
    [
        (["--base", "does/not/exist/here"], "does not exist"),
        (["--base", "nobody-xyz/no-such-model"],
         "cannot reach http://127.0.0.1:9; check your network or HF_ENDPOINT (ConnectError during download base "
         "nobody-xyz/no-such-model)"),
        (["--set", "base.load_in_4bit=true"], "needs a CUDA GPU"),
        pytest.param(["--set", "base.device=cuda"], "no CUDA device",
                     marks=pytest.mark.skipif(cuda_available(), reason="a CUDA device is there: nothing to refuse")),
    ],
)
def test_model_loading_failures_are_clear(tiny_base, small_persona_data, tmp_path, capsys, monkeypatch, override,
                                         needle):
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: "offline"
    monkeypatch.setattr(c, "HF_HUB_ETAG_TIMEOUT", 2)
    args = train_args(tiny_base, small_persona_data, tmp_path / "out", "--max-steps", "2")
    idx = args.index("--base") if override[0] == "--base" else None
    if idx is not None:
        args[idx + 1] = override[1]
    else:
        args += override
    code = main(args)
    err = capsys.readouterr().err
    assert code != 0 and needle in err and "Traceback" not in err, err


@pytest.mark.slow
@pytest.mark.parametrize("late_rank", [False, True], ids=["together", "rank-1-late"])
def test_accelerate_launch_runs_data_parallel_on_two_cpu_processes(tiny_base, small_persona_data, tmp_path,
                                                                    late_rank):
    """`accelerate launch` runs the same command data-parallel (2 CPU processes, gloo), also when rank 1 starts
    seconds after rank 0 has claimed the output folder."""
    out = tmp_path / "ddp"
    args = train_args(tiny_base, small_persona_data, out, "--max-steps", "3", "--set", "training.batch_size=4",
                      "--set", "training.samples=0", "--set", "training.report_to=none")
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()),
        *(["tests/fixtures/late_rank.py"] if late_rank else ["-m", "persona_lora"]), *args,
    ]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    m = json.loads((out / MANIFEST_NAME).read_text())
    assert m["training"]["world_size"] == 2 and m["training"]["effective_batch_size"] == 8
    assert m["metrics"]["steps"] == 3
    assert proc.stdout.count("LoRA coverage:") == 1, "only rank 0 prints"
    weights = load_file(str(out / "adapter_model.safetensors"))
    assert any(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k)


def test_packing_without_flash_attention_is_refused(tiny_base, small_persona_data, tmp_path, capsys):
    """Packed examples attend to each other under SDPA (the second example's logits change), so packing is only
    allowed where flash-attention separates them."""
    args = train_args(tiny_base, small_persona_data, tmp_path / "o", "--max-steps", "1",
                      "--set", "training.packing=true")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "training.packing needs flash-attention 2" in err and not (tmp_path / "o").exists()
