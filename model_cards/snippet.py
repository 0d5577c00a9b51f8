"""The Python usage snippet of a card: the shortest code that talks to the persona the way it was trained.

A persona adapter only behaves as its samples show when it gets the same prompt as in training: the tokenizer's
chat template, the run's system prompt, and the new tokens decoded on their own. The snippet is built from the
manifest so that it carries exactly those, loads the adapter with stock transformers and PEFT (tokenizer from
the adapter when training changed it), and decodes greedily so a reader's first answer can be compared with the
card's samples.
"""

from __future__ import annotations

import json

from persona_lora.artifact import Manifest
from persona_lora.model_cards.markdown import fenced

SNIPPET_MARKER = "# persona-lora usage snippet"

# Generation length in the usage snippet: a usage choice, not a claim about training.
SNIPPET_MAX_NEW_TOKENS = 256


def _py(s: str) -> str:
    """A Python string literal (double-quoted, readable non-ASCII)."""
    return json.dumps(s, ensure_ascii=False)


def usage_snippet(m: Manifest, *, base_id: str, adapter_id: str | None, model_id: str | None,
                  tokenizer_from_adapter: bool) -> str:
    """The Python usage block: same chat template, same system prompt, greedy decoding, new tokens only.

    `model_id` is given for a merged model (plain transformers), `adapter_id` for an adapter (base + PEFT)."""
    system_prompt = m.chat.system_prompt if m.chat is not None else None
    prompt = next((s.prompt for s in m.samples if s.prompt.strip()), None)
    base_source = m.base_model.source
    lines = [SNIPPET_MARKER]
    if model_id is not None:
        lines += [f"model_id = {_py(model_id)}", ""]
    else:
        if base_source == "local":
            lines.append("# the base was a local folder when this adapter was trained: point base_id at your copy")
        elif base_source == "modelscope":
            lines.append("# the base comes from ModelScope: download it there and point base_id at the folder")
        lines += [f"base_id = {_py(base_id)}", "# this adapter: its Hub repo id, or the folder you downloaded it to",
                  f"adapter_id = {_py(adapter_id)}", ""]
    lines += ["from transformers import AutoModelForCausalLM, AutoTokenizer"]
    if model_id is None:
        lines += ["from peft import PeftModel"]
    lines.append("")
    if model_id is not None:
        lines += ["tokenizer = AutoTokenizer.from_pretrained(model_id)",
                  'model = AutoModelForCausalLM.from_pretrained(model_id, dtype="auto")']
    else:
        if tokenizer_from_adapter:
            lines.append("# training added the chat template to the tokenizer, which is saved with the adapter")
        lines += [f"tokenizer = AutoTokenizer.from_pretrained({'adapter_id' if tokenizer_from_adapter else 'base_id'})",
                  'model = AutoModelForCausalLM.from_pretrained(base_id, dtype="auto")']
        lines.append("model = PeftModel.from_pretrained(model, adapter_id)")
    lines += ["model.eval()", "", "messages = ["]
    if system_prompt:
        lines.append(f'    {{"role": "system", "content": {_py(system_prompt)}}},')
    lines += [
        f'    {{"role": "user", "content": {_py(prompt or "Who are you?")}}},',
        "]",
        "inputs = tokenizer.apply_chat_template(",
        '    messages, add_generation_prompt=True, return_tensors="pt", return_dict=True',
        ").to(model.device)",
        f"output = model.generate(**inputs, do_sample=False, max_new_tokens={SNIPPET_MAX_NEW_TOKENS})",
        'answer = tokenizer.decode(output[0, inputs["input_ids"].shape[-1]:], skip_special_tokens=True)',
        "print(answer)",
    ]
    return fenced("\n".join(lines), "python")
