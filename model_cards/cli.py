"""`persona-lora card ADAPTER_DIR`: (re)write the folder's README.md model card from its manifest.

Training writes the card already; this command exists for regeneration (after editing the user section, after a
pull, after upgrading persona-lora) and is what `push` relies on to publish a card that matches the folder.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from persona_lora.errors import UsageError

log = logging.getLogger(__name__)


def configure_card(p: argparse.ArgumentParser) -> None:
    p.description = ("Write README.md (Hub metadata + card) and the loss curve PNG from the folder's "
                     "persona_manifest.json and adapter_config.json. Text between the persona-lora user-section "
                     "markers of an existing README.md is kept.")
    p.add_argument("adapter_dir", type=Path, metavar="ADAPTER_DIR", help="adapter (or merged model) folder")
    p.add_argument("--repo-id", default=None, metavar="OWNER/NAME",
                   help="Hub repo id to show in the usage snippet (default: the folder's manifest name)")
    p.add_argument("--eval", type=Path, default=None, metavar="DIR", dest="eval_dir",
                   help="the --out folder of `persona-lora eval` run on this adapter: adds an Evaluation section "
                        "(summary table, set, prompts, decoding) and the Hub's model-index with the held-out loss. "
                        "Give it again on every regeneration to keep the section")
    p.add_argument("--gguf", type=Path, action="append", default=[], metavar="DIR", dest="gguf_dirs",
                   help="a GGUF export of this adapter (the --out folder of `persona-lora export --for llama.cpp|"
                        "ollama`; repeatable): adds the \"Run it locally\" section with its Ollama and llama.cpp "
                        "commands, naming the hub repo it was pushed to or else the export folder. Checked: the "
                        "files are there and were merged from this adapter. Give it again on every regeneration")


def run_card(args: argparse.Namespace) -> int:
    from persona_lora.model_cards.cards import write_card

    if args.repo_id is not None and not args.repo_id.strip():
        raise UsageError("--repo-id is empty: give the Hub repo id (owner/name) or leave the option out.")
    path = write_card(args.adapter_dir, repo_id=args.repo_id, eval_dir=args.eval_dir, gguf_dirs=args.gguf_dirs)
    print(path)
    return 0
