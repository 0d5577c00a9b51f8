"""Finding and loading a base model: a local folder, a Hugging Face id (+ revision) or a ModelScope id.

train, merge and demo all read the base through `resolve_base`, so a base given as a hub id is downloaded
once into the hub's own cache (safetensors only) and every module sees the same local folder and the same
provenance (id, source, revision) for the manifest.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from persona_lora.dtypes import accepted_names, torch_dtype
from persona_lora.errors import ModelLoadError, UsageError
from persona_lora.hashing import sha256_file
from persona_lora.hub_ids import SOURCES, is_repo_id

log = logging.getLogger(__name__)

# Only what a model needs, never pickled weights.
# config.json key of the bases `persona-lora tiny-base` builds: random weights, so their answers are noise. The demo
# reads it to say so on the page (a newcomer would otherwise take the noise for a fault).
RANDOM_WEIGHTS_KEY = "persona_lora_random_weights"


def has_random_weights(model_dir: Path) -> bool:
    """Whether the base in `model_dir` was built with random weights (its config.json says so)."""
    import json

    try:
        config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get(RANDOM_WEIGHTS_KEY) is True


BASE_PATTERNS = [
    "*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.tiktoken", "*.txt", "README.md", "LICENSE*"
]


@dataclass(frozen=True)
class ResolvedBase:
    """Where a base model lives on disk and what to record about it."""

    path: Path
    id: str  # hub id, or the folder's name for local bases (never an absolute path: it goes into cards)
    source: str  # local | hf | modelscope
    revision: str | None

    @property
    def config_sha256(self) -> str:
        return sha256_file(self.path / "config.json")


def _looks_like_path(base: str) -> bool:
    """Hub ids are `owner/name`; anything else that does not exist is a missing local folder."""
    return not is_repo_id(base) or base.startswith((".", "~"))


def resolve_base(base: str, *, revision: str | None = None, source: str = "auto") -> ResolvedBase:
    """Turn a --base value into a local folder, downloading from a hub when it is a hub id."""
    if source not in SOURCES:
        raise UsageError(f"--source must be one of {', '.join(SOURCES)}; got {source!r}")
    local = Path(base).expanduser()
    if source == "local" or (source == "auto" and (local.exists() or _looks_like_path(base))):
        if not local.is_dir():
            raise ModelLoadError(
                f"base model folder {base} does not exist; build the embedded default with "
                f"`persona-lora tiny-base {base}` or give a hub id like deepseek-ai/DeepSeek-Coder-V2-Lite-Instruct"
            )
        if not (local / "config.json").is_file():
            raise ModelLoadError(f"{base} is not a model folder: it has no config.json")
        manifest_id = _recorded_hub_id(local)
        return ResolvedBase(local.resolve(), manifest_id or local.resolve().name, "local", revision)
    return _from_hub("modelscope" if source == "modelscope" else "hf", base, revision)


def _recorded_hub_id(folder: Path) -> str | None:
    """A merged folder of ours remembers the hub id of the base it was made from."""
    from persona_lora.artifact import MANIFEST_NAME, read_manifest
    from persona_lora.errors import ManifestError

    if not (folder / MANIFEST_NAME).is_file():
        return None
    try:
        manifest = read_manifest(folder)
    except ManifestError:
        return None
    return manifest.base_model.id if manifest.kind == "merged" else None


def _from_hub(hub: str, repo_id: str, revision: str | None, patterns: list[str] = BASE_PATTERNS) -> ResolvedBase:
    """Download (or find in the hub client's cache, offline too) the files a model needs, never pickles."""
    from persona_lora.hubs.backends import backend

    be = backend(hub)
    hint = f" (there is no local folder {repo_id}; if you meant one, check the path)"
    with be.errors("download base", repo_id, revision=revision, error_type=ModelLoadError, hint=hint):
        path = be.snapshot(repo_id, revision=revision, commit=None, allow_patterns=patterns)
    return ResolvedBase(path, repo_id, hub, revision)


def resolve_base_config(base: str, *, revision: str | None = None, source: str = "auto") -> ResolvedBase:
    """Like `resolve_base`, but a hub base brings only its config.json: enough to build the architecture on the
    meta device (to see which modules an adapter targets) without downloading weights."""
    local = Path(base).expanduser()
    if source == "local" or (source == "auto" and (local.exists() or _looks_like_path(base))):
        return resolve_base(base, revision=revision, source="local")
    return _from_hub("modelscope" if source == "modelscope" else "hf", base, revision, ["config.json"])


def load_tokenizer(
    base: str | ResolvedBase, *, revision: str | None = None, source: str = "auto",
    chat_template_file: str | Path | None = None,
):
    """The base's tokenizer, with a chat template from a file when given (it then counts as changed by us)."""
    from transformers import AutoTokenizer

    rb = base if isinstance(base, ResolvedBase) else resolve_base(base, revision=revision, source=source)
    try:
        tok = AutoTokenizer.from_pretrained(rb.path)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load the tokenizer of {rb.id}: {e}") from e
    if chat_template_file:
        p = Path(chat_template_file)
        if not p.is_file():
            raise ModelLoadError(f"--chat-template {p} does not exist")
        tok.chat_template = p.read_text(encoding="utf-8")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def default_dtype(device: str):
    """bf16 on a CUDA device that supports it, fp32 elsewhere (CPU bf16 matmuls are slow and lossy)."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def parse_dtype(name: str | None, device: str):
    if name in (None, "auto"):
        return default_dtype(device)
    if name not in accepted_names():
        raise UsageError(f"dtype must be one of auto, {', '.join(accepted_names())}; got {name!r}")
    return torch_dtype(name)


def attention_implementation() -> str:
    """flash-attn when installed (and on CUDA), else PyTorch SDPA."""
    import importlib.util

    import torch

    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def from_pretrained(path, name: str, kwargs: dict, device: str, how: str = ""):
    """`AutoModelForCausalLM.from_pretrained(path, **kwargs)` (plus our attention kernel on CUDA), its failures as
    one ModelLoadError naming `name`; `how` says how it was being loaded (e.g. " sharded over 2 processes")."""
    from transformers import AutoModelForCausalLM

    from persona_lora.progress import quiet_libraries

    quiet_libraries()  # no "Loading weights" bar between our own progress lines (shown at -v)
    if device.startswith("cuda"):
        kwargs = {**kwargs, "attn_implementation": attention_implementation()}
    try:
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise ModelLoadError(f"{name} needs remote code; set trust_remote_code: true only if you trust it") from e
        raise ModelLoadError(f"cannot load {name}{how}: {e}") from e
    except OSError as e:
        raise ModelLoadError(f"cannot load {name}: {e}") from e


def load_base_model(
    base: str | ResolvedBase,
    *,
    revision: str | None = None,
    source: str = "auto",
    dtype: str | None = "auto",
    device: str | None = None,
    load_in_4bit: bool = False,
    trust_remote_code: bool = False,
):
    """Load the base causal LM. Never runs remote code unless asked; DeepSeek-V2 is native in transformers 5."""
    import torch

    rb = base if isinstance(base, ResolvedBase) else resolve_base(base, revision=revision, source=source)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():  # torch would fail with an AssertionError
        raise UsageError(f"--device {device}: no CUDA device is available here (torch {torch.__version__}); "
                         "use --device cpu or leave --device out")
    kwargs = {"dtype": parse_dtype(dtype, device), "trust_remote_code": trust_remote_code}
    if load_in_4bit:
        if not device.startswith("cuda") or not torch.cuda.is_available():
            raise UsageError("load_in_4bit (QLoRA) needs a CUDA GPU; on CPU set load_in_4bit: false")
        try:
            import bitsandbytes  # noqa: F401
            from transformers import BitsAndBytesConfig
        except ImportError as e:
            raise UsageError("load_in_4bit needs bitsandbytes: pip install 'persona-lora[qlora]'") from e
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=kwargs["dtype"],
            bnb_4bit_use_double_quant=True,
        )
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    model = from_pretrained(rb.path, rb.id, kwargs, device)
    if not load_in_4bit and device != "cpu":
        model.to(device)
    if not load_in_4bit:  # quantized experts keep transformers' forward
        from persona_lora.expert_lora import use_fast_bare_experts

        use_fast_bare_experts(model)
    return model
