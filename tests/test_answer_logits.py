"""Logits at labelled positions only (`persona_lora.train.answer_logits`), used by every training run and its eval
passes.

What must hold: the loss and every gradient equal the stock forward's (the model's own loss over all positions),
the output head sees exactly one row per labelled token, the Trainer's training and eval losses are the stock
Trainer's, and a model whose forward does not take the boolean `logits_to_keep` keeps the stock path.
"""

from __future__ import annotations

import pytest
import torch

from persona_lora.chat_format import IGNORE_INDEX
from persona_lora.train.answer_logits import answer_logits_trainer, answer_positions, supports
from tests.peft_helpers import attach, fresh

TOL = 1e-6


def batch(pad_id: int) -> dict:
    """Three rows of different lengths, right-padded: a prompt (label -100), an answer, padding (label -100)."""
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 4000, (3, 20), generator=gen)
    labels = ids.clone()
    mask = torch.ones_like(ids)
    for row, (prompt, length) in enumerate([(5, 20), (9, 16), (3, 11)]):
        labels[row, :prompt] = IGNORE_INDEX
        labels[row, length:] = IGNORE_INDEX
        ids[row, length:] = pad_id
        mask[row, length:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def head_rows(model) -> list[int]:
    """Records how many rows each call of the output head projects."""
    rows = []
    model.get_output_embeddings().register_forward_hook(lambda m, args, out: rows.append(args[0].shape[:-1].numel()))
    return rows


def lora_model(path):
    torch.manual_seed(0)
    _, peft_model, _ = attach(fresh(path), "all")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return peft_model.train()


def loss_and_grads(model, inputs):
    model.zero_grad(set_to_none=True)
    loss = model(**inputs).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("base", ["tiny_base", "tiny_llama"])
def test_labelled_positions_only_give_the_stock_loss_and_gradients(base, request):
    model = lora_model(request.getfixturevalue(base))
    inputs = batch(pad_id=0)
    rows = head_rows(model)
    stock_loss, stock_grads = loss_and_grads(model, inputs)
    kept = answer_positions(inputs["labels"])
    loss, grads = loss_and_grads(model, {**inputs, **kept})
    labelled = int((inputs["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert rows == [3 * 20, labelled]
    assert int(kept["logits_to_keep"].sum()) == labelled == kept["shift_labels"].numel()
    assert torch.allclose(loss, stock_loss, rtol=TOL, atol=0)
    assert stock_grads.keys() == grads.keys() and len(grads) > 10
    for name, grad in stock_grads.items():
        assert torch.allclose(grads[name], grad, rtol=1e-5, atol=1e-7), name


def trainers(model, tmp_path, dataset):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=3, per_device_eval_batch_size=3,
                             report_to="none", use_cpu=True, prediction_loss_only=True, remove_unused_columns=False)

    def collate(rows):
        return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}

    common = dict(model=model, args=args, train_dataset=dataset, eval_dataset=dataset, data_collator=collate)
    return Trainer(**common), answer_logits_trainer(Trainer)(**common)


def as_rows(inputs: dict) -> list[dict]:
    return [{k: v[i] for k, v in inputs.items()} for i in range(len(inputs["input_ids"]))]


def test_trainer_projects_only_labelled_positions_in_training_and_eval(tiny_base, tmp_path):
    model = lora_model(tiny_base)
    inputs = batch(pad_id=0)
    stock, ours = trainers(model, tmp_path, as_rows(inputs))
    rows = head_rows(model)
    items = torch.tensor(int((inputs["labels"][:, 1:] != IGNORE_INDEX).sum()))
    stock_loss = stock.compute_loss(model, dict(inputs), num_items_in_batch=items)
    loss = ours.compute_loss(model, dict(inputs), num_items_in_batch=items)
    assert rows == [60, int(items)]
    assert torch.allclose(loss, stock_loss, rtol=TOL, atol=0)
    rows.clear()
    stock_eval, eval_ = stock.evaluate()["eval_loss"], ours.evaluate()["eval_loss"]
    assert rows == [60, int(items)]
    assert eval_ == pytest.approx(stock_eval, rel=TOL)


def own_head_llama():
    """A causal LM whose forward projects every position itself (no `logits_to_keep`), as some models do (a class
    made when used: transformers is imported by the tests that run, not while collecting)."""
    from transformers import LlamaForCausalLM
    from transformers.modeling_outputs import CausalLMOutputWithPast

    class OwnHeadLlama(LlamaForCausalLM):
        def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            logits = self.lm_head(hidden)
            loss = None if labels is None else self.loss_function(logits, labels, self.config.vocab_size, **kwargs)
            return CausalLMOutputWithPast(loss=loss, logits=logits)

    return OwnHeadLlama


def test_a_model_without_the_mask_contract_keeps_the_stock_path(tiny_llama, tiny_base, tmp_path):
    model = own_head_llama().from_pretrained(tiny_llama)
    assert not supports(model)
    assert supports(fresh(tiny_base)) and supports(lora_model(tiny_llama))
    inputs = batch(pad_id=0)
    stock, ours = trainers(model, tmp_path, as_rows(inputs))
    rows = head_rows(model)
    items = torch.tensor(int((inputs["labels"][:, 1:] != IGNORE_INDEX).sum()))
    loss = ours.compute_loss(model, dict(inputs), num_items_in_batch=items)
    assert rows == [60]
    assert torch.allclose(loss, stock.compute_loss(model, dict(inputs), num_items_in_batch=items), rtol=TOL, atol=0)


def test_eval_loss_is_per_answer_token_whatever_the_batches(tiny_base, tmp_path):
    """The eval loss is the sum of the answer tokens' losses over their number: the same with eval batches of 1, 2
    and 3 rows (rows of 15, 7 and 8 answer tokens), and equal to the loss of one forward over all rows; the stock
    loop's mean of batch means moves with the batch size."""
    from transformers import Trainer, TrainingArguments

    model = lora_model(tiny_base)
    inputs = batch(pad_id=0)
    with torch.no_grad():
        want = model.eval()(**inputs).loss.item()  # the model's own mean over every answer token of the 3 rows

    def evaluate(cls, size):
        args = TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=size, report_to="none",
                                 use_cpu=True, prediction_loss_only=True, remove_unused_columns=False)
        return cls(model=model, args=args, eval_dataset=as_rows(inputs),
                   data_collator=lambda rows: {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
                   ).evaluate()["eval_loss"]

    ours = [evaluate(answer_logits_trainer(Trainer), size) for size in (1, 2, 3)]
    assert ours == pytest.approx([want] * 3, rel=TOL)
    stock = evaluate(Trainer, 1)
    assert abs(stock - want) > 100 * TOL * want  # rows with answers of other lengths: the stock mean moves
