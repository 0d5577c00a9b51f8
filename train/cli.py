"""`persona-lora train CONFIG.yaml [overrides]` (see train/trainer.py) and `persona-lora tiny-base OUT_DIR` (the
embedded default base, see train/tiny_base.py): the training stage's commands."""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path

from persona_lora.train.config import CliFlag, TriState, cli_flags, field_help, load_config, parse_set
from persona_lora.train.tiny_base import DTYPES, PRESETS, TinySpec, build_tiny_base, build_wide_base


def configure_train(p: argparse.ArgumentParser) -> None:
    p.description = ("Train a LoRA adapter. The YAML config has sections base, data, lora, training, preference "
                     "(see configs/*.yaml and `persona-lora train --help-config`); flags override it.")
    p.add_argument("config", nargs="?", help="YAML config file (optional: defaults + flags also work)")
    for flag in cli_flags():  # each sets one config key, described by that key's own field
        p.add_argument(flag.option, **_argument(flag))
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any config key, e.g. --set training.learning_rate=1e-4")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved config, data statistics, LoRA coverage and estimates; do not train")
    p.add_argument("--help-config", action="store_true", help="list every config key with its help text")


def _argument(flag: CliFlag) -> dict:
    """argparse's description of a config flag, from the key's field: a yes/no key is a switch, a tri-state takes
    an optional word (the bare flag means true), numbers are parsed as numbers, choices are the key's."""
    meta = flag.field.metadata
    spec: dict = {"help": f"{meta['help']} [{flag.key}]".replace("%", "%%")}
    if flag.type is bool:
        return {**spec, "action": "store_true"}
    if flag.type is TriState:
        spec.update(nargs="?", const=TriState.TRUE.value, choices=[m.value for m in TriState])
    elif flag.type in (int, float):
        spec["type"] = flag.type
    if "choices" in meta:
        spec["choices"] = list(meta["choices"])
    if "metavar" in meta:
        spec["metavar"] = meta["metavar"]
    return spec


def overrides_from_args(args: argparse.Namespace) -> dict:
    """`--set` assignments, then the flags given (a flag wins over `--set` of the same key)."""
    o = parse_set(args.set)
    for flag in cli_flags():
        value = getattr(args, flag.dest, None)
        if value is None or value is False:  # not given (a switch not given is False)
            continue
        section = o.setdefault(flag.section, {})
        section[flag.field.name] = value
        replaced = flag.field.metadata.get("replaces")  # e.g. --lora-preset: the config's target_modules would clash
        if replaced and value:
            section.setdefault(replaced, None)
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
    p.add_argument("--preset", choices=sorted(PRESETS), default="toy",
                   help="toy (default: ~8.6M parameters) or lite-wide (DeepSeek-Coder-V2-Lite's exact widths, random "
                        "weights, --layers layers, default 3: 1.67B parameters, 3.3 GB in bfloat16; for benchmarks)")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="weights' dtype for --preset lite-wide (default bfloat16); the toy is float32")
    defaults = TinySpec()
    p.add_argument("--arch", choices=["deepseek_v2", "llama"], default=None,
                   help="deepseek_v2 (MoE, default) or llama (dense)")
    for f in fields(TinySpec):
        if f.name == "arch":
            continue
        default = getattr(defaults, f.name)
        p.add_argument(f"--{f.name.replace('_', '-')}", type=int, default=None, help=f"default {default}")
    p.add_argument("--corpus", type=Path, nargs="+", default=None,
                   help="text/JSON files to train the tokenizer on (default: the sample persona data)")


def run_tiny_base(args: argparse.Namespace) -> int:
    from persona_lora.errors import UsageError
    from persona_lora.output_folder import OutputFolder, check_target

    given = {f.name: getattr(args, f.name) for f in fields(TinySpec) if getattr(args, f.name) is not None}
    if args.preset == "lite-wide":
        fixed = sorted(set(given) - {"layers", "seed"})
        if fixed:
            names = ", ".join("--" + n.replace("_", "-") for n in fixed)
            raise UsageError(f"--preset lite-wide has the real model's sizes; drop {names} (only --layers, --seed, "
                             "--dtype and --corpus apply)")
    elif args.dtype not in (None, "float32"):
        raise UsageError("--dtype applies to --preset lite-wide; the toy base is written in float32")
    target = check_target(args.out_dir, option="OUT_DIR", occupied_hint="choose a new folder or remove it first")
    with OutputFolder(target) as work:  # a refused corpus or Ctrl-C leaves no half-written base
        if args.preset == "lite-wide":
            build_wide_base(work, given.get("layers", PRESETS["lite-wide"].layers), args.dtype or "bfloat16",
                            given.get("seed", 0), args.corpus)
        else:
            build_tiny_base(work, TinySpec(**given), args.corpus)
    print(target.path)
    return 0
