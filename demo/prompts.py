"""Prompts for the demo: each adapter's chat template, the one formatting path, and the prompt length limit.

Why: an adapter answers as it was trained only when its prompt is formatted with the template its training
used, and the base side of a comparison must read the very same tokens. Formatting is therefore never
re-implemented here: prompts come from `train.chat_format.encode_prompt` on a tokenizer that carries the
template. A long chat must not fail outright, so the oldest exchanges are dropped until the prompt fits.
"""

from __future__ import annotations

import copy

from persona_lora.chat_format import encode_prompt
from persona_lora.errors import UsageError


class TemplateCodec:
    """One chat template's tokenizer, as the decode loop uses it (a `demo.decode.PromptCodec`)."""

    def __init__(self, tokenizer, max_prompt_tokens: int):
        self.tokenizer = tokenizer
        self.max_prompt_tokens = max_prompt_tokens
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def encode(self, conversation: list[dict]) -> list[int]:
        """The prompt through the one formatting path; the oldest turns are dropped when it is over the limit,
        so a long chat keeps going instead of failing (a single turn that is too long is the user's to shorten)."""
        conv = list(conversation)
        while True:
            ids = encode_prompt(self.tokenizer, conv)
            if len(ids) <= self.max_prompt_tokens:
                return ids
            first = 1 if conv and conv[0]["role"] == "system" else 0
            if len(conv) - first <= 1:
                raise UsageError(f"the prompt is {len(ids)} tokens long; this demo accepts at most "
                                 f"{self.max_prompt_tokens} (shorten the message or the system prompt)")
            conv = conv[:first] + conv[first + 2:]  # drop the oldest user/assistant exchange

    def decode(self, tokens: list[int]) -> str:
        """Generated text as the user sees it: special tokens (EOS, turn markers) left out."""
        return self.tokenizer.decode(tokens, skip_special_tokens=True)


class PromptFormatter:
    """The base tokenizer and one copy per other chat template in use. Not thread-safe: only the inference
    thread calls `codec`, so copies are made and used by that one thread."""

    def __init__(self, tokenizer, max_prompt_tokens: int):
        self.tokenizer = tokenizer
        self.max_prompt_tokens = max_prompt_tokens
        self._codecs: dict[str, TemplateCodec] = {}

    def codec(self, template: str) -> TemplateCodec:
        """The codec for `template`: the base tokenizer itself when the template is its own, else a cached copy
        carrying it (a template is never written onto the shared tokenizer, which other sides still use)."""
        codec = self._codecs.get(template)
        if codec is None:
            base = self.tokenizer
            tok = base if template == getattr(base, "chat_template", None) else copy.deepcopy(base)
            tok.chat_template = template
            codec = self._codecs[template] = TemplateCodec(tok, self.max_prompt_tokens)
        return codec
