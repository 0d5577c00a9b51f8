"""`persona-lora merge` and `persona-lora push --merged`.

hub_tools/cli.py imports this module when it exists: `register_merge(subparsers)` adds `merge`,
`add_push_arguments(push_parser)` adds the `--merged` options to `push`, and `cmd_push` hands `--merged` pushes to
`cmd_push_merged`. Why a push that merges: publishing a merged model is "merge, push, delete the 30 GB folder";
one command does the three and cannot push a half-written folder (the merge only appears once complete).
"""

from __future__ import annotations

import argparse
import logging
import re
import shutil
import sys
import tempfile
from pathlib import Path

from persona_lora.errors import HubError, UsageError

log = logging.getLogger(__name__)

DTYPE_CHOICES = ("float32", "bfloat16", "float16")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _merge_options(p, *, for_push: bool) -> None:
    g = p.add_argument_group("merge" if not for_push else "merge before pushing (--merged)")
    if for_push:
        g.add_argument("--merged", action="store_true",
                       help="DIR is an adapter: merge it into --base and push the merged model instead")
        g.add_argument("--base", metavar="BASE", help="(with --merged) the base model folder or hub id to merge into")
        g.add_argument("--merge-dir", metavar="DIR",
                       help="(with --merged) keep the merged model in DIR (default: a temporary folder, deleted after the push)")
    g.add_argument("--dtype", choices=DTYPE_CHOICES, help="dtype of the merged weights (default: the base's)")
    g.add_argument("--max-shard-size", metavar="SIZE",
                   help="re-shard the output, e.g. 2GB (default: keep the base's shard files and index)")
    g.add_argument("--force", action="store_true",
                   help="merge even if the base's config.json differs from the one the adapter was trained on")
    g.add_argument("--base-revision", metavar="REV", help="revision of a hub --base")
    g.add_argument("--base-source", choices=("auto", "local", "hf", "modelscope"), default="auto",
                   help="where --base lives (default: a folder if it exists, else the Hugging Face Hub)")


def register_merge(subparsers) -> None:
    p = subparsers.add_parser(
        "merge",
        help="merge an adapter into its base model's weights (shard by shard)",
        description="Write a standalone model: the base's weights plus the adapter's LoRA deltas, shard by shard "
        "(memory: about one tensor block plus the adapter), in the base's own checkpoint layout (per-expert keys, "
        "same shard names and index), with config, tokenizer, manifest and model card. Then `persona-lora push "
        "OUT REPO_ID` publishes it, or use `persona-lora push ADAPTER REPO_ID --merged --base BASE`.",
    )
    p.add_argument("adapter", metavar="ADAPTER", help="adapter folder, or a hub repo id (pulled and verified first)")
    p.add_argument("--base", metavar="BASE", required=True, help="base model folder or hub id the adapter was trained on")
    p.add_argument("--out", metavar="DIR", required=True, help="folder to write the merged model to (new or empty)")
    p.add_argument("--overwrite", action="store_true", help="replace a model folder already in --out")
    p.add_argument("--hub", choices=("hf", "modelscope"), default="hf", help="hub of a hub-id ADAPTER (default hf)")
    p.add_argument("--revision", metavar="REV", help="revision of a hub-id ADAPTER")
    _merge_options(p, for_push=False)
    p.set_defaults(func=cmd_merge)


_MERGE_ONLY = ("base", "merge_dir", "dtype", "max_shard_size", "force", "base_revision")


def add_push_arguments(push_parser) -> None:
    _merge_options(push_parser, for_push=True)
    push_parser.set_defaults(func=_push_entry)


def _push_entry(args) -> int:
    """`push`, refusing merge options without --merged (they would be silently ignored otherwise)."""
    from persona_lora.hub_tools import cli

    given = [n for n in _MERGE_ONLY if getattr(args, n, None)]
    if given and not args.merged:
        flags = ", ".join("--" + n.replace("_", "-") for n in given)
        raise UsageError(f"push: {flags} only apply with --merged (merge DIR into --base, then push the merged model)")
    return cli.cmd_push(args)


def resolve_adapter(adapter: str, *, hub: str = "hf", revision: str | None = None) -> tuple[Path, str | None]:
    """(local folder, hub id or None): a folder is used as it is, a hub id is pulled (and verified) first."""
    local = Path(adapter).expanduser()
    if local.is_dir():
        return local, None
    if _HUB_ID.match(adapter) and not adapter.startswith((".", "~")):
        from persona_lora.hub_tools.pull import pull

        try:
            return Path(pull(adapter, hub=hub, revision=revision)), adapter
        except HubError as e:
            raise HubError(f"{e} (ADAPTER {adapter} was tried as a hub id: there is no local folder of that name)") from e
    raise UsageError(f"ADAPTER {adapter}: no such folder, and it is not a hub id (owner/name)")


def cmd_merge(args) -> int:
    from persona_lora.hub_tools.merge import merge_adapter

    folder, hub_id = resolve_adapter(args.adapter, hub=args.hub, revision=args.revision)
    out = merge_adapter(
        folder, args.base, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size, overwrite=args.overwrite,
        force=args.force, base_revision=args.base_revision, base_source=args.base_source, adapter_id=hub_id,
    )
    print(out)
    return 0


def cmd_push_merged(args) -> int:
    """Merge DIR (an adapter) into --base, then push the merged folder with the ordinary push."""
    from persona_lora.hub_tools import cli
    from persona_lora.hub_tools.merge import merge_adapter

    if not args.base:
        raise UsageError("push --merged needs --base BASE (the model to merge the adapter into)")
    adapter = Path(args.dir).expanduser()
    if not (adapter / "adapter_config.json").is_file():
        raise UsageError(f"push --merged: {adapter} is not an adapter folder (no adapter_config.json); "
                         "to push a model folder that is already merged, drop --merged")
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
        return cli.cmd_push(argparse.Namespace(**{**vars(args), "dir": str(out), "merged": False}))
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
