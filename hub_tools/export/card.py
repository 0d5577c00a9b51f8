"""The README.md of an export: which engine and version it is for, what was converted, how to serve and call it.

Why a card of its own rather than the adapter's model card: the export is not an adapter persona-lora or PEFT
loads (its routed experts are per expert, not on transformers 5's fused parameters), so what a reader needs is
the serve command that works, the request that selects the adapter, and — when tensors were dropped — what the
served adapter no longer does. The adapter's provenance travels next to it, as the copied persona_manifest.json.
"""

from __future__ import annotations

from dataclasses import dataclass

from persona_lora import __version__
from persona_lora.engines import (
    KV_B,
    KV_B_ISSUE,
    NO_KV_B_PRESETS,
    Engine,
    request_example,
    request_model,
    runtime_loading,
    serve_command,
)
from persona_lora.hub_tools.export.layout import Summary


@dataclass(frozen=True)
class CardFacts:
    """Everything the card states, decided by the export before anything is written."""

    engine: Engine
    adapter_name: str  # the manifest's name
    lora_name: str  # how a request selects it
    base: str  # as the serve command names it: hub id or absolute folder
    base_id: str  # the manifest's base id
    out: str  # the export folder, absolute
    r: int
    alpha: float
    source_r: int
    source_alpha: float
    folded: bool  # per-module ranks/scalings were made one (zero padding, scaling folded into lora_B)
    max_rank: int  # vLLM's --max-lora-rank
    summary: Summary
    dropped_kv_b: int  # kv_b_proj modules left out (vLLM with --allow-dropped-kv-b)
    spelling: str  # portable | legacy
    system_prompt: str | None = None  # the manifest's: requests should carry it
    chat_template: str | None = None  # absolute path of the export's chat_template.jinja, when training used its own


def render(f: CardFacts) -> str:
    eng = f.engine
    parts = [
        f"# {f.adapter_name} for {eng.label} {eng.version}",
        "",
        f"The LoRA adapter **{f.adapter_name}** (base `{f.base_id}`), exported by persona-lora {__version__} with "
        f"`persona-lora export --for {eng.key}` for **{eng.label} {eng.version}**. It is a PEFT-format LoRA folder "
        f"laid out the way {eng.label}'s loader reads it; PEFT and persona-lora load the original adapter, not this "
        "export.",
        "",
    ]
    if f.dropped_kv_b:
        parts += [
            "## Warning: kv_b_proj LoRA was dropped",
            "",
            f"The adapter has LoRA on `{KV_B}` in {f.dropped_kv_b} layer(s). {eng.label} {eng.version}'s MLA attention "
            f"never applies it ({KV_B_ISSUE}), so this export was written without those tensors "
            "(`--allow-dropped-kv-b`): **the served adapter differs from the trained one.** To serve it complete, "
            "serve the merged model (`persona-lora merge`), export for SGLang (`--for sglang`), or train with a "
            f"preset that leaves kv_b_proj out (`lora.preset`: {', '.join(f'`{p}`' for p in NO_KV_B_PRESETS)}).",
            "",
        ]
    serve = serve_command(eng, f.base, f.lora_name, f.out, f.max_rank, f.chat_template)
    parts += ["## Serve", "", "```bash", serve, "```", ""]
    if f.chat_template:
        parts += ["The adapter was trained with its own chat template (`chat_template.jinja`, from the manifest), so "
                  "the server formats chats with it, for the base model too.", ""]
    parts += [
        f"Requests with `\"model\": \"{request_model(eng, f.base, f.lora_name)}\"` get the adapter; "
        f"`\"model\": \"{f.base}\"` gets the base model"
        + (" (the system prompt is the one the adapter was trained with):" if f.system_prompt else ":"),
        "",
        "```bash",
        request_example(eng, f.base, f.lora_name, f.system_prompt),
        "```",
        "",
    ]
    runtime = runtime_loading(eng, f.base, f.lora_name, f.out, f.max_rank)
    if runtime:
        parts += ["Or add it to a running server (runtime loading must be switched on at start):", "", "```bash",
                  runtime, "```", ""]
    if eng.key == "sglang":
        parts += ["`--lora-strict-loading` makes SGLang refuse a weight that matches no target module instead of "
                  "dropping it with a warning; every tensor of this export matches one.", ""]
    parts += ["## What was converted", ""] + _converted(f) + [""]
    parts += [
        "## Files",
        "",
        "- `adapter_model.safetensors`, `adapter_config.json`: the LoRA, in the layout above.",
        *(["- `chat_template.jinja`: the chat template training used."] if f.chat_template else []),
        "- `persona_manifest.json`: the original adapter's manifest, unchanged: its provenance (base, data, "
        "hyperparameters, coverage) and the system prompt and chat template it was trained with.",
        "",
    ]
    return "\n".join(parts)


def _converted(f: CardFacts) -> list[str]:
    s = f.summary
    lines = []
    if s.linear:
        listed = ", ".join(f"`{leaf}` ×{n}" for leaf, n in sorted(s.linear.items()))
        lines.append(f"- Linear LoRA (attention, dense MLP, shared experts): {listed}; tensors and keys unchanged.")
    if s.experts:
        lines.append(
            f"- Routed experts: PEFT's LoRA on transformers 5's fused `mlp.experts.gate_up_proj` / `down_proj` "
            f"({s.expert_layers} layer(s)) split into per-expert LoRA on `mlp.experts.{{e}}.gate_proj`, `up_proj` "
            f"and `down_proj` ({s.experts} experts in all); gate_proj and up_proj share the fused lora_A, lora_B "
            "is split at the middle row. Exact: each expert's B @ A is its slice of the fused delta.")
        if f.engine.key == "vllm":
            lines.append(
                "- Per-expert layout chosen for vLLM (not the fused 3-D one with `is_3d_lora_weight`): it is the "
                "layout vLLM reads for DeepSeek-V2 by default, so no `--enable-mixed-moe-lora-format` is needed, "
                "and nothing depends on declaring the layout correctly at load time.")
    if s.zero_filled:
        lines.append(f"- {s.zero_filled} missing expert projection(s) written as zero LoRA (vLLM packs gate, up and "
                     "down of each expert together); they change nothing.")
    if not f.folded:
        lines.append(f"- Rank r = {f.r}, lora_alpha = {f.alpha} (scaling {f.alpha / f.r:g}), as trained.")
    else:
        lines.append(f"- One rank and scaling for every module, as {f.engine.label} applies: r = {f.r}, lora_alpha = "
                     f"{f.alpha} (trained: r = {f.source_r}, lora_alpha = {f.source_alpha}, per-module values in "
                     "rank_pattern/alpha_pattern); smaller ranks zero-padded and scalings folded into lora_B, so "
                     "every delta is unchanged.")
    if f.spelling == "legacy":
        lines.append("- The adapter's config was in persona-lora's older spelling (MLP layers in target_modules); "
                     "the export does not depend on it.")
    if f.dropped_kv_b:
        lines.append(f"- Dropped: `{KV_B}` LoRA in {f.dropped_kv_b} layer(s) (see the warning above).")
    return lines
