"""`persona-lora export`: an adapter written in the layout and config a serving engine loads as trained.

- `run`: `export_adapter`: checks, the per-engine layout, the refusals (what an engine would silently drop);
- `layout`: per-expert LoRA tensors from PEFT's fused expert LoRA;
- `card`: the export folder's README with the command that serves it;
- `cli`: the command.
What each engine reads is the shared engine table (`persona_lora.engines`), which the model card also shows.
"""
