"""The one `persona-lora` command: a table of subcommands, each mapped to the module that implements it.

`COMMANDS` is the whole command line: every subcommand is found by reading that one list. Each CLI module follows
one convention: `configure_<command>(parser)` adds the options, `run_<command>(args) -> int` runs it. The CLI
modules import only argparse-level code, so building the parser stays fast; the work is imported by the
handlers. `main(argv) -> int` is what tests call; `run()` is the console entry point. User mistakes
(`PersonaLoraError`) become one message on stderr and an exit code, as does a file-system refusal (`OSError`,
naming the path); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

INTERRUPTED_EXIT = 130

# A Ctrl-C while the command modules load (the first second of any command) is the user stopping it, not a bug: one
# line and exit 130, as during the command itself, instead of a traceback from the middle of an import.
try:
    from persona_lora import __version__
    from persona_lora.demo import cli as demo_cli
    from persona_lora.errors import PersonaLoraError
    from persona_lora.evaluation import cli as eval_cli
    from persona_lora.hub_tools import cli as hub_cli
    from persona_lora.hub_tools.export import cli as export_cli
    from persona_lora.hub_tools.merge import cli as merge_cli
    from persona_lora.hub_tools.serve import cli as serve_cli
    from persona_lora.hub_tools.space import cli as space_cli
    from persona_lora.model_cards import cli as card_cli
    from persona_lora.progress import set_invocation
    from persona_lora.train import cli as train_cli
    from persona_lora.train.data import cli as data_cli
    from persona_lora.train.reproduce import cli as reproduce_cli
except KeyboardInterrupt:
    print("persona-lora: interrupted", file=sys.stderr)
    raise SystemExit(INTERRUPTED_EXIT) from None


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS = (
    Command("tiny-base", "build a toy base model with the real DeepSeek-V2 architecture and checkpoint layout",
            train_cli.configure_tiny_base, train_cli.run_tiny_base),
    Command("data", "validate and preview datasets", data_cli.configure_data, data_cli.run_data),
    Command("train", "train a LoRA adapter from a YAML config", train_cli.configure_train, train_cli.run_train),
    Command("reproduce", "train an adapter again from its manifest alone and show whether it comes out the same",
            reproduce_cli.configure_reproduce, reproduce_cli.run_reproduce),
    Command("eval", "compare the base and adapters over a prompt set: losses, answers, forgetting guard, judge; "
            "report.json + report.html", eval_cli.configure_eval, eval_cli.run_eval),
    Command("leaderboard", "rate the models arena and A/B votes compared: Bradley-Terry with bootstrap intervals; "
            "leaderboard.json + .html + plots", eval_cli.configure_leaderboard, eval_cli.run_leaderboard),
    Command("card", "regenerate the model card (README.md) of an adapter or merged-model folder",
            card_cli.configure_card, card_cli.run_card),
    Command("push", "upload an adapter (or merged model) folder to a hub as one commit",
            hub_cli.configure_push, hub_cli.run_push),
    Command("pull", "download an adapter from a hub and verify it", hub_cli.configure_pull, hub_cli.run_pull),
    Command("list", "list the adapters published for a base model", hub_cli.configure_list, hub_cli.run_list),
    Command("merge", "merge an adapter into its base model's weights (shard by shard)",
            merge_cli.configure_merge, merge_cli.run_merge),
    Command("export", "write an adapter in the layout vLLM or SGLang serves, with the command that serves it",
            export_cli.configure_export, export_cli.run_export),
    Command("upgrade-adapter", "rewrite an adapter's config in the portable spelling stock PEFT loads as trained",
            hub_cli.configure_upgrade_adapter, hub_cli.run_upgrade_adapter),
    Command("demo", "chat with a base model and its adapters side by side (in this process or on a serving "
            "engine's OpenAI-compatible API); blind A/B votes", demo_cli.configure_demo, demo_cli.run_demo),
    Command("serve", "start vLLM or SGLang with the base and adapters loaded (flags computed), and print the demo "
            "line for it", serve_cli.configure_serve, serve_cli.run_serve),
    Command("space", "publish the A/B demo as a Hugging Face Space (same app, votes and compare API) in one commit",
            space_cli.configure_space, space_cli.run_space),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="persona-lora",
        description="LoRA-fine-tune chat LLMs into personas, write their cards, move them to and from hubs, "
        "demo them.",
    )
    parser.add_argument("--version", action="version", version=f"persona-lora {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        p = sub.add_parser(command.name, help=command.help, description=command.help[:1].upper() + command.help[1:])
        command.configure(p)
        p.set_defaults(run=command.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
    except KeyboardInterrupt:
        print("persona-lora: interrupted", file=sys.stderr)
        return INTERRUPTED_EXIT
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    try:
        set_invocation(argv if argv is not None else sys.argv[1:])  # for the commands that print how to continue
        level = logging.WARNING - 10 * min(args.verbose, 2)
        logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        return int(args.run(args) or 0)
    except PersonaLoraError as e:
        print(f"persona-lora {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"persona-lora {args.command}: interrupted", file=sys.stderr)
        return INTERRUPTED_EXIT
    except OSError as e:  # a file system refusal no check foresaw: name the path and what the system said
        where = f" {e.filename}" if e.filename else ""
        print(f"persona-lora {args.command}: error:{where}: {e.strerror or e}; check that the path exists, is "
              "writable and the disk has room", file=sys.stderr)
        return 1


def run() -> None:
    sys.exit(main())
