"""`persona-lora tiny-base OUT_DIR`: build the embedded default base (see train/tiny_base.py)."""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path

from persona_lora.train.tiny_base import TinySpec, build_tiny_base


def configure_tiny_base(p: argparse.ArgumentParser) -> None:
    p.description = ("Write a deterministic toy model folder (config, sharded safetensors in the original "
                     "per-expert layout, byte-level BPE tokenizer with the DeepSeek-V2 chat template).")
    p.add_argument("out_dir", type=Path, help="folder to create (must not exist or be empty)")
    defaults = TinySpec()
    p.add_argument("--arch", choices=["deepseek_v2", "llama"], default=defaults.arch,
                   help="deepseek_v2 (MoE, default) or llama (dense)")
    for f in fields(TinySpec):
        if f.name == "arch":
            continue
        default = getattr(defaults, f.name)
        p.add_argument(f"--{f.name.replace('_', '-')}", type=int, default=default, help=f"default {default}")
    p.add_argument("--corpus", type=Path, nargs="+", default=None,
                   help="text/JSON files to train the tokenizer on (default: the sample persona data)")


def run_tiny_base(args: argparse.Namespace) -> int:
    spec = TinySpec(**{f.name: getattr(args, f.name) for f in fields(TinySpec)})
    out = build_tiny_base(args.out_dir, spec, args.corpus)
    print(out)
    return 0
