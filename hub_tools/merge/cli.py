"""`persona-lora merge`, and the merge half of `persona-lora push --merged`.

Why a push that merges: publishing a merged model is "merge, push, delete the big folder"; one command does the
three and cannot push a half-written folder (a merge only appears under its name once complete).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import shutil
import sys
import tempfile
from pathlib import Path

from persona_lora.artifact import require_adapter_files
from persona_lora.dtypes import WEIGHT_DTYPES
from persona_lora.errors import ModelLoadError, UsageError
from persona_lora.hub_ids import SOURCES, add_hub_option

log = logging.getLogger(__name__)

_MERGE_ONLY = ("base", "merge_dir", "dtype", "max_shard_size", "force", "base_revision")


def add_merge_options(p: argparse.ArgumentParser, *, for_push: bool) -> None:
    g = p.add_argument_group("merge" if not for_push else "merge before pushing (--merged)")
    if for_push:
        g.add_argument("--merged", action="store_true",
                       help="DIR is an adapter: merge it into --base and push the merged model instead")
        g.add_argument("--base", metavar="BASE", help="(with --merged) the base model folder or hub id to merge into")
        g.add_argument("--merge-dir", metavar="DIR",
                       help="(with --merged) keep the merged model in DIR (default: a temporary folder, deleted "
                            "after the push)")
    g.add_argument("--dtype", choices=WEIGHT_DTYPES, help="dtype of the merged weights (default: the base's)")
    g.add_argument("--max-shard-size", metavar="SIZE",
                   help="re-shard the output, e.g. 2GB (default: keep the base's shard files and index)")
    g.add_argument("--force", action="store_true",
                   help="merge even if the base's config.json differs from the one the adapter was trained on")
    g.add_argument("--base-revision", metavar="REV", help="revision of a hub --base")
    g.add_argument("--base-source", choices=SOURCES, default="auto",
                   help="where --base lives (default: a folder if it exists, else the Hugging Face Hub)")


def merge_only_flags(args: argparse.Namespace) -> list[str]:
    """The merge options given on a `push` command line (they only mean something with --merged)."""
    return ["--" + n.replace("_", "-") for n in _MERGE_ONLY if getattr(args, n, None)]


def configure_merge(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Write a standalone model: the base's weights plus the adapter's LoRA deltas, shard by shard (memory: about "
        "one tensor block plus the adapter), in the base's own checkpoint layout (per-expert keys, same shard names "
        "and index), with config, tokenizer, manifest and model card. Then `persona-lora push OUT REPO_ID` "
        "publishes it, or use `persona-lora push ADAPTER REPO_ID --merged --base BASE`.")
    p.add_argument("adapter", metavar="ADAPTER", help="adapter folder, or a hub repo id (pulled and verified first)")
    p.add_argument("--base", metavar="BASE", required=True,
                   help="base model folder or hub id the adapter was trained on")
    p.add_argument("--out", metavar="DIR", required=True, help="folder to write the merged model to (new or empty)")
    p.add_argument("--overwrite", action="store_true", help="replace a merged model already in --out (one that "
                   "persona-lora merge wrote), once the new one is complete")
    add_hub_option(p, help_prefix="hub of a hub-id ADAPTER: ")
    p.add_argument("--revision", metavar="REV", help="revision of a hub-id ADAPTER")
    add_merge_options(p, for_push=False)


def run_merge(args: argparse.Namespace) -> int:
    from persona_lora.hub_tools.merge.run import merge_adapter
    from persona_lora.hubs.pull import local_or_pulled

    folder, ref, _ = local_or_pulled(args.adapter, hub=args.hub, revision=args.revision)
    print(merge_adapter(
        folder, args.base, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size, overwrite=args.overwrite,
        force=args.force, base_revision=args.base_revision, base_source=args.base_source,
        adapter_id=ref.repo_id if ref else None,
    ))
    return 0


@contextlib.contextmanager
def merged_for_push(args: argparse.Namespace):
    """Merge DIR (an adapter) into --base; yield the merged folder, deleted afterwards unless --merge-dir."""
    from persona_lora.hub_tools.merge.run import merge_adapter

    if not args.base:
        raise UsageError("push --merged needs --base BASE (the model to merge the adapter into)")
    try:
        adapter = require_adapter_files(Path(args.dir).expanduser())
    except ModelLoadError as e:
        raise UsageError(f"push --merged: {e}; to push a model folder that is already merged, drop --merged") from e
    name = args.repo_id.rstrip("/").split("/")[-1]
    work = Path(tempfile.mkdtemp(prefix="persona-lora-merge-")) if not args.merge_dir else None
    out = Path(args.merge_dir) if args.merge_dir else work / name
    try:
        merge_adapter(
            adapter, args.base, out, dtype=args.dtype, max_shard_size=args.max_shard_size, force=args.force,
            base_revision=args.base_revision, base_source=args.base_source, name=name,
            card_repo_id=args.repo_id if "/" in args.repo_id else None,
        )
        print(f"merged into {out}", file=sys.stderr)
        yield out
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
