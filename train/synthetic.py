"""Adapters of our trainer's exact kind without training, for tests and benchmarks.

Training even the tiny model takes a minute; merge, demo and coverage checks only need an adapter with the real
structure (same presets, same PEFT config, same manifest fields) whose weights move the output. LoRA B starts at
zero, so it is filled with seeded random values.
"""

from __future__ import annotations

from pathlib import Path


def make_random_adapter(
    base: str | Path,
    out: str | Path,
    preset: str | None,
    *,
    target_modules: list[str] | None = None,
    seed: int = 0,
    r: int = 8,
    alpha: int = 16,
    std: float = 0.05,
    system_prompt: str | None = None,
) -> Path:
    """Write an adapter folder (PEFT files + manifest) for `base` with the given coverage preset (or, with
    `preset` None, the explicit leaf names `target_modules`, as `lora.target_modules` would give them)."""
    import torch

    from persona_lora import __version__, presets
    from persona_lora.artifact import BaseModelInfo, ChatInfo, LoraInfo, Manifest, now_iso, write_manifest
    from persona_lora.model_loading import load_base_model, load_tokenizer, resolve_base
    from persona_lora.peft_compat import attach_new_adapter
    from persona_lora.train.model_setup import save_adapter

    out = Path(out)
    rb = resolve_base(str(base))
    model = load_base_model(rb, device="cpu")
    spec = presets.resolve(model, preset, target_modules)
    peft_model, note = attach_new_adapter(model, presets.lora_config_for(spec, r=r, alpha=alpha, dropout=0.0))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    peft_model.peft_config["default"].base_model_name_or_path = rb.id
    save_adapter(peft_model, out, rb, spec)
    write_manifest(out, Manifest(
        kind="adapter", name=out.name, created_at=now_iso(), persona_lora_version=__version__,
        base_model=BaseModelInfo(id=rb.id, source=rb.source, revision=None, config_sha256=rb.config_sha256,
                                 model_type=model.config.model_type,
                                 architectures=list(model.config.architectures or [])),
        chat=ChatInfo(system_prompt=system_prompt, chat_template=load_tokenizer(rb).chat_template,
                      template_source="base", train_on="all", overlong="truncate", max_length=256),
        lora=LoraInfo(preset=preset, asked_target_modules=target_modules, r=r, alpha=alpha, dropout=0.0,
                      dropout_note=note, target_modules=spec.target_modules,
                      target_parameters=spec.target_parameters),
    ))
    return out
