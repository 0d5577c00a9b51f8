"""`persona-lora merge`: fold an adapter into its base's weights, shard by shard, in the base's own layout.

Why not PEFT's `merge_and_unload()` + `save_pretrained()`: that loads the whole base (31 GB in bf16 for
DeepSeek-Coder-V2-Lite), and transformers 5 saves the routed experts in its fused layout
(`mlp.experts.gate_up_proj`), which vLLM, llama.cpp's converters and older transformers do not read. Here every
base shard is streamed tensor by tensor (hub_tools/merge/write.py) and written to a shard of the same name, so peak
memory is the adapter plus a few blocks, whatever the model size, and the output has exactly the base's keys
(per-expert `mlp.experts.{e}.gate_proj.weight`, …), index and shard names.

`merge_adapter` runs four steps, each handing the next a value:
1. `check_inputs` -> MergeInputs: adapter files and manifest, options, the base (resolved, config.json hash
   compared with the one the adapter was trained on; `force` overrides), the output folder rules.
2. `plan_merge` -> MergePlan: the base's safetensors shards (never pickles), the LoRA layers as PEFT injects them,
   the adapter's keys (exactly those its config targets), the deltas per checkpoint tensor, the output layout, and
   room on the disk.
3. `write_merge`: shards, index, config and tokenizer, into a hidden staging folder next to the output
   (`persona_lora.output_folder`, removed again if anything stops the merge).
4. `finalise_merge`: manifest, card, a re-read of every written header; then the rename to the final name.
Steps 1 and 2 only read, so everything that can be wrong is found before the first byte is written; nothing
appears under the final name until the model is complete. A model replaced with `overwrite` is deleted only once
the new one is complete, so the disk needs room for both for a moment.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from persona_lora.artifact import (
    ADAPTER_WEIGHTS,
    MANIFEST_NAME,
    Manifest,
    MergeBase,
    MergeInfo,
    now_iso,
    read_manifest,
    require_adapter_files,
    write_manifest,
)
from persona_lora.consistency import check_folder
from persona_lora.dtypes import name_of
from persona_lora.errors import UsageError
from persona_lora.hub_tools.merge.checks import (
    check_base_config,
    check_disk,
    check_not_quantized,
    check_out_dir,
    open_base_weights,
    output_dtype,
    parse_max_shard_size,
)
from persona_lora.hub_tools.merge.write import (
    Layout,
    check_applied,
    dominant_dtype,
    layout_name,
    one_torch_thread,
    plan_output,
    verify_written,
    write_extras,
    write_index,
    write_shard,
)
from persona_lora.output_folder import OutputFolder, Target, human_size
from persona_lora.progress import ProgressLine
from persona_lora.safetensors_io import ShardReader

if TYPE_CHECKING:
    from persona_lora.hub_tools.merge.deltas import LoraLayer, TensorDelta
    from persona_lora.model_loading import ResolvedBase

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MergeOptions:
    """What the caller asked for, as given (checked by `check_inputs`); see `merge_adapter` for each field."""

    dtype: str | None = None
    max_shard_size: str | int | None = None
    overwrite: bool = False
    force: bool = False
    base_revision: str | None = None
    base_source: str = "auto"
    adapter_id: str | None = None
    name: str | None = None
    card_repo_id: str | None = None


@dataclass(frozen=True)
class MergeInputs:
    """The checked inputs: every path resolved, every option parsed, the base matched to the adapter."""

    adapter: Path
    manifest: Manifest
    base: ResolvedBase
    base_config_sha256: str
    forced_base_mismatch: bool
    out: Path
    target: Target  # `out` as checked (`replaces`: it holds a model `overwrite` replaces once the new one is complete)
    out_dtype: str | None  # safetensors code of the output floats; None keeps each tensor's dtype
    max_bytes: int | None  # re-shard to this size; None keeps the base's shards
    options: MergeOptions


@dataclass
class MergePlan:
    """Everything to write, decided before writing: the open base shards, the deltas, the output layout."""

    inputs: MergeInputs
    shards: dict[str, ShardReader]
    index: dict | None  # the base's safetensors index, None for a single-file base
    layers: list[LoraLayer]
    deltas: dict[str, TensorDelta]  # checkpoint key -> what to add to it
    expected: Counter  # LoRA layer label -> delta pieces `write_merge` must apply
    layout: Layout
    total_bytes: int
    checkpoint_layout: str  # original per-expert | fused (transformers 5) | original
    base_tensors: int

    def close(self) -> None:
        """Close the base shards' file handles."""
        for s in self.shards.values():
            s.close()


# ------------------------------------------------------------------------------------------ the steps
def check_inputs(adapter_dir: str | Path, base: str | Path, out_dir: str | Path, options: MergeOptions) -> MergeInputs:
    """Step 1: the adapter folder, the options, the base (downloaded if a hub id) and the output folder."""
    from persona_lora.hashing import sha256_file
    from persona_lora.model_loading import resolve_base

    adapter = require_adapter_files(Path(adapter_dir).expanduser().resolve())
    out = Path(out_dir).expanduser().resolve()
    manifest = read_manifest(adapter)
    check_folder(adapter)
    if manifest.kind != "adapter":
        raise UsageError(f"{adapter / MANIFEST_NAME} says kind {manifest.kind!r}; merge takes an adapter folder")
    out_dtype = output_dtype(options.dtype)
    max_bytes = parse_max_shard_size(options.max_shard_size)
    rb = resolve_base(str(base), revision=options.base_revision, source=options.base_source)
    have = sha256_file(rb.path / "config.json")
    mismatch = check_base_config(manifest, rb.id, have, adapter, force=options.force)
    target = check_out_dir(out, overwrite=options.overwrite, base=rb.path.resolve(), adapter=adapter)
    return MergeInputs(adapter=adapter, manifest=manifest, base=rb, base_config_sha256=have,
                       forced_base_mismatch=mismatch, out=out, target=target, out_dtype=out_dtype,
                       max_bytes=max_bytes, options=options)


def plan_merge(inputs: MergeInputs) -> MergePlan:
    """Step 2: match the adapter to the base's checkpoint tensors and lay out the output; the last check is the
    disk space the planned output needs."""
    import torch
    from safetensors.torch import load_file

    from persona_lora.hub_tools.merge.deltas import check_adapter_keys, discover_layers, plan_deltas

    base, adapter = inputs.base.path, inputs.adapter
    shards, index = open_base_weights(base)
    try:
        layers = discover_layers(base, adapter)
        weights = adapter / ADAPTER_WEIGHTS
        tensors = {k: v.to(torch.float32) for k, v in load_file(str(weights)).items()}
        check_adapter_keys(layers, tensors, weights)
        ckpt = {k: v for s in shards.values() for k, v in s.tensors.items()}
        deltas, expected = plan_deltas(layers, tensors, {k: tuple(v["shape"]) for k, v in ckpt.items()})
        check_not_quantized(list(deltas), {k: v["dtype"] for k, v in ckpt.items()})
        layout = plan_output(shards, inputs.out_dtype, inputs.max_bytes)
        total = sum(t.nbytes for _, ts in layout for t in ts)
        check_disk(inputs.out, total)
    except BaseException:
        for s in shards.values():
            s.close()
        raise
    log.info("merging %d LoRA layer(s) into %d of %d tensors of %s", len(layers), len(deltas), len(ckpt),
             inputs.base.id)
    return MergePlan(inputs=inputs, shards=shards, index=index, layers=layers, deltas=deltas, expected=expected,
                     layout=layout, total_bytes=total, checkpoint_layout=layout_name(ckpt), base_tensors=len(ckpt))


def write_merge(plan: MergePlan, tmp: Path) -> None:
    """Step 3: the weights (base + deltas), their index, config and tokenizer, into the staging folder `tmp`."""
    inputs = plan.inputs
    keep_meta = inputs.max_bytes is None  # re-sharded output gets transformers' own shard metadata
    applied: Counter = Counter()
    line = ProgressLine("merge, shards", len(plan.layout))
    with one_torch_thread():
        for i, (shard_name, shard_tensors) in enumerate(plan.layout, 1):
            meta = plan.shards[shard_name].metadata if keep_meta else {"format": "pt"}
            write_shard(tmp / shard_name, shard_tensors, meta, plan.shards, plan.deltas, applied)
            line.update(i, [shard_name], force=i == len(plan.layout))
    line.close()
    check_applied(applied, plan.expected, inputs.out)
    if plan.index is not None or len(plan.layout) > 1:
        meta = ((plan.index or {}).get("metadata") or {}) if keep_meta else {}
        write_index(tmp, plan.layout, meta, plan.total_bytes)
    write_extras(inputs.base.path, inputs.adapter, tmp, inputs.out_dtype)


def merged_manifest(plan: MergePlan) -> Manifest:
    """The adapter's manifest turned into the merged model's: its provenance plus how the merge was made."""
    inputs, options = plan.inputs, plan.inputs.options
    rb = inputs.base
    return dataclasses.replace(
        inputs.manifest,
        kind="merged",
        name=options.name or inputs.out.name,
        merge=MergeInfo(
            adapter=options.adapter_id or inputs.manifest.name or inputs.adapter.name,
            dtype=name_of(inputs.out_dtype or dominant_dtype(plan.layout)),
            layout=plan.checkpoint_layout,
            base=MergeBase(id=rb.id, source=rb.source, revision=rb.revision, config_sha256=inputs.base_config_sha256),
            forced_base_mismatch=inputs.forced_base_mismatch,
            lora_layers=len(plan.layers),
            tensors_changed=len(plan.deltas),
            created_at=now_iso(),
        ),
    )


def finalise_merge(plan: MergePlan, tmp: Path) -> None:
    """Step 4: manifest and card into the staging folder `tmp`, then a re-read of every written header; the
    staging folder takes the output's name when `merge_adapter`'s block completes (an old model there, replaced
    with `overwrite`, is deleted only then)."""
    from persona_lora.model_cards.cards import write_card

    write_manifest(tmp, merged_manifest(plan))
    write_card(tmp, repo_id=plan.inputs.options.card_repo_id)
    verify_written(tmp, plan.layout)


# ------------------------------------------------------------------------------------------ the merge
def merge_adapter(
    adapter_dir: str | Path,
    base: str | Path,
    out_dir: str | Path,
    *,
    dtype: str | None = None,
    max_shard_size: str | int | None = None,
    overwrite: bool = False,
    force: bool = False,
    base_revision: str | None = None,
    base_source: str = "auto",
    adapter_id: str | None = None,
    name: str | None = None,
    card_repo_id: str | None = None,
) -> Path:
    """Merge the adapter in `adapter_dir` into `base` (folder or hub id) and write a model folder to `out_dir`.

    dtype: output dtype of floating tensors (float32 | bfloat16 | float16); default keeps each tensor's dtype.
    max_shard_size: re-shard to this size ('2GB'); default keeps the base's shard files and index.
    overwrite: replace the model folder already in `out_dir` (only a model folder, and only once the new one is
    complete).
    force: merge even though the base's config.json is not the one the adapter was trained on.
    base_revision / base_source: which revision of a hub base, and where `base` lives (auto | local | hf |
    modelscope).
    adapter_id: how the manifest/card name the adapter (its hub id when it was pulled); default its manifest name.
    name / card_repo_id: the merged model's name in its manifest and card (default: the out folder's name).
    Returns the output folder."""
    options = MergeOptions(dtype=dtype, max_shard_size=max_shard_size, overwrite=overwrite, force=force,
                           base_revision=base_revision, base_source=base_source, adapter_id=adapter_id, name=name,
                           card_repo_id=card_repo_id)
    inputs = check_inputs(adapter_dir, base, out_dir, options)
    plan = plan_merge(inputs)
    try:
        with OutputFolder(inputs.target) as tmp:  # removed again if anything (an error, Ctrl-C) stops the merge
            write_merge(plan, tmp)
            finalise_merge(plan, tmp)
    finally:
        plan.close()
    out = inputs.out
    log.info("merged model written to %s (%s, %d shard(s))", out, human_size(plan.total_bytes), len(plan.layout))
    return out
