"""`persona-lora push | pull | list`: the hub subcommands.

Each handler prints only its result on stdout (the URL, the local path, the ids) so that shell scripts can use
it; skipped files and notes go to stderr. User mistakes surface as persona_lora.errors types, which
persona_lora/cli.py prints as one line.

Extension point: `merge` (and `push --merged`) live in `hub_tools/merge_cli.py`, owned by the merge code. If
that module exists, `register` calls its `register_merge(subparsers)`; it may also define
`add_push_arguments(parser)` to add options to `push` (read them in its own code through `args`).
"""

from __future__ import annotations

import argparse
import importlib
import sys


def register(subparsers) -> None:
    push_parser = _register_push(subparsers)
    _register_pull(subparsers)
    _register_list(subparsers)
    try:
        merge_cli = importlib.import_module("persona_lora.hub_tools.merge_cli")
    except ModuleNotFoundError as e:
        if e.name != "persona_lora.hub_tools.merge_cli":
            raise
        return
    if hasattr(merge_cli, "add_push_arguments"):
        merge_cli.add_push_arguments(push_parser)
    if hasattr(merge_cli, "register_merge"):
        merge_cli.register_merge(subparsers)


# ---------------------------------------------------------------------------------------------- push
def _register_push(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "push",
        help="upload an adapter (or merged model) folder to a hub as one commit",
        description="Upload the adapter/model files of DIR to REPO_ID (created if missing) as one commit. "
        "Checkpoints, optimizer states, logs and pickled files are never pushed unless named with --include.",
    )
    p.add_argument("dir", metavar="DIR", help="the adapter folder (or merged model folder)")
    p.add_argument("repo_id", metavar="REPO_ID", help="owner/name (or name, for your own namespace)")
    _hub_option(p)
    p.add_argument("--private", action="store_true",
                   help="create the repo private (an existing repo keeps its visibility)")
    p.add_argument("--revision", metavar="BRANCH", help="commit to this branch (created from main if missing)")
    p.add_argument("--create-pr", action="store_true",
                   help="open a pull request against main instead of committing to it")
    p.add_argument("--message", "-m", metavar="MSG", help="commit message")
    p.add_argument("--include", metavar="PATTERN", action="append", default=[],
                   help="also push files matching PATTERN (relative path or name, e.g. 'notes/*.md'); repeatable")
    p.set_defaults(func=cmd_push)
    return p


def cmd_push(args) -> int:
    if getattr(args, "merged", False):  # `push --merged`, added by merge_cli
        return importlib.import_module("persona_lora.hub_tools.merge_cli").cmd_push_merged(args)
    from persona_lora.hub_tools.push import push_folder

    result = push_folder(
        args.dir, args.repo_id, hub=args.hub, private=args.private, revision=args.revision,
        create_pr=args.create_pr, message=args.message, include_extra=args.include or None,
    )
    if result.skipped:
        print(f"not pushed ({len(result.skipped)}):", file=sys.stderr)
        for rel, why in result.skipped:
            print(f"  {rel}: {why}", file=sys.stderr)
    print(f"pushed {len(result.pushed)} file(s): {', '.join(result.pushed)}", file=sys.stderr)
    print(result.url)
    return 0


# ---------------------------------------------------------------------------------------------- pull
def _register_pull(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "pull",
        help="download an adapter from a hub and verify it",
        description="Download the adapter/model files of REPO_ID (into the hub cache unless --local-dir), check "
        "them against the hub's hashes, refuse pickles, and with --base check the adapter fits that base.",
    )
    p.add_argument("repo_id", metavar="REPO_ID")
    p.add_argument("--revision", metavar="REV", help="branch, tag or commit (default: main)")
    _hub_option(p)
    p.add_argument("--base", metavar="BASE", help="a local base folder or hub id the adapter must fit")
    p.add_argument("--allow-pickle", action="store_true",
                   help="accept pickled files (*.bin, *.pt, …) in the repo; they run code when loaded")
    p.add_argument("--local-dir", metavar="DIR", help="download into DIR instead of the hub cache")
    p.set_defaults(func=cmd_pull)
    return p


def cmd_pull(args) -> int:
    from persona_lora.hub_tools.pull import pull

    path = pull(args.repo_id, hub=args.hub, revision=args.revision, base=args.base,
                allow_pickle=args.allow_pickle, local_dir=args.local_dir)
    print(path)
    return 0


# ---------------------------------------------------------------------------------------------- list
def _register_list(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "list",
        help="list the adapters published for a base model",
        description="List Hub repos tagged base_model:adapter:BASE_ID (set by the card's base_model field).",
    )
    p.add_argument("--base", metavar="BASE_ID", required=True, help="the base model's hub id")
    _hub_option(p)
    p.set_defaults(func=cmd_list)
    return p


def cmd_list(args) -> int:
    from persona_lora.hub_tools.pull import list_adapters

    ids = list_adapters(args.base, hub=args.hub)
    for repo_id in ids:
        print(repo_id)
    if not ids:
        print(f"no adapters found for {args.base}", file=sys.stderr)
    return 0


def _hub_option(p) -> None:
    p.add_argument("--hub", choices=("hf", "modelscope"), default="hf",
                   help="hf = Hugging Face (HF_TOKEN, HF_ENDPOINT); modelscope = ModelScope "
                   "(MODELSCOPE_API_TOKEN, MODELSCOPE_DOMAIN)")
