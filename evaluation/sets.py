"""The prompt sets an evaluation runs over: the user's data (any format we train on), an adapter's own held-out
split rebuilt from its manifest, and the forgetting guard we ship.

Why rebuild the held-out split rather than store it: the manifest already records everything the split depends
on (the data's sha256, `training.seed`, `data.eval_fraction`), and training draws it with
`persona_lora.dataset.split.split_indices`, the function used here. The data's sha256 must equal the
manifest's, or the split is refused: the same seed over other records would hold out other prompts, and figures
on them could include the adapter's own training records.

An adapter trained with a separate held-out file (`data.eval_path`, e.g. the DATA.eval.json `data build` splits off
by scene) records that file's name and sha256 instead: its held-out set is that file, found by name and proven the
same way.

Every item keeps its record's origin (`file:line` or `file:record N`), so a row of the report can be traced back.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

from persona_lora.artifact import Manifest
from persona_lora.chat_format import conversation_for
from persona_lora.dataset.reading import LoadedDataset, load_records
from persona_lora.dataset.split import split_indices
from persona_lora.errors import DataError, UsageError

log = logging.getLogger(__name__)

DATA_DIR = Path(__file__).resolve().parent / "data"
GUARD_FILE = DATA_DIR / "general.jsonl"  # ~50 general prompts (Chinese and English) with reference answers
SPLITS = ("held-out", "train", "all")


@dataclass
class Item:
    """One prompt: the conversation up to and including its reference answer (system prompt applied)."""

    index: int
    origin: str
    conversation: list[dict]

    @property
    def prompt_messages(self) -> list[dict]:
        """What the models answer: the conversation up to its last user turn."""
        last_user = max(i for i, m in enumerate(self.conversation) if m["role"] == "user")
        return self.conversation[: last_user + 1]

    @property
    def prompt(self) -> str:
        return self.prompt_messages[-1]["content"]

    @property
    def reference(self) -> str:
        return self.conversation[-1]["content"]


@dataclass
class EvalSet:
    """A named set of items and what the report says about where they came from."""

    name: str  # "main" | "guard"
    items: list[Item]
    info: dict = field(default_factory=dict)


def _items(loaded: LoadedDataset, indices: list[int], system_prompt: str | None) -> list[Item]:
    out = []
    for k, i in enumerate(indices):
        record = loaded.records[i]
        conv = conversation_for(record["messages"], system_prompt)
        last = max(j for j, m in enumerate(conv) if m["role"] == "assistant")
        out.append(Item(index=k, origin=str(record.get("origin", i)), conversation=conv[: last + 1]))
    return out


def _subsample(indices: list[int], n: int | None, seed: int) -> list[int]:
    """The first-come `n` would favour the start of a file; a seeded sample (kept in file order) does not."""
    if n is None or n >= len(indices):
        return indices
    return sorted(random.Random(seed).sample(indices, n))


def training_split(manifest: Manifest) -> dict:
    """Where an adapter's training data was and how it was split, from its manifest (config first, then the
    typed sections older manifests have)."""
    config = manifest.config or {}
    data_cfg, train_cfg = config.get("data") or {}, config.get("training") or {}
    dataset, training = manifest.dataset, manifest.training
    source = dataset.source if dataset else None
    path = data_cfg.get("path") or (dataset.hub_id if dataset and source == "hub" else None) or (
        dataset.name if dataset else None)
    held = dataset.eval_file if dataset else None
    return {
        "path": path, "source": source, "revision": data_cfg.get("revision"),
        "sha256": dataset.sha256 if dataset else None,
        "seed": train_cfg.get("seed", training.seed if training else None),
        "eval_fraction": data_cfg.get("eval_fraction", training.eval_fraction if training else None),
        "markers": data_cfg.get("markers") or [],
        # data.eval_path: the held-out records were their own file, named and hashed here
        "eval_file": None if held is None else {"path": data_cfg.get("eval_path") or held.name, "name": held.name,
                                                "source": held.source, "sha256": held.sha256},
    }


def _candidates(name: str, adapter_folder: Path, beside: Path | None = None) -> list[Path]:
    """Where a training file recorded only by name may be: as given, next to or above the adapter folder, next to
    `beside` (the training file, for its eval file), in examples/data/ and in the sample data we ship (the embedded
    default trains on it)."""
    import persona_lora.sample_data as sample_data

    plain = Path(name)
    places = [plain, adapter_folder / name, adapter_folder.parent / name,
              *([beside.parent / plain.name] if beside is not None else []), Path("examples") / "data" / name,
              Path(sample_data.__file__).resolve().parent / name]
    return [p for p in dict.fromkeys(places) if p.is_file()]


def _eval_file(held: dict, adapter_name: str, adapter_folder: Path, beside: Path | None) -> LoadedDataset:
    """The held-out file an adapter was trained with (`data.eval_path`), found by its recorded name and proven by
    its sha256: other bytes under that name would be other prompts, perhaps trained on."""
    name, sha = held["path"], held["sha256"]
    fix = f"give the held-out file with --data {Path(name).name} (it is checked against the recorded sha256)"
    if held["source"] == "hub":
        loaded = load_records(name)
        if loaded.sha256 != sha:
            raise DataError(f"hub dataset {name}: its rows have changed since adapter {adapter_name} was trained "
                            f"on it as its held-out file (sha256 {loaded.sha256[:12]}… ≠ {sha[:12]}…); {fix}", name)
        return loaded
    found = _candidates(name, adapter_folder, beside)
    for candidate in found:
        loaded = load_records(str(candidate))
        if loaded.sha256 == sha:
            return loaded
    if found:
        raise DataError(f"adapter {adapter_name} held out {name} (sha256 {sha[:12]}…), but "
                        f"{', '.join(str(p) for p in found)} has changed since (other sha256), so it is not the set "
                        f"training evaluated on; restore it (e.g. rerun `data build` with the same settings), or {fix}",
                        name)
    raise UsageError(f"adapter {adapter_name} held out the file {name} (sha256 {sha[:12]}…), which was not found "
                     f"here; {fix}")


def _training_data(split: dict, adapter_name: str, adapter_folder: Path) -> LoadedDataset:
    """The adapter's training data, found from its manifest and proven by its sha256."""
    path, sha = split["path"], split["sha256"]
    fix = "give the training file with --data FILE (the held-out split is then rebuilt from it)"
    if not path or not sha:
        raise UsageError(f"adapter {adapter_name}: its manifest does not record its training data and its sha256, "
                         f"so its held-out split cannot be rebuilt; give --data FILE_OR_ID --split all")
    if split["source"] == "hub":
        loaded = load_records(path, revision=split["revision"])
        if loaded.sha256 != sha:
            raise DataError(f"hub dataset {path}: its rows have changed since adapter {adapter_name} was trained "
                            f"(sha256 {loaded.sha256[:12]}… ≠ {sha[:12]}… in its manifest); {fix}", path)
        return loaded
    found = _candidates(path, adapter_folder)
    for candidate in found:
        loaded = load_records(str(candidate))
        if loaded.sha256 == sha:
            return loaded
    seen = f" ({', '.join(str(p) for p in found)} differ from it)" if found else ""
    raise UsageError(f"adapter {adapter_name} was trained on {path} (sha256 {sha[:12]}…), which was not found "
                     f"here{seen}; {fix}")


def main_set(*, data: str | None, split: str | None, n: int | None, seed: int, system_prompt: str | None,
             reference: tuple[str, Path, Manifest | None] | None) -> EvalSet:
    """The set to evaluate: `--data` (whole, or its held-out/train split) or, without it, the held-out split of
    `reference` (name, folder, manifest of the first adapter)."""
    split = split or ("all" if data else "held-out")
    info: dict = {"split": split}
    recorded = training_split(reference[2]) if reference and reference[2] else None
    if split != "all":
        if reference is None or recorded is None:
            raise UsageError(f"--split {split} needs the adapter's manifest (its seed and eval fraction); the first "
                             "adapter has none: use --split all")
        if recorded["seed"] is None or recorded["eval_fraction"] is None:
            raise UsageError(f"adapter {reference[0]}: its manifest does not record training.seed and "
                             "data.eval_fraction, so its split cannot be rebuilt; use --split all")
    if split == "held-out" and recorded["eval_file"] is not None:
        return _held_out_file(data, recorded, reference, n, seed, system_prompt)
    if data:
        loaded = load_records(data)
    elif recorded is not None:
        loaded = _training_data(recorded, reference[0], reference[1])
    else:
        raise UsageError("give --data FILE_OR_ID: the first adapter has no manifest to find its held-out split in")
    info.update(name=loaded.name, source=loaded.source, format=loaded.format, sha256=loaded.sha256,
                records=len(loaded.records))
    if recorded is not None:
        info["training_sha256"] = recorded["sha256"]
        info["sha256_matches_training"] = recorded["sha256"] == loaded.sha256 if recorded["sha256"] else None
    if split == "all":
        indices = list(range(len(loaded.records)))
    else:
        if recorded["sha256"] != loaded.sha256:
            raise DataError(f"{loaded.name} is not the data adapter {reference[0]} was trained on (sha256 "
                            f"{loaded.sha256[:12]}… ≠ {str(recorded['sha256'])[:12]}… in its manifest), so its "
                            f"{split} split cannot be rebuilt from it; give the training file, or --split all",
                            loaded.name)
        held, trained = split_indices(len(loaded.records), recorded["seed"], recorded["eval_fraction"])
        indices = held if split == "held-out" else trained
        info.update(split_of=reference[0], seed=recorded["seed"], eval_fraction=recorded["eval_fraction"])
        if not indices:
            raise UsageError(f"adapter {reference[0]} held nothing out (data.eval_fraction "
                             f"{recorded['eval_fraction']}); give --data FILE_OR_ID --split all")
    chosen = _subsample(indices, n, seed)
    info.update(available=len(indices), evaluated=len(chosen), sample_seed=seed if len(chosen) < len(indices)
                else None)
    return EvalSet("main", _items(loaded, chosen, system_prompt), info)


def _held_out_file(data: str | None, recorded: dict, reference: tuple[str, Path, Manifest | None], n: int | None,
                   seed: int, system_prompt: str | None) -> EvalSet:
    """The held-out set of an adapter trained with a separate eval file: that file, whole. `--data` may name it,
    or the training file (the eval file is then looked for beside it); either is proven by its sha256."""
    name, folder = reference[0], reference[1]
    held = recorded["eval_file"]
    beside = None
    if data:
        given = load_records(data)
        if given.sha256 == held["sha256"]:
            loaded = given
        elif given.sha256 == recorded["sha256"]:
            beside = Path(given.path) if given.path else None
            loaded = _eval_file(held, name, folder, beside)
        else:
            raise DataError(f"{given.name} is neither the training file nor the held-out file adapter {name} was "
                            f"trained with ({recorded['path']}, {held['path']}; sha256 {given.sha256[:12]}… matches "
                            "neither); give one of them, or --split all", given.name)
    else:
        loaded = _eval_file(held, name, folder, None)
    indices = list(range(len(loaded.records)))
    chosen = _subsample(indices, n, seed)
    info = {"split": "held-out", "name": loaded.name, "source": loaded.source, "format": loaded.format,
            "sha256": loaded.sha256, "records": len(loaded.records), "training_sha256": recorded["sha256"],
            "sha256_matches_training": False, "held_out_file": True, "sha256_matches_held_out_file": True,
            "split_of": name, "seed": recorded["seed"], "eval_fraction": recorded["eval_fraction"],
            "available": len(indices), "evaluated": len(chosen),
            "sample_seed": seed if len(chosen) < len(indices) else None}
    return EvalSet("main", _items(loaded, chosen, system_prompt), info)


def guard_set(source: str | None) -> EvalSet:
    """The forgetting guard: general prompts outside any persona, without a system prompt (what the model can
    still do when nobody asks for the persona). `source` replaces the shipped set."""
    loaded = load_records(source or str(GUARD_FILE))
    name = "persona-lora general (zh, en)" if source is None else loaded.name
    items = _items(loaded, list(range(len(loaded.records))), None)
    return EvalSet("guard", items, {"name": name, "sha256": loaded.sha256, "evaluated": len(items),
                                    "system_prompt": None})
