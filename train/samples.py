"""Greedy answers of the base and of the freshly trained adapter to held-out prompts, for the manifest and card.

The prompts go through the one formatting path (`encode_prompt`), exactly as the demo and the card's usage
snippet format them, so a sample in the card is what a reader gets.
"""

from __future__ import annotations

from persona_lora.artifact import Sample
from persona_lora.chat_format import encode_prompt


def generate_greedy(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int, *,
                    batched: bool = False) -> list[str]:
    """Greedy answers to each conversation's prompt, formatted by the one formatting path. `batched` decodes all
    prompts as one left-padded batch (one pass per token for all of them instead of one per prompt and token:
    the end-of-training samples cost a fraction of the time); without it, each prompt runs alone."""
    import torch

    device = next(model.parameters()).device
    prompts = [encode_prompt(tokenizer, conv) for conv in conversations]
    groups = [prompts] if batched and prompts else [[p] for p in prompts]
    answers = []
    for group in groups:
        width = max(len(p) for p in group)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in group], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group], device=device)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
        answers += [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in out]
    return answers


def sample_answers(peft_model, tokenizer, conversations: list[list[dict]], n: int, max_new_tokens: int) -> list[Sample]:
    """Base vs adapter greedy answers on held-out prompts (the last user turn of each conversation).

    Both sides decode as one batch, as the demo's side-by-side answers do: the base rows get no LoRA
    (`RowRouting`), so each side answers exactly as it would alone, for little more than one side's time."""
    from persona_lora.peft_compat import BASE_ROW
    from persona_lora.row_routing import RowRouting

    prompts = []
    for conv in conversations[:n]:
        last_user = max(i for i, m in enumerate(conv) if m["role"] == "user")
        prompts.append(conv[: last_user + 1])
    if not prompts:
        return []
    peft_model.eval()
    peft_model.config.use_cache = True
    active = peft_model.active_adapter
    routing = RowRouting()
    routing.install(peft_model)
    try:
        with routing.rows([BASE_ROW] * len(prompts) + [active] * len(prompts), active):
            answers = generate_greedy(peft_model, tokenizer, prompts + prompts, max_new_tokens, batched=True)
    finally:
        routing.uninstall(peft_model)
    base, tuned = answers[: len(prompts)], answers[len(prompts):]
    return [Sample(prompt=p[-1]["content"], base=b, adapter=a) for p, b, a in zip(prompts, base, tuned)]
