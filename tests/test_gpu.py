"""The CUDA tier: what the GPU configs and a GPU demo rely on, on the device, in bfloat16 (the default dtype there).

Skipped with the reason printed where torch sees no CUDA device (tests/conftest.py); on a GPU machine each test takes
seconds on the tiny base. `pytest -m gpu` runs this tier alone. The CPU tests pin device and dtype, so these are the
only tests that see what `auto` picks on a GPU.
"""

from __future__ import annotations

import json

import pytest
import torch

from persona_lora.artifact import MANIFEST_NAME
from persona_lora.cli import main
from tests.conftest import train_args

pytestmark = pytest.mark.gpu

SYSTEM = "You are Zhen Huan, a consort in the imperial palace."
PROMPTS = ["Who are you?", "What did you do today?"]
IDS = [0, 11, 250, 37, 902, 4, 1500, 1, 77, 3000]
N = 12


@pytest.fixture(scope="module")
def adapters(tiny_base, tmp_path_factory):
    from persona_lora.train.synthetic import make_random_adapter

    root = tmp_path_factory.mktemp("gpu-adapters")
    return {preset: make_random_adapter(tiny_base, root / preset, preset, seed=seed, r=8, alpha=16,
                                        system_prompt=SYSTEM)
            for preset, seed in (("attention", 1), ("all", 2))}


def test_demo_on_cuda_bf16_answers_both_sides_in_one_batch_as_in_separate_runs(tiny_base, adapters):
    """The resident model's per-row routing on the GPU: base and adapter rows decoded in one batch give the answers
    the same engine gives decoding each side in a batch of its own."""
    from persona_lora.demo.engine import Engine, GenerationSettings

    greedy = GenerationSettings(max_new_tokens=N)
    engines = {mixed: Engine(str(tiny_base), mixed_batch=mixed, max_new_tokens_cap=N) for mixed in (True, False)}
    try:
        for engine in engines.values():
            assert engine.device.type == "cuda" and next(engine.model.parameters()).dtype == torch.bfloat16
            for folder in adapters.values():
                engine.add_adapter(str(folder))
        for preset in adapters:
            for prompt in PROMPTS:
                batched = engines[True].compare(preset, prompt, SYSTEM, greedy)
                separate = engines[False].compare(preset, prompt, SYSTEM, greedy)
                assert batched == separate, (preset, prompt)
            assert batched[0] != batched[1], f"{preset}: the adapter must change the answer, or this proves nothing"
    finally:
        for engine in engines.values():
            engine.close()


@pytest.mark.parametrize("preset", ["attention", "all"])
def test_stock_peft_and_our_loader_give_the_same_logits_on_cuda(tiny_base, adapters, preset):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from persona_lora.peft_compat import load_adapter

    def fresh():
        return AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.bfloat16, device_map="cuda").eval()

    def logits(model):
        with torch.no_grad():
            return model(input_ids=torch.tensor([IDS], device="cuda")).logits.float()

    ours = load_adapter(fresh(), adapters[preset])
    stock = PeftModel.from_pretrained(fresh(), str(adapters[preset]))
    assert next(ours.parameters()).device.type == "cuda"
    got, want = logits(ours), logits(stock)
    with ours.disable_adapter():
        plain = logits(ours)
    assert (want - plain).abs().max() > 0.1, "the adapter must change the logits, or this proves nothing"
    assert (got - want).abs().max() <= 1e-2


def test_training_on_cuda_uses_bf16_and_gradient_checkpointing(tiny_base, small_persona_data, tmp_path):
    """What both GPU configs do by default (dtype auto, gradient_checkpointing auto), for a few steps; the adapter
    then loads on the CPU."""
    from transformers import AutoModelForCausalLM

    from persona_lora.peft_compat import load_adapter

    out = tmp_path / "out"
    args = train_args(tiny_base, small_persona_data, out, "--max-steps", "6", "--set", "base.device=cuda",
                      "--set", "training.logging_steps=1", "--set", "training.samples=0",
                      "--set", "training.report_to=none")
    assert main(args) == 0
    m = json.loads((out / MANIFEST_NAME).read_text(encoding="utf-8"))
    assert m["training"]["dtype"] == "bfloat16" and m["training"]["gradient_checkpointing"] is True
    losses = [h["loss"] for h in m["metrics"]["history"] if "loss" in h]
    assert len(losses) == 6 and all(loss == loss for loss in losses) and losses[-1] < losses[0]

    ids = torch.tensor([IDS])
    base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()
    model = load_adapter(AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32), out).eval()
    with torch.no_grad():
        assert (model(input_ids=ids).logits - base(input_ids=ids).logits).abs().max() > 1e-3
