"""The demo's decode loop: prefill, decode and sampling for the rows of one request, one step at a time.

Why a loop of our own rather than `generate()`: the demo answers as the base and as an adapter in ONE forward
pass, and several requests share the one model, so the engine must be able to advance a request by exactly one
token and then serve another. Each row of a batch carries the key of the adapter it answers with; the model
side (which adapter serves which row) is not this module's business.

The loop sees the model only through a `DecodeTarget` (one forward pass with per-row adapter keys, the EOS ids,
a fresh KV cache, and the two keyword names this model's `forward` takes) and the tokenizer only through a
`PromptCodec` (encode a conversation, decode tokens, the pad id). Anything that offers those can be decoded
against, which keeps this module free of PEFT and of the engine's state.

Greedy decoding with left padding, explicit positions and the attention mask gives each row exactly the logits
its model computes alone, so every side's greedy answer equals standalone `generate(do_sample=False)`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from persona_lora.errors import UsageError

log = logging.getLogger(__name__)

# C0 control characters but tab and newline, and DEL: a model (a random one certainly) can emit the bytes, and a
# pane or a terminal showing them would look broken
_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f]")


def shown_text(text: str, *, done: bool) -> str:
    """An answer as the panes show it, mid-stream or final: control characters and U+FFFD removed. A byte-level
    tokenizer emits a CJK character over several tokens, so decoding mid-way gives U+FFFD for the bytes of a
    character still being generated (held back until it is whole), and a model that emits bytes which never
    form a character (a random base does) leaves U+FFFD that stand for nothing a reader could use."""
    text = _CONTROLS.sub("", text).replace("\ufffd", "").lstrip()
    return text.rstrip() if done else text


@dataclass(frozen=True)
class GenerationSettings:
    """How to decode. Temperature 0 (the default) is greedy; `seed` makes sampling repeatable."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    ignore_eos: bool = False  # benchmarks only: always produce max_new_tokens tokens

    @property
    def greedy(self) -> bool:
        """Temperature 0 means argmax: the answers the tests compare with standalone greedy generation."""
        return self.temperature <= 0

    def checked(self, cap: int) -> GenerationSettings:
        """Validate, and clamp max_new_tokens to the server's cap (the UI cannot exceed it; API callers may)."""
        problems = []
        try:
            n = int(self.max_new_tokens)
        except (TypeError, ValueError):
            raise UsageError(f"max_new_tokens must be a whole number, got {self.max_new_tokens!r}") from None
        if n < 1:
            problems.append(f"max_new_tokens must be at least 1, got {n}")
        if not (self.temperature is not None and 0 <= float(self.temperature) <= 5):
            problems.append(f"temperature must be between 0 (greedy) and 5, got {self.temperature!r}")
        if not (self.top_p is not None and 0 < float(self.top_p) <= 1):
            problems.append(f"top_p must be in (0, 1], got {self.top_p!r}")
        if problems:
            raise UsageError("; ".join(problems))
        if n > cap:
            log.info("max_new_tokens %d clamped to the server cap %d", n, cap)
        return replace(self, max_new_tokens=min(n, cap), temperature=float(self.temperature), top_p=float(self.top_p),
                       seed=int(self.seed or 0))


class DecodeTarget(Protocol):
    """The model as the decode loop needs it. Implemented by `persona_lora.resident.ResidentModel`."""

    device: Any  # where input tensors go
    eos_ids: frozenset[int]  # a row ends when it picks one of these
    cache_kwarg: str  # the name `forward` takes the KV cache under
    keeps_logits: bool  # `forward` takes `logits_to_keep` (prefill then computes the last position only)

    def new_cache(self) -> Any:
        """An empty KV cache for one batch."""
        ...

    def forward(self, keys: list[str], **inputs) -> Any:
        """One forward pass where row i uses adapter `keys[i]`; returns the last position's logits (rows, vocab)."""
        ...


class PromptCodec(Protocol):
    """One chat template's tokenizer as the decode loop needs it. Implemented by `demo.prompts.TemplateCodec`."""

    pad_id: int

    def encode(self, conversation: list[dict]) -> list[int]:
        """The prompt ids of `conversation`, ready for the assistant's turn (raises UsageError when too long)."""
        ...

    def decode(self, tokens: list[int]) -> str:
        """The text of generated tokens, special tokens left out."""
        ...


@dataclass
class Row:
    """One side of a request: its conversation, the adapter key it answers with, and what it has produced."""

    conversation: list[dict]
    key: str
    ids: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    done: bool = False
    generator: object = None


@dataclass
class Batch:
    """Rows decoded in one forward pass, with their KV cache, attention mask and positions."""

    rows: list[Row]
    cache: object = None
    mask: object = None
    positions: object = None


class Job:
    """One request: a few rows decoded together, one decode step per `step()`.

    With `one_batch` (the engine's default) all rows share a batch; otherwise each row gets its own batch of
    one, decoded alternately: twice the passes, for models whose MoE layout the per-row split cannot serve.
    `codec_for(template)` is called on the first step, on the thread that runs the steps, so tokenizer copies
    are made and used by that thread only."""

    def __init__(self, target: DecodeTarget, codec_for: Callable[[str], PromptCodec], rows: list[Row],
                 template: str, settings: GenerationSettings, *, one_batch: bool = True):
        self.target, self.codec_for, self.template, self.settings = target, codec_for, template, settings
        self.rows = rows
        self.batches = [Batch(rows)] if one_batch else [Batch([r]) for r in rows]
        self.codec: PromptCodec | None = None

    def step(self) -> bool:
        """Advance every unfinished batch by one forward pass; True when all rows hit EOS or max_new_tokens."""
        import torch

        with torch.inference_mode():
            if self.codec is None:
                self._encode()
            for batch in self.batches:
                if all(r.done for r in batch.rows):
                    continue
                logits = self._prefill(batch) if batch.cache is None else self._decode(batch)
                self._pick(batch.rows, logits)
        return all(r.done for r in self.rows)

    def texts(self) -> tuple[str, ...]:
        """Every row's answer so far, in row order (what the reader of the request is shown)."""
        return tuple(self._text(r) for r in self.rows)

    def _encode(self) -> None:
        import torch

        self.codec = self.codec_for(self.template)
        for r in self.rows:
            r.ids = self.codec.encode(r.conversation)
            if not self.settings.greedy:  # same seed on every side: a fair comparison, and repeatable
                r.generator = torch.Generator(device="cpu").manual_seed(self.settings.seed)

    def _prefill(self, batch: Batch):
        import torch

        t = self.target
        width = max(len(r.ids) for r in batch.rows)
        ids = torch.full((len(batch.rows), width), self.codec.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch.rows), width), dtype=torch.long)
        for i, r in enumerate(batch.rows):  # left padding: every row's last prompt token is in the last column
            ids[i, width - len(r.ids):] = torch.tensor(r.ids)
            mask[i, width - len(r.ids):] = 1
        batch.mask = mask.to(t.device)
        batch.positions = (batch.mask.cumsum(1) - 1).clamp(min=0)
        batch.cache = t.new_cache()
        extra = {"logits_to_keep": 1} if t.keeps_logits else {}
        return t.forward([r.key for r in batch.rows], input_ids=ids.to(t.device), attention_mask=batch.mask,
                         position_ids=batch.positions, use_cache=True, **{t.cache_kwarg: batch.cache}, **extra)

    def _decode(self, batch: Batch):
        import torch

        t = self.target
        nxt = torch.tensor([[r.tokens[-1]] for r in batch.rows], device=t.device)  # finished rows: ignored
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones((len(batch.rows), 1))], dim=1)
        batch.positions = batch.positions[:, -1:] + 1
        return t.forward([r.key for r in batch.rows], input_ids=nxt, attention_mask=batch.mask,
                         position_ids=batch.positions, use_cache=True, **{t.cache_kwarg: batch.cache})

    def _pick(self, rows: list[Row], logits) -> None:
        import torch

        s = self.settings
        for i, r in enumerate(rows):
            if r.done:
                continue
            if s.greedy:
                token = int(torch.argmax(logits[i]))
            else:
                probs = torch.softmax(logits[i].float().cpu() / s.temperature, dim=-1)
                if s.top_p < 1:
                    sorted_p, order = torch.sort(probs, descending=True)
                    sorted_p[sorted_p.cumsum(0) - sorted_p > s.top_p] = 0  # the smallest set reaching top_p
                    probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
                token = int(torch.multinomial(probs / probs.sum(), 1, generator=r.generator))
            r.tokens.append(token)
            if (token in self.target.eos_ids and not s.ignore_eos) or len(r.tokens) >= s.max_new_tokens:
                r.done = True

    def _text(self, r: Row) -> str:
        if self.codec is None:
            return ""
        return shown_text(self.codec.decode(r.tokens), done=r.done)
