"""Sharded training (training.fsdp) on the tiny DeepSeek-V2 base with 2 CPU processes over gloo, and the dry run's
memory plan for the real model's shape.

The multi-process runs go through the real launchers (torchrun, accelerate launch) and the real CLI. A 2-process
sharded run with per-device batch 4 must train exactly what one process with batch 8 trains (same global batch,
same data order: length grouping off, and a train split that divides into full batches).
"""

from __future__ import annotations

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
from tests.conftest import REPO, free_port, train_args

# 16 records, half held out: 8 train examples, one full global batch of 8 per step (4 per process); a loss logged
# every 3 steps, so the last step (8) is logged only because it is the last
RUN = ("--max-steps", "8", "--set", "data.eval_fraction=0.5", "--set", "training.group_by_length=false",
       "--set", "training.logging_steps=3", "--set", "training.eval_steps=4", "--set", "training.save_steps=3",
       "--set", "training.samples=2", "--set", "training.report_to=none")
SHARDED = ("--set", "training.batch_size=4", "--set", "training.fsdp=true",
           "--set", "training.gradient_checkpointing=true")

# Runs the CLI, and just before the adapter is written each rank dumps the LoRA parameters it trained (whole).
DRIVER = '''
import json, os, sys
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor
import persona_lora.train.trainer as T

original = T.finalise

def finalise(cfg, setup, data, model, *args, **kwargs):
    trained = {}
    for name, p in model.peft_model.named_parameters():
        if p.requires_grad:
            trained[name] = (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu().clone()
    save_file(trained, os.path.join(os.environ["DUMP_DIR"], "rank%s.safetensors" % os.environ["RANK"]))
    experts = {n: [list(p.shape), list(p.to_local().shape) if isinstance(p, DTensor) else None]
               for n, p in model.peft_model.named_parameters() if n.endswith("base_layer.base_layer.gate_up_proj")}
    with open(os.path.join(os.environ["DUMP_DIR"], "rank%s.json" % os.environ["RANK"]), "w") as f:
        json.dump({"experts_forward": model.experts_forward, "experts": experts}, f)
    return original(cfg, setup, data, model, *args, **kwargs)

T.finalise = finalise
from persona_lora.cli import main
sys.exit(main(sys.argv[1:]))
'''


def _env() -> dict:
    return {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _torchrun(script_or_module: list[str], args: list[str], env: dict | None = None, **popen) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           *script_or_module, *args]
    return subprocess.Popen(cmd, cwd=REPO, env=env or _env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, **popen)


def _finish(proc: subprocess.Popen, timeout: int = 300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def manifest(out: Path) -> dict:
    return json.loads((out / MANIFEST_NAME).read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def runs(tiny_base, small_persona_data, tmp_path_factory):
    """One sharded 2-process run (torchrun, with the ranks' trained LoRA dumped) and one single-process run."""
    root = tmp_path_factory.mktemp("fsdp")
    driver = root / "driver.py"
    driver.write_text(DRIVER, encoding="utf-8")
    sharded, single, dumps = root / "sharded", root / "single", root / "dumps"
    dumps.mkdir()
    proc = _torchrun([str(driver)], train_args(tiny_base, small_persona_data, sharded, *RUN, *SHARDED),
                     env={**_env(), "DUMP_DIR": str(dumps)})
    stdout = _finish(proc)
    assert main(train_args(tiny_base, small_persona_data, single, *RUN, "--set", "training.batch_size=8")) == 0
    return {"sharded": sharded, "single": single, "dumps": dumps, "stdout": stdout}


def _history(out: Path, key: str) -> list[tuple[int, float]]:
    return [(h["step"], h[key]) for h in manifest(out)["metrics"]["history"] if key in h]


@pytest.mark.slow
def test_sharded_run_trains_what_one_process_trains(runs):
    sharded, single = manifest(runs["sharded"]), manifest(runs["single"])
    assert sharded["training"]["world_size"] == 2 and sharded["training"]["sharding"] == "fsdp2 per decoder layer"
    assert single["training"]["world_size"] == 1 and single["training"]["sharding"] == "none"
    assert sharded["training"]["effective_batch_size"] == single["training"]["effective_batch_size"] == 8
    for key in ("loss", "eval_loss"):
        got, want = _history(runs["sharded"], key), _history(runs["single"], key)
        assert [s for s, _ in got] == [s for s, _ in want] == ([1, 3, 6, 8] if key == "loss" else [4, 8])
        for (step, a), (_, b) in zip(got, want):
            assert abs(a - b) < 1e-3, (key, step, a, b)
    assert sharded["metrics"]["final_train_loss"] < sharded["metrics"]["first_train_loss"] - 1
    # the steps and final loss recorded are the last step's, also where it is not a multiple of logging_steps
    assert sharded["metrics"]["steps"] == 8 and sharded["metrics"]["final_train_loss"] == _history(
        runs["sharded"], "loss")[-1][1]
    # the coverage applied is the coverage asked, the same as unsharded, group by group
    assert all(row["applied"] == row["asked"] for row in sharded["lora"]["coverage"])
    assert sharded["lora"]["coverage"] == single["lora"]["coverage"]
    assert sharded["lora"]["trainable_params"] == single["lora"]["trainable_params"]
    assert runs["stdout"].count("LoRA coverage:") == 1 and runs["stdout"].count("adapter written to") == 1
    assert len(sharded["samples"]) == 2 and all(s["adapter"] for s in sharded["samples"])
    # checkpoints keep the optimizer and scheduler state (what --resume needs), written once, by rank 0
    ckpt = runs["sharded"] / "checkpoints" / "checkpoint-8"
    assert {"adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json"} <= {
        p.name for p in ckpt.iterdir()}


@pytest.mark.slow
def test_saved_adapter_is_what_the_ranks_trained_and_loads_in_stock_peft(runs, tiny_base):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    rank0 = load_file(str(runs["dumps"] / "rank0.safetensors"))
    rank1 = load_file(str(runs["dumps"] / "rank1.safetensors"))
    assert rank0.keys() == rank1.keys() and rank0
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0), "the LoRA replicas diverged"
    saved = load_file(str(runs["sharded"] / "adapter_model.safetensors"))
    trained = {k.replace(".default.", "."): v for k, v in rank0.items()}
    assert saved.keys() == trained.keys()
    assert all(torch.equal(saved[k], trained[k]) for k in saved), "the saved adapter is not what the ranks trained"
    assert all(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)
    # the routed experts were sharded by expert (half on each rank) and still ran the LoRA-aware expert forward:
    # FSDP hands each decoder layer its full weights for the forward
    info = json.loads((runs["dumps"] / "rank0.json").read_text())
    assert info["experts_forward"].startswith("LoRA-aware") and len(info["experts"]) == 3  # the MoE layers
    assert all(local == [full[0] // 2, *full[1:]] for full, local in info["experts"].values())

    def stock(folder):
        base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
        return PeftModel.from_pretrained(base, folder).eval()

    model = stock(runs["sharded"])
    loaded = {n.replace(".default.", "."): p for n, p in model.named_parameters() if "lora_" in n}
    assert loaded.keys() == trained.keys() and all(torch.equal(loaded[k], trained[k]) for k in loaded)
    ids = torch.tensor([[5, 17, 300, 42, 7, 99, 1000, 3]])
    with torch.no_grad():
        got = model(input_ids=ids).logits
        want = stock(runs["single"])(input_ids=ids).logits
    assert (got - want).abs().max().item() < 1e-3


def _rank_pid(parent: int, rank: int) -> int | None:
    """The pid of the launcher's worker process with RANK=rank."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[1]) != parent:
                continue
            env = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if f"RANK={rank}".encode() in env:
            return int(entry.name)
    return None


@pytest.mark.slow
def test_resume_after_killing_one_rank_continues_the_sharded_run(runs, tiny_base, small_persona_data, tmp_path):
    """kill -9 of rank 1 after the step-3 checkpoint ends the run (the launcher stops the other rank); `--resume`
    under `accelerate launch` with the shipped FSDP config continues it to the uninterrupted run's losses and
    weights."""
    out = tmp_path / "killed"
    args = train_args(tiny_base, small_persona_data, out, *RUN, *SHARDED)
    proc = _torchrun(["-m", "persona_lora"], args)
    deadline = time.time() + 240
    while not (out / "checkpoints" / "checkpoint-3" / "trainer_state.json").exists():
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() < deadline, "no checkpoint-3"
        time.sleep(0.05)
    victim = _rank_pid(proc.pid, 1)
    assert victim is not None
    os.kill(victim, signal.SIGKILL)
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert not (out / "adapter_model.safetensors").exists(), "the killed run must not have finished"

    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "configs" / "accelerate" / "fsdp.yaml"), "--num_processes", "2", "--main_process_port",
           str(free_port()), "-m", "persona_lora", *args, "--resume"]
    resumed = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    got, want = manifest(out), manifest(runs["sharded"])
    assert got["run"]["resumed"] is True and got["metrics"]["steps"] == 8
    assert got["training"]["sharding"] == "fsdp2 per decoder layer"
    for key in ("loss", "eval_loss", "learning_rate"):
        a, b = _history(out, key), _history(runs["sharded"], key)
        assert [s for s, _ in a] == [s for s, _ in b]
        assert all(x == pytest.approx(y, rel=1e-4, abs=1e-6) for (_, x), (_, y) in zip(a, b)), key
    assert 0 < got["run"]["trained_tokens"] < want["run"]["trained_tokens"], "only the steps after step 3 ran"
    weights, ref = (load_file(str(p / "adapter_model.safetensors")) for p in (out, runs["sharded"]))
    assert max((weights[k] - ref[k]).abs().max().item() for k in ref) < 1e-5


# ------------------------------------------------------------------ one process, and the plan


def test_fsdp_true_with_one_process_is_a_clear_error(tiny_base, small_persona_data, tmp_path, capsys, monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "ACCELERATE_USE_FSDP"):
        monkeypatch.delenv(var, raising=False)
    out = tmp_path / "out"
    code = main(train_args(tiny_base, small_persona_data, out, "--set", "training.fsdp=true"))
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err
    assert "training.fsdp: true needs more than one process" in err and "torchrun --nproc_per_node" in err, err
    assert not out.exists(), "nothing is written before the refusal"


class _Plan:
    def __init__(self, total_bytes):
        self.total_bytes = total_bytes


def test_when_the_base_is_sharded(monkeypatch):
    """false: never; true: only with more than one process; auto: with more than one process when one device's
    plan exceeds its memory (on the CPU, the machine's RAM shared by the local processes); an accelerate FSDP
    launch config asks for it."""
    import psutil

    from persona_lora.errors import UsageError
    from persona_lora.train.fsdp import decide

    for var in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "ACCELERATE_USE_FSDP"):
        monkeypatch.delenv(var, raising=False)
    asked = []

    def plan(total):
        return lambda: asked.append(total) or _Plan(total)

    ram = psutil.virtual_memory().total
    assert decide(_cfg(fsdp="auto"), "cpu", plan(10 * ram)) is False and not asked, "one process: nothing to shard"
    assert decide(_cfg(fsdp="false"), "cpu", plan(10 * ram)) is False
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert decide(_cfg(fsdp="auto"), "cpu", plan(ram)) is True  # more than each process's half of the RAM
    assert decide(_cfg(fsdp="auto"), "cpu", plan(ram // 4)) is False
    assert decide(_cfg(fsdp="true"), "cpu", plan(1)) is True
    assert decide(_cfg(fsdp="false"), "cpu", plan(10 * ram)) is False
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert decide(_cfg(fsdp="false"), "cpu", plan(1)) is True
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(UsageError, match="needs more than one process"):
        decide(_cfg(fsdp="false"), "cpu", plan(1))


def test_fsdp_with_a_4bit_base_or_a_preference_run_is_refused():
    from persona_lora.errors import ConfigError

    with pytest.raises(ConfigError, match="training.fsdp and base.load_in_4bit"):
        _cfg(fsdp="true", load_in_4bit=None)
    from persona_lora.train.config import config_from_dict

    with pytest.raises(ConfigError, match="preference runs do not shard"):
        config_from_dict({"base": {"model": "b"}, "data": {"path": "d"}, "preference": {"method": "dpo"},
                          "training": {"output_dir": "o", "fsdp": "true"}})


def _cfg(load_in_4bit: bool | None = False, **training):
    from persona_lora.train.config import config_from_dict

    base = {"model": "b", "load_in_4bit": True} if load_in_4bit is None else {"model": "b"}
    return config_from_dict({"base": base, "data": {"path": "d"}, "training": {"output_dir": "o", **training}})


def _real_params(c: dict) -> int:
    """DeepSeek-V2's parameters from its config, by hand: embeddings and head (untied), per layer MLA attention and
    two norms, the dense MLP of the first layers, then 64 fused routed experts, the router and the shared experts."""
    h, heads, kv, rope = c["hidden_size"], c["num_attention_heads"], c["kv_lora_rank"], c["qk_rope_head_dim"]
    nope, v, im = c["qk_nope_head_dim"], c["v_head_dim"], c["moe_intermediate_size"]
    attention = h * heads * (nope + rope) + h * (kv + rope) + kv + kv * heads * (nope + v) + heads * v * h + 2 * h
    dense = 3 * h * c["intermediate_size"]
    moe = c["n_routed_experts"] * (3 * h * im + h) + 3 * h * im * c["n_shared_experts"]
    k, layers = c["first_k_dense_replace"], c["num_hidden_layers"]
    return 2 * c["vocab_size"] * h + h + k * (attention + dense) + (layers - k) * (attention + moe)


def _real_lora(c: dict, r: int) -> int:
    """LoRA parameters of the `all` preset at rank r: A (r x in) and B (out x r) per linear layer; on a fused expert
    tensor (E, out, in) PEFT's A is (r*E, in) and B (out, r*E)."""
    h, heads, kv, rope = c["hidden_size"], c["num_attention_heads"], c["kv_lora_rank"], c["qk_rope_head_dim"]
    nope, v, im, e = c["qk_nope_head_dim"], c["v_head_dim"], c["moe_intermediate_size"], c["n_routed_experts"]
    attention = r * ((h + heads * (nope + rope)) + (h + kv + rope) + (kv + heads * (nope + v)) + (heads * v + h))
    dense = 3 * r * (h + c["intermediate_size"])
    shared = 3 * r * (h + im * c["n_shared_experts"])
    routed = r * e * (h + 2 * im) + r * e * (im + h)
    k, layers = c["first_k_dense_replace"], c["num_hidden_layers"]
    return layers * attention + k * dense + (layers - k) * (shared + routed)


def test_dry_run_memory_table_for_the_real_model(tiny_base, small_persona_data, tmp_path, capsys):
    """The real config's dry run on the real model's shape (config.json only; a meta-device model, no weights):
    weights per device are the base's bf16 bytes / N, LoRA + optimizer 16 bytes per LoRA parameter."""
    import shutil

    from persona_lora.train.tiny_base import real_config

    base = tmp_path / "real-shape"
    base.mkdir()
    config = real_config()
    (base / "config.json").write_text(json.dumps(config), encoding="utf-8")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(tiny_base / name, base / name)
    code = main(["train", str(REPO / "configs" / "deepseek-coder-v2-lite-huanhuan.yaml"), "--base", str(base),
                 "--data", str(small_persona_data), "--output-dir", str(tmp_path / "out"), "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0
    assert not (tmp_path / "out").exists()
    lines = out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("memory per device, GiB"))
    assert "bfloat16 weights" in lines[head] and "checkpointing on" in lines[head]
    cols = lines[head + 1].split()
    rows = {int(line.split()[0]): line.split() for line in lines[head + 2:head + 6]}
    assert sorted(rows) == [1, 2, 4, 8]
    total = _real_params(config)
    assert 15.5e9 < total < 16.0e9  # DeepSeek-Coder-V2-Lite: 15.7B
    lora = _real_lora(config, r=16)
    gib = 1 << 30
    for n, row in rows.items():
        cell = dict(zip(cols, row))
        assert cell["sharding"] == ("none" if n == 1 else "fsdp2")
        assert float(cell["weights"]) == pytest.approx(total * 2 / n / gib, rel=0.05), n
        assert float(cell["LoRA+optim"]) == pytest.approx(lora * 16 / gib, rel=0.05)
        parts = sum(float(cell[k]) for k in ("weights", "gathered", "LoRA+optim", "activations", "runtime"))
        assert float(cell["total"]) == pytest.approx(parts, abs=0.02)
        for card in (24, 40, 80):  # the verdict is the total against the card
            assert cell[f"{card}GiB"] == ("fits" if float(cell["total"]) <= card else "no")
    assert rows[1][cols.index("24GiB")] == "no", "29 GiB of bf16 weights cannot fit one 24 GiB card"
    assert rows[4][cols.index("24GiB")] == "fits", "4 x 24 GiB runs the job sharded"
    assert any(line.startswith("this run (1 process, unsharded)") for line in lines)
