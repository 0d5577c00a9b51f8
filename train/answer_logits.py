"""Logits only where the loss looks: the trainer projects onto the vocabulary just the positions with a label.

Why: a persona run's loss counts the answer tokens only (the system prompt and the user's turn are labelled -100;
about a third of all tokens are answer tokens on persona dialogue data). transformers' causal LMs project every
position onto the vocabulary and the loss then ignores most of them. That projection, its softmax and their
gradients are the largest avoidable cost of a step on the tiny base, and on DeepSeek-Coder-V2-Lite (vocabulary
102,400) the largest activation of the step: a batch of 16 × 384 positions is 2.5 GB of fp32 logits before their
gradient.

transformers' causal LMs take `logits_to_keep` as a boolean (batch, positions) mask, returning the kept rows'
logits flattened, and their causal-LM loss takes already shifted labels (`shift_labels`), so the model's own loss
function sums the same terms over the same positions and divides by the same count; only the discarded rows are
never made. Models whose forward or loss does not follow that contract keep the stock path (`supports`).

The same trainer reports the eval loss per answer token: the sum of every held-out answer token's loss divided by
the number of those tokens. transformers' evaluation loop averages the per-batch means weighted by rows, so its
eval loss moves with the eval batch size and with how records of different answer lengths fall into batches (the
length-sorted eval batches of `length_batches` change that grouping); the token-weighted one does not.
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F

from persona_lora.chat_format import IGNORE_INDEX


def answer_positions(labels: torch.Tensor) -> dict:
    """The model kwargs that keep only labelled positions: the mask of positions whose *next* token has a label
    (a causal LM's logits at t predict token t+1) and those next tokens, in the mask's row-major order."""
    shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    keep = shifted != IGNORE_INDEX
    return {"logits_to_keep": keep, "shift_labels": shifted[keep]}


def supports(model) -> bool:
    """True when `model` (a PEFT model or a transformers causal LM) slices its hidden states with transformers'
    `slice_logits_to_keep` (which accepts the boolean mask) and uses transformers' causal-LM loss (which accepts
    `shift_labels`)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return _class_supports(type(inner)) and _uses_causal_lm_loss(inner)


@functools.cache
def _class_supports(cls) -> bool:
    try:
        return "slice_logits_to_keep(" in inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False


def _uses_causal_lm_loss(model) -> bool:
    from transformers.loss.loss_utils import LOSS_MAPPING

    try:
        return model.loss_function is LOSS_MAPPING["ForCausalLM"]
    except (AttributeError, KeyError):
        return False


def answer_logits_trainer(trainer_cls):
    """`trainer_cls` (transformers' Trainer or a subclass) computing logits at labelled positions only, in
    training and in its eval passes, for models that `supports`; everything else goes through unchanged."""

    class AnswerLogitsTrainer(trainer_cls):
        _answer_logits_supported: bool | None = None  # decided on the first loss, from the model being trained

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if self._answer_logits_supported is None:
                self._answer_logits_supported = supports(self.accelerator.unwrap_model(model))
            labels = inputs.get("labels")
            if (labels is not None and "logits_to_keep" not in inputs and self.label_smoother is None
                    and self.compute_loss_func is None and self._answer_logits_supported):
                inputs = {**inputs, **answer_positions(labels)}
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

        def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                            metric_key_prefix="eval"):
            self._eval_token_loss = [0.0, 0]  # sum of the answer tokens' losses, number of answer tokens
            output = super().evaluation_loop(dataloader, description, prediction_loss_only=prediction_loss_only,
                                             ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
            total, tokens = self._eval_token_loss
            self._eval_token_loss = None
            if self.accelerator.num_processes > 1:
                summed = self.accelerator.reduce(torch.tensor([total, tokens], dtype=torch.float64,
                                                              device=self.args.device), reduction="sum")
                total, tokens = float(summed[0]), int(summed[1])
            if tokens and f"{metric_key_prefix}_loss" in output.metrics:
                output.metrics[f"{metric_key_prefix}_loss"] = total / tokens
            return output

        def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
            loss, logits, labels = super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
            tally = getattr(self, "_eval_token_loss", None)
            if tally is not None and loss is not None and inputs.get("labels") is not None:
                tokens = answer_token_count(inputs["labels"])  # the loss above is their mean
                tally[0] += float(loss.detach().double()) * tokens
                tally[1] += tokens
            return loss, logits, labels

    return AnswerLogitsTrainer


def answer_token_count(labels: torch.Tensor) -> int:
    """The positions a causal LM's loss averages over: tokens whose label is set, less each row's first (no
    logit predicts it)."""
    return int((labels[..., 1:] != IGNORE_INDEX).sum())
