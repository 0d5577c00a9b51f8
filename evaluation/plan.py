"""What an evaluation will run, settled before any model is loaded: the base, each adapter (checked and named),
the system prompt and chat template all models get, the sets, and the fingerprint a resumed run must match.

Why all of it up front: a mistake (a folder that is not an adapter, two adapters trained with different system
prompts, data that is not the adapter's) must stop the command before minutes of model loading, and a rerun with
the same `--out` may only continue rows that were produced under exactly the same settings.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from persona_lora.artifact import ADAPTER_WEIGHTS, MANIFEST_NAME, Manifest
from persona_lora.consistency import check_folder
from persona_lora.errors import ModelLoadError, UsageError, VerificationError
from persona_lora.evaluation.sets import EvalSet, guard_set, main_set, training_split
from persona_lora.hashing import sha256_file
from persona_lora.model_loading import ResolvedBase

log = logging.getLogger(__name__)

BASE = "base"  # the base model's name in the report


@dataclass
class EvalOptions:
    """The `eval` command's options, already checked (see `evaluation.cli`)."""

    adapters: list[str]
    base: str
    out: Path
    data: str | None = None
    split: str | None = None
    n: int | None = None
    max_new_tokens: int = 128
    system: str | None = None
    seed: int = 0
    markers: list[str] | None = None
    batch_size: int = 8
    max_length: int | None = None
    guard: str = "loss"  # loss | full | off (the CLI's default: loss)
    guard_data: str | None = None
    fail_if_forgetting: float | None = None
    judge_endpoint: str | None = None
    judge_model: str | None = None
    judge_key_env: str | None = None
    judge_rubric: Path | None = None
    base_revision: str | None = None
    source: str = "auto"
    hub: str = "hf"
    device: str | None = None
    dtype: str = "auto"
    overwrite: bool = False


@dataclass
class Adapter:
    """One adapter under evaluation: `name` is its name in the report, `key` its PEFT adapter name."""

    name: str
    key: str
    folder: Path
    manifest: Manifest | None
    repo_id: str | None = None
    weights_sha256: str = ""
    warnings: list[str] = field(default_factory=list)
    held_out: bool | None = None  # whether the evaluated prompts were held out from its training

    def describe(self) -> dict:
        """What the report says about it (no local paths: the report may be published with a card)."""
        m = self.manifest
        return {"name": self.name, "folder": self.folder.name, "repo_id": self.repo_id,
                "manifest_name": m.name if m else None, "weights_sha256": self.weights_sha256,
                "trained_on": (m.dataset.name if m and m.dataset else None), "held_out": self.held_out,
                "warnings": self.warnings}


@dataclass
class Plan:
    options: EvalOptions
    base: ResolvedBase
    adapters: list[Adapter]
    system_prompt: str | None
    chat_template: str | None  # the adapters' training template when it is not the base tokenizer's, else None
    main: EvalSet
    guard: EvalSet | None
    markers: list[str]
    max_length: int

    @property
    def models(self) -> list[str]:
        return [BASE] + [a.name for a in self.adapters]

    def fingerprint(self) -> dict:
        """Everything a row depends on: a resumed run must match it exactly."""
        o = self.options
        return {
            "base": {"id": self.base.id, "config_sha256": self.base.config_sha256, "revision": self.base.revision},
            "adapters": [{"name": a.name, "weights_sha256": a.weights_sha256} for a in self.adapters],
            "data": {k: self.main.info.get(k) for k in ("name", "sha256", "split", "seed", "eval_fraction",
                                                        "evaluated", "sample_seed")},
            "origins": [it.origin for it in self.main.items],
            "guard": None if self.guard is None else {"sha256": self.guard.info["sha256"], "mode": o.guard},
            "system_prompt": self.system_prompt,
            "chat_template_sha256": _sha(self.chat_template) if self.chat_template else None,
            "max_new_tokens": o.max_new_tokens, "max_length": self.max_length, "dtype": o.dtype,
        }


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _unique_name(wanted: str, taken: set[str]) -> str:
    name = "base-adapter" if wanted == BASE else wanted
    k = 2
    while name in taken:
        name, k = f"{wanted}-{k}", k + 1
    return name


def resolve_adapters(specs: list[str], base: ResolvedBase, hub: str) -> list[Adapter]:
    """Each ADAPTER (folder or hub id) located, checked like every command checks a folder, and named."""
    from persona_lora.hubs.pull import local_or_pulled
    from persona_lora.hubs.verify import check_base

    out: list[Adapter] = []
    taken: set[str] = {BASE}
    for i, spec in enumerate(specs):
        folder, ref, _ = local_or_pulled(spec, hub=hub, what="ADAPTER")
        checked = check_folder(folder)
        if checked.kind != "adapter":
            raise ModelLoadError(f"ADAPTER {spec} is a model folder, not an adapter; evaluate it as --base {spec}")
        manifest = checked.manifest
        if manifest is None:
            log.warning("%s has no %s: not written by persona-lora (no system prompt, no held-out split)", folder,
                        MANIFEST_NAME)
        wanted = ref.repo_id if ref else (manifest.name if manifest else folder.name)
        adapter = Adapter(name=_unique_name(wanted, taken), key=f"eval{i}", folder=folder, manifest=manifest,
                          repo_id=ref.repo_id if ref else None, weights_sha256=sha256_file(folder / ADAPTER_WEIGHTS))
        taken.add(adapter.name)
        try:
            if base.source == "local":
                check_base(folder, str(base.path))
            else:
                check_base(folder, base.id, hub=base.source)
        except VerificationError as e:  # it may still load (same shapes); its figures then mean little: say so
            adapter.warnings.append(f"trained on a different base: {e}")
            log.warning("%s: %s", adapter.name, e)
        out.append(adapter)
    return out


def _agreed(adapters: list[Adapter], what: str, get, option: str):
    """The one value of `get(manifest)` all adapters share; UsageError naming `option` when they differ."""
    values = {a.name: get(a.manifest) for a in adapters if a.manifest is not None}
    distinct = set(values.values())
    if len(distinct) > 1:
        raise UsageError(f"the adapters were trained with different {what} ({', '.join(values)}); base and adapters "
                         f"must get the same prompt: give {option}, or evaluate them in separate runs")
    return next(iter(distinct)) if distinct else None


def make_plan(o: EvalOptions, base: ResolvedBase, base_template: str | None) -> Plan:
    """Resolve adapters, prompts and sets; nothing heavy is loaded yet."""
    adapters = resolve_adapters(o.adapters, base, o.hub)
    if o.system is not None:
        system = o.system or None
    else:
        system = _agreed(adapters, "system prompts", lambda m: (m.chat.system_prompt if m.chat else None) or None,
                         "--system TEXT")
    template = _agreed(adapters, "chat templates", lambda m: m.chat.chat_template if m.chat else None,
                       "one set of adapters trained with the same template")
    if template == base_template:
        template = None
    first = adapters[0]
    main = main_set(data=o.data, split=o.split, n=o.n, seed=o.seed, system_prompt=system,
                    reference=(first.name, first.folder, first.manifest))
    _mark_held_out(adapters, main)
    guard = None if o.guard == "off" else guard_set(o.guard_data)
    if o.markers is not None:
        markers = o.markers
    else:
        markers = list(dict.fromkeys(m for a in adapters if a.manifest for m in training_split(a.manifest)["markers"]))
    max_length = o.max_length or max([a.manifest.chat.max_length for a in adapters
                                      if a.manifest and a.manifest.chat and a.manifest.chat.max_length] or [2048])
    return Plan(o, base, adapters, system, template, main, guard, markers, max_length)


def _mark_held_out(adapters: list[Adapter], main: EvalSet) -> None:
    """Whether each adapter's training saw the evaluated prompts, from its own manifest; a warning when it did
    (figures on its own training records flatter it)."""
    info = main.info
    for a in adapters:
        if a.manifest is None:
            continue
        rec = training_split(a.manifest)
        if rec["sha256"] != info["sha256"]:
            a.held_out = True if rec["sha256"] else None  # other data: nothing of this set was trained on
        elif info["split"] == "held-out" and (rec["seed"], rec["eval_fraction"]) == (info.get("seed"),
                                                                                    info.get("eval_fraction")):
            a.held_out = True
        else:
            a.held_out = False
        if a.held_out is False:
            note = (f"{a.name} was trained on these records (its training data is {info['name']}, "
                    f"split {info['split']}): its figures here are not held-out figures")
            a.warnings.append(note)
            log.warning(note)


def describe_settings(plan: Plan) -> dict:
    o = plan.options
    return {"decoding": "greedy", "max_new_tokens": o.max_new_tokens, "system_prompt": plan.system_prompt,
            "chat_template": "the adapters' training template" if plan.chat_template else "the base tokenizer's",
            "max_length": plan.max_length, "markers": plan.markers, "seed": o.seed, "batch_size": o.batch_size,
            "dtype": o.dtype, "guard": o.guard, "fail_if_forgetting": o.fail_if_forgetting}


def fingerprint_text(fp: dict) -> str:
    return json.dumps(fp, ensure_ascii=False, sort_keys=True)
