"""`train --dry-run`: the resolved config, data statistics, LoRA coverage and estimates, without training."""

from __future__ import annotations

import math

from persona_lora import presets
from persona_lora.train.config import TrainConfig
from persona_lora.train.model_setup import AdaptedModel
from persona_lora.train.prepare import PreparedData, eval_file_line

ADAM_BYTES_PER_PARAM = 4 + 4 + 8  # fp32 master weight + gradient + two Adam moments
NF4_BYTES_PER_PARAM = 0.55  # 4-bit weights plus quantisation constants


def dry_run_report(cfg: TrainConfig, data: PreparedData, model: AdaptedModel, device: str, dtype) -> str:
    import torch
    import yaml

    t = cfg.training
    stats = data.stats
    tokens_epoch = stats.tokens.train_split
    steps_epoch = math.ceil(len(data.train) / (t.batch_size * t.gradient_accumulation_steps))
    steps = t.max_steps if t.max_steps is not None else math.ceil(steps_epoch * t.epochs)
    tokens = tokens_epoch * (t.epochs if t.max_steps is None else t.max_steps / max(steps_epoch, 1))
    bytes_per = torch.finfo(dtype).bits // 8
    weight_gb = model.total * (NF4_BYTES_PER_PARAM if cfg.base.load_in_4bit else bytes_per) / 1e9
    lora_gb = model.trainable * ADAM_BYTES_PER_PARAM / 1e9
    lines = [
        "resolved config:",
        yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True).rstrip(),
        "",
        f"dataset {data.loaded.name}: {stats.records} records, {stats.kept} kept, dropped {stats.dropped or 0}, "
        f"{stats.truncated} truncated; {stats.train_examples} train / {stats.eval_examples} eval examples",
        *([line] if (line := eval_file_line(data)) else []),
        f"tokens: {stats.tokens.total:,} total, {stats.tokens.trained:,} trained (labels), mean "
        f"{stats.tokens.mean_length}, max {stats.tokens.max_length}",
        "",
        "LoRA coverage:",
        presets.format_coverage(model.coverage, model.trainable, model.total),
    ]
    if model.dropout_note:
        lines.append(f"note: {model.dropout_note}")
    lines += [
        "",
        f"estimate: {steps:,} optimizer steps, ~{tokens:,.0f} training tokens on {device} "
        f"({str(dtype).replace('torch.', '')})",
        f"memory: ~{weight_gb:.2f} GB weights + ~{lora_gb:.3f} GB LoRA params/grads/optimizer + activations "
        f"(batch {t.batch_size} x up to {stats.tokens.max_length} tokens)",
    ]
    from persona_lora.train.memory_plan import memory_section

    lines += ["", memory_section(cfg, data, model, device, dtype)]
    return "\n".join(lines)
