"""Greedy answers of the base and of the freshly trained adapter to held-out prompts, for the manifest and card.

The prompts go through the one formatting path (`encode_prompt`), exactly as the demo and the card's usage
snippet format them, so a sample in the card is what a reader gets.
"""

from __future__ import annotations

from persona_lora.artifact import Sample
from persona_lora.train.chat_format import encode_prompt


def generate_greedy(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int) -> list[str]:
    """Greedy answers to each conversation's prompt, formatted by the one formatting path."""
    import torch

    answers = []
    device = next(model.parameters()).device
    for conv in conversations:
        ids = torch.tensor([encode_prompt(tokenizer, conv)], device=device)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
        answers.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return answers


def sample_answers(peft_model, tokenizer, conversations: list[list[dict]], n: int, max_new_tokens: int) -> list[Sample]:
    """Base vs adapter greedy answers on held-out prompts (the last user turn of each conversation)."""
    prompts = []
    for conv in conversations[:n]:
        last_user = max(i for i, m in enumerate(conv) if m["role"] == "user")
        prompts.append(conv[: last_user + 1])
    if not prompts:
        return []
    peft_model.eval()
    peft_model.config.use_cache = True
    with peft_model.disable_adapter():
        base = generate_greedy(peft_model, tokenizer, prompts, max_new_tokens)
    tuned = generate_greedy(peft_model, tokenizer, prompts, max_new_tokens)
    return [Sample(prompt=p[-1]["content"], base=b, adapter=a) for p, b, a in zip(prompts, base, tuned)]
