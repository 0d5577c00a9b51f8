"""Training side of persona-lora: data, the one chat-formatting path, LoRA presets, the trainer, the tiny base."""
