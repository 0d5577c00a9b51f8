"""Adapters other people's code loads as trained: stock PEFT, transformers' `load_adapter`, AutoPeftModel, the
merged model and persona-lora's own loader give the same logits, for every preset; legacy adapters upgrade to
identical outputs; push and pull keep the spelling honest; the card's snippet runs on stock libraries.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys

import pytest
import torch

from persona_lora.artifact import ADAPTER_CONFIG, read_adapter_config, write_adapter_config
from persona_lora.errors import UsageError
from persona_lora.peft_compat import LINEAR_WEIGHT, is_legacy_spelling, load_adapter, module_regex
from persona_lora.presets import LEAF_TARGETS
from persona_lora.train.synthetic import make_random_adapter

PRESETS = ["attention", "attention+mlp", "all"]
IDS = torch.tensor([[0, 11, 250, 37, 902, 4, 1500, 1, 77, 3000]])
ATOL = 1e-5
SYSTEM = "你是沈知微，宫中的微嫔。"


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits


def fresh(base):
    from transformers import AutoModelForCausalLM  # imported when used: collecting the tests stays fast

    return AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()


def legacy_copy(adapter, dst):
    """The same adapter with its config in the spelling persona-lora wrote before adapters were portable."""
    shutil.copytree(adapter, dst)
    config = read_adapter_config(dst)
    params = config.get("target_parameters") or []
    linear = [p.removesuffix(LINEAR_WEIGHT) for p in params if p.endswith(LINEAR_WEIGHT)]
    attention = [n for n in json.loads((adapter / "persona_manifest.json").read_text())["lora"]["target_modules"]
                 if n not in linear]
    config["target_modules"] = module_regex(attention + linear)
    config["target_parameters"] = [p for p in params if not p.endswith(LINEAR_WEIGHT)] or None
    write_adapter_config(dst, config)
    return dst


@pytest.fixture(scope="module")
def adapters(tiny_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("interop")
    out = {p: make_random_adapter(tiny_base, root / p.replace("+", "-"), p, r=8, alpha=16, system_prompt=SYSTEM)
           for p in PRESETS}
    out["leaf-targets"] = make_random_adapter(tiny_base, root / "leaf", None, target_modules=LEAF_TARGETS, r=8,
                                              alpha=16, system_prompt=SYSTEM)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["leaf-targets", "llama-all"])
def test_the_leaf_target_list_and_dense_models_load_as_trained_too(adapters, tiny_base, tiny_llama, tmp_path, spec):
    """The common leaf-name list (every linear layer, experts included) and a dense architecture: stock PEFT and
    transformers load them as trained as well."""
    from peft import PeftModel

    base = tiny_llama if spec == "llama-all" else tiny_base
    adapter = (make_random_adapter(tiny_llama, tmp_path / "llama", "all", r=8, alpha=16) if spec == "llama-all"
               else adapters[spec])
    ours = logits(load_adapter(fresh(base), adapter))
    assert (ours - logits(fresh(base))).abs().max() > 1e-2
    stock = logits(PeftModel.from_pretrained(fresh(base), str(adapter)))
    transformers_model = fresh(base)
    transformers_model.load_adapter(str(adapter))
    assert (stock - ours).abs().max() <= ATOL and (logits(transformers_model) - ours).abs().max() <= ATOL


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
def test_every_loader_gives_the_trained_model(adapters, tiny_base, tmp_path, monkeypatch, preset):
    from peft import AutoPeftModelForCausalLM, PeftModel

    from persona_lora.hub_tools.merge.run import merge_adapter

    adapter = adapters[preset]
    config = read_adapter_config(adapter)
    assert not is_legacy_spelling(config, "deepseek_v2")
    ours = logits(load_adapter(fresh(tiny_base), adapter))
    assert (ours - logits(fresh(tiny_base))).abs().max() > 1e-2, "the adapter changes the model"

    stock = logits(PeftModel.from_pretrained(fresh(tiny_base), str(adapter)))
    transformers_model = fresh(tiny_base)
    transformers_model.load_adapter(str(adapter))
    via_transformers = logits(transformers_model)
    monkeypatch.chdir(tiny_base.parent)  # the adapter records its base as "tiny-base": resolvable from here
    assert config["base_model_name_or_path"] == tiny_base.name
    auto = logits(AutoPeftModelForCausalLM.from_pretrained(str(adapter), dtype=torch.float32))
    merged_dir = merge_adapter(adapter, tiny_base, tmp_path / "merged", dtype="float32")
    merged = logits(fresh(merged_dir))
    for name, got in (("stock PEFT", stock), ("transformers load_adapter", via_transformers),
                      ("AutoPeftModelForCausalLM", auto), ("merged", merged)):
        diff = (got - ours).abs().max().item()
        assert diff <= ATOL, f"{name}: max |logit difference| {diff:.2e} > {ATOL}"


def test_the_trained_adapter_is_portable(trained_adapter, tiny_base):
    from peft import PeftModel

    assert not is_legacy_spelling(read_adapter_config(trained_adapter), "deepseek_v2")
    ours = logits(load_adapter(fresh(tiny_base), trained_adapter))
    stock = logits(PeftModel.from_pretrained(fresh(tiny_base), str(trained_adapter)))
    assert (stock - ours).abs().max() <= ATOL


@pytest.mark.parametrize("preset", ["attention+mlp", "all"])
def test_legacy_adapters_load_in_our_tools_and_upgrade_to_identical_outputs(adapters, tiny_base, tmp_path, preset):
    from peft import PeftModel

    from persona_lora.hub_tools.upgrade import LEGACY_BACKUP, upgrade_adapter

    portable = adapters[preset]
    legacy = legacy_copy(portable, tmp_path / "legacy")
    assert is_legacy_spelling(read_adapter_config(legacy), "deepseek_v2")
    ours = logits(load_adapter(fresh(tiny_base), portable))
    assert torch.equal(logits(load_adapter(fresh(tiny_base), legacy)), ours), "old adapters load as trained"
    if preset == "attention+mlp":  # stock PEFT puts this LoRA on the routed experts: the bug the upgrade fixes
        wrong = logits(PeftModel.from_pretrained(fresh(tiny_base), str(legacy)))
        assert (wrong - ours).abs().max() > 1e-3

    assert upgrade_adapter(legacy, base=str(tiny_base)) is True
    assert read_adapter_config(legacy) == read_adapter_config(portable)
    assert (legacy / LEGACY_BACKUP).is_file() and "legacy spelling" not in (legacy / "README.md").read_text()
    stock = logits(PeftModel.from_pretrained(fresh(tiny_base), str(legacy)))
    assert (stock - ours).abs().max() <= ATOL
    assert upgrade_adapter(legacy) is False  # already portable (and the manifest names the base)


def test_upgrade_adapter_command(adapters, tiny_base, tmp_path, capsys):
    from persona_lora.cli import main

    legacy = legacy_copy(adapters["all"], tmp_path / "legacy")
    assert main(["upgrade-adapter", str(legacy), "--base", str(tiny_base)]) == 0
    assert "rewritten in the portable spelling" in capsys.readouterr().out
    assert main(["upgrade-adapter", str(legacy)]) == 0
    assert "already portable" in capsys.readouterr().out
    assert main(["upgrade-adapter", str(tmp_path / "nowhere")]) == 1
    err = capsys.readouterr().err
    assert "nowhere" in err and "Traceback" not in err
    # a local base is recorded by its folder's name: without --base, the message says to pass its path
    again = legacy_copy(adapters["all"], tmp_path / "legacy-2")
    assert main(["upgrade-adapter", str(again)]) == 1
    err = capsys.readouterr().err
    assert "trained on a local base recorded as 'tiny-base'" in err and "pass --base" in err


def test_push_refuses_a_legacy_adapter_and_pull_says_how_to_upgrade(hub_server, adapters, tmp_path, caplog):
    from persona_lora.hub_tools.push import push_folder
    from persona_lora.hubs.pull import pull

    legacy = legacy_copy(adapters["attention+mlp"], tmp_path / "legacy")
    with pytest.raises(UsageError, match=re.escape(f"persona-lora upgrade-adapter {legacy}")):
        push_folder(legacy, "tester/legacy")
    push_folder(legacy, "tester/legacy", legacy=True)
    with caplog.at_level(logging.WARNING, logger="persona_lora.hubs.pull"):
        folder = pull("tester/legacy")
    assert any("legacy adapter spelling" in r.getMessage() and "upgrade-adapter" in r.getMessage()
               for r in caplog.records)
    assert (folder / ADAPTER_CONFIG).is_file()
    caplog.clear()
    push_folder(adapters["attention+mlp"], "tester/portable")
    with caplog.at_level(logging.WARNING, logger="persona_lora.hubs.pull"):
        pull("tester/portable")
    assert not any("legacy" in r.getMessage() for r in caplog.records)


def _snippet(card: str) -> str:
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", card, flags=re.S)
                if b.startswith("# persona-lora usage snippet")]
    return block


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
def test_card_snippet_runs_on_stock_libraries_and_answers_like_us(adapters, tiny_base, tmp_path, preset):
    from transformers import AutoTokenizer

    from persona_lora.model_cards.cards import write_card
    from persona_lora.train.samples import generate_greedy

    adapter = shutil.copytree(adapters[preset], tmp_path / "adapter")
    card = write_card(adapter).read_text(encoding="utf-8")
    code = _snippet(card)
    assert "peft.utils" not in code and "_conv" not in code, "plain transformers + peft, no patch"
    code = re.sub(r'^base_id = ".*"$', f"base_id = {str(tiny_base)!r}", code, flags=re.M)
    code = re.sub(r'^adapter_id = ".*"$', f"adapter_id = {str(adapter)!r}", code, flags=re.M)
    code = code.replace("max_new_tokens=256", "max_new_tokens=24")
    (tmp_path / "snippet.py").write_text(code, encoding="utf-8")
    proc = subprocess.run([sys.executable, str(tmp_path / "snippet.py")], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    conv = eval(re.search(r"messages = (\[.*?\n\])", code, flags=re.S).group(1))  # the snippet's own literal
    assert conv[0] == {"role": "system", "content": SYSTEM}
    model = load_adapter(fresh(tiny_base), adapter)
    ours = generate_greedy(model, AutoTokenizer.from_pretrained(tiny_base), [conv], 24)[0]
    assert proc.stdout.strip().splitlines()[-1].strip() == ours and ours
