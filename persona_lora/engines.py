"""What vLLM and SGLang read from a LoRA adapter folder, and how to serve an export with each of them.

Why a table of engine facts: an engine that meets a key or config field it does not expect either refuses the
adapter with a message far from its cause, or (SGLang without `--lora-strict-loading`, vLLM on MLA's
`kv_b_proj`) serves the base model's answers under the adapter's name. `persona-lora export` writes exactly what
each engine's loader reads, and the export's card gives the exact command that serves it. Every fact below names
the engine source file it was read from, at the versions in `ENGINES`; when an engine pin moves, re-read those
files and `tests/test_export.py`'s expectations.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass

from persona_lora.errors import UsageError
from persona_lora.presets import NO_KV_B, PRESETS

# vllm/config/lora.py: `MaxLoRARanks = Literal[1, 8, 16, 32, 64, 128, 256, 320, 512]`; `--max-lora-rank` takes
# only these, and vllm/lora/peft_helper.py `validate_legal` refuses an adapter whose r (or any rank_pattern value)
# is above the server's --max-lora-rank.
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
KV_B = "kv_b_proj"
KV_B_ISSUE = "vllm-project/vllm#48974"
NO_KV_B_PRESETS = tuple(name for name in PRESETS["moe"] if name.endswith(NO_KV_B))


@dataclass(frozen=True)
class Engine:
    """One serving engine: its name on the command line, the version the facts were read at, its default port."""

    key: str  # vllm | sglang
    label: str
    version: str
    port: int


ENGINES = {
    "vllm": Engine("vllm", "vLLM", "0.33.0", 8000),
    "sglang": Engine("sglang", "SGLang", "0.5.23", 30000),
}


def engine(key: str) -> Engine:
    if key not in ENGINES:
        raise UsageError(f"--for must be one of {', '.join(ENGINES)}; got {key!r}")
    return ENGINES[key]


def adapter_config(base_id: str, r: int, alpha: int | float, target_modules: list[str]) -> dict:
    """The adapter_config.json both engines read, with nothing they would refuse or misread.

    - `target_modules` is a list of leaf names. SGLang (python/sglang/srt/lora/lora_manager.py
      `init_lora_shapes`) refuses any string but "all"/"all-linear" ("SGLang does not recognize target_modules")
      and maps each entry's last dotted part through `get_normalized_target_modules` (lora/utils.py); vLLM
      (vllm/lora/lora_model.py `check_unexpected_modules`) checks the weight keys, not this list.
    - one `r` and one `lora_alpha`, `rank_pattern`/`alpha_pattern` empty: SGLang's memory pool
      (lora/mem_pool.py `load_lora_weight_to_buffer`) slices every layer's buffer with `config.r` and scales with
      `lora_alpha / r` (lora/lora.py `LoRAAdapter.scaling`), so per-module ranks would not fit; the export pads
      and folds them instead (export_layout.uniform_rank).
    - `use_rslora`/`use_dora` false, `bias` "none", `modules_to_save` null, `init_lora_weights` true: the values
      vLLM's `PEFTHelper._validate_features`/`validate_legal` (vllm/lora/peft_helper.py) accept; SGLang asserts
      `peft_type` is LORA (lora/lora.py `LoRAAdapter.__init__`)."""
    return {
        "alpha_pattern": {},
        "base_model_name_or_path": base_id,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": r,
        "rank_pattern": {},
        "target_modules": sorted(target_modules),
        "task_type": "CAUSAL_LM",
        "use_dora": False,
        "use_rslora": False,
    }


def vllm_max_lora_rank(rank: int) -> int:
    """The smallest `--max-lora-rank` vLLM accepts that holds `rank`; UsageError (cause and fix) above 512."""
    for allowed in VLLM_MAX_LORA_RANKS:
        if rank <= allowed:
            return allowed
    raise UsageError(
        f"the adapter's LoRA rank is {rank}, above {VLLM_MAX_LORA_RANKS[-1]}, the largest --max-lora-rank vLLM "
        f"{ENGINES['vllm'].version} accepts (vllm/config/lora.py MaxLoRARanks: "
        f"{', '.join(map(str, VLLM_MAX_LORA_RANKS))}); serve the merged model instead (`persona-lora merge`), or "
        f"train again with lora.r <= {VLLM_MAX_LORA_RANKS[-1]}")


def kv_b_refusal(adapter: str, layers: int) -> UsageError:
    """Why a vLLM export of an adapter with LoRA on MLA's kv_b_proj is refused, and the four ways out."""
    return UsageError(
        f"{adapter} has LoRA on {KV_B} ({layers} layer(s)), which vLLM {ENGINES['vllm'].version} loads without "
        f"error and then never applies: its MLA attention uses kv_b_proj's base weights directly ({KV_B_ISSUE}, "
        "open), so the served adapter would silently answer without that part of the training. Ways out: serve "
        "the merged model (`persona-lora merge ADAPTER --base BASE --out DIR`, then `vllm serve DIR`); export for "
        f"SGLang, which applies kv_b_proj LoRA (`--for sglang`); train with a preset that leaves kv_b_proj out "
        f"(lora.preset: {' | '.join(NO_KV_B_PRESETS)}); or export anyway without those tensors "
        "(`--allow-dropped-kv-b`; the export's README records the loss)")


def lora_name(name: str) -> str:
    """The adapter's name as a request selects it: letters, digits, '.', '_' and '-' only (no ':' — SGLang splits
    the OpenAI `model` field at it — and nothing a shell would interpret)."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")
    return cleaned or "persona"


def serve_command(eng: Engine, base: str, name: str, path: str, max_rank: int, chat_template: str | None = None) -> str:
    """The command that serves the base with the export loaded at start.

    vLLM (vllm/engine/arg_utils.py, vllm/entrypoints/openai/cli_args.py): `--enable-lora`, `--max-lora-rank` from
    `VLLM_MAX_LORA_RANKS`, `--lora-modules NAME=PATH`. Routed experts are written per expert, the layout
    DeepSeek-V2 declares (`is_3d_moe_weight` false, vllm/lora/utils.py `process_packed_modules_mapping` adds
    `experts.{e}.{gate,up,down}_proj`), so `--enable-mixed-moe-lora-format` is not needed.
    SGLang (python/sglang/srt/server_args.py): `--enable-lora`, `--lora-paths NAME=PATH`, and
    `--lora-strict-loading`, which makes a weight that matches no target module fatal (lora/mem_pool.py) instead
    of a warning with the weight dropped. Its rank is inferred from the adapter (lora_manager.py
    `init_lora_shapes`). Both take `--chat-template FILE` for an adapter trained with its own template."""
    q = shlex.quote
    template = f" --chat-template {q(chat_template)}" if chat_template else ""
    if eng.key == "vllm":
        return (f"vllm serve {q(base)} --enable-lora --max-lora-rank {max_rank} "
                f"--lora-modules {q(f'{name}={path}')}{template}")
    return (f"python -m sglang.launch_server --model-path {q(base)} --enable-lora "
            f"--lora-paths {q(f'{name}={path}')} --lora-strict-loading{template}")


def request_model(eng: Engine, base: str, name: str) -> str:
    """The OpenAI-API `model` value that selects the adapter: vLLM serves each `--lora-modules` name as a model;
    SGLang takes `served-model-name:adapter` (its served name defaults to --model-path)."""
    return name if eng.key == "vllm" else f"{base}:{name}"


def request_example(eng: Engine, base: str, name: str, system_prompt: str | None = None) -> str:
    """A curl that asks the adapter one question through the OpenAI-compatible chat endpoint, with the system
    prompt the adapter was trained with (a persona answers as trained only with it)."""
    import json

    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": "你是谁？"})
    body = json.dumps({"model": request_model(eng, base, name), "messages": messages, "max_tokens": 64},
                      ensure_ascii=False)
    return (f"curl http://127.0.0.1:{eng.port}/v1/chat/completions -H 'Content-Type: application/json' \\\n"
            f"  -d {shlex.quote(body)}")


def runtime_loading(eng: Engine, base: str, name: str, path: str, max_rank: int) -> str | None:
    """How to add the export to a running vLLM server (vllm/entrypoints/openai/api_server.py: the
    /v1/load_lora_adapter route exists only with VLLM_ALLOW_RUNTIME_LORA_UPDATING set)."""
    import json

    if eng.key != "vllm":
        return None
    body = json.dumps({"lora_name": name, "lora_path": path})
    return (f"VLLM_ALLOW_RUNTIME_LORA_UPDATING=True vllm serve {shlex.quote(base)} --enable-lora "
            f"--max-lora-rank {max_rank}\n"
            f"curl -X POST http://127.0.0.1:{eng.port}/v1/load_lora_adapter -H 'Content-Type: application/json' \\\n"
            f"  -d {shlex.quote(body)}")


# ---------------------------------------------------------------------------------------------- serving many adapters
# What `persona-lora serve` starts: one engine process, the base plus every exported adapter loaded at start.

# The module each engine's own environment must import (checked with --engine-python before anything starts).
ENGINE_MODULES = {"vllm": "vllm", "sglang": "sglang"}


def adapter_max_rank(config: dict) -> int:
    """The largest LoRA rank in a PEFT adapter config: `r` and every `rank_pattern` override (vLLM's
    `validate_legal` compares exactly this with --max-lora-rank)."""
    return max([int(config.get("r", 8)), *(int(v) for v in (config.get("rank_pattern") or {}).values())])


def needs_mixed_moe_format(config: dict) -> bool:
    """vLLM reads routed-expert LoRA in PEFT's fused 3-D layout (`target_parameters`) only with
    `--enable-mixed-moe-lora-format` (vllm/engine/arg_utils.py) and `is_3d_lora_weight` on the adapter; an export
    is written per expert, so it never needs them."""
    return bool(config.get("target_parameters"))


def engine_program(eng: Engine, base: str, engine_python: str | None) -> list[str]:
    """The start of the engine's command line. With the engine's own interpreter (`--engine-python`): vLLM's
    OpenAI server module (vllm/entrypoints/openai/api_server.py, `--model`), SGLang's launcher
    (python/sglang/launch_server.py, `--model-path`); without one, the commands their docs print."""
    if eng.key == "vllm":
        if engine_python:
            return [engine_python, "-m", "vllm.entrypoints.openai.api_server", "--model", base]
        return ["vllm", "serve", base]
    return [engine_python or "python", "-m", "sglang.launch_server", "--model-path", base]


def serve_argv(eng: Engine, base: str, served_name: str, loras: list[tuple[str, str]], *, max_rank: int | None,
               host: str, port: int, chat_template: str | None = None, mixed_moe: bool = False,
               engine_python: str | None = None) -> list[str]:
    """The whole command that serves `base` as `served_name` with every (name, path) in `loras` loaded at start.

    vLLM (vllm/engine/arg_utils.py, vllm/entrypoints/openai/cli_args.py): `--served-model-name`, `--enable-lora`,
    `--max-lora-rank` (one of `VLLM_MAX_LORA_RANKS`), `--max-loras` (adapters in one batch: all of them, so a page
    comparing several never waits for a slot), `--lora-modules` as JSON objects (`name`, `path`,
    `base_model_name`, so /v1/models lists each adapter with the base as its parent), and
    `--enable-mixed-moe-lora-format` only for PEFT's fused-expert layout.
    SGLang (python/sglang/srt/server_args.py): `--served-model-name`, `--enable-lora`, `--lora-paths NAME=PATH…`,
    `--max-loras-per-batch`, `--lora-strict-loading` (a weight matching no module is fatal, not dropped)."""
    import json

    argv = [*engine_program(eng, base, engine_python), "--host", host, "--port", str(port),
            "--served-model-name", served_name, "--enable-lora"]
    if eng.key == "vllm":
        argv += ["--max-lora-rank", str(max_rank), "--max-loras", str(max(1, len(loras))), "--lora-modules"]
        argv += [json.dumps({"name": n, "path": p, "base_model_name": served_name}) for n, p in loras]
        if mixed_moe:
            argv.append("--enable-mixed-moe-lora-format")
    else:
        argv += ["--lora-paths", *(f"{n}={p}" for n, p in loras), "--max-loras-per-batch", str(max(1, len(loras))),
                 "--lora-strict-loading"]
    if chat_template:
        argv += ["--chat-template", chat_template]
    return argv
