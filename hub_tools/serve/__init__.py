"""`persona-lora serve`: vLLM or SGLang started with the base and every adapter loaded as trained.

- `run`: the plan (exports, names, the flags every adapter needs, refusals) from configs and tensor headers alone,
  the exports, the engine started from its own Python, the matching `persona-lora demo --backend openai` line;
- `cli`: the command.
"""
