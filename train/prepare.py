"""Records -> training examples: load and validate, split (seeded), encode through the one formatting path.

The eval set is either a seeded `data.eval_fraction` of `data.path`, or a file of its own (`data.eval_path`, e.g.
the DATA.eval.json `data build` holds out by scene); then every record of `data.path` is trained on, and records
found in both files are counted and warned about.

Every record that does not become an example is counted with its reason, and every truncation is counted: the
manifest and card report both, so what the adapter was trained on is never a guess.
"""

from __future__ import annotations

import json
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
    eval_loaded: object | None = None  # the LoadedDataset of data.eval_path, when the held-out set is its own file
    also_in_training: int = 0  # records of the eval file that are also in the training file


def _eval_file(cfg: TrainConfig, loaded, train_convs: list[list[dict]]) -> tuple[object, list[list[dict]], int]:
    """data.eval_path: its records as conversations, and how many of them the training file also holds (each such
    record is trained on, so eval loss on it is no held-out figure: warned with the count, never hidden)."""
    from persona_lora.dataset.reading import load_records

    try:
        held = load_records(cfg.data.eval_path)
    except DataError as e:  # said as the eval file's problem, so nobody looks for it in data.path
        raise DataError(e.problems, f"data.eval_path {e.source or cfg.data.eval_path}") from None
    if held.sha256 == loaded.sha256:
        raise DataError(f"data.eval_path {cfg.data.eval_path} has the same records as data.path {cfg.data.path} "
                        "(same sha256): nothing would be held out; give the held-out file (DATA.eval.json of "
                        "`data build`), or drop data.eval_path to hold out data.eval_fraction of data.path",
                        held.name)
    convs = [conversation_for(r["messages"], cfg.data.system_prompt) for r in held.records]
    trained = {json.dumps(c, ensure_ascii=False, sort_keys=True) for c in train_convs}
    shared = [held.records[i].get("origin", i) for i, c in enumerate(convs)
              if json.dumps(c, ensure_ascii=False, sort_keys=True) in trained]
    log.info("eval records: %d read from %s (data.eval_path)", len(convs), held.name)
    if shared:
        log.warning("%d of the %d records of %s are also in %s (first: %s): they are trained on, so the eval loss "
                    "is partly on training records; a split by scene (`data build`) has none - rebuild the two "
                    "files, or remove those records from one of them", len(shared), len(convs), held.name,
                    loaded.name, ", ".join(str(o) for o in shared[:3]))
    return held, convs, len(shared)


def prepare_data(cfg: TrainConfig, tokenizer) -> PreparedData:
    """Load, validate, split (seeded) and encode; drops and truncations are counted, never silent."""
    from persona_lora.dataset.reading import load_records

    loaded = load_records(cfg.data.path, revision=cfg.data.revision)
    warn_system_prompt_differs(cfg, loaded)
    convs = [conversation_for(r["messages"], cfg.data.system_prompt) for r in loaded.records]
    held, also_in_training, origins = None, 0, [r.get("origin", i) for i, r in enumerate(loaded.records)]
    if cfg.data.eval_path:  # the held-out set is its own file: appended after the training records
        held, eval_convs, also_in_training = _eval_file(cfg, loaded, convs)
        train_idx, eval_idx = list(range(len(convs))), list(range(len(convs), len(convs) + len(eval_convs)))
        convs += eval_convs
        origins += [r.get("origin", i) for i, r in enumerate(held.records)]
    else:
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
            log.warning("record %s dropped: %s", origins[i], reason)
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
    return PreparedData(train, evals, [convs[i] for i in eval_idx], [convs[i] for i in train_idx], stats, loaded,
                        held, also_in_training)


def eval_file_line(data: PreparedData) -> str | None:
    """What training prints about a separate eval file: rows read, and any also in the training file."""
    held = data.eval_loaded
    if held is None:
        return None
    shared = f"; {data.also_in_training} also in {data.loaded.name} (see the warning)" if data.also_in_training \
        else f"; none also in {data.loaded.name}"
    return (f"eval set: {len(held.records)} records read from {held.name} (data.eval_path), "
            f"{data.stats.eval_examples} eval examples{shared}")


def warn_system_prompt_differs(cfg: TrainConfig, loaded) -> None:
    """A file `data build` wrote with a system prompt carries it in every record, and its DATA.card.md records it;
    data.system_prompt is what the manifest, the demo and eval prompt with. Different (or unset), the adapter is
    trained on one prompt and shown another: warned, naming both and the fix, never silently replaced."""
    from persona_lora.train.data.data_card import built_system_prompt

    built = built_system_prompt(getattr(loaded, "path", None), loaded.sha256)
    if built is None or built.text == cfg.data.system_prompt:
        return
    configured = repr(_short(cfg.data.system_prompt)) if cfg.data.system_prompt else "not set"
    log.warning("%s was built with the system prompt %r (its %s), but data.system_prompt is %s: the records are "
                "trained with their own, while the manifest, the demo and eval will prompt with %s; fix: set "
                "data.system_prompt to the same text (the training config `data build` wrote beside it, %s, has it)",
                loaded.name, _short(built.text), built.card, configured,
                "that" if cfg.data.system_prompt else "none", built.config)


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit] + "…"
