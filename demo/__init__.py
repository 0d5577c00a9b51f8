"""The Gradio A/B demo: one resident base model, any number of adapters, base and adapter answers side by side.

- `engine`: `Engine`, the facade the app, CLI, tests and benchmarks use; it wires together
  `registry` (which adapters, from where, with which template and system prompt), the shared base's
  `persona_lora.resident` (the one model), `prompts` (the one formatting path, per template), `decode` (rows,
  batches, sampling) and `worker` (the one inference thread). Votes go to the shared vote store
  (`persona_lora.votes`), which the preference trainer and evaluation read too.
- `backend`: `DemoBackend`, what the page needs from whatever answers (the engine above, or a serving engine).
- `openai_backend`: `OpenAIBackend`, both sides answered by vLLM or SGLang through their OpenAI-compatible API,
  two concurrent streamed requests per turn, for demos shared with many people.
- `app`: `build_demo(engine, ...)`, the `gr.Blocks` app (also the `compare` API endpoint).
- `cli`: `persona-lora demo` (`--backend local|openai`).
"""
