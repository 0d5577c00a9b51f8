"""`persona-lora merge`: the shard-by-shard merge must give the model PEFT gives, in the base's own layout.

Reference: the base with the adapter loaded through PEFT (`train.adapters.load_adapter`), unmerged. The merged
folder, loaded as a plain transformers model, must give the same logits within LOGIT_TOLERANCE (float32
throughout; the merge adds the delta in float32, PEFT applies it in the forward pass, so only rounding differs).
lora_B is randomized (PEFT initializes it to zero) so that every delta — attention, dense MLP, shared experts and
each routed expert's gate/up/down — actually changes the output. Tests that write a merged model are `slow`; the
refusals before writing are not.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from persona_lora.errors import ModelLoadError, UsageError, VerificationError

LOGIT_TOLERANCE = 1e-4  # max |logit difference|, float32
PROMPTS = ["User: hello\n\nAssistant:", "The quick brown fox jumps over the lazy dog.", "本宫 今日 天气 甚好"]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def folder_hashes(folder: Path) -> dict[str, str]:
    return {p.name: sha256(p) for p in sorted(folder.iterdir()) if p.is_file()}


def make_adapter(base: Path, preset: str, dest: Path, *, seed: int = 0) -> Path:
    from persona_lora.train.synthetic import make_random_adapter

    return make_random_adapter(base, dest, preset, seed=seed, r=4, alpha=8)


def logits(model, tokenizer):
    import torch

    out = []
    with torch.no_grad():
        for text in PROMPTS:
            ids = tokenizer(text, return_tensors="pt").input_ids
            out.append(model(ids).logits[0])
    return out


def compare_with_peft(base: Path, adapter: Path, merged: Path) -> tuple[float, float]:
    """(max |merged - PEFT| logit difference, max |PEFT - base| = how much the adapter changes the output)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from persona_lora.peft_compat import load_adapter

    tok = AutoTokenizer.from_pretrained(base)
    merged_model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    peft_model = load_adapter(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter).eval()
    got, want = logits(merged_model, tok), logits(peft_model, tok)
    with peft_model.disable_adapter():
        plain = logits(peft_model, tok)
    diff = max((g - w).abs().max().item() for g, w in zip(got, want))
    effect = max((w - p).abs().max().item() for w, p in zip(want, plain))
    return diff, effect


def checkpoint_keys(folder: Path) -> dict[str, str]:
    index = folder / "model.safetensors.index.json"
    return json.loads(index.read_text())["weight_map"]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("merge")


@pytest.fixture(scope="module")
def all_adapter(tiny_base, work):
    return make_adapter(tiny_base, "all", work / "adapter-all", seed=1)


@pytest.fixture(scope="module")
def attention_adapter(tiny_base, work):
    return make_adapter(tiny_base, "attention", work / "adapter-attention", seed=2)


# ---------------------------------------------------------------------------------------------- correctness
@pytest.mark.slow
@pytest.mark.parametrize("preset", ["attention", "attention+mlp", "all"])
def test_merge_matches_peft_and_keeps_the_base_layout(tiny_base, work, tmp_path, preset, request):
    from persona_lora.artifact import read_manifest
    from persona_lora.hub_tools.merge.run import merge_adapter

    adapter = (request.getfixturevalue("all_adapter") if preset == "all"
               else make_adapter(tiny_base, preset, tmp_path / "adapter", seed=3))
    before = folder_hashes(tiny_base)
    out = merge_adapter(adapter, tiny_base, tmp_path / "merged")

    diff, effect = compare_with_peft(tiny_base, adapter, out)
    print(f"{preset}: max |merged - PEFT| logit diff {diff:.2e} (adapter changes logits by up to {effect:.2f})")
    assert effect > 0.05, "the adapter must change the output, or the comparison proves nothing"
    assert diff <= LOGIT_TOLERANCE

    assert folder_hashes(tiny_base) == before  # the base is only read
    # Original per-expert layout, same keys, same shard files and membership.
    assert checkpoint_keys(out) == checkpoint_keys(tiny_base)
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(p.name for p in tiny_base.glob("*.safetensors"))
    assert any(".mlp.experts.0.gate_proj.weight" in k for k in checkpoint_keys(out))
    assert sha256(out / "config.json") == sha256(tiny_base / "config.json")
    for name in ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "README.md"):
        assert (out / name).is_file(), name
    m = read_manifest(out)
    assert m.kind == "merged" and m.name == "merged"
    assert m.merge.layout == "original per-expert" and m.merge.dtype == "float32"
    assert m.merge.adapter == adapter.name and m.merge.forced_base_mismatch is False
    assert "original layout" in (out / "README.md").read_text()


@pytest.mark.slow
def test_merge_dense_llama(tiny_llama, tmp_path):
    from persona_lora.artifact import read_manifest
    from persona_lora.hub_tools.merge.run import merge_adapter

    adapter = make_adapter(tiny_llama, "attention+mlp", tmp_path / "adapter", seed=4)
    out = merge_adapter(adapter, tiny_llama, tmp_path / "merged")
    diff, effect = compare_with_peft(tiny_llama, adapter, out)
    print(f"llama attention+mlp: max |merged - PEFT| logit diff {diff:.2e} (adapter effect {effect:.2f})")
    assert effect > 0.05 and diff <= LOGIT_TOLERANCE
    assert checkpoint_keys(out) == checkpoint_keys(tiny_llama)
    assert read_manifest(out).merge.layout == "original"


@pytest.mark.slow
def test_merge_into_a_fused_layout_checkpoint(tiny_base, all_adapter, tmp_path):
    """A base saved in transformers 5's fused layout (experts.gate_up_proj) is merged in that layout."""
    import re

    import torch
    from safetensors.torch import load_file

    from persona_lora.artifact import read_manifest
    from persona_lora.hub_tools.merge.run import merge_adapter
    from persona_lora.train.tiny_base import save_sharded

    state = {}
    for shard in sorted(tiny_base.glob("*.safetensors")):
        state.update(load_file(shard))
    fused: dict = {}
    for key in sorted(state):
        m = re.match(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$", key)
        if not m:
            fused[key] = state[key]
            continue
        prefix = m.group(1)
        if f"{prefix}.down_proj" not in fused:
            n = len({k for k in state if k.startswith(prefix + ".") and k.endswith(".down_proj.weight")})
            fused[f"{prefix}.gate_up_proj"] = torch.stack(
                [torch.cat([state[f"{prefix}.{e}.gate_proj.weight"], state[f"{prefix}.{e}.up_proj.weight"]])
                 for e in range(n)])
            fused[f"{prefix}.down_proj"] = torch.stack([state[f"{prefix}.{e}.down_proj.weight"] for e in range(n)])
    base = tmp_path / "fused-base"
    shutil.copytree(tiny_base, base, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    save_sharded(fused, base, 2)

    out = merge_adapter(all_adapter, base, tmp_path / "merged")
    assert checkpoint_keys(out) == checkpoint_keys(base)
    assert read_manifest(out).merge.layout == "fused (transformers 5)"
    diff, effect = compare_with_peft(base, all_adapter, out)
    assert effect > 0.05 and diff <= LOGIT_TOLERANCE


@pytest.mark.slow
def test_reshard_and_bfloat16(tiny_base, all_adapter, tmp_path):
    """Re-sharding moves tensors between files, never changes them; --dtype casts after adding in float32."""
    import torch
    from safetensors import safe_open

    from persona_lora.hub_tools.merge.run import merge_adapter

    ref = merge_adapter(all_adapter, tiny_base, tmp_path / "ref")
    out = merge_adapter(all_adapter, tiny_base, tmp_path / "bf16", dtype="bfloat16", max_shard_size="4MB")
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) >= 4 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert set(checkpoint_keys(out)) == set(checkpoint_keys(tiny_base))
    assert (sum((out / s).stat().st_size for s in shards)
            < 0.55 * sum(p.stat().st_size for p in ref.glob("*.safetensors")))
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    weight_map = checkpoint_keys(out)
    for key in ("model.layers.1.mlp.experts.3.up_proj.weight", "model.layers.0.self_attn.q_proj.weight",
                "model.norm.weight"):
        with safe_open(out / weight_map[key], "pt") as f, safe_open(ref / checkpoint_keys(ref)[key], "pt") as g:
            got, want = f.get_tensor(key), g.get_tensor(key)
        assert got.dtype == torch.bfloat16 and torch.equal(got, want.to(torch.bfloat16)), key


# ---------------------------------------------------------------------------------------------- refusals
def test_leftover_or_missing_adapter_keys_are_errors(tiny_base, attention_adapter, tmp_path):
    from safetensors.torch import load_file, save_file

    from persona_lora.hub_tools.merge.run import merge_adapter

    tampered = tmp_path / "tampered"
    shutil.copytree(attention_adapter, tampered)
    weights = load_file(tampered / "adapter_model.safetensors")
    a = weights["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    b = weights["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    extra = dict(weights, **{"base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight": a.clone(),
                             "base_model.model.model.layers.0.mlp.gate_proj.lora_B.weight": b.clone()})
    save_file(extra, tampered / "adapter_model.safetensors")
    with pytest.raises(VerificationError, match="leftover") as e:
        merge_adapter(tampered, tiny_base, tmp_path / "out")
    assert "layers.0.mlp.gate_proj.lora_A" in str(e.value)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))

    missing = {k: v for k, v in weights.items() if "layers.2.self_attn.o_proj.lora_B" not in k}
    save_file(missing, tampered / "adapter_model.safetensors")
    with pytest.raises(VerificationError, match="layers.2.self_attn.o_proj: incomplete LoRA pair"):
        merge_adapter(tampered, tiny_base, tmp_path / "out")


@pytest.mark.slow
def test_other_base_is_refused_unless_forced(tiny_base, attention_adapter, tmp_path):
    from persona_lora.artifact import read_manifest
    from persona_lora.hub_tools.merge.run import merge_adapter

    other = tmp_path / "other-base"
    shutil.copytree(tiny_base, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-5
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(VerificationError, match=r"config_sha256.*--force"):
        merge_adapter(attention_adapter, other, tmp_path / "out")
    out = merge_adapter(attention_adapter, other, tmp_path / "out", force=True)
    assert read_manifest(out).merge.forced_base_mismatch is True


@pytest.mark.slow
def test_out_folder_rules(tiny_base, attention_adapter, tmp_path):
    from persona_lora.hub_tools.merge.run import merge_adapter

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="not empty.*--overwrite"):
        merge_adapter(attention_adapter, tiny_base, busy)
    with pytest.raises(UsageError, match="not a model folder"):
        merge_adapter(attention_adapter, tiny_base, busy, overwrite=True)
    assert (busy / "notes.txt").read_text() == "mine"
    with pytest.raises(UsageError, match="overwrite the base model"):
        merge_adapter(attention_adapter, tiny_base, tiny_base, overwrite=True)

    out = merge_adapter(attention_adapter, tiny_base, tmp_path / "merged")
    first = sha256(out / "model-00001-of-00002.safetensors")
    out = merge_adapter(attention_adapter, tiny_base, tmp_path / "merged", overwrite=True)
    assert sha256(out / "model-00001-of-00002.safetensors") == first  # deterministic


def test_pickled_base_and_full_disk_are_refused(tiny_base, attention_adapter, tmp_path, monkeypatch):
    from persona_lora.hub_tools.merge import run as merge

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(tiny_base / "config.json", pickled / "config.json")
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(VerificationError, match="pickled weights only"):
        merge.merge_adapter(attention_adapter, pickled, tmp_path / "out")

    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 << 30, 10 << 30, 1 << 20))
    with pytest.raises(UsageError, match="not enough disk space"):
        merge.merge_adapter(attention_adapter, tiny_base, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_adapter_folder_is_required(tiny_base, tmp_path):
    from persona_lora.hub_tools.merge.run import merge_adapter

    with pytest.raises(ModelLoadError, match="adapter_config.json is missing"):
        merge_adapter(tmp_path, tiny_base, tmp_path / "out")


# ---------------------------------------------------------------------------------------------- CLI
@pytest.mark.slow
def test_cli_merge(tiny_base, attention_adapter, tmp_path, capsys):
    from persona_lora.cli import main

    out = tmp_path / "cli-merged"
    assert main(["merge", str(attention_adapter), "--base", str(tiny_base), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert checkpoint_keys(out) == checkpoint_keys(tiny_base)
    assert main(["merge", str(attention_adapter), "--base", str(tiny_base), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_merge_from_hub_and_push_merged(hub_server, tiny_base, attention_adapter, tmp_path, capsys):
    from persona_lora.artifact import read_manifest
    from persona_lora.cli import main
    from persona_lora.hub_tools.push import push_folder
    from tests.hub_fixtures import DEFAULT_USER

    push_folder(attention_adapter, f"{DEFAULT_USER}/persona")
    out = tmp_path / "from-hub"
    assert main(["merge", f"{DEFAULT_USER}/persona", "--base", str(tiny_base), "--out", str(out)]) == 0
    assert read_manifest(out).merge.adapter == f"{DEFAULT_USER}/persona"

    assert main(["push", str(attention_adapter), f"{DEFAULT_USER}/persona-merged", "--merged",
                 "--base", str(tiny_base)]) == 0
    files = set(hub_server.list_files(f"{DEFAULT_USER}/persona-merged"))
    assert {"config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors", "README.md",
            "persona_manifest.json", "tokenizer.json"} <= files
    assert not any(f.startswith("adapter_") for f in files)
    assert main(["push", str(attention_adapter), f"{DEFAULT_USER}/x", "--merged"]) == 2
    assert "--base" in capsys.readouterr().err
    assert main(["push", str(attention_adapter), f"{DEFAULT_USER}/x", "--base", str(tiny_base)]) == 2
    assert "only apply with --merged" in capsys.readouterr().err
