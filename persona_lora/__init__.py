"""persona-lora: the CLI and the small pieces every module shares (errors, logging)."""

__version__ = "0.1.0"
