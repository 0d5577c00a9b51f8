"""The embedded toy base (train/tiny_base.py): it must look like DeepSeek-Coder-V2-Lite-Instruct on disk.

Loads natively (no remote code) with the same logits every time and the same as the model built in memory;
config in the hub's own form; weights in the original per-expert layout, sharded with a correct index;
deterministic bytes; DeepSeek's special tokens and chat template on a byte-level tokenizer; size options that
work and bad ones that name the option. Extra bases are built small, into tmp_path, to stay fast.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from persona_lora.chat_templates import BOS_TOKEN, DEEPSEEK_V2, EOS_TOKEN
from persona_lora.cli import main
from persona_lora.errors import UsageError
from persona_lora.train.tiny_base import TinySpec, build_tiny_base, validate_spec

# Small enough to build in well under a second; big enough to keep the real structure (dense layer 0, MoE after).
SMALL = TinySpec(layers=2, hidden=64, heads=2, experts=8, experts_per_token=2, moe_intermediate=32,
                 dense_intermediate=64, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                 vocab_size=1024)
PROMPT_IDS = torch.tensor([[0, 5, 17, 300, 42, 999, 7, 1]])


def load(path: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)  # no trust_remote_code: DeepSeek-V2 is native
    return model.eval()


def logits(model, ids=PROMPT_IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def config_json(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def index_json(path: Path) -> dict:
    return json.loads((path / "model.safetensors.index.json").read_text())


def shard_contents(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    out = {}
    for shard in sorted(path.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            out[shard.name] = {k: f.get_tensor(k) for k in f.keys()}
    return out


def all_tensors(path: Path) -> dict[str, torch.Tensor]:
    return {k: t for tensors in shard_contents(path).values() for k, t in tensors.items()}


# ------------------------------------------------------------------------------------------------ loading
def test_loads_natively_without_missing_or_unexpected_keys(tiny_base):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(tiny_base, output_loading_info=True)
    assert type(model).__name__ == "DeepseekV2ForCausalLM"
    assert model.config.model_type == "deepseek_v2"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    # the per-expert checkpoint was fused on load (transformers 5)
    params = dict(model.named_parameters())
    spec = TinySpec()
    assert params["model.layers.1.mlp.experts.gate_up_proj"].shape == (
        spec.experts, 2 * spec.moe_intermediate, spec.hidden
    )
    assert params["model.layers.1.mlp.experts.down_proj"].shape == (spec.experts, spec.hidden, spec.moe_intermediate)


def test_logits_match_a_reload_and_the_model_built_in_memory(tiny_base):
    from transformers import AutoConfig, AutoModelForCausalLM

    first = logits(load(tiny_base))
    assert torch.isfinite(first).all()
    assert first.shape == (1, PROMPT_IDS.shape[1], TinySpec().vocab_size)
    assert torch.equal(first, logits(load(tiny_base)))

    # the same construction build_tiny_base performs, without going through disk
    spec = TinySpec()
    config = AutoConfig.from_pretrained(tiny_base)
    torch.manual_seed(spec.seed)
    in_memory = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        in_memory.get_output_embeddings().weight.normal_(0.0, spec.head_std_x1000 / 1000)
    torch.testing.assert_close(logits(in_memory.eval()), first, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ config.json
def test_config_is_the_hub_form_of_deepseek_v2(tiny_base):
    cfg = config_json(tiny_base)
    assert cfg["model_type"] == "deepseek_v2"
    assert cfg["architectures"] == ["DeepseekV2ForCausalLM"]
    assert "auto_map" not in cfg  # nothing that would ask for remote code
    assert cfg["q_lora_rank"] is None
    assert cfg["kv_lora_rank"] == TinySpec().kv_lora_rank
    for key in ("qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim"):
        assert isinstance(cfg[key], int) and cfg[key] > 0, key
    rope = cfg["rope_scaling"]
    assert rope["type"] == "yarn" and rope["factor"] == 40 and rope["original_max_position_embeddings"] == 4096
    assert cfg["first_k_dense_replace"] == 1
    assert cfg["n_shared_experts"] == 2
    assert cfg["n_routed_experts"] >= 8
    assert 1 <= cfg["num_experts_per_tok"] <= cfg["n_routed_experts"]
    assert cfg["tie_word_embeddings"] is False


def test_config_converts_on_load(tiny_base):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_base)
    rope = getattr(config, "rope_parameters", None) or config.rope_scaling
    assert rope["rope_type"] == "yarn" and rope["factor"] == 40


# ------------------------------------------------------------------------------------------------ checkpoint layout
def test_checkpoint_is_in_the_original_per_expert_layout(tiny_base):
    spec = TinySpec()
    tensors = all_tensors(tiny_base)
    keys = set(tensors)
    assert not any("gate_up_proj" in k for k in keys)
    assert not any(re.search(r"mlp\.experts\.(down_proj|gate_up_proj)$", k) for k in keys)
    # layer 0: dense MLP
    for proj in ("gate_proj", "up_proj", "down_proj"):
        assert f"model.layers.0.mlp.{proj}.weight" in keys
    assert not any(k.startswith("model.layers.0.mlp.experts") for k in keys)
    # every later layer: router, shared experts, and one tensor per routed expert and projection
    for layer in range(1, spec.layers):
        assert f"model.layers.{layer}.mlp.gate.weight" in keys
        for proj in ("gate_proj", "up_proj", "down_proj"):
            assert f"model.layers.{layer}.mlp.shared_experts.{proj}.weight" in keys
        for e in range(spec.experts):
            gate = tensors[f"model.layers.{layer}.mlp.experts.{e}.gate_proj.weight"]
            up = tensors[f"model.layers.{layer}.mlp.experts.{e}.up_proj.weight"]
            down = tensors[f"model.layers.{layer}.mlp.experts.{e}.down_proj.weight"]
            assert gate.shape == up.shape == (spec.moe_intermediate, spec.hidden)
            assert down.shape == (spec.hidden, spec.moe_intermediate)
        assert f"model.layers.{layer}.mlp.experts.{spec.experts}.gate_proj.weight" not in keys
    assert "lm_head.weight" in keys and "model.embed_tokens.weight" in keys  # untied: both stored
    assert not torch.equal(tensors["lm_head.weight"], tensors["model.embed_tokens.weight"])


def test_checkpoint_is_sharded_with_a_correct_index(tiny_base):
    shards = shard_contents(tiny_base)
    assert len(shards) >= 2
    index = index_json(tiny_base)
    weight_map = index["weight_map"]
    seen: dict[str, str] = {}
    for name, tensors in shards.items():
        for key in tensors:
            assert key not in seen, f"{key} stored in both {seen[key]} and {name}"
            seen[key] = name
    assert weight_map == seen  # every key exactly once, pointing at the shard that holds it
    assert set(weight_map.values()) == set(shards)
    total = sum(t.numel() * t.element_size() for tensors in shards.values() for t in tensors.values())
    assert index["metadata"]["total_size"] == total


# ------------------------------------------------------------------------------------------------ determinism
def test_same_spec_gives_identical_bytes(tmp_path):
    a = build_tiny_base(tmp_path / "a", SMALL)
    b = build_tiny_base(tmp_path / "b", SMALL)
    files_a = sorted(p.name for p in a.iterdir())
    assert files_a == sorted(p.name for p in b.iterdir())
    assert {"config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json",
            "tokenizer_config.json"} <= set(files_a)
    for name in files_a:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_another_seed_gives_other_weights_and_the_same_tokenizer(tmp_path):
    a = build_tiny_base(tmp_path / "a", SMALL)
    b = build_tiny_base(tmp_path / "b", replace(SMALL, seed=1))
    ta, tb = all_tensors(a), all_tensors(b)
    assert set(ta) == set(tb)
    differing = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert "lm_head.weight" in differing and "model.layers.1.mlp.experts.0.gate_proj.weight" in differing
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()


# ------------------------------------------------------------------------------------------------ tokenizer
def test_special_tokens(tokenizer, tiny_base):
    cfg = config_json(tiny_base)
    assert tokenizer.bos_token == BOS_TOKEN == "<｜begin▁of▁sentence｜>"
    assert tokenizer.eos_token == EOS_TOKEN == "<｜end▁of▁sentence｜>"
    assert tokenizer.pad_token == tokenizer.eos_token
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    assert tokenizer.bos_token_id != tokenizer.eos_token_id
    assert tokenizer.convert_tokens_to_ids(BOS_TOKEN) == tokenizer.bos_token_id == cfg["bos_token_id"]
    assert tokenizer.convert_tokens_to_ids(EOS_TOKEN) == tokenizer.eos_token_id == cfg["eos_token_id"]
    assert len(tokenizer) <= cfg["vocab_size"]
    # like DeepSeek's: a plain encode adds bos once; add_special_tokens=False adds nothing
    ids = tokenizer("hello")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert tokenizer.bos_token_id not in tokenizer("hello", add_special_tokens=False)["input_ids"]
    # special token text is one token
    assert tokenizer(EOS_TOKEN, add_special_tokens=False)["input_ids"] == [tokenizer.eos_token_id]


def test_chat_template_is_deepseek_v2(tokenizer):
    assert tokenizer.chat_template == DEEPSEEK_V2
    text = tokenizer.apply_chat_template(
        [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
        tokenize=False,
    )
    assert text == f"{BOS_TOKEN}S\n\nUser: Q\n\nAssistant: A{EOS_TOKEN}"
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Q"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt == f"{BOS_TOKEN}User: Q\n\nAssistant:"


@pytest.mark.parametrize("text", [
    "hello, world",
    "本宫今日甚是欢喜。",
    "emoji 😀🎉👩‍👩‍👧 and flags 🇨🇳🇫🇷",
    "ünïcödé ñ Ωmega ∑∫√ — “quotes” ‘x’",
    "tabs\tand\nnewlines\r\n  double  spaces ",
    "日本語のテキスト、한국어 텍스트, العربية, עברית, हिन्दी",
    "\x00\x01 control chars \u200b zero-width \ufeff",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 astral 𠀀𪚥",
])
def test_tokenizer_is_byte_level(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id is None or tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == text


def test_generation_config(tiny_base, tokenizer):
    from transformers import GenerationConfig

    gen = GenerationConfig.from_pretrained(tiny_base)
    assert gen.bos_token_id == tokenizer.bos_token_id
    assert gen.eos_token_id == tokenizer.eos_token_id
    assert gen.pad_token_id == tokenizer.eos_token_id


# ------------------------------------------------------------------------------------------------ variants and sizes
def test_llama_variant_loads_and_is_dense(tiny_llama):
    from transformers import AutoTokenizer

    cfg = config_json(tiny_llama)
    assert cfg["model_type"] == "llama" and "n_routed_experts" not in cfg
    model = load(tiny_llama)
    assert type(model).__name__ == "LlamaForCausalLM"
    names = [n for n, _ in model.named_modules()]
    assert not any("expert" in n for n in names)
    for layer in range(cfg["num_hidden_layers"]):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            assert isinstance(model.get_submodule(f"model.layers.{layer}.mlp.{proj}"), torch.nn.Linear)
    assert torch.isfinite(logits(model)).all()
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    assert tok.chat_template == DEEPSEEK_V2 and tok.eos_token == EOS_TOKEN


def test_size_options(tmp_path):
    spec = replace(TinySpec(), layers=3, hidden=128, experts=8, experts_per_token=2, vocab_size=1024)
    out = build_tiny_base(tmp_path / "sized", spec)
    cfg = config_json(out)
    sizes = (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["n_routed_experts"], cfg["num_experts_per_tok"])
    assert sizes == (3, 128, 8, 2)
    assert cfg["vocab_size"] == 1024
    model = load(out)
    assert len(model.model.layers) == 3
    assert model.model.layers[2].mlp.experts.gate_up_proj.shape == (8, 2 * spec.moe_intermediate, 128)
    assert logits(model, torch.tensor([[0, 5, 6, 1]])).shape == (1, 4, 1024)
    keys = set(index_json(out)["weight_map"])
    assert "model.layers.2.mlp.experts.7.down_proj.weight" in keys
    assert "model.layers.2.mlp.experts.8.down_proj.weight" not in keys


@pytest.mark.parametrize("changes, option", [
    ({"hidden": 100, "heads": 3}, "--hidden (100) must be divisible by --heads (3)"),
    ({"experts": 4, "experts_per_token": 6}, "--experts-per-token (6) must be <= --experts (4)"),
    ({"layers": 1}, "--layers"),
    ({"vocab_size": 100}, "--vocab-size"),
])
def test_bad_sizes_name_the_option(tmp_path, changes, option):
    spec = replace(SMALL, **changes)
    with pytest.raises(UsageError) as e:
        validate_spec(spec)
    assert option in str(e.value)
    with pytest.raises(UsageError, match=re.escape(option)):
        build_tiny_base(tmp_path / "bad", spec)
    assert not (tmp_path / "bad").exists()  # refused before anything is written


def test_unknown_arch_names_the_option(tmp_path):
    with pytest.raises(UsageError, match="--arch 'gpt2' is not supported"):
        build_tiny_base(tmp_path / "bad", replace(SMALL, arch="gpt2"))


def test_unknown_arch_writes_nothing(tmp_path):
    with pytest.raises(UsageError, match="--arch"):
        build_tiny_base(tmp_path / "bad", replace(SMALL, arch="gpt2"))
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())


def test_all_problems_are_reported_at_once():
    with pytest.raises(UsageError) as e:
        validate_spec(replace(SMALL, hidden=100, heads=3, experts=4, experts_per_token=6))
    assert "--hidden" in str(e.value) and "--experts-per-token" in str(e.value)


# ------------------------------------------------------------------------------------------------ CLI
SMALL_ARGS = ["--layers", "2", "--hidden", "64", "--heads", "2", "--experts", "8", "--experts-per-token", "2",
              "--moe-intermediate", "32", "--dense-intermediate", "64", "--kv-lora-rank", "16",
              "--qk-nope-head-dim", "8", "--qk-rope-head-dim", "8", "--v-head-dim", "8", "--vocab-size", "1024"]


def test_cli_builds_the_same_folder_as_the_api(tmp_path, capsys):
    out = tmp_path / "cli-base"
    assert main(["tiny-base", str(out), *SMALL_ARGS]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    api = build_tiny_base(tmp_path / "api-base", SMALL)
    for f in api.iterdir():
        if f.name != "README.md":
            assert (out / f.name).read_bytes() == f.read_bytes(), f.name
    assert type(load(out)).__name__ == "DeepseekV2ForCausalLM"


def test_cli_llama(tmp_path):
    out = tmp_path / "llama"
    assert main(["tiny-base", str(out), "--arch", "llama", "--layers", "2", "--hidden", "64", "--heads", "2",
                 "--vocab-size", "1024"]) == 0
    assert config_json(out)["model_type"] == "llama"


def test_cli_refuses_a_non_empty_folder(tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["tiny-base", str(out), *SMALL_ARGS]) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "not empty" in err and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]  # nothing written
    # an existing empty folder is fine
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["tiny-base", str(empty), *SMALL_ARGS]) == 0


def test_cli_bad_size_is_one_line_naming_the_option(tmp_path, capsys):
    out = tmp_path / "bad"
    assert main(["tiny-base", str(out), *SMALL_ARGS, "--hidden", "100", "--heads", "3"]) == 2
    err = capsys.readouterr().err
    assert "--hidden (100) must be divisible by --heads (3)" in err and "Traceback" not in err
    assert not out.exists()


def test_wide_base_writes_the_original_layout_one_layer_per_shard(tmp_path):
    """The lite-wide writer (here at toy widths, bfloat16): transformers loads it with nothing missing or left
    over, the experts fused from the per-expert tensors, one shard per layer plus embeddings and head; the same
    arguments give the same bytes."""
    from transformers import AutoModelForCausalLM

    from persona_lora.train.tiny_base import build_wide_base

    widths = TinySpec(hidden=64, heads=2, experts=8, experts_per_token=2, moe_intermediate=32, dense_intermediate=96,
                      kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, vocab_size=600)
    a = build_wide_base(tmp_path / "a", layers=3, dtype="bfloat16", widths=widths)
    b = build_wide_base(tmp_path / "b", layers=3, dtype="bfloat16", widths=widths)
    shards = sorted(p.name for p in a.glob("*.safetensors"))
    assert len(shards) == 5 and all((a / n).read_bytes() == (b / n).read_bytes() for n in shards)
    index = json.loads((a / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.2.mlp.experts.7.down_proj.weight" in index and not any("gate_up" in k for k in index)
    model, info = AutoModelForCausalLM.from_pretrained(a, output_loading_info=True)
    assert not any(info.values()), info
    assert model.dtype == torch.bfloat16 and model.model.layers[1].mlp.experts.gate_up_proj.shape == (8, 64, 64)
    assert torch.equal(model.model.norm.weight, torch.ones(64, dtype=torch.bfloat16))


def test_lite_wide_refuses_size_flags(tmp_path, capsys):
    assert main(["tiny-base", str(tmp_path / "w"), "--preset", "lite-wide", "--hidden", "64"]) != 0
    assert "drop --hidden" in capsys.readouterr().err and not (tmp_path / "w").exists()
    assert main(["tiny-base", str(tmp_path / "t"), "--dtype", "bfloat16"]) != 0
