"""`persona-lora train CONFIG --method dpo|kto`: preference tuning on the demo's votes with TRL, into an adapter
folder like any other.

Why this shape:
- TRL's `DPOTrainer` / `KTOTrainer` compute the losses and the metrics (rewards, accuracies, margins, KL); this
  module only sets them up. They are given the token ids of our one formatting path (`preference_data`), not
  left to render the conversations again, so prompts are exactly what SFT trained on and the demo feeds.
- One copy of the base weights. With `--init-adapter` (continuing from an SFT adapter) the reference is that
  adapter, frozen: TRL copies it into a second PEFT adapter "ref" on the same model. Without one, the reference
  is the base with the adapter disabled (TRL's "ref" copy of a fresh adapter is removed again: a zero-initialised
  LoRA is the base). TRL adds "ref" with `add_adapter`, which runs PEFT's MoE target rewrite, so the trainer is
  built inside `peft_compat.native_targets()` and the coverage check runs on the policy and on the reference.
- The result is an ordinary adapter folder: PEFT's files in the portable spelling, the manifest (with its
  `preference` section: method, reference, lineage, vote counts, win rates, the metrics history) and the card.

Steps: set up (base, inherited template and system prompt) -> data -> claim the folder -> model -> TRL trainer
(coverage checked on both adapters) -> train -> finalise.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from persona_lora import presets
from persona_lora.artifact import DatasetStats, TokenStats, read_manifest, write_manifest
from persona_lora.artifact_preference import (
    InitAdapterInfo,
    PreferenceDataInfo,
    PreferenceInfo,
    PreferenceStep,
    WinRateRow,
)
from persona_lora.errors import ModelLoadError, TrainingInterrupted, UsageError
from persona_lora.expert_lora import use_lora_aware_experts
from persona_lora.hashing import sha256_file
from persona_lora.peft_compat import load_adapter, lora_module_label, native_targets
from persona_lora.train.config import TrainConfig
from persona_lora.train.preference_data import (
    EncodedPreferences,
    PreferenceSet,
    encode_preferences,
    load_preferences,
    require_votes_for,
)

log = logging.getLogger(__name__)

METRIC_KEYS = {"rewards/chosen": "rewards_chosen", "rewards/rejected": "rewards_rejected",
               "rewards/accuracies": "rewards_accuracies", "rewards/margins": "rewards_margins", "kl": "kl"}
REF = "ref"  # the adapter name TRL gives the frozen reference copy


@dataclass
class InitAdapter:
    """The adapter a run continues from: where it is, what it was, and what the hub said about it."""

    path: Path
    spec: str  # as given: folder or hub id
    repo_id: str | None
    revision: str | None
    commit: str | None
    manifest: object  # artifact.Manifest


def resolve_init(cfg: TrainConfig) -> InitAdapter | None:
    """The init adapter (pulled and verified when a hub id), and the settings it passes on: its LoRA shape, its
    system prompt when the config gives none."""
    spec = cfg.preference.init_adapter
    if not spec:
        return None
    from persona_lora.consistency import check_folder
    from persona_lora.hubs.pull import local_or_pulled

    path, ref, commit = local_or_pulled(spec, what="--init-adapter")
    check_folder(path)  # a truncated or inconsistent adapter is refused by name before any weight is read
    manifest = read_manifest(path)
    if manifest.kind != "adapter" or manifest.lora is None:
        raise UsageError(f"--init-adapter {spec}: a {manifest.kind} folder without a LoRA record; give an adapter "
                         "folder written by `persona-lora train`")
    lora = manifest.lora
    cfg.lora.preset, cfg.lora.target_modules = lora.preset, lora.asked_target_modules
    cfg.lora.r, cfg.lora.alpha = lora.r or cfg.lora.r, lora.alpha or cfg.lora.alpha
    cfg.lora.dropout = lora.dropout or 0.0
    inherited = manifest.chat.system_prompt if manifest.chat else None
    if cfg.data.system_prompt is None:
        cfg.data.system_prompt = inherited
    elif inherited and cfg.data.system_prompt != inherited:
        log.warning("data.system_prompt differs from the one %s was trained with; the config's is used", spec)
    return InitAdapter(path, spec, ref.repo_id if ref else None, ref.revision if ref else None, commit, manifest)


def init_adapter_ids(init: InitAdapter) -> set[str]:
    """The ids the demo may have recorded votes for this adapter under: its folder name (or the name given), a
    hub id at the revision or commit it was loaded at."""
    ids = {init.spec, init.path.name, init.manifest.name}
    if init.repo_id:
        ids |= {f"{init.repo_id}@{rev}" for rev in (init.commit, init.revision or "main") if rev}
    return {i for i in ids if i}


def check_init_base(init: InitAdapter, setup) -> None:
    """The init adapter must have been trained on this base (its config hash), and prompts keep its template."""
    recorded = init.manifest.base_model.config_sha256
    if recorded and recorded != setup.base.config_sha256:
        raise ModelLoadError(
            f"--init-adapter {init.spec} was trained on {init.manifest.base_model.id} (config.json sha256 "
            f"{recorded[:12]}), but --base {setup.base.id} has sha256 {setup.base.config_sha256[:12]}; give the base "
            "it was trained on")
    chat = init.manifest.chat
    if chat and chat.chat_template:
        setup.tokenizer.chat_template = chat.chat_template
        setup.template_source = chat.template_source or setup.template_source


# ------------------------------------------------------------------------------------------------ data


@dataclass
class PreferenceRun:
    """The data of a run: the set as read, and its training and held-out splits as token ids."""

    prefs: PreferenceSet
    train: EncodedPreferences
    eval: EncodedPreferences | None
    train_conversations: list[list[dict]]  # prompt + chosen (or the completion): for the card's sample answers
    eval_conversations: list[list[dict]]
    trl_rows: list[dict]  # the training examples in TRL's conversational format (what its constructor prepares)
    trl_eval_rows: list[dict]


def prepare_preferences(cfg: TrainConfig, tokenizer) -> PreferenceRun:
    from persona_lora.chat_format import conversation_for
    from persona_lora.dataset.split import split_indices
    from persona_lora.errors import DataError

    method = cfg.preference.method
    prefs = load_preferences(cfg.data.path, revision=cfg.data.revision)
    examples = prefs.examples(method)
    eval_idx, train_idx = split_indices(len(examples), cfg.training.seed, cfg.data.eval_fraction)
    kw = dict(system_prompt=cfg.data.system_prompt, max_length=cfg.data.max_length, overlong=cfg.data.overlong)
    train = encode_preferences(tokenizer, [examples[i] for i in train_idx], method, **kw)
    evals = encode_preferences(tokenizer, [examples[i] for i in eval_idx], method, **kw) if eval_idx else None
    if not train.rows:
        raise DataError(f"no training examples left after formatting: {dropped_summary(train)}; set "
                        f"data.max_length={train.needed_length} (or more) to keep them", prefs.name)
    answers = ("chosen", "rejected") if method == "dpo" else ("completion",)

    def convs(idx):
        return [conversation_for([*examples[i]["prompt"], {"role": "assistant", "content": examples[i][answers[0]]}],
                                 cfg.data.system_prompt) for i in idx]

    def trl(idx):
        rows = []
        for i in idx:
            ex = examples[i]
            row = {"prompt": conversation_for(ex["prompt"], cfg.data.system_prompt),
                   **{a: [{"role": "assistant", "content": ex[a]}] for a in answers}}
            rows.append({**row, "label": bool(ex["label"])} if method == "kto" else row)
        return rows

    return PreferenceRun(prefs, train, evals if evals and evals.rows else None, convs(train_idx), convs(eval_idx),
                         trl(train_idx), trl(eval_idx))


def dropped_summary(enc: EncodedPreferences) -> str:
    return ", ".join(f"{n} {reason}" for reason, n in enc.dropped.items())


def formatting_note(cfg: TrainConfig, run: PreferenceRun) -> str | None:
    """Said before training when formatting dropped examples: how many, why, and the max_length that keeps all."""
    parts = [run.train] + ([run.eval] if run.eval else [])
    dropped = sum(sum(e.dropped.values()) for e in parts)
    if not dropped:
        return None
    total = dropped + sum(len(e.rows) for e in parts)
    needed = max(e.needed_length for e in parts)
    return (f"note: {dropped} of {total} examples dropped ({'; '.join(dropped_summary(e) for e in parts if e.dropped)}"
            f"); set data.max_length={needed} (or more) to train on all of them")


def dataset_stats(run: PreferenceRun) -> DatasetStats:
    parts = [run.train] + ([run.eval] if run.eval else [])
    dropped: dict[str, int] = {k: v for k, v in run.prefs.counts.items() if "(dropped)" in k and v}
    for enc in parts:
        for reason, n in enc.dropped.items():
            dropped[reason] = dropped.get(reason, 0) + n
    kept = sum(len(e.rows) for e in parts)
    tokens = sum(e.tokens for e in parts)
    return DatasetStats(records=run.prefs.counts.get("votes", run.prefs.counts.get("records")), kept=kept,
                        dropped=dropped, truncated=sum(e.truncated for e in parts), train_examples=len(run.train.rows),
                        eval_examples=len(run.eval.rows) if run.eval else 0,
                        tokens=TokenStats(total=tokens, train_split=run.train.tokens,
                                          mean_length=round(tokens / max(kept, 1), 1)))


def to_dataset(enc: EncodedPreferences, method: str, batch_size: int, seed: int):
    """The ids as TRL's collators read them. KTO estimates its KL term from mismatched pairs: each completion also
    goes with the next prompt of its batch of `batch_size` (as TRL's own preparation rotates them), which needs
    batches in a fixed order, so KTO's examples are shuffled once here (seeded) and then read in order."""
    import random

    from datasets import Dataset

    rows = list(enc.rows)
    if method == "kto":
        random.Random(seed).shuffle(rows)
    columns = {k: [r[k] for r in rows] for k in rows[0]}
    if method == "kto":
        done = columns["completion_ids"]
        kl = []
        for start in range(0, len(done), batch_size):
            chunk = done[start:start + batch_size]
            kl += [chunk[-1]] + chunk[:-1]
        columns["KL_completion_ids"] = kl
    return Dataset.from_dict(columns)


# ------------------------------------------------------------------------------------------------ model


def build_policy(cfg: TrainConfig, setup, init: InitAdapter | None):
    """The model being tuned: the init adapter loaded trainable, or a fresh adapter as SFT builds it."""
    from persona_lora.model_loading import load_base_model
    from persona_lora.train.model_setup import AdaptedModel, build_adapted_model

    if init is None:
        return build_adapted_model(cfg, setup.base, setup.device)
    model = load_base_model(setup.base, dtype=cfg.base.dtype, device=setup.device,
                            load_in_4bit=cfg.base.load_in_4bit, trust_remote_code=cfg.base.trust_remote_code)
    if setup.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.config.use_cache = False
    peft_model = load_adapter(model, init.path, is_trainable=True)
    # the init adapter records its base by hub id; during the run it is this local copy, so that PEFT's checkpoint
    # saves (save_embedding_layers "auto") find its config.json here instead of asking the hub (save_adapter
    # records the hub id again in the folder written)
    peft_model.peft_config["default"].base_model_name_or_path = str(setup.base.path)
    lora = init.manifest.lora
    spec = presets.LoraSpec([row.group for row in lora.coverage if row.asked], list(lora.target_modules),
                            list(lora.target_parameters))
    table = presets.check_coverage(peft_model, spec)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    experts = use_lora_aware_experts(peft_model)
    return AdaptedModel(peft_model, spec, table, lora.dropout_note, trainable, total, experts)


def adapter_coverage(peft_model, adapter: str) -> set[str]:
    """The modules (and fused expert tensors) holding LoRA of `adapter`."""
    names = set()
    for name, mod in peft_model.get_base_model().named_modules():
        if adapter in (getattr(mod, "lora_A", None) or {}):
            names.add(lora_module_label(name, mod)[1])
    return names


def check_both_adapters(peft_model, asked: set[str]) -> None:
    """Policy and reference adapter must each cover exactly what was asked (and checked) for the policy."""
    from persona_lora.errors import ConfigError

    for adapter in [a for a in ("default", REF) if a in peft_model.peft_config]:
        got = adapter_coverage(peft_model, adapter)
        if got != asked:
            raise ConfigError(f"LoRA coverage check failed for the {adapter!r} adapter: missing "
                              f"{sorted(asked - got)[:5]}, unexpected {sorted(got - asked)[:5]}; this is a bug or a "
                              "PEFT/TRL behaviour change, please report it")


# ------------------------------------------------------------------------------------------------ trainer


def preference_trainer(cfg: TrainConfig, setup, model, run: PreferenceRun, out: Path, callbacks):
    """TRL's trainer on our model and ids; the reference set up as the module docstring says."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer

    from persona_lora.train.trainer import training_arguments

    method, p = cfg.preference.method, cfg.preference
    base_args = training_arguments(cfg, out, setup, run.eval is not None)
    kwargs = {f.name: getattr(base_args, f.name) for f in dataclasses.fields(base_args) if f.init}
    kwargs.update(train_sampling_strategy="sequential" if method == "kto" else "random", max_length=None,
                  beta=p.beta, remove_unused_columns=False)
    if method == "dpo":
        args, trainer_cls = DPOConfig(**kwargs), DPOTrainer
    else:
        args = KTOConfig(**kwargs, desirable_weight=p.desirable_weight, undesirable_weight=p.undesirable_weight)
        trainer_cls = KTOTrainer
    asked = adapter_coverage(model.peft_model, "default")
    model.peft_model.config.pad_token_id = setup.tokenizer.pad_token_id
    with native_targets():  # TRL's add_adapter("ref") must not re-target our MoE adapter
        trainer = trainer_cls(model=model.peft_model, args=args, processing_class=setup.tokenizer,
                              train_dataset=Dataset.from_list(run.trl_rows), callbacks=callbacks,
                              eval_dataset=Dataset.from_list(run.trl_eval_rows) if run.eval is not None else None)
    if cfg.preference.init_adapter is None and REF in model.peft_model.peft_config:
        model.peft_model.delete_adapter(REF)  # a fresh LoRA is the base: the disabled adapter is the reference
        model.peft_model.set_adapter("default")
    check_both_adapters(model.peft_model, asked)
    use_lora_aware_experts(model.peft_model)
    trainer.train_dataset = to_dataset(run.train, method, args.per_device_train_batch_size, cfg.training.seed)
    if run.eval is not None:
        trainer.eval_dataset = to_dataset(run.eval, method, args.per_device_eval_batch_size, cfg.training.seed)
    return trainer


def coverage_note(cfg: TrainConfig) -> str:
    if cfg.preference.init_adapter:
        return "the reference (the init adapter, frozen) has the same coverage: checked on both adapters"
    return "the reference is the base: the adapter disabled"


def reference_kind(cfg: TrainConfig) -> str:
    return "init-adapter" if cfg.preference.init_adapter else "base"


def _preference_section(manifest, cfg: TrainConfig, init, run: PreferenceRun, history: list[dict]) -> None:
    """The manifest's preference section; TRL's trainers draw their batches themselves (KTO in order)."""
    manifest.preference = preference_info(cfg, init, run, history)
    manifest.training.batch_order = "sequential" if cfg.preference.method == "kto" else "random"


def preference_info(cfg: TrainConfig, init: InitAdapter | None, run: PreferenceRun, history: list[dict]):
    steps = [PreferenceStep(step=h.get("step"), loss=h.get("loss"),
                            **{ours: h[theirs] for theirs, ours in METRIC_KEYS.items() if theirs in h})
             for h in history if "loss" in h]
    lineage = None
    if init is not None:
        m = init.manifest
        lineage = InitAdapterInfo(id=init.repo_id or init.path.name, revision=init.revision, commit=init.commit,
                                  sha256=sha256_file(init.path / "adapter_model.safetensors"),
                                  method=m.preference.method if m.preference else "sft")
    data = PreferenceDataInfo(kind=run.prefs.kind, name=run.prefs.name, sha256=run.prefs.sha256,
                              counts=dict(run.prefs.counts), win_rates=[WinRateRow(**r) for r in run.prefs.win_rates])
    return PreferenceInfo(method=cfg.preference.method, beta=cfg.preference.beta, reference=reference_kind(cfg),
                          init_adapter=lineage, data=data, history=steps)


def dry_run_summary(cfg: TrainConfig, setup, init: InitAdapter | None, run: PreferenceRun) -> str:
    """`--dry-run`: the coverage the policy (and its reference) will have, and how many steps the run takes."""
    import math

    from persona_lora.train.model_setup import build_adapted_model

    if init is not None:
        lora = init.manifest.lora
        table = [dataclasses.asdict(row) for row in lora.coverage]
        trainable, total = lora.trainable_params or 0, lora.total_params or 0
    else:
        model = build_adapted_model(cfg, setup.base, setup.device, meta=True)
        table, trainable, total = model.coverage, model.trainable, model.total
    t = cfg.training
    per_epoch = math.ceil(len(run.train.rows) / (t.batch_size * t.gradient_accumulation_steps))
    steps = t.max_steps or math.ceil(per_epoch * t.epochs)
    sequences = 2 if cfg.preference.method == "dpo" else 1
    return ("LoRA coverage:\n" + presets.format_coverage(table, trainable, total) + "\n" + coverage_note(cfg)
            + f"\nestimate: {steps} optimizer steps of {t.batch_size * t.gradient_accumulation_steps} examples "
            f"({sequences * t.batch_size} sequences per micro-batch through the policy, the same through the "
            "reference)")


# ------------------------------------------------------------------------------------------------ the run


def run_preference_training(cfg: TrainConfig, *, dry_run: bool = False, print_fn=print) -> Path | None:
    """Train with DPO or KTO and write the adapter folder; with dry_run, print the plan and return None."""
    import torch

    from persona_lora.train.fsdp import all_ranks_planned
    from persona_lora.train.prepare import PreparedData
    from persona_lora.train.progress import (
        interrupted_at,
        replace_library_output,
        summary_lines,
        train_progress_callback,
    )
    from persona_lora.train.provenance import build_manifest
    from persona_lora.train.run_folder import CHECKPOINTS, abandon_output, claim_output, complete_output, plan_output
    from persona_lora.train.steps import (
        StopOnSignal,
        check_some_step_updates,
        loop_callbacks,
        loop_result,
        new_tally,
        set_up,
    )
    from persona_lora.train.trainer import finalise

    started = time.time()
    method = cfg.preference.method
    if cfg.training.resume != "false":
        raise UsageError(f"--resume is not supported with --method {method}; start the run again (it is short) or "
                         "train SFT with --resume")
    if cfg.training.packing:
        raise UsageError(f"training.packing does not apply to --method {method}; set training.packing: false")
    init = resolve_init(cfg)
    setup = set_up(cfg)
    if init is not None:
        check_init_base(init, setup)
    run = prepare_preferences(cfg, setup.tokenizer)
    counts = ", ".join(f"{k}: {v}" for k, v in run.prefs.counts.items())
    reference = ("the init adapter, frozen" if init else "the base (adapter disabled)")
    print_fn(f"{method.upper()} on {run.prefs.name} ({counts}); {len(run.train.rows)} training examples, "
             f"{len(run.eval.rows) if run.eval else 0} held out; reference: {reference}")
    note = formatting_note(cfg, run)
    if note:
        print_fn(note)
    if init is not None:
        require_votes_for(run.prefs, init.spec, init_adapter_ids(init),
                          sha256_file(init.path / "adapter_model.safetensors"),
                          allow=cfg.preference.allow_other_adapter, print_fn=print_fn)
    check_some_step_updates(cfg, len(run.train.rows), setup.world_size, print_fn)
    if dry_run:
        print_fn(dry_run_summary(cfg, setup, init, run))
        return None
    plan = plan_output(cfg)
    all_ranks_planned(setup.device)
    torch.manual_seed(cfg.training.seed)
    model = build_policy(cfg, setup, init)
    loaded = SimpleNamespace(name=run.prefs.name, source=run.prefs.source, sha256=run.prefs.sha256,
                             hub_id=run.prefs.name if run.prefs.source == "hub" else None)
    data = PreparedData([], [], run.eval_conversations, run.train_conversations, dataset_stats(run), loaded)
    draft = build_manifest(cfg, setup, data, model, None, [], plan.out)
    _preference_section(draft, cfg, init, run, [])
    out = plan.work
    try:
        if setup.rank == 0:  # only rank 0 writes the folder (data parallel runs)
            claim_output(plan, model.trainable * (4 + 12 * cfg.training.save_total_limit))
            write_manifest(out, draft)
        else:
            print_fn = lambda *a, **k: None  # noqa: E731
        print_fn("LoRA coverage:\n" + presets.format_coverage(model.coverage, model.trainable, model.total) + "\n"
                 + coverage_note(cfg))
        stop, tally = StopOnSignal(), new_tally()
        callbacks = [*loop_callbacks(stop, tally, allow_no_update=cfg.training.allow_no_update),
                     train_progress_callback(method)]
        trainer = preference_trainer(cfg, setup, model, run, out, callbacks)
        replace_library_output(trainer)
        t0 = time.time()
        with stop, native_targets():
            trainer.train()
        result = loop_result(trainer, tally, t0, resumed=False, interrupted=stop.interrupted)
        if not trainer.is_world_process_zero():
            if result.interrupted:
                raise TrainingInterrupted("interrupted")
            return None
        if REF in model.peft_model.peft_config:
            model.peft_model.delete_adapter(REF)  # the folder holds the tuned adapter only
            model.peft_model.set_adapter("default")
        finalise(cfg, setup, data, model, result, out, started, [],
                 extend_manifest=lambda m: _preference_section(m, cfg, init, run, result.history))
        if result.interrupted:
            raise TrainingInterrupted(f"{interrupted_at(result)}: the adapter in {out} is from the last step reached "
                                      f"(its card says so); checkpoints under {out / CHECKPOINTS}")
        out = complete_output(plan)
        for line in summary_lines(out, cfg.base.model, result):
            print_fn(line)
    except BaseException as e:
        abandon_output(plan, e)  # a failed replacement leaves nothing; an interrupted one is kept to continue
        raise
    return out
