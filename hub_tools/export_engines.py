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
from persona_lora.train.presets import NO_KV_B, PRESETS

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
