"""The Gradio A/B demo: one resident base model, any number of adapters, base and adapter answers side by side.

- `demo.engine`: the model server (one model, one inference thread, both answers in one batch, streaming).
- `demo.votes`: blind A/B votes in SQLite, win rates with Wilson intervals, preference-dataset export/push.
- `demo.app`: `build_demo(engine, ...)`, the `gr.Blocks` app (also the `compare` API endpoint).
- `demo.cli`: `persona-lora demo`.
"""
