"""Write an adapter folder's README.md (its Hub model card) from the folder alone.

A card is only worth reading if every statement in it is true, so the card is derived from the two files that
record what actually happened: the run's manifest (`persona_manifest.json`) and PEFT's `adapter_config.json`.
Nothing is typed in by hand, nothing is guessed: a section with no data behind it is left out rather than filled
with a placeholder. The card is rendered through `huggingface_hub.ModelCard.from_template`, so the YAML header
is the Hub's own serialization of `ModelCardData`.

Cards are regenerated (after training, before a push, after a pull); regeneration must be byte-identical for an
unchanged folder and must keep what a person wrote between the user-section markers.

Nothing private may reach a public card: manifest strings that are absolute local paths are reduced to their
last component, home directories inside free text become `~`, and token-like strings are redacted. The card
code itself never reads the user name, `$HOME` or the working directory.
"""

from __future__ import annotations

import html
import json
import logging
import math
import re
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from persona_lora import peft_compat
from persona_lora.artifact import CARD_NAME, LOSS_CURVE, read_adapter_config, read_manifest

log = logging.getLogger(__name__)

DEFAULT_LOSS_PNG = LOSS_CURVE
USER_START = "<!-- persona-lora:user-start -->"
USER_END = "<!-- persona-lora:user-end -->"
SNIPPET_MARKER = "# persona-lora usage snippet"
# PEFT's `save_pretrained` writes a stub README.md from its own template (a page of filler); this comment of
# that template tells the stub from a card someone wrote.
_PEFT_DEFAULT_CARD = "<!-- Provide a quick summary of what the model is/does. -->"
TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"
TEMPLATES = {"adapter": TEMPLATES_DIR / "adapter_card.md", "merged": TEMPLATES_DIR / "merged_card.md"}

# Generation length in the usage snippet: a usage choice, not a claim about training.
SNIPPET_MAX_NEW_TOKENS = 256

# License ids the Hub knows; anything else is published as `other` with a `license_name`.
_HUB_LICENSES = set(
    "apache-2.0 mit openrail openrail++ bigscience-openrail-m creativeml-openrail-m bigscience-bloom-rail-1.0 "
    "bigcode-openrail-m afl-3.0 artistic-2.0 bsl-1.0 bsd bsd-2-clause bsd-3-clause bsd-3-clause-clear c-uda cc "
    "cc0-1.0 cc-by-2.0 cc-by-2.5 cc-by-3.0 cc-by-4.0 cc-by-sa-3.0 cc-by-sa-4.0 cc-by-nc-2.0 cc-by-nc-3.0 "
    "cc-by-nc-4.0 cc-by-nd-4.0 cc-by-nc-nd-3.0 cc-by-nc-nd-4.0 cc-by-nc-sa-2.0 cc-by-nc-sa-3.0 cc-by-nc-sa-4.0 "
    "cdla-sharing-1.0 cdla-permissive-1.0 cdla-permissive-2.0 wtfpl ecl-2.0 epl-1.0 epl-2.0 etalab-2.0 eupl-1.1 "
    "eupl-1.2 agpl-3.0 gfdl gpl gpl-2.0 gpl-3.0 lgpl lgpl-2.1 lgpl-3.0 isc lppl-1.3c ms-pl mpl-2.0 odc-by odbl "
    "osl-3.0 postgresql ofl-1.1 ncsa unlicense zlib pddl lgpl-lr deepfloyd-if-license llama2 llama3 llama3.1 "
    "llama3.2 llama3.3 llama4 gemma other".split()
)

# Manifest fields whose text is free prose the user wrote or the model produced: reducing them to a path's last
# component would destroy them, so only home directories and tokens inside them are scrubbed.
_FREE_TEXT_FIELDS = {("chat", "system_prompt"), ("chat", "chat_template"), ("samples",)}

_ABS_PATH = re.compile(r"^(?:file://|~[\\/]|/|[A-Za-z]:[\\/]|\\\\)[^\n]*$")
_HOME_IN_TEXT = re.compile(r"(?:/home/|/Users/|[A-Za-z]:\\Users\\)[^/\\\s]+|/root(?=[/\\\s]|$)")
_TOKENS = re.compile(r"\b(?:hf_[A-Za-z0-9]{20,}|ms-[0-9a-fA-F-]{32,}|gh[pousr]_[A-Za-z0-9]{20,})\b")
_URL_USERINFO = re.compile(r"(\b[a-z][a-z0-9+.-]*://)[^/\s@]+@", re.IGNORECASE)


# --------------------------------------------------------------------------------------------- reading the folder


# ----------------------------------------------------------------------------------------------------- scrubbing


def _scrub_text(s: str) -> str:
    """Redact tokens and URL credentials, and replace home directories inside any text with `~`."""
    s = _TOKENS.sub("[redacted token]", s)
    s = _URL_USERINFO.sub(r"\1", s)
    return _HOME_IN_TEXT.sub("~", s)


def path_tail(s: str) -> str:
    """The last component of a path-like string: `/home/x/models/tiny/` -> `tiny`."""
    s = re.sub(r"^file://", "", s)
    win = PureWindowsPath(s) if "\\" in s or re.match(r"^[A-Za-z]:", s) else None
    name = (win.name if win is not None else PurePosixPath(s).name).strip()
    return name or "local"


def looks_like_local_path(s: str) -> bool:
    """True for absolute, home-relative and file:// paths (never for hub ids like `org/name`)."""
    return bool(_ABS_PATH.match(s))


def scrub(obj: Any, where: tuple = ()) -> Any:
    """A deep copy of `obj` that is safe to publish (see the module docstring)."""
    if isinstance(obj, dict):
        return {k: scrub(v, where + (k,)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [scrub(v, where) for v in obj]
    if isinstance(obj, str):
        free = any(where[: len(f)] == f for f in _FREE_TEXT_FIELDS)
        if not free and looks_like_local_path(obj):
            return path_tail(obj)
        return _scrub_text(obj)
    return obj


# ------------------------------------------------------------------------------------------- markdown formatting


def esc(s: Any) -> str:
    """Text safe inside markdown prose or a table cell: HTML shown not run, no links/images, one line."""
    text = html.escape(str(s), quote=False)
    text = re.sub(r"([\\`*_\[\]~|#])", r"\\\1", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text.replace("\n", "<br>")


def code(s: Any) -> str:
    """An inline code span for `s` (one line; `|` escaped so it can sit in a table)."""
    text = " ".join(str(s).split("\n"))
    ticks = "`" * (max((len(r) for r in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{ticks}{pad}{text}{pad}{ticks}".replace("|", "\\|")


def fenced(body: str, lang: str = "") -> str:
    """A fenced code block whose fence is longer than any backtick run inside `body`."""
    longest = max((len(r) for r in re.findall(r"`{3,}", body)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{lang}\n{body.rstrip(chr(10))}\n{fence}"


def num(x: Any) -> str:
    """Integers with thousands separators, floats without noise, everything else as text."""
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        if x.is_integer() and abs(x) < 1e15:
            return f"{int(x):,}"
        return f"{x:.6g}"
    return str(x)


def loss(x: Any) -> str:
    return f"{x:.4f}" if _is_num(x) else str(x)


def duration(seconds: float) -> str:
    """`95.2 s`, `12 min 05 s`, `10 h 03 min`."""
    s = float(seconds)
    if s < 60:
        return f"{s:.1f} s"
    m, sec = divmod(int(round(s)), 60)
    if m < 60:
        return f"{m} min {sec:02d} s"
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min"


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


_FILLERS = {"unknown", "n/a", "na", "none", "null", "todo", "tbd", "-", "?", "more information needed"}


def _present(x: Any) -> bool:
    """Something true to say: not None, not empty, not a filler such as "unknown" or "N/A"."""
    if x is None or x == "" or x == [] or x == {}:
        return False
    return not (isinstance(x, str) and x.strip("` ").lower() in _FILLERS)


def _rows(pairs: list[tuple[str, Any]]) -> list[tuple[str, str]]:
    """Table rows for the pairs whose value is present (value already formatted)."""
    return [(label, value) for label, value in pairs if _present(value)]


# ------------------------------------------------------------------------------------------------ card metadata


def base_is_on_hub(base: dict) -> bool:
    """Whether `base_model.id` names a Hugging Face repo a reader can open (not a local folder, not ModelScope)."""
    bid = base.get("id") or ""
    source = base.get("source")
    if source not in (None, "hf") or looks_like_local_path(bid):
        return False
    return bool(re.fullmatch(r"[\w.-]+(/[\w.-]+)?", bid))


def hub_license(manifest: dict) -> tuple[str | None, str | None]:
    """(license, license_name): the run's own `license` first, else the base's; (None, None) when unknown."""
    for value in (manifest.get("license"), (manifest.get("base_model") or {}).get("license")):
        if isinstance(value, str) and value.strip():
            lic = value.strip().lower()
            if lic in _HUB_LICENSES:
                return lic, None
            return "other", re.sub(r"[^a-z0-9.]+", "-", lic).strip("-") or None
    return None, None


def _tag(s: str) -> str:
    return re.sub(r"[^a-z0-9_.-]+", "-", s.lower()).strip("-")


def card_data(m: dict):
    """The Hub metadata (`ModelCardData`) for a scrubbed manifest."""
    from huggingface_hub import ModelCardData

    merged = m["kind"] == "merged"
    base = m.get("base_model") or {}
    dataset = m.get("dataset") or {}
    fields: dict[str, Any] = {}
    if base_is_on_hub(base):
        fields["base_model"] = base["id"]
    if dataset.get("source") == "hub" and isinstance(dataset.get("hub_id"), str) and dataset["hub_id"]:
        fields["datasets"] = [dataset["hub_id"]]
    language = dataset.get("language")
    if isinstance(language, str):
        language = [language]
    if isinstance(language, list) and (langs := [x for x in language if isinstance(x, str) and x.strip()]):
        fields["language"] = langs
    fields["library_name"] = "transformers" if merged else "peft"
    lic, lic_name = hub_license(m)
    if lic:
        fields["license"] = lic
    if lic_name:
        fields["license_name"] = lic_name
    fields["pipeline_tag"] = "text-generation"
    tags = ["lora", "persona", "persona-lora"]
    if isinstance(base.get("model_type"), str) and _tag(base["model_type"]):
        tags.append(_tag(base["model_type"]))
    tags.append("merge" if merged else "peft")
    fields["tags"] = tags
    if "base_model" in fields:
        fields["base_model_relation"] = "merge" if merged else "adapter"
    return ModelCardData(**fields)


# ------------------------------------------------------------------------------------------------ usage snippet


def _leaf_names(targets: Any) -> list[str]:
    if isinstance(targets, str):
        return [targets]
    if isinstance(targets, (list, tuple, set)):
        return [str(t) for t in targets]
    return []


def needs_moe_rewrite_off(m: dict, adapter_config: dict | None) -> bool:
    """Whether PEFT would re-map this adapter's MLP targets onto fused experts when loading it: our adapters name
    transformers 5 modules, where `gate_proj`/`up_proj`/`down_proj` are the dense MLP and the shared experts, so
    the snippet must switch the rewrite off exactly when such a target exists on such a model."""
    return peft_compat.needs_moe_rewrite_off((m.get("base_model") or {}).get("model_type"),
                                             (m.get("lora") or {}).get("target_modules"),
                                             (adapter_config or {}).get("target_modules"))


def _py(s: str) -> str:
    """A Python string literal (double-quoted, readable non-ASCII)."""
    return json.dumps(s, ensure_ascii=False)


def usage_snippet(m: dict, *, base_id: str, adapter_id: str | None, model_id: str | None,
                  tokenizer_from_adapter: bool, rewrite_off: bool) -> str:
    """The Python usage block: same chat template, same system prompt, greedy decoding, new tokens only."""
    chat = m.get("chat") or {}
    system_prompt = chat.get("system_prompt")
    samples = m.get("samples") or []
    prompt = next((s["prompt"] for s in samples if isinstance(s.get("prompt"), str) and s["prompt"].strip()), None)
    base_source = (m.get("base_model") or {}).get("source")
    lines = [SNIPPET_MARKER]
    if model_id is not None:
        lines += [f"model_id = {_py(model_id)}", ""]
    else:
        if base_source == "local":
            lines.append("# the base was a local folder when this adapter was trained: point base_id at your copy")
        elif base_source == "modelscope":
            lines.append("# the base comes from ModelScope: download it there and point base_id at the folder")
        lines += [f"base_id = {_py(base_id)}", "# this adapter: its Hub repo id, or the folder you downloaded it to",
                  f"adapter_id = {_py(adapter_id)}", ""]
    lines += ["from transformers import AutoModelForCausalLM, AutoTokenizer"]
    if model_id is None:
        lines += ["from peft import PeftModel"]
    lines.append("")
    if model_id is not None:
        lines += ["tokenizer = AutoTokenizer.from_pretrained(model_id)",
                  'model = AutoModelForCausalLM.from_pretrained(model_id, dtype="auto")']
    else:
        if tokenizer_from_adapter:
            lines.append("# training added the chat template to the tokenizer, which is saved with the adapter")
        lines += [f"tokenizer = AutoTokenizer.from_pretrained({'adapter_id' if tokenizer_from_adapter else 'base_id'})",
                  'model = AutoModelForCausalLM.from_pretrained(base_id, dtype="auto")']
        if rewrite_off:
            lines += [
                "# PEFT would move gate_proj/up_proj/down_proj onto the fused routed experts; keep the targets as trained",
                "import peft.utils.transformers_weight_conversion as _conv",
                "_conv.convert_peft_config_for_transformers = lambda *args, **kwargs: None"
                "  # adapter already targets transformers-5 modules",
            ]
        lines.append("model = PeftModel.from_pretrained(model, adapter_id)")
    lines += ["model.eval()", "", "messages = ["]
    if isinstance(system_prompt, str) and system_prompt:
        lines.append(f'    {{"role": "system", "content": {_py(system_prompt)}}},')
    lines += [
        f'    {{"role": "user", "content": {_py(prompt or "Who are you?")}}},',
        "]",
        "inputs = tokenizer.apply_chat_template(",
        '    messages, add_generation_prompt=True, return_tensors="pt", return_dict=True',
        ").to(model.device)",
        f"output = model.generate(**inputs, do_sample=False, max_new_tokens={SNIPPET_MAX_NEW_TOKENS})",
        'answer = tokenizer.decode(output[0, inputs["input_ids"].shape[-1]:], skip_special_tokens=True)',
        "print(answer)",
    ]
    return fenced("\n".join(lines), "python")


# -------------------------------------------------------------------------------------------------- the context


def _data_section(m: dict) -> dict | None:
    dataset = m.get("dataset") or {}
    stats = dataset.get("stats") or {}
    tokens = stats.get("tokens") or {}
    rows = _rows([
        ("Records", num(stats["records"]) if _is_num(stats.get("records")) else None),
        ("Kept", num(stats["kept"]) if _is_num(stats.get("kept")) else None),
        ("Dropped", num(sum(v for v in (stats.get("dropped") or {}).values() if _is_num(v)))
         if isinstance(stats.get("dropped"), dict) else None),
        ("Truncated to max length", num(stats["truncated"]) if _is_num(stats.get("truncated")) else None),
        ("Training examples", num(stats["train_examples"]) if _is_num(stats.get("train_examples")) else None),
        ("Evaluation examples", num(stats["eval_examples"]) if _is_num(stats.get("eval_examples")) else None),
        ("Tokens (all examples)", num(tokens["total"]) if _is_num(tokens.get("total")) else None),
        ("Tokens with loss (trained on)", num(tokens["trained"]) if _is_num(tokens.get("trained")) else None),
        ("Mean example length (tokens)", num(tokens["mean_length"]) if _is_num(tokens.get("mean_length")) else None),
        ("Longest example (tokens)", num(tokens["max_length"]) if _is_num(tokens.get("max_length")) else None),
    ])
    dropped = [(esc(reason), num(n)) for reason, n in (stats.get("dropped") or {}).items() if _is_num(n) and n]
    source = dataset.get("source")
    name = dataset.get("name")
    if source == "hub" and dataset.get("hub_id"):
        what = f"the Hub dataset [{esc(dataset['hub_id'])}](https://huggingface.co/datasets/{dataset['hub_id']})"
    elif name:
        what = f"the local file {code(name)}" if source == "local" else code(name)
    else:
        what = None
    license_ = dataset.get("license")
    if not rows and not dropped and not what:
        return None
    return {"what": what, "rows": rows, "dropped": dropped,
            "license": esc(license_) if isinstance(license_, str) and license_ else None}


def _prompt_section(m: dict) -> dict | None:
    chat = m.get("chat") or {}
    source = {"base": "the base model's tokenizer", "file": "a template file (saved with the tokenizer files in this repo)"}
    train_on = {"all": "every assistant turn", "last": "the last assistant turn only"}
    overlong = {"truncate": "truncated", "drop": "dropped"}
    rows = _rows([
        ("Chat template from", esc(source.get(chat.get("template_source"), chat.get("template_source") or "")) or None),
        ("Loss on", esc(train_on.get(chat.get("train_on"), chat.get("train_on") or "")) or None),
        ("Examples longer than max length", esc(overlong.get(chat.get("overlong"), chat.get("overlong") or "")) or None),
        ("Max length (tokens)", num(chat["max_length"]) if _is_num(chat.get("max_length")) else None),
    ])
    template = chat.get("chat_template")
    template_block = fenced(template, "jinja") if isinstance(template, str) and template else None
    if not rows and not template_block:
        return None
    return {"rows": rows, "template": template_block}


_TRAINING_LABELS = [
    ("learning_rate", "Learning rate"), ("lr_scheduler", "LR scheduler"), ("warmup_ratio", "Warmup ratio"),
    ("weight_decay", "Weight decay"), ("max_grad_norm", "Max gradient norm"),
    ("epochs", "Epochs"), ("max_steps", "Max steps"), ("per_device_batch_size", "Batch size per device"),
    ("gradient_accumulation_steps", "Gradient accumulation steps"), ("world_size", "Devices (world size)"),
    ("effective_batch_size", "Effective batch size"),
    ("max_length", "Max length (tokens)"), ("seed", "Seed"), ("dtype", "Training dtype"), ("device", "Device"),
    ("load_in_4bit", "Base loaded in 4 bit (QLoRA)"),
    ("gradient_checkpointing", "Gradient checkpointing"), ("eval_fraction", "Eval fraction"),
    ("group_by_length", "Group by length"), ("packing", "Packing"),
]


def _hyper_section(m: dict) -> dict | None:
    training = m.get("training") or {}
    lora = m.get("lora") or {}
    pairs: list[tuple[str, Any]] = []
    known = {k for k, _ in _TRAINING_LABELS}
    for key, label in _TRAINING_LABELS + [(k, code(k)) for k in training if k not in known]:
        value = training.get(key)
        if key == "max_steps" and _is_num(value) and value <= 0:
            continue  # "no step limit": the epochs decide
        if isinstance(value, (str, int, float, bool)):
            pairs.append((label, esc(num(value)) if not isinstance(value, str) else esc(value)))
    batch = training.get("per_device_batch_size")
    accum = training.get("gradient_accumulation_steps") or 1
    world = training.get("world_size") or 1
    if training.get("effective_batch_size") is None and all(_is_num(x) for x in (batch, accum, world)):
        pairs.append(("Effective batch size", num(batch * accum * world)))
    pairs += [
        ("LoRA preset", code(lora["preset"]) if isinstance(lora.get("preset"), str) and lora["preset"] else None),
        ("LoRA rank r", num(lora["r"]) if _is_num(lora.get("r")) else None),
        ("LoRA alpha", num(lora["alpha"]) if _is_num(lora.get("alpha")) else None),
        ("LoRA dropout", num(lora["dropout"]) if _is_num(lora.get("dropout")) else None),
        ("Dropout note", esc(lora["dropout_note"]) if isinstance(lora.get("dropout_note"), str) and lora["dropout_note"] else None),
    ]
    rows = _rows(pairs)
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


def _coverage_section(m: dict) -> dict | None:
    lora = m.get("lora") or {}
    rows, not_applied = [], []
    for g in lora.get("coverage") or []:
        if not isinstance(g, dict) or not g.get("group"):
            continue
        rows.append((esc(g["group"]), num(g["asked"]) if isinstance(g.get("asked"), bool) else "",
                     num(g["applied"]) if isinstance(g.get("applied"), bool) else "",
                     num(g["modules"]) if _is_num(g.get("modules")) else "",
                     num(g["params"]) if _is_num(g.get("params")) else ""))
        if g.get("asked") is True and g.get("applied") is False:
            not_applied.append(esc(g["group"]))
    trainable, total = lora.get("trainable_params"), lora.get("total_params")
    summary = None
    if _is_num(trainable) and _is_num(total) and total > 0:
        summary = f"{num(trainable)} trainable parameters of {num(total)} in total ({100 * trainable / total:.3g}%)."
    elif _is_num(trainable):
        summary = f"{num(trainable)} trainable parameters."
    asked = [code(t) for t in _leaf_names(lora.get("asked_target_modules"))]
    targets = [code(t) for t in compress_layer_names(_leaf_names(lora.get("target_modules")))]
    params = [code(t) for t in _leaf_names(lora.get("target_parameters"))]
    if not rows and not summary and not targets and not params:
        return None
    return {"rows": rows, "summary": summary, "not_applied": not_applied, "asked_modules": ", ".join(asked) or None,
            "target_modules": ", ".join(targets) or None, "target_parameters": ", ".join(params) or None}


def _results_section(m: dict, loss_png: str | None) -> dict | None:
    metrics = m.get("metrics") or {}
    rows = _rows([
        ("First train loss", loss(metrics["first_train_loss"]) if _is_num(metrics.get("first_train_loss")) else None),
        ("Final train loss", loss(metrics["final_train_loss"]) if _is_num(metrics.get("final_train_loss")) else None),
        ("Final eval loss", loss(metrics["final_eval_loss"]) if _is_num(metrics.get("final_eval_loss")) else None),
        ("Best eval loss", loss(metrics["best_eval_loss"]) if _is_num(metrics.get("best_eval_loss")) else None),
        ("Optimizer steps", num(metrics["steps"]) if _is_num(metrics.get("steps")) else None),
    ])
    interrupted = (m.get("run") or {}).get("interrupted") is True
    if not rows and not loss_png and not interrupted:
        return None
    return {"rows": rows, "loss_png": loss_png, "interrupted": interrupted}


def _samples_section(m: dict) -> list[tuple[str, str, str]] | None:
    rows = []
    for s in m.get("samples") or []:
        if not isinstance(s.get("prompt"), str):
            continue
        rows.append((esc(s["prompt"]), esc(s.get("base") or ""), esc(s.get("adapter") or "")))
    return rows or None


def _provenance_section(m: dict) -> dict | None:
    base = m.get("base_model") or {}
    dataset = m.get("dataset") or {}
    env = m.get("environment") or {}
    run = m.get("run") or {}
    libs = env.get("libraries") or {}
    archs = base.get("architectures")
    rows = _rows([
        ("Base model", code(base["id"]) if base.get("id") else None),
        ("Base source", esc(base["source"]) if isinstance(base.get("source"), str) and base["source"] else None),
        ("Base revision", code(base["revision"]) if isinstance(base.get("revision"), str) and base["revision"] else None),
        ("Base config sha256", code(base["config_sha256"]) if base.get("config_sha256") else None),
        ("Base model type", code(base["model_type"]) if base.get("model_type") else None),
        ("Base architectures", ", ".join(code(a) for a in archs) if isinstance(archs, list) and archs else None),
        ("Base parameters", num(base["num_parameters"]) if _is_num(base.get("num_parameters")) else None),
        ("Dataset", code(dataset["name"]) if dataset.get("name") else None),
        ("Dataset sha256", code(dataset["sha256"]) if dataset.get("sha256") else None),
        ("Created", esc(m["created_at"]) if isinstance(m.get("created_at"), str) and m["created_at"] else None),
        ("persona-lora version", code(m["persona_lora_version"]) if m.get("persona_lora_version") else None),
        ("Python", esc(env["python"]) if env.get("python") else None),
        ("Platform", esc(env["platform"]) if env.get("platform") else None),
        ("Hardware", esc(env["hardware"]) if env.get("hardware") else None),
        ("Training wall time", duration(run["wall_time_s"]) if _is_num(run.get("wall_time_s")) else None),
        ("Total wall time", duration(run["total_wall_time_s"]) if _is_num(run.get("total_wall_time_s")) else None),
        ("Trained tokens", num(run["trained_tokens"]) if _is_num(run.get("trained_tokens")) else None),
        ("Throughput", f"{run['tokens_per_second']:,.1f} tokens/s" if _is_num(run.get("tokens_per_second")) else None),
        ("Resumed from a checkpoint", num(run["resumed"]) if isinstance(run.get("resumed"), bool) else None),
    ])
    lib_rows = [(esc(k), code(v)) for k, v in libs.items() if isinstance(v, str) and v] if isinstance(libs, dict) else []
    if not rows and not lib_rows:
        return None
    return {"rows": rows, "libraries": lib_rows}


def _merge_section(m: dict) -> dict | None:
    merge = m.get("merge") or {}
    layout = merge.get("layout")
    layout_note = None
    if isinstance(layout, str) and "original" in layout:
        layout_note = ("The weights are saved in the base checkpoint's original layout, so tools that read the "
                       "base checkpoint read this one too.")
    elif isinstance(layout, str) and "fused" in layout:
        layout_note = ("The weights are saved in transformers 5's fused-expert layout; tools that expect the base "
                       "checkpoint's original layout may not read them.")
    rows = _rows([
        ("Merged adapter", code(merge["adapter"]) if merge.get("adapter") else None),
        ("Weights dtype", code(merge["dtype"]) if merge.get("dtype") else None),
        ("Weight layout", esc(layout) if isinstance(layout, str) and layout else None),
    ])
    if not rows:
        return None
    return {"rows": rows, "layout_note": layout_note}


def build_context(m: dict, adapter_config: dict | None, *, loss_png: str | None, repo_id: str | None = None,
                  tokenizer_in_folder: bool = False) -> dict:
    """Everything the templates show, already formatted and escaped (the templates only lay it out)."""
    merged = m["kind"] == "merged"
    base = m.get("base_model") or {}
    dataset = m.get("dataset") or {}
    chat = m.get("chat") or {}
    base_id = base["id"]
    name = m.get("name") if isinstance(m.get("name"), str) and m.get("name") else None
    own_id = repo_id or name or ("merged-model" if merged else "adapter")
    on_hub = base_is_on_hub(base)
    base_ref = f"[{esc(base_id)}](https://huggingface.co/{base_id})" if on_hub else code(base_id)
    rewrite_off = not merged and needs_moe_rewrite_off(m, adapter_config)
    tokenizer_from_adapter = chat.get("template_source") == "file" or tokenizer_in_folder
    merge = m.get("merge") or {}
    source_adapter = merge.get("adapter") if merged and isinstance(merge.get("adapter"), str) else None
    system_prompt = chat.get("system_prompt")
    stats = dataset.get("stats") or {}
    trained_on = None
    if dataset.get("source") == "hub" and dataset.get("hub_id"):
        trained_on = code(dataset["hub_id"])
    elif dataset.get("name"):
        trained_on = code(dataset["name"])
    if trained_on and _is_num(stats.get("train_examples")):
        trained_on += f" ({num(stats['train_examples'])} training examples)"
    return {
        "kind": m["kind"],
        "name": esc(name or own_id),
        "base_ref": base_ref,
        "base_model_type": code(base["model_type"]) if base.get("model_type") else None,
        "trained_on": trained_on,
        "preset": code(m["lora"]["preset"]) if isinstance((m.get("lora") or {}).get("preset"), str) else None,
        "version": code(m["persona_lora_version"]) if m.get("persona_lora_version") else None,
        "system_prompt": fenced(system_prompt, "text") if isinstance(system_prompt, str) and system_prompt else None,
        "snippet": usage_snippet(
            m, base_id=base_id, adapter_id=None if merged else own_id, model_id=own_id if merged else None,
            tokenizer_from_adapter=tokenizer_from_adapter, rewrite_off=rewrite_off),
        "rewrite_off": rewrite_off,
        "demo_command": (fenced(f"persona-lora demo --base {base_id} --adapter {own_id}", "bash") if not merged
                         else fenced(f"persona-lora demo --base {base_id} --adapter {source_adapter}", "bash")
                         if source_adapter else None),
        "merge_command": (fenced(f"persona-lora merge {source_adapter} --base {base_id} --out {own_id}", "bash")
                          if merged and source_adapter else None),
        "merge": _merge_section(m) if merged else None,
        "prompt": _prompt_section(m),
        "data": _data_section(m),
        "hyper": _hyper_section(m),
        "coverage": _coverage_section(m),
        "results": _results_section(m, loss_png),
        "samples": _samples_section(m),
        "provenance": _provenance_section(m),
        "user_start": USER_START,
        "user_end": USER_END,
    }


# ---------------------------------------------------------------------------------------------------- rendering


def _tidy(text: str) -> str:
    """Collapse runs of blank lines the template's `if`s leave behind (outside code blocks); one final newline."""
    out: list[str] = []
    fence: str | None = None
    for line in text.replace("\r\n", "\n").split("\n"):
        stripped = line.strip()
        if fence is None:
            opening = re.match(r"^(`{3,}|~{3,})", stripped)
            if opening:
                fence = opening.group(1)
            line = line.rstrip()
            if not line and out and not out[-1]:
                continue
        elif stripped.startswith(fence[0] * len(fence)) and not stripped.strip(fence[0]):
            fence = None
        out.append(line)
    return "\n".join(out).strip("\n") + "\n"


def render_card(m: dict, adapter_config: dict | None, *, loss_png: str | None, repo_id: str | None = None,
                tokenizer_in_folder: bool = False) -> str:
    """The card text for a scrubbed manifest (no user section merged in yet)."""
    from huggingface_hub import ModelCard

    context = build_context(m, adapter_config, loss_png=loss_png, repo_id=repo_id,
                            tokenizer_in_folder=tokenizer_in_folder)
    card = ModelCard.from_template(card_data(m), template_path=str(TEMPLATES[m["kind"]]), c=context)
    return _tidy(str(card))


def _user_section(text: str) -> str | None:
    """What lies between the user markers of an existing card (None when it has no such section)."""
    start = text.find(USER_START)
    end = text.find(USER_END, start + len(USER_START)) if start >= 0 else -1
    if start < 0 or end < 0:
        return None
    return text[start + len(USER_START):end]


def keep_user_section(new: str, old: str | None) -> str:
    """`new` with the user section of `old` put back in place of its (empty) one."""
    kept = _user_section(old) if old else None
    if kept is None:
        return new
    start = new.find(USER_START)
    end = new.find(USER_END, start + len(USER_START))
    if start < 0 or end < 0:  # pragma: no cover - both templates carry the markers
        return new
    return new[: start + len(USER_START)] + kept + new[end:]


def _loss_png_name(m: dict) -> str:
    """The manifest's loss curve file name, if it is a plain name inside the folder."""
    name = (m.get("files") or {}).get("loss_curve")
    if isinstance(name, str) and name and "/" not in name and "\\" not in name and name not in (".", ".."):
        return name
    return DEFAULT_LOSS_PNG


def _free_name(folder: Path, stem: str, suffix: str) -> Path:
    """`stem.suffix`, or `stem.N.suffix` for the first N not taken (a backup never overwrites a backup)."""
    path, n = folder / f"{stem}{suffix}", 1
    while path.exists():
        path, n = folder / f"{stem}.{n}{suffix}", n + 1
    return path


def write_card(folder: Path, *, repo_id: str | None = None) -> Path:
    """(Re)write `folder/README.md` and its loss curve from the folder's manifest; returns the README path.

    `repo_id` (e.g. given by a push) names the adapter in the usage snippet; without it the manifest's name is
    used, which is also the folder name a `persona-lora pull` writes.
    """
    from persona_lora.model_cards.plots import has_loss_points, write_loss_curve

    folder = Path(folder)
    manifest = read_manifest(folder).to_dict()
    adapter_config = read_adapter_config(folder)
    m = scrub(manifest)

    history = (manifest.get("metrics") or {}).get("history") or []
    loss_png = None
    if has_loss_points(history):
        png_name = _loss_png_name(manifest)
        if write_loss_curve(history, folder / png_name) is not None:
            loss_png = png_name

    text = render_card(m, adapter_config, loss_png=loss_png, repo_id=repo_id,
                       tokenizer_in_folder=(folder / "tokenizer_config.json").is_file())
    readme = folder / CARD_NAME
    old = readme.read_text(encoding="utf-8", errors="replace") if readme.is_file() else None
    if old is not None and _user_section(old) is None:
        if _PEFT_DEFAULT_CARD in old:  # the stub PEFT's save_pretrained writes: nothing of the user's in it
            log.info("%s: replacing PEFT's default card", readme.name)
        else:  # someone's own card: never lost, kept beside the generated one
            backup = _free_name(folder, "README.before-persona-lora", ".md")
            backup.write_text(old, encoding="utf-8")
            log.warning("%s had no persona-lora user section (%s ... %s); your text is kept in %s; move what should "
                        "stay into the user section of the new card", readme, USER_START, USER_END, backup.name)
    text = keep_user_section(text, old)
    if text != old:
        with open(readme, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        log.info("wrote %s", readme)
    return readme
