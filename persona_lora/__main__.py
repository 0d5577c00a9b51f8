"""`python -m persona_lora` is the same as the `persona-lora` console command."""

from persona_lora.cli import run

run()
