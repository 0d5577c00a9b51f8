"""LoRA coverage per preset (persona_lora/presets.py, persona_lora/peft_compat.py), checked per module on the tiny
DeepSeek-V2 base by walking the PEFT model ourselves (independently of `coverage_table`), then against it.
The PEFT behaviours the compat module guards against are in tests/test_peft_compat.py.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn as nn

from persona_lora import presets
from persona_lora.errors import ConfigError, ModelLoadError
from persona_lora.peft_compat import load_adapter
from persona_lora.presets import LEAF_TARGETS, check_coverage, resolve
from tests.peft_helpers import IDS, adapted, attach, fresh

ATTN = ("q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def expected(config, groups) -> set[str]:
    layers, dense = config.num_hidden_layers, config.first_k_dense_replace
    out = set()
    if "attention" in groups:
        out |= {f"model.layers.{L}.self_attn.{p}" for L in range(layers) for p in ATTN}
    if "dense" in groups:
        out |= {f"model.layers.{L}.mlp.{p}" for L in range(dense) for p in MLP}
    if "shared" in groups:
        out |= {f"model.layers.{L}.mlp.shared_experts.{p}" for L in range(dense, layers) for p in MLP}
    if "routed" in groups:
        out |= {
            f"model.layers.{L}.mlp.experts.{p}" for L in range(dense, layers) for p in ("gate_up_proj", "down_proj")
        }
    return out


PRESET_GROUPS = {
    "attention": ["attention"],
    "attention+mlp": ["attention", "dense", "shared"],
    "all": ["attention", "dense", "shared", "routed"],
}
TABLE_GROUPS = {"attention": presets.ATTENTION, "dense": presets.DENSE_MLP, "shared": presets.SHARED_EXPERTS,
                "routed": presets.ROUTED_EXPERTS}


def assert_never_adapted(names):
    for n in names:
        assert "lm_head" not in n and "embed_tokens" not in n, n
        assert not n.endswith("mlp.gate"), n  # the router
        assert "norm" not in n, n


# ------------------------------------------------------------------------------------------------ coverage per preset
@pytest.mark.parametrize("preset", PRESET_GROUPS)
def test_preset_coverage_module_by_module(tiny_base, preset):
    model = fresh(tiny_base)
    config = model.config
    assert config.first_k_dense_replace == 1 and config.num_hidden_layers >= 3
    spec, peft_model, _ = attach(model, preset)
    found = adapted(peft_model)
    want = expected(config, PRESET_GROUPS[preset])
    assert set(found) == want
    assert_never_adapted(found)
    for name, mod in found.items():
        is_expert = re.search(r"\.mlp\.experts\.(gate_up_proj|down_proj)$", name) is not None
        assert (type(mod).__name__ == "ParamWrapper") == is_expert, name
        if not is_expert:
            assert isinstance(mod.base_layer, nn.Linear), name
    if preset != "all":
        assert not any(".mlp.experts" in n for n in found)
    if preset == "attention":
        assert not any(".mlp." in n for n in found)
    # the router, lm_head and the embeddings are untouched modules, and only LoRA weights train
    base = peft_model.get_base_model()
    for L in range(1, config.num_hidden_layers):
        assert type(base.get_submodule(f"model.layers.{L}.mlp.gate")).__name__ == "DeepseekV2TopkRouter"
    assert type(base.lm_head) is nn.Linear and type(base.model.embed_tokens) is nn.Embedding
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)

    # coverage_table agrees, group by group, and check_coverage passes
    table = {row["group"]: row for row in check_coverage(peft_model, spec)}
    asked = {TABLE_GROUPS[g] for g in PRESET_GROUPS[preset]}
    assert set(table) == asked
    for short in PRESET_GROUPS[preset]:
        row = table[TABLE_GROUPS[short]]
        assert row["asked"] and row["applied"]
        assert set(row["names"]) == expected(config, [short])
        assert row["modules"] == len(row["names"])
        assert row["params"] == sum(p.numel() for n in row["names"] for k in ("lora_A", "lora_B")
                                    for p in getattr(found[n], k).parameters())


def test_leaf_targets_cover_what_all_covers(tiny_base):
    spec, peft_model, _ = attach(fresh(tiny_base), None, LEAF_TARGETS)
    assert spec.groups == presets.PRESETS["moe"]["all"]
    _, all_model, _ = attach(fresh(tiny_base), "all")
    assert set(adapted(peft_model)) == set(adapted(all_model)) == expected(peft_model.config, PRESET_GROUPS["all"])


@pytest.mark.parametrize("targets, message", [
    (["q_proj", "gate_proj"], "gate_proj"),
    (["gate_proj", "up_proj"], "down_proj"),
    (["q_proj", "mlp"], "unknown module name"),
    (["lm_head"], "lm_head"),
])
def test_bad_target_lists_are_config_errors(tiny_base, targets, message):
    with pytest.raises(ConfigError, match=message):
        resolve(fresh(tiny_base), None, targets)


def test_unknown_preset_is_a_config_error(tiny_base):
    with pytest.raises(ConfigError, match="'everything'.*attention, attention\\+mlp, all"):
        resolve(fresh(tiny_base), "everything")


# ------------------------------------------------------------------------------------------------ save + reload
@pytest.mark.parametrize("preset", PRESET_GROUPS)
def test_save_and_reload_gives_identical_logits(tiny_base, tmp_path, preset):
    base_logits = fresh(tiny_base)(input_ids=IDS).logits.detach()
    spec, peft_model, _ = attach(fresh(tiny_base), preset)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    peft_model.eval()
    with torch.no_grad():
        before = peft_model(input_ids=IDS).logits
    assert not torch.allclose(before, base_logits)  # the adapter does something
    peft_model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert bool(saved.get("target_parameters")) == (preset == "all")

    reloaded = load_adapter(fresh(tiny_base), tmp_path / "adapter")
    reloaded.eval()
    assert set(adapted(reloaded)) == set(adapted(peft_model))
    check_coverage(reloaded, spec)
    with torch.no_grad():
        after = reloaded(input_ids=IDS).logits
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_load_adapter_refuses_a_folder_without_adapter_files(tiny_base, tmp_path):
    with pytest.raises(ModelLoadError, match="adapter_config.json"):
        load_adapter(fresh(tiny_base), tmp_path)


# ------------------------------------------------------------------------------------------------ dense llama
def test_llama_all_adapts_every_linear_layer_but_lm_head(tiny_llama):
    model = fresh(tiny_llama)
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}
    spec, peft_model, note = attach(model, "all", dropout=0.1)
    assert note is None and spec.target_parameters == []
    found = adapted(peft_model)
    assert set(found) == linears
    assert_never_adapted(found)
    table = {row["group"]: row for row in check_coverage(peft_model, spec)}
    assert set(table) == {presets.ATTENTION, presets.DENSE_MLP}
    layers = peft_model.config.num_hidden_layers
    assert table[presets.DENSE_MLP]["modules"] == 3 * layers
    assert table[presets.ATTENTION]["modules"] == 4 * layers


def test_llama_attention_preset(tiny_llama):
    _, peft_model, _ = attach(fresh(tiny_llama), "attention")
    layers = peft_model.config.num_hidden_layers
    assert set(adapted(peft_model)) == {f"model.layers.{L}.self_attn.{p}" for L in range(layers)
                                        for p in ("q_proj", "k_proj", "v_proj", "o_proj")}


@pytest.mark.parametrize("preset", ["attention-no-kv-b", "attention+mlp-no-kv-b", "all-no-kv-b"])
def test_no_kv_b_presets_leave_out_kv_b_proj_only(tiny_base, preset):
    spec, peft_model, _ = attach(fresh(tiny_base), preset)
    _, full, _ = attach(fresh(tiny_base), preset.removesuffix("-no-kv-b"))
    found = set(adapted(peft_model))
    assert not any(n.endswith("kv_b_proj") for n in found)
    assert found == {n for n in adapted(full) if not n.endswith("kv_b_proj")}
    check_coverage(peft_model, spec)


def test_coverage_check_fails_when_an_asked_target_is_missing(tiny_base):
    """The check compares both ways: a module asked for but left without LoRA (and routed experts asked for but not
    adapted) fail it, as an unexpected one does."""
    spec, peft_model, _ = attach(fresh(tiny_base), "attention")
    check_coverage(peft_model, spec)  # as asked: passes
    asked_more = presets.LoraSpec(spec.groups, [*spec.target_modules, "model.layers.0.mlp.shared_experts.up_proj"],
                                  list(spec.target_parameters))
    with pytest.raises(ConfigError, match=r"missing \['model\.layers\.0\.mlp\.shared_experts\.up_proj'\], "
                                          r"unexpected \[\]"):
        check_coverage(peft_model, asked_more)
    experts_asked = presets.LoraSpec(spec.groups, list(spec.target_modules), ["mlp.experts.gate_up_proj"])
    with pytest.raises(ConfigError, match=r"LoRA on routed experts differs from what was asked \(0 applied, [1-9]"):
        check_coverage(peft_model, experts_asked)
