"""`persona-lora train CONFIG.yaml [overrides]` (see train/trainer.py) and `persona-lora tiny-base OUT_DIR` (the
embedded default base, see train/tiny_base.py): the training stage's commands."""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path

from persona_lora.train.config import field_help, load_config, parse_set
from persona_lora.train.tiny_base import TinySpec, build_tiny_base


def configure_train(p: argparse.ArgumentParser) -> None:
    p.description = ("Train a LoRA adapter. The YAML config has sections base, data, lora, training "
                     "(see configs/*.yaml and `persona-lora train --help-config`); flags override it.")
    p.add_argument("config", nargs="?", help="YAML config file (optional: defaults + flags also work)")
    p.add_argument("--base", help="override base.model (local folder, HF id or ModelScope id)")
    p.add_argument("--data", help="override data.path")
    p.add_argument("--output-dir", help="override training.output_dir")
    p.add_argument("--max-steps", type=int, help="override training.max_steps")
    p.add_argument("--epochs", type=float, help="override training.epochs")
    p.add_argument("--lora-preset", help="override lora.preset (attention, attention+mlp, all)")
    p.add_argument("--resume", nargs="?", const="true", choices=["true", "auto", "false"],
                   help="continue from the latest checkpoint (auto: only if one exists)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output folder of a persona-lora run (only once the new run finished)")
    p.add_argument("--allow-changes", action="store_true",
                   help="with --resume: continue with changed data or settings, recording them in the manifest")
    p.add_argument("--allow-no-update", action="store_true",
                   help="train even when no step can change the adapter (all steps in the warm-up, learning rate 0)")
    p.add_argument("--allow-other-adapter", action="store_true",
                   help="dpo/kto: train on votes cast for another adapter than --init-adapter")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any config key, e.g. --set training.learning_rate=1e-4")
    p.add_argument("--method", choices=["sft", "dpo", "kto"],
                   help="override preference.method: sft (default), dpo (pairs or the demo's votes), kto (single "
                        "judgements or votes); --data then takes a vote database or a preference file")
    p.add_argument("--init-adapter", metavar="DIR_OR_ID",
                   help="override preference.init_adapter: dpo/kto continue from this adapter (its base is checked, "
                        "its chat template and system prompt inherited; it is the frozen reference)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved config, data statistics, LoRA coverage and estimates; do not train")
    p.add_argument("--help-config", action="store_true", help="list every config key with its help text")


def overrides_from_args(args: argparse.Namespace) -> dict:
    o = parse_set(args.set)
    flags = {
        ("base", "model"): args.base,
        ("data", "path"): args.data,
        ("training", "output_dir"): args.output_dir,
        ("training", "max_steps"): args.max_steps,
        ("training", "epochs"): args.epochs,
        ("lora", "preset"): args.lora_preset,
        ("training", "resume"): args.resume,
        ("training", "overwrite"): True if args.overwrite else None,
        ("training", "allow_changes"): True if args.allow_changes else None,
        ("training", "allow_no_update"): True if args.allow_no_update else None,
        ("preference", "allow_other_adapter"): True if args.allow_other_adapter else None,
        ("preference", "method"): getattr(args, "method", None),
        ("preference", "init_adapter"): getattr(args, "init_adapter", None),
    }
    for (section, key), value in flags.items():
        if value is not None:
            o.setdefault(section, {})[key] = value
    if args.lora_preset:
        o["lora"].setdefault("target_modules", None)
    return o


def run_train(args: argparse.Namespace) -> int:
    if args.help_config:
        for key, text in field_help().items():
            print(f"{key:<40} {text}")
        return 0
    cfg = load_config(args.config, overrides_from_args(args))
    if cfg.preference.method != "sft":
        from persona_lora.train.preference_train import run_preference_training

        run_preference_training(cfg, dry_run=args.dry_run)
        return 0
    from persona_lora.train.trainer import run_training

    run_training(cfg, dry_run=args.dry_run)
    return 0


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
