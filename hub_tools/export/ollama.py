"""The Ollama `Modelfile` of a GGUF export: the weights, the chat template in Ollama's Go-template syntax, the
persona's system prompt, the stop token and the card's decoding.

Why a template of our own: Ollama does not run the Jinja chat template stored in the GGUF; it formats every chat
with the Modelfile's `TEMPLATE`. A persona answers as trained only on the prompt it was trained on, so the
TEMPLATE must render exactly what `persona_lora.chat_format` feeds the model. It is written for the DeepSeek-V2
template (the one we ship, `persona_lora.chat_templates.DEEPSEEK_V2`) and refused for any other, rather than
guessed. Ollama passes the system prompt and the turns in `.Messages` (the Modelfile's `SYSTEM` becomes a system
message when a request has none) and adds the BOS token itself (the GGUF says `add_bos_token`), so the template
renders system text + blank line, `User: …` + blank line, then `Assistant:`; an earlier answer follows as
` answer` + EOS. That is the same text as the Jinja template's, cut at the same place for the generation prompt.
"""

from __future__ import annotations

import json

from persona_lora.chat_templates import DEEPSEEK_V2, EOS_TOKEN
from persona_lora.errors import UsageError

# Go template (text/template), as Ollama renders it: no trim markers, so every character outside the actions is
# prompt text.
DEEPSEEK_V2_TEMPLATE = (
    '{{ range .Messages }}'
    '{{ if eq .Role "system" }}{{ .Content }}\n\n'
    '{{ else if eq .Role "user" }}User: {{ .Content }}\n\nAssistant:'
    '{{ else if eq .Role "assistant" }} {{ .Content }}' + EOS_TOKEN
    + '{{ end }}'
    '{{ end }}'
)


def ollama_template(chat_template: str | None) -> str:
    """The Go template equal to `chat_template` (None: the base's, which must be DeepSeek-V2's).

    UsageError for a template we have no verified translation of."""
    if chat_template is not None and _normal(chat_template) != _normal(DEEPSEEK_V2):
        raise UsageError("--for ollama knows the DeepSeek-V2 chat template only, and this adapter was trained with "
                         "another one; export --for llama.cpp instead (llama.cpp applies the GGUF's own template)")
    return DEEPSEEK_V2_TEMPLATE


def _normal(template: str) -> str:
    return "".join(template.split())


def _quoted(text: str) -> str:
    """A Modelfile string: triple-quoted, which keeps newlines; a text holding \"\"\" cannot be written so."""
    if '"""' in text:
        raise UsageError('the system prompt contains """, which a Modelfile cannot quote; change the system prompt')
    return f'"""{text}"""'


def modelfile(gguf_name: str, *, template: str, system_prompt: str | None, stop: list[str],
              parameters: dict[str, float | int]) -> str:
    """The Modelfile text: FROM the GGUF next to it, TEMPLATE, SYSTEM, stop tokens and decoding parameters."""
    lines = [f"FROM ./{gguf_name}", "", f"TEMPLATE {_quoted(template)}", ""]
    if system_prompt:
        lines += [f"SYSTEM {_quoted(system_prompt)}", ""]
    lines += [f"PARAMETER stop {json.dumps(s, ensure_ascii=False)}" for s in stop]
    lines += [f"PARAMETER {k} {v}" for k, v in parameters.items()]
    return "\n".join(lines) + "\n"
