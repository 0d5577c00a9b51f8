"""Sharded training (FSDP2): the frozen base split across processes per decoder layer, the LoRA whole on each.

Why: the reference base needs ~31 GB in bf16, about 29 GB of it in the fused routed experts, which 4-bit loading does
not shrink (bitsandbytes quantizes only `nn.Linear`). Data parallelism copies the whole base to every device, so two
to eight 24 GB cards could not run the job at all. Sharding the base across N processes puts ~1/N of it on each.

How, with the field's libraries:
- transformers 5 shards a model while it loads (`from_pretrained(distributed_config=DistributedConfig(fsdp_size=N))`):
  torch's `fully_shard` on every decoder layer (routed experts included: their fused tensors are split by expert),
  the embeddings and the head, and each process reads only its own shard from the checkpoint, so a 31 GB base never
  sits whole in one 24 GB card. FSDP gathers a layer's full weights before its forward and frees them after it, so
  the LoRA-aware expert forward (`persona_lora.expert_lora`) and PEFT's layers see ordinary full tensors.
- PEFT attaches LoRA after that as ordinary parameters: small, trainable and replicated on every process.
- transformers' Trainer knows such a model: it does not wrap it in DDP, broadcasts the LoRA from rank 0 at the
  start and averages its gradients over the processes, so N processes with batch b train as one with batch N·b.

Accelerate's FSDP plugin is not used: its process state enables FSDP only on GPU-type process groups (a CPU/gloo
launch falls back to DDP, which refuses sharded parameters, so it could not be tested here), and it loads the whole
base in every process before sharding it. An `accelerate launch` with an FSDP config (`configs/accelerate/fsdp.yaml`)
counts as `training.fsdp: true`, and accelerate's own wrapping is switched off so nothing is sharded twice.

What this module adds: the decision (`training.fsdp: false | true | auto`), the process helpers, the sharded load,
the adapter gathered whole for saving, and checkpoints that keep the optimizer state. Trainer refuses optimizer
checkpoints for models sharded at load time, because in general their optimizer state is sharded too; here only
the replicated LoRA is trained, so the optimizer state is plain tensors, identical on every process, and Trainer's
own single-file checkpoint is correct (`sharded_trainer` checks that before it lifts the refusal).
"""

from __future__ import annotations

import logging
import os

from persona_lora.errors import UsageError
from persona_lora.train.config import TriState

log = logging.getLogger(__name__)

SHARDING = "fsdp2 per decoder layer"  # what the manifest records for a sharded run
LAUNCH_HINT = ("launch one process per device: torchrun --nproc_per_node N -m persona_lora train CONFIG, or "
               "accelerate launch --config_file configs/accelerate/fsdp.yaml -m persona_lora train CONFIG")


def world_size() -> int:
    """Processes of this run (torchrun and accelerate launch set WORLD_SIZE; 1 when started directly)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_world_size() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size())))


def all_ranks_planned(device: str) -> None:
    """Wait until every process of a multi-process run has looked at the output folder, so that none sees the folder
    rank 0 claims for this very run and refuses it as "exists and is not empty" (a slow rank would). The process
    group is the one Trainer uses (accelerate's `PartialState`, made here first), with the long timeout
    transformers gives sharded loading, whose ranks can be minutes apart on a 16B base."""
    if world_size() < 2:
        return
    from datetime import timedelta

    from accelerate import PartialState

    PartialState(cpu=device == "cpu", timeout=timedelta(hours=2)).wait_for_everyone()


def accelerate_asked_fsdp() -> bool:
    """`accelerate launch` with an FSDP config exports ACCELERATE_USE_FSDP=true to every process."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("true", "1")


def device_memory_bytes(device: str) -> int:
    """Memory one process may use: the local GPU's, or on the CPU the machine's RAM shared by its processes."""
    import torch

    if device.startswith("cuda"):
        index = torch.device(device).index
        if index is None:
            index = int(os.environ.get("LOCAL_RANK", "0"))
        return torch.cuda.get_device_properties(index).total_memory
    import psutil

    return psutil.virtual_memory().total // max(local_world_size(), 1)


def check_launch(cfg) -> str:
    """The sharding mode this launch asks for (the launch config's FSDP counts as true), and the refusals that need
    no memory plan: `--dry-run` calls this too, so it refuses what the run would refuse instead of saying "fits"."""
    mode = cfg.training.fsdp
    n = world_size()
    if accelerate_asked_fsdp():  # the launch config asked for FSDP: that is the user's choice for this run
        mode = TriState.TRUE
    if mode == TriState.FALSE:
        return mode
    if n < 2:
        if mode == TriState.TRUE:
            raise UsageError(f"training.fsdp: true needs more than one process, but this run has WORLD_SIZE={n}; "
                             f"{LAUNCH_HINT}; or set training.fsdp: false (or auto) for one device")
        return mode
    if cfg.base.load_in_4bit:
        raise UsageError("training.fsdp with base.load_in_4bit: a 4-bit base cannot be sharded (and 4-bit loading does "
                         "not shrink the fused experts); set base.load_in_4bit: false")
    return mode


def decide(cfg, device: str, plan_one_device=None) -> bool:
    """Whether this run shards the base. `plan_one_device()` returns the dry-run memory plan of one unsharded device
    (`memory_plan.DevicePlan`); it is asked only for `training.fsdp: auto` with more than one process."""
    mode = check_launch(cfg)
    if mode == TriState.FALSE or world_size() < 2:
        return False
    if mode == TriState.TRUE:
        return True
    plan = plan_one_device()
    capacity = device_memory_bytes(device)
    shard = plan.total_bytes > capacity
    log.info("training.fsdp auto: one %s device needs ~%.1f GB of %.1f GB: %s", device, plan.total_bytes / 1e9,
             capacity / 1e9, "sharding the base" if shard else "data parallel")
    return shard


def load_sharded_base(path: str, *, name: str, dtype, device: str, trust_remote_code: bool = False):
    """The base, sharded over this run's processes while it loads (each process reads only its shard)."""
    from transformers.distributed import DistributedConfig

    from persona_lora.model_loading import from_pretrained

    kwargs = {"dtype": dtype, "trust_remote_code": trust_remote_code,
              "distributed_config": DistributedConfig(fsdp_size=world_size())}
    return from_pretrained(path, name, kwargs, device, f" sharded over {world_size()} processes")


def adapter_state_dict(peft_model) -> dict:
    """The LoRA tensors, whole, under PEFT's own names: what `save_pretrained(state_dict=...)` writes. Every process
    must call it (a LoRA tensor that were sharded would be gathered with a collective); the base is never gathered."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, tensor in peft_model.state_dict().items():
        if "lora_" not in name:
            continue
        if isinstance(tensor, DTensor):
            tensor = tensor.full_tensor()
        out[name] = tensor.detach().cpu().contiguous()
    return out


def check_replicated_lora(peft_model) -> None:
    """The trainable parameters must be plain tensors (replicated), or the single-file optimizer checkpoint would
    hold only one process's shard of their state."""
    from torch.distributed.tensor import DTensor

    sharded = [n for n, p in peft_model.named_parameters() if p.requires_grad and isinstance(p, DTensor)]
    if sharded:
        raise UsageError(f"training.fsdp: {len(sharded)} trainable parameters are sharded (e.g. {sharded[0]}); only "
                         "LoRA on a frozen base can be trained sharded here")


def sharded_trainer(trainer_cls):
    """`trainer_cls` (transformers' Trainer or a subclass) for a base sharded at load time: checkpoints hold the
    LoRA and its optimizer, scheduler and RNG state, and saving never gathers the base."""

    class ShardedBaseTrainer(trainer_cls):
        def __init__(self, *, model, args, **kwargs):
            keep_optimizer = not args.save_only_model
            check_replicated_lora(model)
            args.save_only_model = True  # passes Trainer's guard against sharded optimizer state; ours is replicated
            try:
                super().__init__(model=model, args=args, **kwargs)
            finally:
                args.save_only_model = not keep_optimizer

        def _save(self, output_dir=None, state_dict=None):
            if state_dict is None:
                state_dict = adapter_state_dict(self.model)
            super()._save(output_dir, state_dict=state_dict)

    return ShardedBaseTrainer


def switch_off_accelerate_fsdp() -> None:
    """The base is sharded at load time; accelerate must not wrap it again (it would with ACCELERATE_USE_FSDP)."""
    os.environ.pop("ACCELERATE_USE_FSDP", None)
