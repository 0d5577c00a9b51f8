"""`persona-lora export --for vllm|sglang`: the export must hold the adapter's exact deltas, in the keys and config
fields each engine's loader reads, and refuse what an engine would silently not apply.

Reference for the deltas: `persona-lora merge` of the same adapter (float32), whose checkpoint keeps the base's
per-expert layout (`model.layers.L.mlp.experts.{e}.gate_proj.weight`, …): for every sampled module,
`scaling · lora_B @ lora_A` of the export equals merged − base.

The loaders are not installed here (they need a GPU), so what they read is written down below from their source,
with the file it comes from, and every export is checked against it.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from persona_lora.engines import VLLM_MAX_LORA_RANKS, vllm_max_lora_rank
from persona_lora.errors import UsageError
from persona_lora.hub_tools.export.run import export_adapter
from persona_lora.train.synthetic import make_random_adapter

TOL = 1e-5
PEFT_PREFIX = "base_model.model."
LINEAR_SAMPLES = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.o_proj",
                  "model.layers.2.self_attn.kv_a_proj_with_mqa", "model.layers.0.mlp.gate_proj",
                  "model.layers.0.mlp.down_proj", "model.layers.2.mlp.shared_experts.up_proj",
                  "model.layers.3.mlp.shared_experts.down_proj"]
EXPERT_SAMPLES = [(layer, e) for layer in (1, 3) for e in (0, 7, 15)]
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")

# ---------------------------------------------------------------------------------------------- vLLM 0.33.0
# vllm/lora/utils.py parse_fine_tuned_lora_name: drop a leading `base_model.model.`; `X.lora_A.weight` /
#   `X.lora_B.weight` name module X.
# vllm/lora/worker_manager.py _load_adapter: expected modules = the model's LoRA-capable leaf names
#   (vllm/lora/utils.py get_supported_lora_modules: LinearBase and FusedMoE leaves), each packed name replaced by
#   its parts (DeepseekV2ForCausalLM.packed_modules_mapping, vllm/model_executor/models/deepseek_v2.py:
#   gate_up_proj -> gate_proj, up_proj; fused_qkv_a_proj -> q_a_proj, kv_a_proj_with_mqa when q_lora_rank is set),
#   plus `experts.{e}.{gate_proj,up_proj,down_proj}` (vllm/lora/utils.py process_packed_modules_mapping, for a
#   model with is_3d_moe_weight False, as DeepSeek-V2).
# vllm/lora/lora_model.py check_unexpected_modules: a key whose module contains `.experts` must have its suffix
#   from `experts.` in the expected set, any other its last dotted part; keys with `base_layer` (PEFT's fused 3-D
#   layout) skip the check, so the per-expert export must have none.
# vllm/lora/lora_weights.py PackedLoRALayerWeights.pack_moe: each expert brings gate_proj, up_proj and down_proj.
# vllm/lora/peft_helper.py PEFTHelper: requires r, lora_alpha, target_modules; validate_legal refuses use_dora,
#   lora_bias, bias != "none", modules_to_save other than classifier/score, init_lora_weights such as "pissa",
#   and max(r, *rank_pattern.values()) > --max-lora-rank; vllm/config/lora.py MaxLoRARanks lists --max-lora-rank.
VLLM_DEEPSEEK_LEAVES = {"q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate",
                        "gate_proj", "up_proj", "down_proj"}

# ---------------------------------------------------------------------------------------------- SGLang 0.5.23
# python/sglang/srt/lora/lora_config.py LoRAConfig: reads hf_config["target_modules"], ["r"], ["lora_alpha"],
#   rank_pattern / alpha_pattern (overrides), use_dora; lora/lora.py LoRAAdapter asserts peft_type "lora" and
#   scales by lora_alpha / r.
# lora/lora_manager.py init_lora_shapes: target_modules must be a list ("SGLang does not recognize target_modules"
#   for any string but all/all-linear); lora/utils.py get_normalized_target_modules maps each entry's last dotted
#   part: gate_proj/up_proj -> gate_up_proj, k_proj/v_proj (and q_proj outside MLA) -> qkv_proj.
# lora/lora.py _process_weight: a key is filed under the layer `get_layer_id` finds (`layers.N.`);
#   normalize_gate_up_proj stacks each `gate_proj` key with the same key with `up_proj` (a missing one is zero).
# lora/mem_pool.py load_lora_weight_to_buffer: per-expert MoE weights are the keys matching `experts\.(\d+)\.`
#   (`shared_experts.gate_proj` does not), sliced to config r; with --lora-strict-loading a weight whose name
#   contains no normalized target module is an error (`get_target_module_name`), otherwise dropped with a warning.
SGLANG_NORMALIZED = {"gate_proj": "gate_up_proj", "up_proj": "gate_up_proj", "k_proj": "qkv_proj",
                     "v_proj": "qkv_proj"}


def vllm_module(key: str) -> tuple[str, bool]:
    start = 2 if key.startswith(PEFT_PREFIX) else 0
    parts = key.split(".")
    assert parts[-1] == "weight" and parts[-2] in ("lora_A", "lora_B"), key
    return ".".join(parts[start:-2]), parts[-2] == "lora_A"


def check_vllm_reads(export: Path, n_experts: int) -> None:
    config = json.loads((export / "adapter_config.json").read_text())
    keys = list(load_file(str(export / "adapter_model.safetensors")))
    expected = VLLM_DEEPSEEK_LEAVES | {f"experts.{e}.{p}" for e in range(n_experts) for p in PROJECTIONS}
    experts: dict[str, set[str]] = {}
    for key in keys:
        assert "base_layer" not in key, key
        module, _ = vllm_module(key)
        if ".experts" in module:
            suffix = module[module.find(".experts") + 1:]
            assert suffix in expected, key
            layer_expert, proj = module.rsplit(".", 1)
            experts.setdefault(layer_expert, set()).add(proj)
        else:
            assert module.rsplit(".", 1)[-1] in expected, key
    assert all(projs == set(PROJECTIONS) for projs in experts.values()), experts
    assert {"r", "lora_alpha", "target_modules"} <= set(config)
    assert config["bias"] == "none" and not config["use_dora"] and not config["modules_to_save"]
    assert config["init_lora_weights"] is True and not config.get("lora_bias")
    assert max([config["r"], *config["rank_pattern"].values()]) <= 512
    readme = (export / "README.md").read_text()
    max_rank = int(re.search(r"--max-lora-rank (\d+)", readme).group(1))
    assert max_rank in VLLM_MAX_LORA_RANKS and config["r"] <= max_rank


def check_sglang_reads(export: Path) -> None:
    config = json.loads((export / "adapter_config.json").read_text())
    tensors = load_file(str(export / "adapter_model.safetensors"))
    assert config["peft_type"].lower() == "lora"
    assert isinstance(config["target_modules"], list)
    assert not config["rank_pattern"] and not config["alpha_pattern"] and not config["use_dora"]
    normalized = {SGLANG_NORMALIZED.get(t.split(".")[-1], t.split(".")[-1]) for t in config["target_modules"]}
    for key, t in tensors.items():
        assert re.search(r"layers\.(\d+)\.", key), key
        stacked = key.replace("gate_proj", "gate_up_proj").replace(".up_proj", ".gate_up_proj")
        assert any(target in stacked for target in normalized), (key, normalized)  # strict loading
        rank_dim = 0 if ".lora_A." in key else 1
        assert t.shape[rank_dim] == config["r"], key
        if "gate_proj" in key:
            up = tensors[key.replace("gate_proj", "up_proj")]
            assert up.shape == t.shape
    assert any(re.search(r"experts\.(\d+)\.", k) for k in tensors) == any(".experts." in k for k in tensors)


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("export")


@pytest.fixture(scope="module")
def adapters(tiny_base, work):
    return {p: make_random_adapter(tiny_base, work / p.replace("+", "-"), p, r=8, alpha=16, seed=3,
                                   system_prompt="你是沈知微。")
            for p in ("attention", "attention+mlp", "all")}


@pytest.fixture(scope="module")
def merged(tiny_base, adapters, work):
    from persona_lora.hub_tools.merge.run import merge_adapter

    return merge_adapter(adapters["all"], tiny_base, work / "merged-all", dtype="float32")


@pytest.fixture(scope="module")
def exports(tiny_base, adapters, work):
    return {
        "sglang": export_adapter(adapters["all"], engine="sglang", out_dir=work / "sglang-all", base=tiny_base),
        "vllm": export_adapter(adapters["all"], engine="vllm", out_dir=work / "vllm-all", base=tiny_base,
                               allow_dropped_kv_b=True),
    }


def weight(folder: Path, key: str) -> torch.Tensor:
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(str(folder / weight_map[key]), framework="pt") as f:
        return f.get_tensor(key).to(torch.float32)


def export_delta(export: Path, module: str) -> torch.Tensor:
    config = json.loads((export / "adapter_config.json").read_text())
    tensors = load_file(str(export / "adapter_model.safetensors"))
    a = tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"].to(torch.float32)
    b = tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"].to(torch.float32)
    return config["lora_alpha"] / config["r"] * (b @ a)


def assert_delta(export: Path, base: Path, merged: Path, module: str) -> None:
    want = weight(merged, f"{module}.weight") - weight(base, f"{module}.weight")
    got = export_delta(export, module)
    assert want.abs().max() > 1e-4, f"{module}: the adapter does not change it"
    assert (got - want).abs().max().item() < TOL, module


# ---------------------------------------------------------------------------------------------- deltas


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["sglang", "vllm"])
def test_export_deltas_equal_the_merged_weights(engine, exports, merged, tiny_base):
    export = exports[engine]
    modules = LINEAR_SAMPLES + (["model.layers.3.self_attn.kv_b_proj"] if engine == "sglang" else [])
    modules += [f"model.layers.{layer}.mlp.experts.{e}.{p}" for layer, e in EXPERT_SAMPLES for p in PROJECTIONS]
    for module in modules:
        assert_delta(export, tiny_base, merged, module)


@pytest.mark.parametrize("engine", ["sglang", "vllm"])
def test_export_has_exactly_the_keys_and_fields_the_engine_reads(engine, exports, adapters):
    export = exports[engine]
    tensors = load_file(str(export / "adapter_model.safetensors"))
    experts = {k for k in tensors if ".mlp.experts." in k}
    assert len(experts) == 3 * 16 * 3 * 2  # layers 1-3 x 16 experts x gate/up/down x A/B
    if engine == "vllm":
        check_vllm_reads(export, n_experts=16)
        assert not any("kv_b_proj" in k for k in tensors)
    else:
        check_sglang_reads(export)
        assert sum("kv_b_proj" in k for k in tensors) == 4 * 2
    config = json.loads((export / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (8, 16)
    assert (export / "persona_manifest.json").read_bytes() == (adapters["all"] / "persona_manifest.json").read_bytes()


@pytest.mark.parametrize("preset", ["attention", "attention+mlp"])
def test_presets_without_routed_experts_export_for_sglang(preset, adapters, tiny_base, tmp_path):
    export = export_adapter(adapters[preset], engine="sglang", out_dir=tmp_path / "out", base=tiny_base)
    check_sglang_reads(export)
    tensors = load_file(str(export / "adapter_model.safetensors"))
    assert not any(".experts." in k for k in tensors)
    original = load_file(str(adapters[preset] / "adapter_model.safetensors"))
    assert set(tensors) == set(original) and all(torch.equal(tensors[k], original[k]) for k in tensors)


def test_dense_adapter_exports_unchanged_for_both_engines(tiny_llama, tmp_path):
    adapter = make_random_adapter(tiny_llama, tmp_path / "llama", "all", r=8, alpha=16)
    original = load_file(str(adapter / "adapter_model.safetensors"))
    for engine in ("vllm", "sglang"):
        export = export_adapter(adapter, engine=engine, out_dir=tmp_path / engine, base=tiny_llama)
        tensors = load_file(str(export / "adapter_model.safetensors"))
        assert set(tensors) == set(original) and all(torch.equal(tensors[k], original[k]) for k in tensors)
        assert json.loads((export / "adapter_config.json").read_text())["target_modules"] == [
            "down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


# ---------------------------------------------------------------------------------------------- the cards


def test_readme_gives_the_exact_serve_command_and_request(exports, tiny_base):
    vllm = (exports["vllm"] / "README.md").read_text()
    assert "vLLM 0.33.0" in vllm
    assert f"vllm serve {tiny_base} --enable-lora --max-lora-rank 8 --lora-modules all={exports['vllm']}" in vllm
    assert '"model": "all"' in vllm and "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True" in vllm
    assert "/v1/load_lora_adapter" in vllm and "你是沈知微。" in vllm
    assert "--enable-mixed-moe-lora-format" in vllm  # named as not needed, with the reason
    sglang = (exports["sglang"] / "README.md").read_text()
    assert "SGLang 0.5.23" in sglang
    assert (f"python -m sglang.launch_server --model-path {tiny_base} --enable-lora --lora-paths "
            f"all={exports['sglang']} --lora-strict-loading") in sglang
    assert f'"model": "{tiny_base}:all"' in sglang
    assert "Warning" not in sglang


# ---------------------------------------------------------------------------------------------- kv_b_proj


def test_vllm_refuses_kv_b_proj_through_the_cli_naming_cause_and_fixes(adapters, tiny_base, tmp_path, capsys):
    from persona_lora.cli import main

    out = tmp_path / "vllm"
    code = main(["export", str(adapters["attention"]), "--for", "vllm", "--out", str(out), "--base", str(tiny_base)])
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err
    for needed in ("kv_b_proj", "vllm-project/vllm#48974", "persona-lora merge", "--for sglang",
                   "attention-no-kv-b", "lora.preset", "--allow-dropped-kv-b"):
        assert needed in err, needed
    assert not out.exists() and not list(tmp_path.glob(".*partial*"))


def test_allow_dropped_kv_b_writes_the_warning_and_no_kv_b_tensors(exports):
    export = exports["vllm"]
    readme = (export / "README.md").read_text()
    assert "Warning: kv_b_proj LoRA was dropped" in readme and "vllm-project/vllm#48974" in readme
    assert "differs from the trained one" in readme
    config = json.loads((export / "adapter_config.json").read_text())
    assert "kv_b_proj" not in config["target_modules"]
    assert not any("kv_b_proj" in k for k in load_file(str(export / "adapter_model.safetensors")))


def test_no_kv_b_preset_exports_for_vllm_without_the_flag(tiny_base, tmp_path):
    from persona_lora import presets

    if "all-no-kv-b" not in presets.PRESETS["moe"]:
        pytest.skip("the no-kv-b presets are not in persona_lora/presets.py")
    adapter = make_random_adapter(tiny_base, tmp_path / "ad", "all-no-kv-b", r=8, alpha=16)
    export = export_adapter(adapter, engine="vllm", out_dir=tmp_path / "out", base=tiny_base)
    check_vllm_reads(export, n_experts=16)
    assert "Warning" not in (export / "README.md").read_text()


# ---------------------------------------------------------------------------------------------- refusals


def test_existing_out_dir_is_refused_and_left_untouched(adapters, tiny_base, tmp_path, capsys):
    from persona_lora.cli import main

    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="not empty"):
        export_adapter(adapters["attention"], engine="sglang", out_dir=out, base=tiny_base)
    code = main(["export", str(adapters["attention"]), "--for", "sglang", "--out", str(out), "--base", str(tiny_base)])
    assert code == 2 and "Traceback" not in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"
    assert not list(tmp_path.glob(".*partial*"))


def test_rank_above_512_is_refused_for_vllm(tiny_base, tmp_path):
    assert [vllm_max_lora_rank(r) for r in (1, 2, 8, 9, 300, 320, 321, 512)] == [1, 8, 8, 16, 320, 320, 512, 512]
    with pytest.raises(UsageError, match=r"513, above 512.*persona-lora merge"):
        vllm_max_lora_rank(513)
    adapter = make_random_adapter(tiny_base, tmp_path / "big", "attention", r=520, alpha=520)
    with pytest.raises(UsageError, match=r"rank is 520, above 512"):
        export_adapter(adapter, engine="vllm", out_dir=tmp_path / "out", base=tiny_base, allow_dropped_kv_b=True)
    assert not (tmp_path / "out").exists()


def test_a_local_base_that_is_not_here_asks_for_base(adapters, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match="--base PATH"):
        export_adapter(adapters["attention"], engine="sglang", out_dir=tmp_path / "out")


# ---------------------------------------------------------------------------------------------- inputs


def test_cli_defaults_to_the_manifests_base_and_prints_the_folder(adapters, tiny_base, tmp_path, monkeypatch, capsys):
    from persona_lora.cli import main

    monkeypatch.chdir(tiny_base.parent)  # the manifest names the local base "tiny-base"
    out = tmp_path / "sg"
    assert main(["export", str(adapters["attention+mlp"]), "--for", "sglang", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out.resolve())
    check_sglang_reads(out)


def test_hub_base_downloads_only_its_config(adapters, tiny_base, tmp_path, monkeypatch):
    calls = []

    class FakeHub:
        label = "a fake hub"

        def token(self, explicit=None):
            return None

        def errors(self, *args, **kwargs):
            return contextlib.nullcontext()

        def snapshot(self, repo_id, *, revision, commit, allow_patterns, local_dir=None, token=None):
            calls.append((repo_id, allow_patterns))
            folder = tmp_path / "snapshot"
            folder.mkdir()
            shutil.copy(tiny_base / "config.json", folder / "config.json")
            return folder

    monkeypatch.setattr("persona_lora.hubs.backends.backend", lambda hub: FakeHub())
    monkeypatch.chdir(tmp_path)
    export = export_adapter(adapters["attention"], engine="sglang", out_dir=tmp_path / "out", base="owner/tiny-ds")
    assert calls == [("owner/tiny-ds", ["config.json"])]
    assert "--model-path owner/tiny-ds " in (export / "README.md").read_text()


def test_legacy_spelling_exports_the_same_tensors(adapters, tiny_base, tmp_path):
    from persona_lora.peft_compat import LINEAR_WEIGHT, module_regex

    legacy = tmp_path / "legacy"
    shutil.copytree(adapters["attention+mlp"], legacy)
    config = json.loads((legacy / "adapter_config.json").read_text())
    manifest = json.loads((legacy / "persona_manifest.json").read_text())
    config["target_modules"] = module_regex(manifest["lora"]["target_modules"])
    config["target_parameters"] = [p for p in config.get("target_parameters") or []
                                   if not p.endswith(LINEAR_WEIGHT)] or None
    (legacy / "adapter_config.json").write_text(json.dumps(config))
    a = export_adapter(adapters["attention+mlp"], engine="sglang", out_dir=tmp_path / "a", base=tiny_base)
    b = export_adapter(legacy, engine="sglang", out_dir=tmp_path / "b", base=tiny_base)
    ta, tb = (load_file(str(x / "adapter_model.safetensors")) for x in (a, b))
    assert set(ta) == set(tb) and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert json.loads((a / "adapter_config.json").read_text()) == json.loads((b / "adapter_config.json").read_text())
    assert "older spelling" in (b / "README.md").read_text()


def test_per_module_alpha_is_folded_into_one_scaling(adapters, tiny_base, tmp_path):
    """SGLang applies one lora_alpha / r per adapter: an alpha_pattern module keeps its delta through lora_B."""
    adapter = tmp_path / "alpha"
    shutil.copytree(adapters["attention"], adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["alpha_pattern"] = {"o_proj": 32}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    export = export_adapter(adapter, engine="sglang", out_dir=tmp_path / "out", base=tiny_base)
    check_sglang_reads(export)
    original = load_file(str(adapter / "adapter_model.safetensors"))
    for module, scaling in (("model.layers.1.self_attn.o_proj", 32 / 8), ("model.layers.1.self_attn.q_proj", 2.0)):
        a, b = (original[f"{PEFT_PREFIX}{module}.lora_{x}.weight"] for x in "AB")
        assert (export_delta(export, module) - scaling * b @ a).abs().max().item() < TOL, module
    assert "One rank and scaling for every module" in (export / "README.md").read_text()


# ---------------------------------------------------------------------------------------------- units


def test_missing_expert_projections_are_zero_filled_with_their_shapes():
    from persona_lora.hub_tools.export.layout import ModuleLora, fill_expert_projections

    r, hidden, inter = 4, 12, 6
    gate = ModuleLora("model.layers.1.mlp.experts.0.gate_proj", torch.randn(r, hidden), torch.randn(inter, r), 2.0,
                      "x", True)
    down = ModuleLora("model.layers.1.mlp.experts.1.down_proj", torch.randn(r, inter), torch.randn(hidden, r), 2.0,
                      "x", True)
    filled = {m.module: m for m in fill_expert_projections([gate, down])}
    shapes = {name: (tuple(m.lora_a.shape), tuple(m.lora_b.shape)) for name, m in filled.items()}
    e0, e1 = "model.layers.1.mlp.experts.0", "model.layers.1.mlp.experts.1"
    assert shapes[f"{e0}.up_proj"] == shapes[f"{e1}.gate_proj"] == shapes[f"{e1}.up_proj"] == ((r, hidden), (inter, r))
    assert shapes[f"{e0}.down_proj"] == ((r, inter), (hidden, r))
    assert len(filled) == 6 and all(not m.lora_b.any() for m in filled.values() if m.source == "zero fill")


def test_uniform_rank_pads_and_folds_without_changing_a_delta():
    from persona_lora.hub_tools.export.layout import ModuleLora, uniform_rank

    mods = [ModuleLora(f"m{i}", torch.randn(rank, 10), torch.randn(7, rank), scaling, "x")
            for i, (rank, scaling) in enumerate([(8, 2.0), (8, 2.0), (4, 4.0), (2, 1.0)])]
    same, r, alpha, changed = uniform_rank(mods[:2], 8, 16)
    assert (r, alpha, changed) == (8, 16, False) and same == mods[:2]
    out, r, alpha, changed = uniform_rank(mods, 8, 16)
    assert (r, alpha, changed) == (8, 16, True)
    for before, after in zip(mods, out):
        assert after.rank == 8 and after.scaling == 2.0
        want = before.scaling * before.lora_b @ before.lora_a
        assert (after.scaling * after.lora_b @ after.lora_a - want).abs().max().item() < TOL
