"""`persona-lora space REPO_ID --base BASE --adapter DIR_OR_ID…`: the A/B demo as a Hugging Face Space.

Prints only the result on stdout (the Space's URL, or the folder written with `--dry-run`); what was checked and
chosen goes to stderr. The work is in `plan` (plan, folder), `push` (one commit) and `app` (what
the Space runs).
"""

from __future__ import annotations

import argparse
import sys


def configure_space(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Write a Hugging Face Space that serves `persona-lora demo` for BASE and the adapters (same page, blind "
        "votes and compare API), and push it as one commit. Everything is checked before anything is written: "
        "the token, the Space name, the base's size against the hardware, each adapter against the base.")
    p.add_argument("repo_id", metavar="REPO_ID", help="the Space: owner/name (or name, for your own namespace)")
    p.add_argument("--base", required=True, metavar="BASE",
                   help="base model: hub id (referenced), or a local folder with --include-base")
    p.add_argument("--revision", metavar="REV", help="revision of a hub base")
    p.add_argument("--adapter", action="append", default=[], required=True, metavar="DIR_OR_ID",
                   help="an adapter folder (uploaded into the Space, or pushed as its own repo with "
                        "--push-adapters) or a hub id owner/name[@revision] (referenced); repeat for several")
    p.add_argument("--hardware", metavar="NAME",
                   help="request this hardware (e.g. cpu-basic, t4-small, l40sx1, a100-large; paid flavours need "
                        "billing on the account). Default: only suggest one in the card, chosen from the base's size")
    p.add_argument("--zerogpu", action="store_true",
                   help="run on ZeroGPU: each request is decoded inside spaces.GPU (hardware zero-a10g)")
    p.add_argument("--gpu-duration", type=int, default=60, metavar="SECONDS",
                   help="--zerogpu: longest GPU time one request may take (default 60)")
    p.add_argument("--private", action="store_true", help="create the Space (and pushed adapters) private")
    p.add_argument("--votes-dataset", metavar="REPO_ID",
                   help="commit the votes to this dataset repo (created private) on a schedule; the Space gets your "
                        "token as the secret HF_TOKEN for it")
    p.add_argument("--votes-every", type=float, default=5.0, metavar="MINUTES",
                   help="minutes between two commits of the votes (default 5)")
    p.add_argument("--include-base", action="store_true",
                   help="upload a local --base folder into the Space (refused above 2 GiB)")
    p.add_argument("--push-adapters", action="store_true",
                   help="push local adapters as their own model repos OWNER/FOLDER_NAME first and reference them")
    p.add_argument("--dry-run", metavar="DIR",
                   help="write the Space folder into DIR (new or empty) and push nothing; `cd DIR && python app.py` "
                        "runs it")
    p.add_argument("--title", help="the Space's title (default: from the first adapter)")
    p.add_argument("--short-description", metavar="TEXT", help="one line, at most 60 characters")
    p.add_argument("--license", metavar="ID", help="licence id (default: the first adapter card's, else 'other')")
    p.add_argument("--max-new-tokens", type=int, default=256, metavar="N",
                   help="the page's cap on new tokens per answer (default 256)")
    p.add_argument("--wheel", metavar="FILE",
                   help="ship this persona_lora-*.whl instead of building one from the source checkout")
    p.add_argument("--overwrite", action="store_true",
                   help="push into an existing Space that persona-lora did not write (its app is replaced)")
    p.add_argument("--message", "-m", metavar="MSG", help="commit message")


def run_space(args: argparse.Namespace) -> int:
    from persona_lora.errors import UsageError
    from persona_lora.hub_tools.space.plan import plan_space, write_space

    if args.dry_run and (args.push_adapters or args.overwrite):
        raise UsageError("--push-adapters and --overwrite act on the Hub; --dry-run pushes nothing: drop one")
    if args.dry_run:  # an occupied or unwritable folder is refused before the adapters are resolved
        from persona_lora.output_folder import check_target

        check_target(args.dry_run, option="--dry-run", occupied_hint="give a new or empty folder")
    plan = plan_space(
        args.repo_id, base=args.base, adapters=args.adapter, base_revision=args.revision, hardware=args.hardware,
        zerogpu=args.zerogpu, gpu_duration=args.gpu_duration, private=args.private,
        votes_dataset=args.votes_dataset, votes_every=args.votes_every, include_base=args.include_base,
        title=args.title, short_description=args.short_description, license=args.license,
        max_new_tokens=args.max_new_tokens, wheel=args.wheel)
    size = f"{plan.base_params / 1e6:,.1f}M parameters" if plan.base_params else "size unknown"
    chosen = "requested" if plan.hardware_given else "suggested in the card"
    print(f"base {plan.base} ({size}); hardware {plan.hardware} ({chosen}); adapters: "
          f"{', '.join(a.in_space for a in plan.adapters)}", file=sys.stderr)
    if args.dry_run:
        files = write_space(plan, args.dry_run)
        print(f"wrote {len(files)} files; nothing was pushed. Run it: cd {args.dry_run} && python app.py",
              file=sys.stderr)
        print(args.dry_run)
        return 0
    from persona_lora.hub_tools.space.push import push_space

    result = push_space(plan, push_adapters=args.push_adapters, overwrite=args.overwrite, message=args.message)
    what = "created" if result.created else "updated"
    print(f"{what} {result.repo_id}: commit {result.commit}, {len(result.files)} files"
          + (f", {len(result.deleted)} old files removed" if result.deleted else "")
          + (f"; secret {'HF_TOKEN'} set" if result.secret_set else "")
          + (f"; hardware {result.hardware_requested} requested" if result.hardware_requested else ""),
          file=sys.stderr)
    print(result.url)
    return 0
