"""The one `persona-lora` command.

Each package registers its own subcommands through a `register(subparsers)` function listed in
`SUBCOMMAND_MODULES`; a module that is not written yet is simply absent. `main(argv) -> int` is what tests
call; `run()` is the console entry point. User mistakes (`PersonaLoraError`) become one message on stderr
and an exit code; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from persona_lora import __version__
from persona_lora.errors import PersonaLoraError

# Modules that add subcommands, in help order. Each defines `register(subparsers) -> None`, and each
# subparser sets `func=callable(args) -> int`.
SUBCOMMAND_MODULES = [
    "persona_lora.train.tiny_base_cli",
    "persona_lora.train.data_cli",
    "persona_lora.train.train_cli",
    "persona_lora.model_cards.cli",
    "persona_lora.hub_tools.cli",
    "persona_lora.demo.cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="persona-lora",
        description="LoRA-fine-tune chat LLMs into personas, write their cards, move them to and from hubs, demo them.",
    )
    parser.add_argument("--version", action="version", version=f"persona-lora {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # not written yet
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return int(args.func(args) or 0)
    except PersonaLoraError as e:
        print(f"persona-lora {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"persona-lora {args.command}: interrupted", file=sys.stderr)
        return 130


def run() -> None:
    sys.exit(main())
