"""The base model with LoRA attached, exactly as asked: device, dtype, gradient checkpointing, QLoRA, coverage.

`build_adapted_model` checks that the LoRA applied is the LoRA asked for, module by module, before a single step
runs; `save_adapter` writes PEFT's files with the base named by its hub id (never a local path).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from persona_lora import presets
from persona_lora.artifact import read_adapter_config, write_adapter_config
from persona_lora.errors import UsageError
from persona_lora.expert_lora import use_lora_aware_experts
from persona_lora.model_loading import ResolvedBase, load_base_model
from persona_lora.peft_compat import attach_new_adapter, portable_config
from persona_lora.train.compiled_layers import compile_decoder_layers
from persona_lora.train.config import TrainConfig, TriState


@dataclass
class AdaptedModel:
    """A PeftModel and what was attached to it."""

    peft_model: object
    spec: presets.LoraSpec
    coverage: list[dict]  # presets.coverage_table rows
    dropout_note: str | None
    trainable: int
    total: int
    experts_forward: str = ""  # how LoRA on the routed experts runs (expert_lora.use_lora_aware_experts)
    sharded: bool = False  # the base is sharded across the run's processes (train/fsdp.py)


def resolve_device(cfg: TrainConfig) -> str:
    import torch

    if cfg.base.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.base.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"base.device {cfg.base.device!r} but no CUDA device is available; use auto or cpu")
    return cfg.base.device


def use_gradient_checkpointing(cfg: TrainConfig, device: str) -> bool:
    if cfg.training.gradient_checkpointing == TriState.AUTO:
        return device.startswith("cuda")
    return cfg.training.gradient_checkpointing == TriState.TRUE


def check_packing(cfg: TrainConfig, device: str) -> None:
    """Packing puts several examples in one row; only flash-attention separates them by position_ids. With SDPA
    the packed examples attend to each other (their logits differ from the unpacked ones), so packing is refused
    unless flash-attention 2 will be used."""
    from persona_lora.model_loading import attention_implementation

    if cfg.training.packing and not (device.startswith("cuda") and attention_implementation() == "flash_attention_2"):
        raise UsageError(
            "training.packing needs flash-attention 2 on a CUDA GPU (pip install flash-attn): with SDPA the packed "
            "examples would attend to each other; set training.packing: false (length-grouped batches cut padding "
            "instead)"
        )


def build_adapted_model(cfg: TrainConfig, rb: ResolvedBase, device: str, *, meta: bool = False,
                        sharded: bool = False) -> AdaptedModel:
    """Base model + LoRA with the asked coverage. `meta=True` builds on the meta device (no weights), for dry
    runs; `sharded=True` shards the base over the run's processes while it loads (train/fsdp.py)."""
    import torch

    checkpointing = use_gradient_checkpointing(cfg, device)
    if meta:
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(rb.path, trust_remote_code=cfg.base.trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.base.trust_remote_code)
    elif sharded:
        from persona_lora.model_loading import parse_dtype
        from persona_lora.train.fsdp import load_sharded_base

        model = load_sharded_base(rb.path, name=rb.id, dtype=parse_dtype(cfg.base.dtype, device), device=device,
                                  trust_remote_code=cfg.base.trust_remote_code)
    else:
        model = load_base_model(rb, dtype=cfg.base.dtype, device=device, load_in_4bit=cfg.base.load_in_4bit,
                                trust_remote_code=cfg.base.trust_remote_code)
    if cfg.base.load_in_4bit and not meta:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    elif checkpointing and not meta:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.config.use_cache = False
    spec = presets.resolve(model, cfg.lora.preset, cfg.lora.target_modules)
    lcfg = presets.lora_config_for(spec, r=cfg.lora.r, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout)
    peft_model, note = attach_new_adapter(model, lcfg, dropout=cfg.lora.dropout)
    table = presets.check_coverage(peft_model, spec)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    # training, eval and the sample answers run the routed-expert LoRA without rebuilding the expert weights
    experts_forward = "" if meta else use_lora_aware_experts(peft_model)
    if cfg.training.compile and not meta:  # after LoRA and the expert routine: what is compiled is what trains
        compile_decoder_layers(peft_model, device)
    return AdaptedModel(peft_model, spec, table, note, trainable, total, experts_forward, sharded)


def save_adapter(peft_model, out: Path, rb: ResolvedBase, spec: presets.LoraSpec, state_dict: dict | None = None
                 ) -> None:
    """PEFT's files, with the base recorded by its hub id (never a local absolute path) and the config in the
    portable spelling, so stock PEFT and transformers load the adapter as trained. PEFT's own stub card is
    dropped when there was no card before: ours replaces it right after. `state_dict`: the LoRA tensors gathered
    whole (`fsdp.adapter_state_dict`) when the base is sharded, so that saving never gathers the base."""
    had_card = (out / "README.md").exists()
    peft_model.peft_config["default"].base_model_name_or_path = rb.id
    # save_embedding_layers=False: embeddings are never adapted, and "auto" would look the base id up online
    peft_model.save_pretrained(out, save_embedding_layers=False, state_dict=state_dict)
    config = read_adapter_config(out)
    write_adapter_config(out, portable_config(config, spec.target_modules, peft_model.config.model_type))
    if not had_card:
        (out / "README.md").unlink(missing_ok=True)
