"""`persona-lora export`: an adapter rewritten for a serving engine (vLLM or SGLang), with the command that serves it.

Why a command of its own: serving is where an adapter is used most, and where a layout the engine half-reads goes
unnoticed (a silently dropped module still answers, just not as trained). `export` refuses those cases by name and
prints the export folder on stdout, so `persona-lora export A --for vllm --out D && vllm serve ...` composes.
"""

from __future__ import annotations

import argparse

from persona_lora.hub_ids import add_hub_option

ENGINE_CHOICES = ("vllm", "sglang")


def configure_export(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Write ADAPTER in the layout a serving engine loads: routed-expert LoRA split per expert, one rank and "
        "scaling, an adapter_config.json the engine reads, a README.md with the exact serve command and request, "
        "and a copy of the manifest. vLLM exports refuse LoRA on MLA's kv_b_proj, which vLLM would silently not "
        "apply (vllm-project/vllm#48974), unless --allow-dropped-kv-b.")
    p.add_argument("adapter", metavar="ADAPTER", help="adapter folder, or a hub repo id (pulled and verified first)")
    p.add_argument("--for", dest="engine", choices=ENGINE_CHOICES, required=True, help="the engine that will serve it")
    p.add_argument("--out", metavar="DIR", required=True, help="folder to write the export to (new or empty)")
    p.add_argument("--base", metavar="BASE",
                   help="base model folder or hub id (only its config.json is read; default: the manifest's base)")
    add_hub_option(p, help_prefix="hub of a hub-id ADAPTER or base: ")
    p.add_argument("--revision", metavar="REV", help="revision of a hub-id ADAPTER")
    p.add_argument("--allow-dropped-kv-b", action="store_true",
                   help="(vllm) export an adapter with LoRA on kv_b_proj anyway, without those tensors; the export's "
                        "README records what the served adapter no longer does")


def run_export(args: argparse.Namespace) -> int:
    from persona_lora.hub_tools.export.run import export_adapter
    from persona_lora.hubs.pull import local_or_pulled

    folder, _, _ = local_or_pulled(args.adapter, hub=args.hub, revision=args.revision)
    print(export_adapter(folder, engine=args.engine, out_dir=args.out, base=args.base,
                         allow_dropped_kv_b=args.allow_dropped_kv_b, hub=args.hub))
    return 0
