"""The end-of-training sample answers (`persona_lora.train.samples.sample_answers`), both sides in one batch.

What must hold: each side's answers are exactly what that side answers alone (the base with the adapter disabled,
the adapter on its own), for LoRA on linear layers and on the fused routed experts, and the model is left as it
was (no per-row hooks, the same logits afterwards).
"""

from __future__ import annotations

import pytest
import torch

from persona_lora.expert_lora import use_lora_aware_experts
from persona_lora.train.samples import generate_greedy, sample_answers
from tests.peft_helpers import attach, fresh

CONVERSATIONS = [
    [{"role": "system", "content": "You are a palace consort."}, {"role": "user", "content": "Who are you?"}],
    [{"role": "user", "content": "What did you do today?"}, {"role": "assistant", "content": "I read."},
     {"role": "user", "content": "And then, my lady?"}],
    [{"role": "user", "content": "Tell me about the emperor."}],
]


@pytest.mark.parametrize("preset", ["attention", "all"])
def test_both_sides_in_one_batch_answer_as_each_side_alone(tiny_base, tokenizer, preset):
    torch.manual_seed(0)
    _, model, _ = attach(fresh(tiny_base), preset)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(5)) * 0.3)
    use_lora_aware_experts(model)
    model.eval()
    with model.disable_adapter():
        base = generate_greedy(model, tokenizer, CONVERSATIONS, 12, batched=True)
    tuned = generate_greedy(model, tokenizer, CONVERSATIONS, 12, batched=True)
    assert base != tuned  # the adapter changes the answers, so mixing the rows up would show
    ids = torch.randint(3, 4000, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(input_ids=ids).logits

    samples = sample_answers(model, tokenizer, CONVERSATIONS, 3, 12)

    assert [s.base for s in samples] == base
    assert [s.adapter for s in samples] == tuned
    assert [s.prompt for s in samples] == ["Who are you?", "And then, my lady?", "Tell me about the emperor."]
    assert not [n for n, m in model.named_modules() if m._forward_pre_hooks]
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)
