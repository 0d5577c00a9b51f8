"""`persona-lora push | pull | list`: the hub subcommands.

Each handler prints only its result on stdout (the URL, the local path, the ids) so that shell scripts can use
it; skipped files and notes go to stderr. `push --merged` merges first (options from `merge.cli`) and pushes
the merged folder with the same code as a plain push.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from persona_lora.errors import UsageError
from persona_lora.hub_ids import SOURCES, add_hub_option
from persona_lora.hub_tools.merge import cli as merge_cli


def configure_push(p: argparse.ArgumentParser) -> None:
    p.description = ("Upload the adapter/model files of DIR to REPO_ID (created if missing) as one commit. "
                     "Checkpoints, optimizer states, logs and pickled files are never pushed unless named with "
                     "--include. A GGUF export (`export --for llama.cpp|ollama`) goes to a repo of its own "
                     "(OWNER/NAME-GGUF), or into its adapter's repo under gguf/ with the card's \"Run it locally\" "
                     "section filled in (the rest of the card is kept).")
    p.add_argument("dir", metavar="DIR", help="the adapter folder (or merged model folder, or GGUF export folder)")
    p.add_argument("repo_id", metavar="REPO_ID", help="owner/name (or name, for your own namespace)")
    add_hub_option(p)
    p.add_argument("--private", action="store_true",
                   help="create the repo private (an existing repo keeps its visibility)")
    p.add_argument("--revision", metavar="BRANCH", help="commit to this branch (created from main if missing)")
    p.add_argument("--create-pr", action="store_true",
                   help="open a pull request against main instead of committing to it")
    p.add_argument("--message", "-m", metavar="MSG", help="commit message")
    p.add_argument("--include", metavar="PATTERN", action="append", default=[],
                   help="also push files matching PATTERN (relative path or name, e.g. 'notes/*.md'); repeatable")
    p.add_argument("--legacy", action="store_true",
                   help="push an adapter whose config is in persona-lora's legacy spelling as it is (stock PEFT "
                        "loads it onto the wrong weights; `persona-lora upgrade-adapter` fixes it)")
    p.add_argument("--allow-interrupted", action="store_true",
                   help="push the adapter of a training run that was interrupted (its card says so)")
    merge_cli.add_merge_options(p, for_push=True)


def run_push(args: argparse.Namespace) -> int:
    given = merge_cli.merge_only_flags(args)
    if given and not args.merged:
        raise UsageError(f"push: {', '.join(given)} only apply with --merged (merge DIR into --base, then push the "
                         "merged model)")
    if args.merged:
        with merge_cli.merged_for_push(args) as folder:
            return _push(args, folder)
    return _push(args, Path(args.dir))


def _push(args: argparse.Namespace, folder: Path) -> int:
    from persona_lora.hub_tools.push import push_folder

    result = push_folder(folder, args.repo_id, hub=args.hub, private=args.private, revision=args.revision,
                         create_pr=args.create_pr, message=args.message, include_extra=args.include or None,
                         legacy=args.legacy, allow_interrupted=args.allow_interrupted)
    if result.skipped:
        print(f"not pushed ({len(result.skipped)}):", file=sys.stderr)
        for rel, why in result.skipped:
            print(f"  {rel}: {why}", file=sys.stderr)
    print(f"pushed {len(result.pushed)} file(s): {', '.join(result.pushed)}", file=sys.stderr)
    print(result.url)
    return 0


def configure_pull(p: argparse.ArgumentParser) -> None:
    p.description = ("Download the adapter/model files of REPO_ID (into the hub cache unless --local-dir), check "
                     "them against the hub's hashes, refuse pickles, and with --base check the adapter fits that "
                     "base.")
    p.add_argument("repo_id", metavar="REPO_ID")
    p.add_argument("--revision", metavar="REV", help="branch, tag or commit (default: main)")
    add_hub_option(p)
    p.add_argument("--base", metavar="BASE", help="a local base folder or hub id the adapter must fit")
    p.add_argument("--allow-pickle", action="store_true",
                   help="accept pickled files (*.bin, *.pt, …) in the repo; they run code when loaded")
    p.add_argument("--local-dir", metavar="DIR", help="download into DIR instead of the hub cache")
    p.add_argument("--force", action="store_true", help="let --local-dir files of the same names be replaced")


def run_pull(args: argparse.Namespace) -> int:
    from persona_lora.hubs.pull import pull

    print(pull(args.repo_id, hub=args.hub, revision=args.revision, base=args.base, allow_pickle=args.allow_pickle,
               local_dir=args.local_dir, force=args.force))
    return 0


def configure_list(p: argparse.ArgumentParser) -> None:
    p.description = ("List the Hub's adapters of a base: for a hub id, repos tagged base_model:adapter:BASE (the "
                     "card's base_model); for a local base folder, the cards persona-lora tagged with that base's "
                     "config.json hash.")
    p.add_argument("--base", metavar="BASE", required=True, help="the base model's hub id or local folder")
    add_hub_option(p)


def run_list(args: argparse.Namespace) -> int:
    from persona_lora.hubs.pull import list_adapters

    ids = list_adapters(args.base, hub=args.hub)
    for repo_id in ids:
        print(repo_id)
    if not ids:
        print(f"no adapters found for {args.base}", file=sys.stderr)
    return 0


def configure_upgrade_adapter(p: argparse.ArgumentParser) -> None:
    from persona_lora.hub_tools.upgrade import LEGACY_BACKUP

    p.description = ("Rewrite an adapter's adapter_config.json from persona-lora's legacy spelling (MLP layers of a "
                     "MoE model named in target_modules, which PEFT re-targets onto the fused experts) into the "
                     "portable one that stock PEFT, transformers and `persona-lora export` read as trained. The "
                     f"tensors do not change; the old config is kept as {LEGACY_BACKUP} and the card is rewritten.")
    p.add_argument("adapter_dir", metavar="ADAPTER_DIR", help="the adapter folder")
    p.add_argument("--base", metavar="BASE",
                   help="the base model folder or hub id (default: the one the manifest records; only its "
                        "config.json is read)")
    p.add_argument("--base-source", choices=SOURCES, default="auto", help="where --base lives")


def run_upgrade_adapter(args: argparse.Namespace) -> int:
    from persona_lora.hub_tools.upgrade import upgrade_adapter

    changed = upgrade_adapter(args.adapter_dir, base=args.base, base_source=args.base_source)
    print(f"{args.adapter_dir}: {'rewritten in the portable spelling' if changed else 'already portable'}")
    return 0
