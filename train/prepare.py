"""Records -> training examples: load and validate, split (seeded), encode through the one formatting path.

Every record that does not become an example is counted with its reason, and every truncation is counted: the
manifest and card report both, so what the adapter was trained on is never a guess.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from persona_lora.artifact import DatasetStats, TokenStats
from persona_lora.chat_format import IGNORE_INDEX, Encoded, conversation_for, encode_examples
from persona_lora.dataset.split import split_indices
from persona_lora.errors import DataError
from persona_lora.train.config import TrainConfig

log = logging.getLogger(__name__)


@dataclass
class PreparedData:
    train: list[Encoded]
    eval: list[Encoded]
    eval_conversations: list[list[dict]]
    train_conversations: list[list[dict]]
    stats: DatasetStats
    loaded: object  # data.LoadedDataset


def prepare_data(cfg: TrainConfig, tokenizer) -> PreparedData:
    """Load, validate, split (seeded) and encode; drops and truncations are counted, never silent."""
    from persona_lora.dataset.reading import load_records

    loaded = load_records(cfg.data.path, revision=cfg.data.revision)
    convs = [conversation_for(r["messages"], cfg.data.system_prompt) for r in loaded.records]
    eval_idx, train_idx = split_indices(len(convs), cfg.training.seed, cfg.data.eval_fraction)
    encoded = encode_examples(tokenizer, convs, max_length=cfg.data.max_length, train_on=cfg.data.train_on,
                              overlong=cfg.data.overlong)
    dropped: dict[str, int] = {}
    reason = (
        f"longer than max_length={cfg.data.max_length} (overlong: drop)"
        if cfg.data.overlong == "drop"
        else f"final answer + EOS alone exceeds max_length={cfg.data.max_length}"
    )
    for i, enc in enumerate(encoded):
        if enc is None:
            dropped[reason] = dropped.get(reason, 0) + 1
            log.warning("record %s dropped: %s", loaded.records[i].get("origin", i), reason)
    train = [encoded[i] for i in train_idx if encoded[i] is not None]
    evals = [encoded[i] for i in eval_idx if encoded[i] is not None]
    if not train:
        raise DataError(f"no training examples left after formatting ({sum(dropped.values())} dropped: {reason}); "
                        "raise data.max_length", loaded.name)
    kept = [e for e in encoded if e is not None]
    lengths = [len(e.input_ids) for e in kept]
    stats = DatasetStats(
        records=len(convs),
        kept=len(kept),
        dropped=dropped,
        truncated=sum(e.truncated for e in kept),
        train_examples=len(train),
        eval_examples=len(evals),
        tokens=TokenStats(
            total=sum(lengths),
            trained=sum(sum(1 for t in e.labels if t != IGNORE_INDEX) for e in kept),
            train_split=sum(len(e.input_ids) for e in train),
            mean_length=round(sum(lengths) / len(lengths), 1),
            max_length=max(lengths),
        ),
    )
    if stats.truncated:
        log.warning("%d example(s) truncated from the left of the prompt to fit max_length=%d (answers and EOS kept)",
                    stats.truncated, cfg.data.max_length)
    return PreparedData(train, evals, [convs[i] for i in eval_idx], [convs[i] for i in train_idx], stats, loaded)
