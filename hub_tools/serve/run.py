"""`persona-lora serve`: one serving engine (vLLM or SGLang) with the base and every adapter loaded, started from
the engine's own Python environment, and the `persona-lora demo --backend openai` line that shows it.

Why a command: serving several adapters correctly takes facts that are easy to get wrong by hand: each adapter
exported in the layout the engine reads (`hub_tools.export`), the smallest `--max-lora-rank` vLLM accepts that
holds every adapter's rank (rank patterns included), one batch slot per adapter, the adapters' names as the
OpenAI `model` field selects them, strict loading on SGLang, and the refusals an engine would otherwise turn into
silently wrong answers (LoRA on MLA's kv_b_proj under vLLM). The facts live in `persona_lora.engines`; this module
plans with them, exports, and starts the engine.

The engines pin other torch/transformers versions than ours, so they never run in this environment:
`--engine-python` names the interpreter of theirs, checked to import the engine before anything starts.
`plan_serve` only reads (configs and safetensors headers), so `--dry-run` writes nothing.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shlex
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from persona_lora import engines
from persona_lora.artifact import ADAPTER_CONFIG, ADAPTER_WEIGHTS, MANIFEST_NAME, read_adapter_config, read_manifest
from persona_lora.errors import ModelLoadError, UsageError

log = logging.getLogger(__name__)


@dataclass
class PlannedAdapter:
    """One adapter to serve: where it is, the name requests select it by, and where its export goes."""

    source: Path
    name: str  # the engine's adapter name (lora_name of the manifest's name, made unique)
    export: Path
    rank: int  # largest rank of the source config (rank_pattern included)
    kv_b_layers: int  # layers with LoRA on kv_b_proj
    system_prompt: str
    chat_template: str | None  # the template training used, when it was not the base's


@dataclass
class ServePlan:
    """Everything the engine's command line says, computed before anything is written or started."""

    engine: engines.Engine
    base: str  # what the engine loads: a local folder (absolute) or a hub id
    served_name: str  # --served-model-name: the base's `model` in requests
    adapters: list[PlannedAdapter]
    host: str
    port: int
    max_rank: int | None  # vLLM's --max-lora-rank
    chat_template: str | None  # path of the export's chat_template.jinja, when an adapter has its own
    dropped_kv_b: bool = False
    mixed_moe: bool = False
    notes: list[str] = field(default_factory=list)

    def request_name(self, adapter: PlannedAdapter) -> str:
        """The OpenAI `model` value of an adapter (vLLM: its name; SGLang: `served:adapter`)."""
        return engines.request_model(self.engine, self.served_name, adapter.name)

    def argv(self, engine_python: str | None = None) -> list[str]:
        loras = [(a.name, str(a.export)) for a in self.adapters]
        return engines.serve_argv(self.engine, self.base, self.served_name, loras, max_rank=self.max_rank,
                                  host=self.host, port=self.port, chat_template=self.chat_template,
                                  mixed_moe=self.mixed_moe, engine_python=engine_python)

    @property
    def endpoint(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"http://{host}:{self.port}/v1"

    def demo_line(self) -> str:
        """The demo that compares the base with every adapter on this engine (system prompts from the exports)."""
        argv = ["persona-lora", "demo", "--backend", "openai", "--endpoint", self.endpoint,
                "--base", self.served_name]
        for a in self.adapters:
            argv += ["--adapter", f"{self.request_name(a)}={a.export}"]
        return shlex.join(argv)


def default_export_dir() -> Path:
    """Exports are derived data, rebuilt on demand: they live in the user's cache folder, never the work tree."""
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "persona-lora" / "serve"


def plan_serve(base: str, adapters: list[str], engine: str, *, host: str = "127.0.0.1", port: int | None = None,
               export_dir: str | Path | None = None, served_name: str | None = None,
               allow_dropped_kv_b: bool = False, hub: str = "hf", revision: str | None = None) -> ServePlan:
    """The serve plan for `base` and the adapter folders or hub ids in `adapters` (hub ids are pulled and
    verified). Reads configs, manifests and safetensors headers only. Raises `persona_lora.errors` exceptions that
    name the cause and the fix: kv_b_proj LoRA on vLLM, a rank above vLLM's largest, two different chat templates
    (one engine has one)."""
    from persona_lora.hubs.pull import local_or_pulled

    eng = engines.engine(engine)
    if not adapters:
        raise UsageError("give at least one --adapter (a folder or hub id); to serve the base alone, run the "
                         "engine directly")
    port = eng.port if port is None else port
    if not 0 < port < 65536:
        raise UsageError(f"--port must be between 1 and 65535, got {port}")
    root = Path(export_dir).expanduser().resolve() if export_dir else default_export_dir()
    local_base = Path(base).expanduser()
    engine_base = str(local_base.resolve()) if local_base.is_dir() else base
    served = served_name or (local_base.resolve().name if local_base.is_dir() else base)

    planned: list[PlannedAdapter] = []
    for spec in adapters:
        folder, _, _ = local_or_pulled(spec, hub=hub, revision=revision, what="--adapter")
        planned.append(_plan_adapter(folder, eng, root, allow_dropped_kv_b, {a.name for a in planned}))
    notes = []
    with_kv_b = [a for a in planned if a.kv_b_layers]
    if eng.key == "vllm" and with_kv_b:
        if not allow_dropped_kv_b:
            refusal = engines.kv_b_refusal(str(with_kv_b[0].source), with_kv_b[0].kv_b_layers)
            raise UsageError(f"{refusal} (with serve: `--engine sglang`, or `--allow-dropped-kv-b`)")
        notes.append(f"kv_b_proj LoRA left out of {', '.join(a.name for a in with_kv_b)} ({engines.KV_B_ISSUE})")
    max_rank = engines.vllm_max_lora_rank(max(a.rank for a in planned)) if eng.key == "vllm" else None
    templates = {a.chat_template for a in planned if a.chat_template}
    if len(templates) > 1:
        raise UsageError("the adapters were trained with different chat templates, and one engine formats every "
                         "request with one: serve them with one `persona-lora serve` each (another --port)")
    template_of = next((a for a in planned if a.chat_template), None)
    return ServePlan(eng, engine_base, served, planned, host, port, max_rank,
                     str(template_of.export / "chat_template.jinja") if template_of else None,
                     dropped_kv_b=bool(with_kv_b), notes=notes)


def _plan_adapter(folder: Path, eng: engines.Engine, root: Path, allow_dropped_kv_b: bool,
                  taken: set[str]) -> PlannedAdapter:
    from persona_lora.artifact import require_adapter_files
    from persona_lora.safetensors_io import read_safetensors_header

    folder = require_adapter_files(folder)
    if not (folder / MANIFEST_NAME).is_file():
        raise ModelLoadError(f"{folder} has no {MANIFEST_NAME}: serve exports adapters persona-lora wrote or "
                             "pulled (the manifest says how they were trained)")
    manifest = read_manifest(folder)
    if manifest.kind != "adapter":
        raise UsageError(f"--adapter {folder} is a {manifest.kind} model, not an adapter; serve it as the base "
                         "(`vllm serve DIR`)")
    config = read_adapter_config(folder) or {}
    keys = read_safetensors_header(folder / ADAPTER_WEIGHTS)
    kv_b_layers = len({k.split(".self_attn.")[0] for k in keys if f".{engines.KV_B}." in k and ".lora_" in k})
    name, n = engines.lora_name(manifest.name), 2
    while name in taken:  # two adapters with one name: the second gets a suffix
        name, n = f"{engines.lora_name(manifest.name)}-{n}", n + 1
    digest = hashlib.sha256()
    for part in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, MANIFEST_NAME):
        digest.update(hashlib.sha256((folder / part).read_bytes()).digest())
    digest.update(f"{eng.key} {eng.version} {allow_dropped_kv_b}".encode())
    chat = manifest.chat
    template = chat.chat_template if chat and chat.template_source == "file" and chat.chat_template else None
    return PlannedAdapter(folder, name, root / eng.key / f"{name}-{digest.hexdigest()[:12]}",
                          engines.adapter_max_rank(config), kv_b_layers,
                          (chat.system_prompt if chat else None) or "", template)


def write_exports(plan: ServePlan, *, allow_dropped_kv_b: bool = False, hub: str = "hf") -> None:
    """Export every adapter of the plan (an export already there, complete, is reused: its folder name holds the
    hash of what it was made from), then check the exports against the plan's flags."""
    from persona_lora.hub_tools.export.run import export_adapter

    ranks = []
    for a in plan.adapters:
        if not (a.export / ADAPTER_WEIGHTS).is_file():
            a.export.parent.mkdir(parents=True, exist_ok=True)
            export_adapter(a.source, engine=plan.engine.key, out_dir=a.export, base=plan.base,
                           allow_dropped_kv_b=allow_dropped_kv_b, hub=hub)
        config = read_adapter_config(a.export) or {}
        ranks.append(engines.adapter_max_rank(config))
        plan.mixed_moe |= plan.engine.key == "vllm" and engines.needs_mixed_moe_format(config)
    if plan.max_rank is not None and max(ranks) > plan.max_rank:  # the export pads to the largest rank only
        plan.max_rank = engines.vllm_max_lora_rank(max(ranks))


def check_engine_python(engine_python: str, eng: engines.Engine) -> str:
    """The engine's version as `engine_python` imports it; a UsageError naming the fix when it cannot."""
    path = Path(engine_python).expanduser()
    module = engines.ENGINE_MODULES[eng.key]
    fix = (f"create the engine's own environment (`python -m venv ~/.venvs/{eng.key} && ~/.venvs/{eng.key}/bin/pip "
           f"install {module}=={eng.version}`) and pass --engine-python ~/.venvs/{eng.key}/bin/python; it must not "
           "be persona-lora's environment (the engines pin other torch and transformers versions)")
    if not path.is_file() or not os.access(path, os.X_OK):
        raise UsageError(f"--engine-python {engine_python}: no such executable; {fix}")
    probe = f"import {module}; print({module}.__version__)"
    try:
        done = subprocess.run([str(path), "-c", probe], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise UsageError(f"--engine-python {engine_python}: could not run it ({type(e).__name__}); {fix}") from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise UsageError(f"--engine-python {engine_python} cannot import {module} ({last}); {fix}")
    version = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else "unknown"
    if version != eng.version:
        log.warning("%s %s is not %s, the version persona-lora's engine facts were read from; flags or loading may "
                    "differ", eng.label, version, eng.version)
    return version


def launch(plan: ServePlan, engine_python: str, *, ready_timeout: float | None = None,
           poll_seconds: float = 1.0, out=None) -> int:
    """Start the engine, wait until its /v1/models answers, print the demo line, then wait for the engine to exit
    (Ctrl-C stops it). Returns the engine's exit code; an engine that dies before it is ready is an error."""
    import sys

    out = out or sys.stdout
    argv = plan.argv(engine_python)
    print(f"starting {plan.engine.label}: {shlex.join(argv)}", file=sys.stderr, flush=True)
    proc = subprocess.Popen(argv)
    try:
        started = time.monotonic()
        while not _answers(f"{plan.endpoint}/models"):
            if proc.poll() is not None:
                raise ModelLoadError(f"{plan.engine.label} exited with code {proc.returncode} before it served "
                                     f"{plan.endpoint} (its output is above); fix what it reports and run serve again")
            if ready_timeout is not None and time.monotonic() - started > ready_timeout:
                raise ModelLoadError(f"{plan.engine.label} did not answer {plan.endpoint}/models within "
                                     f"{ready_timeout:g} s; see its output above")
            time.sleep(poll_seconds)
        print(f"{plan.engine.label} is serving {plan.endpoint}; the A/B demo on it:", file=sys.stderr, flush=True)
        print(plan.demo_line(), file=out, flush=True)
        return proc.wait()
    except BaseException:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        raise


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - the engine we just started
            return response.status == 200
    except urllib.error.HTTPError as e:
        return e.code == 401  # up, and asking for a key: ready
    except (OSError, ValueError):
        return False
