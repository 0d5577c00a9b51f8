"""Length-bucketed training batches (`persona_lora.train.length_batches`), what `training.group_by_length` uses.

What must hold: every record once per epoch, batches of near-equal length (far less padding than transformers'
megabatch grouping on the same lengths), the short batch last, a new random order every epoch that depends only
on the seed and the epoch (resumes see the same batches), and the Trainer's data loader yielding exactly these
batches, epoch after epoch.
"""

from __future__ import annotations

import random

import pytest
import torch

from persona_lora.train.length_batches import LengthBucketSampler, length_bucket_trainer

_RNG = random.Random(7)
LENGTHS = [_RNG.randint(20, 300) for _ in range(203)]


def padding(lengths, batches) -> float:
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return 1 - sum(lengths[i] for b in batches for i in b) / padded


def test_batches_cover_every_record_once_with_little_padding():
    from transformers.trainer_pt_utils import get_length_grouped_indices

    sampler = LengthBucketSampler(LENGTHS, 16, seed=3)
    batches = sampler.batches()
    assert sorted(i for b in batches for i in b) == list(range(len(LENGTHS)))
    assert list(sampler) == [i for b in batches for i in b] and len(sampler) == len(LENGTHS)
    assert [len(b) for b in batches] == [16] * 12 + [11]
    torch.manual_seed(0)
    stock = get_length_grouped_indices(LENGTHS, 16)
    stock_padding = padding(LENGTHS, [stock[i:i + 16] for i in range(0, len(stock), 16)])
    assert padding(LENGTHS, batches) < stock_padding / 3
    full = batches[:-1]
    assert max(max(LENGTHS[i] for i in b) - min(LENGTHS[i] for i in b) for b in full) <= 40


def test_order_is_random_per_epoch_and_reproducible():
    a, b = LengthBucketSampler(LENGTHS, 16, seed=3), LengthBucketSampler(LENGTHS, 16, seed=3)
    first = a.batches()
    assert b.batches() == first
    a.set_epoch(1)
    second = a.batches()
    assert [sorted(x) for x in second] != [sorted(x) for x in first]  # a new order of batches
    assert LengthBucketSampler(LENGTHS, 16, seed=4).batches() != first
    b.set_epoch(1)
    assert b.batches() == second  # what a resumed run sees in epoch 1
    ascending = [max(LENGTHS[i] for i in x) for x in first[:-1]]
    assert ascending != sorted(ascending)  # not long-to-short or short-to-long step after step


def test_the_trainer_loads_exactly_these_batches_every_epoch(tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    dataset = Dataset.from_dict({"idx": list(range(len(LENGTHS))), "length": LENGTHS})
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=16, use_cpu=True, report_to="none",
                             train_sampling_strategy="group_by_length", seed=5, remove_unused_columns=False)
    trainer = length_bucket_trainer(Trainer)(model=torch.nn.Linear(1, 1), args=args, train_dataset=dataset,
                                             data_collator=lambda rows: {"idx": [r["idx"] for r in rows]})
    loader = trainer.get_train_dataloader()
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        expected = LengthBucketSampler(LENGTHS, 16, seed=5)
        expected.set_epoch(epoch)
        assert [b["idx"] for b in loader] == expected.batches()


def test_other_strategies_keep_the_trainers_sampler(tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    dataset = Dataset.from_dict({"idx": list(range(10)), "length": LENGTHS[:10]})
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, use_cpu=True, report_to="none",
                             train_sampling_strategy="random")
    trainer = length_bucket_trainer(Trainer)(model=torch.nn.Linear(1, 1), args=args, train_dataset=dataset)
    assert not isinstance(trainer._get_train_sampler(), LengthBucketSampler)


def test_batch_size_must_be_positive():
    with pytest.raises(ValueError, match="batch_size"):
        LengthBucketSampler([3, 4], 0, seed=1)


def test_eval_batches_are_sorted_by_length(tmp_path):
    """Eval passes compute every held-out record once, in batches cut from the records sorted by length: less
    padding than the stock eval sampler's, and the same batches every pass."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    lengths = LENGTHS[:53]
    dataset = Dataset.from_dict({"idx": list(range(len(lengths))), "length": lengths})
    args = TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=8, use_cpu=True, report_to="none",
                             train_sampling_strategy="group_by_length", seed=5, remove_unused_columns=False)
    collate = lambda rows: {"idx": [r["idx"] for r in rows]}  # noqa: E731
    ours = length_bucket_trainer(Trainer)(model=torch.nn.Linear(1, 1), args=args, eval_dataset=dataset,
                                          data_collator=collate)
    batches = [b["idx"] for b in ours.get_eval_dataloader()]
    assert [i for b in batches for i in b] == sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    assert [b["idx"] for b in ours.get_eval_dataloader()] == batches
    stock = Trainer(model=torch.nn.Linear(1, 1), args=args, eval_dataset=dataset, data_collator=collate)
    stock_batches = [b["idx"] for b in stock.get_eval_dataloader()]
    assert sorted(i for b in stock_batches for i in b) == list(range(len(lengths)))
    assert padding(lengths, batches) < padding(lengths, stock_batches) / 2
