"""`train --dry-run`'s memory plan per device: will this run fit, on how many devices of which size?

A 16B MoE base does not fit a 24 GB card whole; sharded over N processes (`training.fsdp`) each holds 1/N of it.
Before anyone rents or waits for hardware, the dry run prints, from the model's shape alone (a meta-device model,
no weights read), what one device holds:

- **weights**: the base at rest, whole (one device or data parallel) or 1/N of it (sharded);
- **gathered**: with sharding, FSDP puts one decoder layer's full weights on the device for its forward and
  backward, plus the next one prefetched: two of the largest layer;
- **LoRA + optimizer**: LoRA weights, their gradients and Adam's two moments, in fp32 (16 bytes a parameter),
  replicated on every device;
- **activations**, for the per-device batch at its longest sequence: with gradient checkpointing, each layer's
  input is kept and one layer is recomputed at a time; without, every layer's intermediate tensors are kept. The
  logits (vocabulary × tokens, with an fp32 copy for the loss and its gradient) come on top: with a 100k vocabulary
  they are often the largest activation;
- **runtime**: CUDA context and allocator slack (a fixed allowance on a GPU).

These are estimates, from formulas written down here; the device's own peak can differ by the allocator's
fragmentation and by kernels' scratch buffers. Figures are in GiB (2^30 bytes), the unit GPU memory is sold in.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 1 << 30
ADAM_BYTES_PER_PARAM = 4 + 4 + 8  # fp32 LoRA weight + gradient + two Adam moments
CUDA_RUNTIME_BYTES = 1.5 * GIB  # CUDA context, cuBLAS workspaces, allocator slack
DEVICE_COUNTS = (1, 2, 4, 8)
CARD_GIB = (24, 40, 80)


@dataclass
class ModelShape:
    """What the plan needs to know about the model, read from a (meta-device) adapted model."""

    base_params: int  # frozen base parameters
    lora_params: int  # trainable LoRA parameters
    largest_layer_params: int  # the largest decoder layer (FSDP gathers one at a time)
    layers: int
    hidden: int
    vocab: int
    token_width: int  # intermediate values one token produces inside one decoder layer (see `_token_width`)
    heads: int


@dataclass
class DevicePlan:
    """Bytes one device holds at its peak."""

    devices: int
    sharded: bool
    weights_bytes: float
    gathered_bytes: float
    lora_bytes: float
    activation_bytes: float
    runtime_bytes: float

    @property
    def total_bytes(self) -> float:
        return (self.weights_bytes + self.gathered_bytes + self.lora_bytes + self.activation_bytes
                + self.runtime_bytes)

    def fits(self, capacity_bytes: float) -> bool:
        return self.total_bytes <= capacity_bytes


def _token_width(config) -> int:
    """Values one token produces inside one decoder layer, for the activations kept for backward: attention
    projections (MLA: q, compressed kv, k and v per head, output), the norms and residuals, and the MLP's gate, up
    and their product (MoE: for each of the experts the token is routed to, plus the shared experts)."""
    h = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    qk = (getattr(config, "qk_nope_head_dim", 0) + getattr(config, "qk_rope_head_dim", 0)) or head_dim
    v = getattr(config, "v_head_dim", None) or head_dim
    kv_a = (getattr(config, "kv_lora_rank", 0) or 0) + (getattr(config, "qk_rope_head_dim", 0) or 0)
    attention = heads * (2 * qk + 2 * v) + kv_a + 4 * h
    experts = getattr(config, "n_routed_experts", None)
    if experts:
        inter = config.moe_intermediate_size
        mlp = 3 * inter * (config.num_experts_per_tok + (getattr(config, "n_shared_experts", 0) or 0)) + experts
    else:
        mlp = 3 * config.intermediate_size
    return attention + mlp


def model_shape(peft_model) -> ModelShape:
    """The shape of an adapted model (built on the meta device by the dry run: no memory, no weights)."""
    config = peft_model.config
    total = trainable = 0
    for p in peft_model.parameters():
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    layers = _decoder_layers(peft_model)
    largest = max((sum(p.numel() for n, p in layer.named_parameters() if "lora_" not in n) for layer in layers),
                  default=0)
    return ModelShape(base_params=total - trainable, lora_params=trainable, largest_layer_params=largest,
                      layers=config.num_hidden_layers, hidden=config.hidden_size, vocab=config.vocab_size,
                      token_width=_token_width(config), heads=config.num_attention_heads)


def _decoder_layers(model):
    import torch

    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    return max(lists, key=len) if lists else []


def plan_device(shape: ModelShape, *, devices: int, sharded: bool, batch: int, seq: int, weight_bytes: float,
                checkpointing: bool, cuda: bool = True) -> DevicePlan:
    """What one of `devices` devices holds, with a per-device batch of `batch` sequences of `seq` tokens."""
    n = devices if sharded else 1
    weights = shape.base_params * weight_bytes / n
    gathered = 2 * shape.largest_layer_params * weight_bytes if sharded and devices > 1 else 0.0
    lora = shape.lora_params * ADAM_BYTES_PER_PARAM
    tokens = batch * seq
    layer = tokens * shape.token_width * weight_bytes + batch * shape.heads * seq * seq * weight_bytes
    if checkpointing:  # each layer's input kept; one layer's intermediates and their gradients at a time
        kept = shape.layers * tokens * shape.hidden * weight_bytes + 2 * layer
    else:
        kept = shape.layers * layer + layer
    logits = tokens * shape.vocab * (weight_bytes + 4 + 4)  # logits, fp32 copy for the loss, its gradient
    return DevicePlan(devices=devices, sharded=sharded and devices > 1, weights_bytes=weights,
                      gathered_bytes=gathered, lora_bytes=lora, activation_bytes=kept + logits,
                      runtime_bytes=CUDA_RUNTIME_BYTES if cuda else 0.0)


def plan_table(shape: ModelShape, *, batch: int, seq: int, weight_bytes: float,
               checkpointing: bool) -> list[DevicePlan]:
    """One row per device count of DEVICE_COUNTS on CUDA devices: one device unsharded, more sharded."""
    return [plan_device(shape, devices=n, sharded=n > 1, batch=batch, seq=seq, weight_bytes=weight_bytes,
                        checkpointing=checkpointing) for n in DEVICE_COUNTS]


def hint(plan: DevicePlan, capacity_bytes: float, *, checkpointing: bool) -> str:
    """What to change when `plan` does not fit `capacity_bytes`."""
    ways = []
    if plan.weights_bytes + plan.gathered_bytes + plan.lora_bytes + plan.runtime_bytes > capacity_bytes:
        ways.append("shard the base over more devices (training.fsdp: true, " + "torchrun --nproc_per_node N)")
    else:
        if not checkpointing:
            ways.append("turn on training.gradient_checkpointing")
        ways.append("lower training.batch_size (raise training.gradient_accumulation_steps to keep the batch)")
        ways.append("lower data.max_length")
        if not plan.sharded:
            ways.append("or shard over more devices (training.fsdp: true)")
    return "; ".join(ways)


def format_table(rows: list[DevicePlan], *, batch: int, seq: int, dtype_name: str, checkpointing: bool) -> str:
    head = (f"memory per device, GiB (per-device batch {batch} x {seq} tokens, {dtype_name} weights, gradient "
            f"checkpointing {'on' if checkpointing else 'off'}; more than one device: base sharded, training.fsdp)")
    cols = ["devices", "sharding", "weights", "gathered", "LoRA+optim", "activations", "runtime", "total",
            *[f"{c}GiB" for c in CARD_GIB]]
    table = [cols]
    for r in rows:
        cells = [str(r.devices), "fsdp2" if r.sharded else "none"]
        cells += [f"{b / GIB:.2f}" for b in (r.weights_bytes, r.gathered_bytes, r.lora_bytes, r.activation_bytes,
                                            r.runtime_bytes, r.total_bytes)]
        cells += ["fits" if r.fits(c * GIB) else "no" for c in CARD_GIB]
        table.append(cells)
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    return "\n".join([head] + ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in table])


def verdict(plan: DevicePlan, capacity_bytes: float, device: str, *, checkpointing: bool) -> str:
    where = f"{plan.devices} process{'es' if plan.devices > 1 else ''}, {'sharded' if plan.sharded else 'unsharded'}"
    need = f"~{plan.total_bytes / GIB:.1f} GiB per device of {capacity_bytes / GIB:.1f} GiB ({device})"
    if plan.fits(capacity_bytes):
        return f"this run ({where}): {need}: fits"
    return f"this run ({where}): {need}: does not fit; {hint(plan, capacity_bytes, checkpointing=checkpointing)}"


def weight_bytes(cfg, dtype) -> float:
    """Bytes per base parameter at rest: the run's dtype (4-bit: NF4 weights plus their constants)."""
    import torch

    if cfg.base.load_in_4bit:
        return 0.55
    return torch.finfo(dtype).bits // 8


def sequence_length(cfg, data) -> int:
    """The longest sequence a batch is padded to: the longest example, capped at data.max_length."""
    longest = data.stats.tokens.max_length if data.stats.tokens is not None else None
    return min(cfg.data.max_length, longest or cfg.data.max_length)


def run_plan(cfg, data, model, device: str, dtype, *, devices: int, sharded: bool) -> DevicePlan:
    """The plan of one device of this run (its dtype, checkpointing and device type)."""
    from persona_lora.train.model_setup import use_gradient_checkpointing

    return plan_device(model_shape(model.peft_model), devices=devices, sharded=sharded, batch=cfg.training.batch_size,
                       seq=sequence_length(cfg, data), weight_bytes=weight_bytes(cfg, dtype),
                       checkpointing=use_gradient_checkpointing(cfg, device), cuda=device.startswith("cuda"))


def memory_section(cfg, data, model, device: str, dtype) -> str:
    """The dry run's memory plan: the table for 1-8 CUDA devices of 24, 40 and 80 GiB (bf16 unless the config names
    a dtype; checkpointing on unless it is turned off, as on a GPU), then this run's verdict on this device."""
    from persona_lora.dtypes import torch_dtype
    from persona_lora.train import fsdp
    from persona_lora.train.config import TriState
    from persona_lora.train.model_setup import use_gradient_checkpointing

    shape = model_shape(model.peft_model)
    seq = sequence_length(cfg, data)
    table_dtype = "bfloat16" if cfg.base.dtype == "auto" else cfg.base.dtype
    checkpointing = cfg.training.gradient_checkpointing != TriState.FALSE
    rows = plan_table(shape, batch=cfg.training.batch_size, seq=seq,
                      weight_bytes=weight_bytes(cfg, torch_dtype(table_dtype)), checkpointing=checkpointing)
    n = fsdp.world_size()
    one = run_plan(cfg, data, model, device, dtype, devices=1, sharded=False)
    capacity = fsdp.device_memory_bytes(device)
    mode = TriState.TRUE if fsdp.accelerate_asked_fsdp() else cfg.training.fsdp
    sharded = n > 1 and (mode == TriState.TRUE or (mode == TriState.AUTO and not one.fits(capacity)))
    this = run_plan(cfg, data, model, device, dtype, devices=n, sharded=sharded) if n > 1 else one
    return "\n".join([
        format_table(rows, batch=cfg.training.batch_size, seq=seq, dtype_name=table_dtype, checkpointing=checkpointing),
        verdict(this, capacity, device, checkpointing=use_gradient_checkpointing(cfg, device)),
    ])
