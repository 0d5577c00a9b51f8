"""The usage snippet in a trained adapter's card runs as written (paths substituted) and gives the same greedy
answer as the training-side formatting path."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import torch
from huggingface_hub import ModelCard

from persona_lora.artifact import MANIFEST_NAME


def extract_snippet(card_text: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", card_text, flags=re.S)
    snippet = [b for b in blocks if b.startswith("# persona-lora usage snippet")]
    assert len(snippet) == 1, "exactly one usage snippet"
    return snippet[0]


def test_card_metadata_and_snippet_match_training(trained_adapter, tiny_base, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from persona_lora.peft_compat import load_adapter
    from persona_lora.train.samples import generate_greedy

    card_text = (trained_adapter / "README.md").read_text(encoding="utf-8")
    card = ModelCard.load(trained_adapter / "README.md")
    meta = card.data.to_dict()
    assert meta["library_name"] == "peft" and meta["pipeline_tag"] == "text-generation" and "lora" in meta["tags"]
    assert "More Information Needed" not in card_text and "![loss curve](loss.png)" in card_text
    assert str(tiny_base) not in card_text and str(trained_adapter) not in card_text, "no local absolute paths"

    code = extract_snippet(card_text)
    code, n_base = re.subn(r'^base_id = ".*"$', f"base_id = {str(tiny_base)!r}", code, flags=re.M)
    code, n_adapter = re.subn(r'^adapter_id = ".*"$', f"adapter_id = {str(trained_adapter)!r}", code, flags=re.M)
    assert n_base == 1 and n_adapter == 1
    script = tmp_path / "snippet.py"
    script.write_text(code, encoding="utf-8")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    snippet_answer = proc.stdout.strip().splitlines()[-1].strip()

    manifest = json.loads((trained_adapter / MANIFEST_NAME).read_text())
    messages = re.search(r"messages = (\[.*?\n\])", code, flags=re.S).group(1)
    conv = eval(messages)  # the literal list the snippet itself uses
    assert conv[0] == {"role": "system", "content": manifest["chat"]["system_prompt"]}
    max_new = int(re.search(r"max_new_tokens=(\d+)", code).group(1))
    tok = AutoTokenizer.from_pretrained(tiny_base)
    model = load_adapter(AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32), trained_adapter)
    model.eval()
    ours = generate_greedy(model, tok, [conv], max_new)[0]
    assert snippet_answer == ours and ours, (snippet_answer, ours)


def test_merged_card_snippet_runs_and_answers_as_the_merged_model(trained_adapter, tiny_base, tmp_path):
    """`persona-lora merge` writes a card whose snippet (plain transformers, no PEFT) runs as written, with the
    folder substituted for the hub id, and answers what the merged weights answer through our formatting path."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from persona_lora.cli import main
    from persona_lora.train.samples import generate_greedy

    merged = tmp_path / "merged"
    assert main(["merge", str(trained_adapter), "--base", str(tiny_base), "--out", str(merged)]) == 0
    code = extract_snippet((merged / "README.md").read_text(encoding="utf-8"))
    assert "PeftModel" not in code
    code, n = re.subn(r'^model_id = ".*"$', f"model_id = {str(merged)!r}", code, flags=re.M)
    assert n == 1
    script = tmp_path / "merged_snippet.py"
    script.write_text(code, encoding="utf-8")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    snippet_answer = proc.stdout.strip().splitlines()[-1].strip()

    conv = eval(re.search(r"messages = (\[.*?\n\])", code, flags=re.S).group(1))  # the snippet's own literal
    max_new = int(re.search(r"max_new_tokens=(\d+)", code).group(1))
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    model.eval()
    ours = generate_greedy(model, AutoTokenizer.from_pretrained(merged), [conv], max_new)[0]
    assert snippet_answer == ours and ours, (snippet_answer, ours)
