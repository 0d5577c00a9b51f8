"""End-to-end training on the tiny DeepSeek-V2 base through the real CLI, plus resume, interrupt and failures."""

from __future__ import annotations

import hashlib
import json
import os
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
from tests.conftest import REPO, train_args


def sha256_files(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def greedy(model, tokenizer, messages, n=40):
    from persona_lora.train.chat_format import encode_prompt

    ids = torch.tensor([encode_prompt(tokenizer, messages)])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


# ------------------------------------------------------------------ the main path


def test_training_writes_a_complete_adapter_folder(trained_adapter):
    names = {p.name for p in trained_adapter.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", MANIFEST_NAME, "loss.png", "checkpoints",
            "logs"} <= names
    assert not (trained_adapter / "tokenizer.json").exists(), "tokenizer files only when training changed the tokenizer"
    assert list((trained_adapter / "logs").rglob("events.out.tfevents*")), "TensorBoard logs by default"
    cfg = json.loads((trained_adapter / "adapter_config.json").read_text())
    assert not cfg["base_model_name_or_path"].startswith("/"), "no absolute local path in the adapter config"
    assert cfg["target_parameters"] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def test_manifest_records_the_run(trained_adapter, tiny_base, small_persona_data):
    m = json.loads((trained_adapter / MANIFEST_NAME).read_text())
    assert m["kind"] == "adapter" and m["name"] == "tiny-persona"
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
            and t["seed"] == 42)
    hist = m["metrics"]["history"]
    assert any("eval_loss" in h for h in hist) and any("loss" in h for h in hist)
    assert m["metrics"]["final_train_loss"] < m["metrics"]["first_train_loss"] / 4, "loss went down"
    assert m["run"]["trained_tokens"] > 0 and m["run"]["tokens_per_second"] > 0 and m["run"]["wall_time_s"] > 0
    assert {"torch", "transformers", "peft"} <= set(m["environment"]["libraries"])
    assert len(m["samples"]) == 2 and all(s["base"] != s["adapter"] for s in m["samples"])


def test_base_unchanged_adapter_changed_and_reloads_in_persona(trained_adapter, tiny_base, small_persona_data):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from persona_lora.peft_compat import load_adapter
    from persona_lora.train.chat_format import conversation_for
    from persona_lora.train.data import load_records

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


def test_base_files_bit_identical_after_training(tiny_base, small_persona_data, tmp_path):
    before = sha256_files(tiny_base)
    args = train_args(tiny_base, small_persona_data, tmp_path / "out", "--max-steps", "2",
                      "--set", "training.samples=0", "--set", "training.report_to=none")
    assert main(args) == 0
    assert sha256_files(tiny_base) == before


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


def test_resume_after_kill_9_continues_with_continuous_history(tiny_base, small_persona_data, tmp_path):
    out = tmp_path / "out"
    args = train_args(tiny_base, small_persona_data, out, "--max-steps", "24", "--set", "training.save_steps=6",
                      "--set", "training.logging_steps=2", "--set", "training.samples=0",
                      "--set", "training.report_to=none")
    proc = _spawn(args)
    _wait_for(lambda: (out / "checkpoints" / "checkpoint-12" / "trainer_state.json").exists(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / MANIFEST_NAME).exists(), "a killed run has no final adapter yet"
    assert main([*args, "--resume"]) == 0
    m = json.loads((out / MANIFEST_NAME).read_text())
    steps = _steps(m["metrics"]["history"])
    assert steps == sorted(set(steps)), "no step logged twice"
    assert steps[0] == 1 and steps[-1] == 24 and all(b - a <= 2 for a, b in zip(steps, steps[1:])), steps
    assert m["run"]["resumed"] is True and m["metrics"]["steps"] == 24


def test_ctrl_c_leaves_a_usable_checkpoint(tiny_base, small_persona_data, tmp_path):
    out = tmp_path / "out"
    args = train_args(tiny_base, small_persona_data, out, "--max-steps", "200", "--set", "training.logging_steps=1",
                      "--set", "training.samples=0", "--set", "training.report_to=none")
    proc = _spawn(args)
    _wait_for(lambda: (out / "checkpoints").exists(), proc)
    time.sleep(3)
    proc.send_signal(signal.SIGINT)
    text, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, text[-2000:]  # interrupted: not a success
    assert "interrupted: checkpoint saved" in text
    ckpts = list((out / "checkpoints").glob("checkpoint-*"))
    assert ckpts and all((c / "adapter_model.safetensors").exists() for c in ckpts)
    m = json.loads((out / MANIFEST_NAME).read_text())
    assert m["run"]["interrupted"] is True and 0 < m["metrics"]["steps"] < 200
    assert main([*args, "--resume", "--max-steps", str(m["metrics"]["steps"] + 2)]) == 0


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
        (["--set", "base.device=cuda"], "no CUDA device"),
    ],
)
def test_model_loading_failures_are_clear(tiny_base, small_persona_data, tmp_path, capsys, monkeypatch, override,
                                         needle):
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: "offline"
    monkeypatch.setattr(c, "HF_HUB_ETAG_TIMEOUT", 2)
    args = train_args(tiny_base, small_persona_data, tmp_path / "out", "--max-steps", "1")
    idx = args.index("--base") if override[0] == "--base" else None
    if idx is not None:
        args[idx + 1] = override[1]
    else:
        args += override
    code = main(args)
    err = capsys.readouterr().err
    assert code != 0 and needle in err and "Traceback" not in err, err


def test_accelerate_launch_runs_data_parallel_on_two_cpu_processes(tiny_base, small_persona_data, tmp_path):
    """`accelerate launch` runs the same command data-parallel (2 CPU processes, gloo)."""
    out = tmp_path / "ddp"
    args = train_args(tiny_base, small_persona_data, out, "--max-steps", "3", "--set", "training.batch_size=4",
                      "--set", "training.samples=0", "--set", "training.report_to=none")
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517",
        "-m", "persona_lora", *args,
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
