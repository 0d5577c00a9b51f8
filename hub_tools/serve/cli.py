"""`persona-lora serve`: a serving engine (vLLM or SGLang) with the base and adapters loaded, and the matching demo.

Why a command of its own: `export` makes one adapter servable; a shared demo needs the engine started with every
adapter at once and flags that agree with all of them. `--dry-run` prints the command (and writes nothing), so
it can be run by hand on the machine that has the engine.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from persona_lora.hub_ids import add_hub_option
from persona_lora.hub_tools.export.cli import ENGINE_CHOICES


def configure_serve(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Export each adapter for the engine, compute the engine's flags (--enable-lora, the smallest --max-lora-rank "
        "vLLM accepts for every adapter's ranks, --max-loras, --lora-modules / --lora-paths, "
        "--lora-strict-loading on SGLang, --served-model-name), then print the command (--dry-run) or start it "
        "with the engine's own Python (--engine-python) and print the `persona-lora demo --backend openai` line "
        "that compares the base with every adapter on it.")
    p.add_argument("--base", required=True, metavar="BASE", help="base model: local folder or hub id")
    p.add_argument("--adapter", action="append", required=True, metavar="DIR_OR_ID",
                   help="adapter folder or hub id (owner/name[@revision], pulled and verified); repeat for several")
    p.add_argument("--engine", choices=ENGINE_CHOICES, required=True, help="the serving engine")
    p.add_argument("--engine-python", metavar="PATH",
                   help="the Python of the engine's own environment (it pins other torch/transformers versions "
                        "than persona-lora); required unless --dry-run")
    p.add_argument("--host", default="127.0.0.1", help="address the engine listens on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None,
                   help="port (default: the engine's own, 8000 for vLLM, 30000 for SGLang)")
    p.add_argument("--served-model-name", metavar="NAME",
                   help="the base's name in requests (default: the base folder's name or the hub id)")
    p.add_argument("--export-dir", metavar="DIR",
                   help="where the exports go (default: persona-lora/serve in $XDG_CACHE_HOME, ~/.cache when unset); "
                        "an export made before from the same files is reused")
    p.add_argument("--allow-dropped-kv-b", action="store_true",
                   help="(vllm) serve adapters with LoRA on kv_b_proj anyway, without those tensors (vLLM would "
                        "not apply them; see `persona-lora export --help`)")
    p.add_argument("--dry-run", action="store_true", help="print the engine command and the demo line; write nothing")
    add_hub_option(p, help_prefix="hub of hub-id adapters: ")
    p.add_argument("--revision", metavar="REV", help="revision of hub-id adapters")


def run_serve(args: argparse.Namespace) -> int:
    from persona_lora.errors import UsageError
    from persona_lora.hub_tools.serve import run as serve

    if not args.dry_run and not args.engine_python:
        raise UsageError("--engine-python PATH is needed to start the engine (the Python of its own environment); "
                         "or pass --dry-run to print the command")
    plan = serve.plan_serve(args.base, args.adapter, args.engine, host=args.host, port=args.port,
                            export_dir=args.export_dir, served_name=args.served_model_name,
                            allow_dropped_kv_b=args.allow_dropped_kv_b, hub=args.hub, revision=args.revision)
    if args.dry_run:
        if args.engine_python:
            serve.check_engine_python(args.engine_python, plan.engine)
        print(_report(plan, args.engine_python))
        return 0
    serve.check_engine_python(args.engine_python, plan.engine)
    serve.write_exports(plan, allow_dropped_kv_b=args.allow_dropped_kv_b, hub=args.hub)
    for note in plan.notes:
        print(f"note: {note}", file=sys.stderr)
    return serve.launch(plan, args.engine_python)


def _report(plan, engine_python: str | None) -> str:
    """The dry run: the exports it would write, the engine command, and the demo line (commands one per line, so
    they can be copied; comments start with #)."""
    lines = [f"# {plan.engine.label} {plan.engine.version}: exports (written when serving; --dry-run writes nothing)"]
    for a in plan.adapters:
        lines.append(f"#   {plan.request_name(a)}  rank {a.rank}  {a.source} -> {a.export}")
    lines += [f"# note: {n}" for n in plan.notes]
    argv = plan.argv(engine_python)
    lines.append(" \\\n    ".join(_pairs(argv)))
    lines.append(f"# then the A/B demo on it ({plan.endpoint}):")
    lines.append(plan.demo_line())
    return "\n".join(lines)


def _pairs(argv: list[str]) -> list[str]:
    """The command quoted, one option (with its values) per line."""
    out: list[str] = []
    for word in argv:
        if word.startswith("--") or not out:
            out.append(shlex.quote(word))
        else:
            out[-1] += " " + shlex.quote(word)
    return out
