"""The body sections of a card, each built from the manifest alone.

A card is only worth reading if every statement in it is true, so every figure a section shows is read from
the run's manifest, and a row (or a whole section) with nothing behind it is left out rather than filled with a
placeholder. Sections read the typed `Manifest` (an optional section that is absent is None). Most of a section
is a table of rows `(label, manifest path, formatter)` (see `rows`): the path says which field the figure comes
from, the formatter how it is written and whether the value is one worth showing.
Hand-written code is kept for what a row cannot say: a figure worked out from several fields (the effective
batch size), the per-reason and per-group tables, sample answers, and the sentences around the tables.
"""

from __future__ import annotations

import re
from dataclasses import fields
from typing import Any

from persona_lora.artifact import DatasetInfo, LoraInfo, Manifest, TrainingInfo
from persona_lora.engines import ENGINES, KV_B_ISSUE
from persona_lora.gguf_record import WHY_MERGED
from persona_lora.model_cards.markdown import code, esc, fenced, is_num, num
from persona_lora.model_cards.rows import (
    Row,
    as_code,
    as_code_list,
    as_duration,
    as_loss,
    as_number,
    as_setting,
    as_text,
    as_yes_no,
    lookup,
    spelled_out,
    table,
)

# ------------------------------------------------------------------------------- formatters of these sections only


def _step_limit(v: Any) -> str | None:
    """`max_steps`, left out when it is not a limit (<= 0: the epochs decide)."""
    return None if is_num(v) and v <= 0 else as_setting(v)


def _dropped_total(v: dict[str, int] | None) -> str | None:
    """The sum of the per-reason dropped counts (0 is worth saying: nothing was dropped)."""
    return num(sum(n for n in v.values() if is_num(n))) if v is not None else None


def _tokens_per_second(v: Any) -> str | None:
    return f"{v:,.1f} tokens/s" if is_num(v) else None


# ---------------------------------------------------------------------------------------------------- the tables

_DATA_ROWS: list[Row] = [
    ("Records", "dataset.stats.records", as_number),
    ("Kept", "dataset.stats.kept", as_number),
    ("Dropped", "dataset.stats.dropped", _dropped_total),
    ("Truncated to max length", "dataset.stats.truncated", as_number),
    ("Training examples", "dataset.stats.train_examples", as_number),
    ("Evaluation examples", "dataset.stats.eval_examples", as_number),
    ("Tokens (all examples)", "dataset.stats.tokens.total", as_number),
    ("Tokens with loss (trained on)", "dataset.stats.tokens.trained", as_number),
    ("Mean example length (tokens)", "dataset.stats.tokens.mean_length", as_number),
    ("Longest example (tokens)", "dataset.stats.tokens.max_length", as_number),
]

_PROMPT_ROWS: list[Row] = [
    ("Chat template from", "chat.template_source", spelled_out({
        "base": "the base model's tokenizer",
        "file": "a template file (saved with the tokenizer files in this repo)"})),
    ("Loss on", "chat.train_on", spelled_out({"all": "every assistant turn", "last": "the last assistant turn only"})),
    ("Examples longer than max length", "chat.overlong", spelled_out({"truncate": "truncated", "drop": "dropped"})),
    ("Max length (tokens)", "chat.max_length", as_number),
]

_TRAINING_ROWS: list[Row] = [
    ("Learning rate", "training.learning_rate", as_setting),
    ("LR scheduler", "training.lr_scheduler", as_setting),
    ("Warmup ratio", "training.warmup_ratio", as_setting),
    ("Weight decay", "training.weight_decay", as_setting),
    ("Max gradient norm", "training.max_grad_norm", as_setting),
    ("Epochs", "training.epochs", as_setting),
    ("Max steps", "training.max_steps", _step_limit),
    ("Batch size per device", "training.per_device_batch_size", as_setting),
    ("Gradient accumulation steps", "training.gradient_accumulation_steps", as_setting),
    ("Devices (world size)", "training.world_size", as_setting),
    ("Effective batch size", "training.effective_batch_size", as_setting),
    ("Max length (tokens)", "training.max_length", as_setting),
    ("Seed", "training.seed", as_setting),
    ("Training dtype", "training.dtype", as_setting),
    ("Device", "training.device", as_setting),
    ("Base loaded in 4 bit (QLoRA)", "training.load_in_4bit", as_setting),
    ("Gradient checkpointing", "training.gradient_checkpointing", as_setting),
    ("Eval fraction", "training.eval_fraction", as_setting),
    ("Group by length", "training.group_by_length", as_setting),
    ("Packing", "training.packing", as_setting),
]

_LORA_ROWS: list[Row] = [
    ("LoRA preset", "lora.preset", as_code),
    ("LoRA rank r", "lora.r", as_number),
    ("LoRA alpha", "lora.alpha", as_number),
    ("LoRA dropout", "lora.dropout", as_number),
    ("Dropout note", "lora.dropout_note", as_text),
]

_RESULT_ROWS: list[Row] = [
    ("First train loss", "metrics.first_train_loss", as_loss),
    ("Final train loss", "metrics.final_train_loss", as_loss),
    ("Final eval loss (per answer token)", "metrics.final_eval_loss", as_loss),
    ("Best eval loss (per answer token)", "metrics.best_eval_loss", as_loss),
    ("Optimizer steps", "metrics.steps", as_number),
]

_PROVENANCE_ROWS: list[Row] = [
    ("Base model", "base_model.id", as_code),
    ("Base source", "base_model.source", as_text),
    ("Base revision", "base_model.revision", as_code),
    ("Base config sha256", "base_model.config_sha256", as_code),
    ("Base model type", "base_model.model_type", as_code),
    ("Base architectures", "base_model.architectures", as_code_list),
    ("Base parameters", "base_model.num_parameters", as_number),
    ("Dataset", "dataset.name", as_code),
    ("Dataset sha256", "dataset.sha256", as_code),
    ("Held-out file (eval set)", "dataset.eval_file.name", as_code),
    ("Held-out file sha256", "dataset.eval_file.sha256", as_code),
    ("Held-out records", "dataset.eval_file.records", as_number),
    ("Held-out records also in the training file", "dataset.eval_file.also_in_training", as_number),
    ("Dataset made from (`data extract` + `data build`)", "dataset.extraction.source", as_code),
    ("Source sha256", "dataset.extraction.source_sha256", as_code),
    ("Extractor", "dataset.extraction.extractor", as_text),
    ("Extraction model", "dataset.extraction.model", as_code),
    ("Extraction prompt version", "dataset.extraction.prompt_version", as_code),
    ("Character", "dataset.extraction.character", as_text),
    ("Data card", "dataset.extraction.card", as_code),
    ("Created", "created_at", as_text),
    ("persona-lora version", "persona_lora_version", as_code),
    ("Python", "environment.python", as_text),
    ("Platform", "environment.platform", as_text),
    ("Hardware", "environment.hardware", as_text),
    ("Training wall time", "run.wall_time_s", as_duration),
    ("Total wall time", "run.total_wall_time_s", as_duration),
    ("Trained tokens", "run.trained_tokens", as_number),
    ("Throughput", "run.tokens_per_second", _tokens_per_second),
    ("Throughput of the training steps (eval passes excluded)", "run.step_tokens_per_second", _tokens_per_second),
    ("Resumed from a checkpoint", "run.resumed", as_yes_no),
]

_MERGE_ROWS: list[Row] = [
    ("Merged adapter", "merge.adapter", as_code),
    ("Weights dtype", "merge.dtype", as_code),
    ("Weight layout", "merge.layout", as_text),
]


# ------------------------------------------------------------------------------------------------------ sections


def data_section(m: Manifest) -> dict | None:
    """What the persona was trained on and what became of its records (nothing dropped or cut goes unsaid)."""
    dataset = m.dataset or DatasetInfo()
    dropped = [(esc(reason), num(n)) for reason, n in (lookup(m, "dataset.stats.dropped") or {}).items()
               if is_num(n) and n]
    if dataset.source == "hub" and dataset.hub_id:
        what = f"the Hub dataset [{esc(dataset.hub_id)}](https://huggingface.co/datasets/{dataset.hub_id})"
    elif dataset.name:
        what = f"the local file {code(dataset.name)}" if dataset.source == "local" else code(dataset.name)
    else:
        what = None
    rows = table(m, _DATA_ROWS)
    if not rows and not dropped and not what:
        return None
    return {"what": what, "rows": rows, "dropped": dropped, "license": as_text(dataset.license)}


def prompt_section(m: Manifest) -> dict | None:
    """How conversations became tokens: what a user must reproduce to prompt the persona as it was trained."""
    template = lookup(m, "chat.chat_template")
    template_block = fenced(template, "jinja") if template else None
    rows = table(m, _PROMPT_ROWS)
    if not rows and not template_block:
        return None
    return {"rows": rows, "template": template_block}


def _effective_batch(training: TrainingInfo | None) -> list[tuple[str, str]]:
    """Examples per optimizer step, worked out from its factors when the manifest does not record it."""
    if training is None:
        return []
    batch = training.per_device_batch_size
    accum = training.gradient_accumulation_steps or 1
    world = training.world_size or 1
    if training.effective_batch_size is None and all(is_num(x) for x in (batch, accum, world)):
        return [("Effective batch size", num(batch * accum * world))]
    return []


def hyper_section(m: Manifest) -> dict | None:
    """Every hyperparameter of the run, including any the table has no label for yet."""
    known = {path.split(".")[-1] for _, path, _ in _TRAINING_ROWS}
    unlabelled: list[Row] = [(code(f.name), ("training", f.name), as_setting) for f in fields(TrainingInfo)
                             if f.name not in known]
    rows = table(m, _TRAINING_ROWS + unlabelled) + _effective_batch(m.training) + table(m, _LORA_ROWS)
    return {"rows": rows} if rows else None


def _ranges(numbers: list[int]) -> str:
    """`[0, 1, 2, 3, 5]` -> `0-3,5`."""
    out, start, prev = [], None, None
    for n in sorted(set(numbers)) + [None]:
        if start is not None and (n is None or n != prev + 1):
            out.append(str(start) if start == prev else f"{start}-{prev}")
            start = None
        if n is not None and start is None:
            start = n
        prev = n
    return ",".join(out)


def compress_layer_names(names: list[str]) -> list[str]:
    """Full module names with their layer indices folded: `model.layers.{1-26}.mlp.shared_experts.up_proj`.

    The real model has hundreds of adapted modules; the card lists each distinct module path once, ordered by
    first layer then path.
    """
    shapes: dict[tuple[str, str], list[int]] = {}
    plain: list[str] = []
    for name in names:
        match = re.match(r"^(.*?\.layers\.)(\d+)(\..*)$", name)
        if match:
            shapes.setdefault((match.group(1), match.group(3)), []).append(int(match.group(2)))
        else:
            plain.append(name)
    ordered = sorted(shapes.items(), key=lambda item: (min(item[1]), item[0]))
    folded = [f"{pre}{{{_ranges(layers)}}}{post}" if len(set(layers)) > 1 else f"{pre}{layers[0]}{post}"
              for (pre, post), layers in ordered]
    return folded + plain


def coverage_section(m: Manifest) -> dict | None:
    """Which parts of the model the LoRA reached, and any part asked for that it could not reach."""
    lora = m.lora or LoraInfo()
    rows, not_applied = [], []
    for g in lora.coverage:
        if not g.group:
            continue
        rows.append((esc(g.group), as_yes_no(g.asked) or "", as_yes_no(g.applied) or "",
                     as_number(g.modules) or "", as_number(g.params) or ""))
        if g.asked is True and g.applied is False:
            not_applied.append(esc(g.group))
    trainable, total = lora.trainable_params, lora.total_params
    summary = None
    if is_num(trainable) and is_num(total) and total > 0:
        summary = f"{num(trainable)} trainable parameters of {num(total)} in total ({100 * trainable / total:.3g}%)."
    elif is_num(trainable):
        summary = f"{num(trainable)} trainable parameters."
    asked = [code(t) for t in lora.asked_target_modules or []]
    targets = [code(t) for t in compress_layer_names(lora.target_modules)]
    params = [code(t) for t in lora.target_parameters]
    if not rows and not summary and not targets and not params:
        return None
    return {"rows": rows, "summary": summary, "not_applied": not_applied, "asked_modules": ", ".join(asked) or None,
            "target_modules": ", ".join(targets) or None, "target_parameters": ", ".join(params) or None}


def results_section(m: Manifest, loss_png: str | None) -> dict | None:
    """The losses the run reached, the loss curve, and whether the run was cut short."""
    rows = table(m, _RESULT_ROWS)
    interrupted = lookup(m, "run.interrupted") is True
    changes = [esc(c) for c in lookup(m, "run.changes") or [] if c]
    if not rows and not loss_png and not interrupted and not changes:
        return None
    return {"rows": rows, "loss_png": loss_png, "interrupted": interrupted, "changes": changes}


def samples_section(m: Manifest) -> list[tuple[str, str, str]] | None:
    """(prompt, base answer, adapter answer) rows: the persona shown against its base on the same prompts."""
    rows = [(esc(s.prompt), esc(s.base or ""), esc(s.adapter or "")) for s in m.samples]
    return rows or None


def provenance_section(m: Manifest) -> dict | None:
    """What a reader needs to reproduce or audit the run: base, data hashes, software, hardware, time."""
    libs = lookup(m, "environment.libraries") or {}
    lib_rows = [(esc(k), code(v)) for k, v in libs.items() if v]
    rows = table(m, _PROVENANCE_ROWS)
    if not rows and not lib_rows:
        return None
    return {"rows": rows, "libraries": lib_rows}


def merge_section(m: Manifest) -> dict | None:
    """How a merged model was made, and whether tools built for the base checkpoint can read its weights."""
    layout = lookup(m, "merge.layout") or ""
    layout_note = None
    if "original" in layout:
        layout_note = ("The weights are saved in the base checkpoint's original layout, so tools that read the "
                       "base checkpoint read this one too.")
    elif "fused" in layout:
        layout_note = ("The weights are saved in transformers 5's fused-expert layout; tools that expect the base "
                       "checkpoint's original layout may not read them.")
    rows = table(m, _MERGE_ROWS)
    if not rows:
        return None
    return {"rows": rows, "layout_note": layout_note}


# Engines that serve LoRA on DeepSeek-V2's MLA attention, with what their loaders apply (versions checked).
MLA_MODEL_TYPES = ("deepseek_v2", "deepseek_v3")


def serving_section(m: Manifest) -> list[tuple[str, str, str]] | None:
    """Per engine: whether it applies this adapter as trained, and the command that prepares it. vLLM's MLA
    attention does not apply LoRA on `kv_b_proj` (vllm-project/vllm#48974), so an adapter with it is served as
    trained there only as a merged model. The table does not depend on whether a GGUF export exists (the "Run it
    locally" section below it does), so a push of an export can fill that section in without touching the table."""
    lora = m.lora or LoraInfo()
    if not lora.target_modules and not lora.target_parameters:
        return None
    name = m.name or "ADAPTER"
    kv_b = m.base_model.model_type in MLA_MODEL_TYPES and any(t.endswith("kv_b_proj") for t in lora.target_modules)
    vllm, sglang = (f"{e.label} {e.version.removesuffix('.0')}" for e in (ENGINES["vllm"], ENGINES["sglang"]))
    rows = [("transformers + PEFT", "yes", "the snippet above")]
    if kv_b:
        rows.append((vllm, f"no: its MLA attention skips LoRA on `kv_b_proj` ({esc(KV_B_ISSUE)})",
                     f"serve the merged model ({code(f'persona-lora merge {name} --base BASE --out DIR')}), or "
                     "train with a `-no-kv-b` preset"))
    else:
        rows.append((vllm, "yes", code(f"persona-lora export {name} --for vllm --out DIR")))
    rows.append((sglang, "yes", code(f"persona-lora export {name} --for sglang --out DIR")))
    # On your own machine: a merged GGUF; this row is the card's one place that says why not a LoRA GGUF.
    mla = m.base_model.model_type in MLA_MODEL_TYPES
    target = "ollama" if m.base_model.model_type == "deepseek_v2" else "llama.cpp"
    how = code(f"persona-lora export {name} --for {target} --out DIR") + \
        " (its README has the `ollama` / `llama-cli` commands)"
    rows.append(("llama.cpp / Ollama (run it locally)",
                 "yes, as one merged GGUF file" + (f"; not as a LoRA GGUF: {WHY_MERGED}" if mla else ""), how))
    return rows
