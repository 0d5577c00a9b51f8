"""The model side of an evaluation: one base model with every adapter loaded on it, the loss of reference
answers and batched greedy answers, for whichever model (`base` or an adapter) is selected.

Why one model: the base weights are held once however many adapters are compared (adapters are PEFT adapters on
top, `persona_lora.peft_compat.load_adapter`; the base is the same model with adapters disabled). LoRA on fused MoE
experts runs the LoRA-aware experts forward the demo and training use (`expert_lora.use_lora_aware_experts`), not
PEFT's ParamWrapper, which rebuilds every expert's weight on each forward pass: the adapter then decodes at about
the base's speed.

Why these two computations:
- the loss uses the labels of the one formatting path (`encode_examples`, `train_on="last"`): exactly the
  tokens training put loss on, the final reference answer and its EOS, after the same prompt tokens inference
  feeds. Rows are left-padded, so every row's answer sits at the end and only those logits are computed
  (`logits_to_keep`): a 100k-token vocabulary over the whole prompt would not fit a batch otherwise;
- answers are greedy and batched with left padding and explicit positions, so every row gets the logits its
  model computes alone (the same answer as one prompt at a time, tested) at several times the throughput.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass

from persona_lora.chat_format import IGNORE_INDEX, encode_examples, encode_prompt
from persona_lora.errors import ModelLoadError
from persona_lora.evaluation.plan import BASE, Plan

log = logging.getLogger(__name__)


@dataclass
class Answer:
    text: str
    tokens: int  # generated tokens before EOS


def _left_pad(seqs: list[list[int]], pad: int, device):
    """(ids, mask, positions) with every sequence right-aligned: the last tokens of all rows share a column."""
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = 1
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device)


class Models:
    """The loaded base with the plan's adapters, and the tokenizer formatting prompts for all of them."""

    def __init__(self, plan: Plan):
        from persona_lora.model_loading import load_base_model, load_tokenizer
        from persona_lora.peft_compat import load_adapter
        from persona_lora.resident import eos_ids

        o = plan.options
        self.tokenizer = load_tokenizer(plan.base)
        if plan.chat_template:
            self.tokenizer.chat_template = plan.chat_template
        model = load_base_model(plan.base, dtype=o.dtype, device=o.device)
        model.eval()
        for a in plan.adapters:
            try:
                model = load_adapter(model, a.folder, a.key)
            except (RuntimeError, ValueError, KeyError, OSError) as e:  # shapes or names that do not fit the base
                raise ModelLoadError(f"cannot load adapter {a.name} ({a.folder}) onto {plan.base.id}: {e}; evaluate "
                                     "it with the base it was trained on (--base)") from e
        model.eval()
        if plan.adapters:  # LoRA on the fused MoE experts through the LoRA-aware forward, as the demo decodes it
            from persona_lora.expert_lora import use_lora_aware_experts

            self.experts_forward = use_lora_aware_experts(model)
        else:
            self.experts_forward = ""
        self.model = model
        self.keys = {a.name: a.key for a in plan.adapters}
        self.device = next(model.parameters()).device
        self.eos = sorted(eos_ids(model, self.tokenizer))
        self.pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos[0]
        self.max_length = plan.max_length

    @contextlib.contextmanager
    def use(self, name: str):
        """Select `base` (adapters disabled) or an adapter by its report name for the block."""
        if name == BASE:
            with self.model.disable_adapter():
                yield
            return
        self.model.set_adapter(self.keys[name])
        yield

    def _inner(self):
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        return encode_prompt(self.tokenizer, messages)

    def losses(self, conversations: list[list[dict]]) -> list[tuple[float, int] | None]:
        """(summed NLL, tokens) of each conversation's final answer and its EOS; None where even that answer does
        not fit the maximum length."""
        import torch

        encoded = encode_examples(self.tokenizer, conversations, max_length=self.max_length, train_on="last",
                                  overlong="truncate")
        present = [e for e in encoded if e is not None]
        out: list[tuple[float, int] | None] = [None] * len(encoded)
        if not present:
            return out
        ids, mask, positions = _left_pad([e.input_ids for e in present], self.pad, self.device)
        labels = torch.full(ids.shape, IGNORE_INDEX, dtype=torch.long)
        for i, e in enumerate(present):
            labels[i, ids.shape[1] - len(e.labels):] = torch.tensor(e.labels, dtype=torch.long)
        first = min(next(k for k, t in enumerate(e.labels) if t != IGNORE_INDEX) + ids.shape[1] - len(e.labels)
                    for e in present)
        keep = ids.shape[1] - first + 1  # logits of the position before each labelled token onwards
        with torch.inference_mode():
            logits = self._inner()(input_ids=ids, attention_mask=mask, position_ids=positions,
                                   use_cache=False, logits_to_keep=keep).logits.float()
        target = labels[:, -keep + 1:].to(logits.device)
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                ignore_index=IGNORE_INDEX, reduction="none").view(target.shape)
        counted = target != IGNORE_INDEX
        sums, counts = (nll * counted).sum(1).tolist(), counted.sum(1).tolist()
        rows = iter(zip(sums, counts))
        for i, e in enumerate(encoded):
            if e is not None:
                s, c = next(rows)
                out[i] = (float(s), int(c))
        return out

    def generate(self, prompts: list[list[int]], max_new_tokens: int) -> list[Answer]:
        """Greedy answers to a batch of prompts (token ids), left-padded into one `generate` call."""
        import torch

        ids, mask, _ = _left_pad(prompts, self.pad, self.device)
        with torch.inference_mode():
            out = self._inner().generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                         do_sample=False, num_beams=1, pad_token_id=self.pad,
                                         eos_token_id=self.eos)
        answers = []
        for row in out[:, ids.shape[1]:].tolist():
            end = next((k for k, t in enumerate(row) if t in self.eos), len(row))
            answers.append(Answer(self.tokenizer.decode(row[:end], skip_special_tokens=True).strip(), end))
        return answers


class Progress:
    """One line per finished batch on stderr: set, model, prompts done, generated tokens/s."""

    def __init__(self, stream=None):
        import sys

        self.stream = stream or sys.stderr

    def start(self) -> float:
        return time.perf_counter()

    def report(self, what: str, done: int, total: int, tokens: int, since: float) -> None:
        seconds = max(time.perf_counter() - since, 1e-9)
        print(f"eval {what}: {done}/{total} prompts, {tokens / seconds:,.1f} tokens/s", file=self.stream, flush=True)
