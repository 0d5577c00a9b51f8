"""persona-lora: the shared base every stage imports (the adapter-folder contract, the chat format, presets,
model loading, hubs, datasets, the vote store, PEFT compatibility) and the CLI roof (`cli`) that maps each
command to its stage. Nothing here imports a stage; see docs/ARCHITECTURE.md."""

__version__ = "0.1.0"
