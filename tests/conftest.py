"""Shared test fixtures, tiers and isolation.

Isolation: nothing a test runs may write outside pytest's temp folder, and no test reads what another cached.
Libraries read their home, cache and temp folders once (datasets and matplotlib when imported; peft creates
torch-inductor's cache folder when imported, during collection; session-scoped fixtures train before any per-test
fixture runs), so `pytest_configure` points HOME, the XDG folders, TMPDIR and the library caches at a session
folder under pytest's base temp before anything is imported. Every test then also gets its own HF_HOME,
HF_TOKEN_PATH, MODELSCOPE_CACHE, XDG cache/state folders and `datasets` cache (no test touches the user's cache,
token or votes, and hub access is offline unless a test starts a local hub server).

Tiers (`make test` runs them all; `make test-fast` runs `-m "not slow and not browser"`):
- `slow`: trains, merges or spawns an interpreter. A test that uses the `trained_adapter` fixture trains, so it
  is marked here whatever module it lives in.
- `gpu`: needs CUDA (seconds on the tiny base); skipped with the reason printed when torch sees no CUDA device.
  The other tests pass on a CPU build and on a CUDA build of torch alike: tests that compare numbers choose
  device and dtype explicitly.
- `browser`: drives chromium (tests/test_demo_browser.py decides between skipping and failing).

`tiny_base` is the embedded DeepSeek-V2 toy base, built once per session (a few seconds); `tiny_llama` the dense
variant. Tests must not modify them (copy first).
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
from pathlib import Path

import pytest

from tests.hub_fixtures import fast_retries, hub_server, ms_fast_retries, ms_server  # noqa: F401  (fixtures)
from tests.openai_server import openai_server  # noqa: F401  (fixture: an OpenAI-protocol server)

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DISABLE_SAFETENSORS_CONVERSION", "1")

REPO = Path(__file__).resolve().parents[1]
# Variables that name a folder some library writes to on its own; all of them go under the session folder.
_SESSION_FOLDERS = {
    "HOME": "home",
    "XDG_CACHE_HOME": "home/.cache",
    "XDG_CONFIG_HOME": "home/.config",
    "XDG_STATE_HOME": "home/.local/state",
    "XDG_DATA_HOME": "home/.local/share",
    "HF_HOME": "home/.cache/huggingface",
    "MODELSCOPE_CACHE": "home/.cache/modelscope",
    "MPLCONFIGDIR": "home/.config/matplotlib",
    "TORCHINDUCTOR_CACHE_DIR": "tmp/torchinductor",
    "TRITON_CACHE_DIR": "tmp/triton",
    "GRADIO_TEMP_DIR": "tmp/gradio",
    "TMPDIR": "tmp",
}


@pytest.hookimpl(trylast=True)
def pytest_configure(config):
    """Point every home, cache and temp folder at a session folder under pytest's base temp, before collection
    imports anything (pytest's own base temp is already fixed by now, so it is unaffected)."""
    factory = getattr(config, "_tmp_path_factory", None)
    if factory is None or hasattr(config, "workerinput"):  # no temp factory (plugin off) or an xdist worker
        return
    session = factory.mktemp("session-env", numbered=True)
    for var, rel in _SESSION_FOLDERS.items():
        folder = session / rel
        folder.mkdir(parents=True, exist_ok=True)
        os.environ[var] = str(folder)
    tempfile.tempdir = os.environ["TMPDIR"]


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "trained_adapter" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.hookimpl(tryfirst=True)  # before any fixture of the test is set up
def pytest_runtest_setup(item):
    if item.get_closest_marker("gpu") and not cuda_available():
        pytest.skip("needs a CUDA device (torch.cuda.is_available() is False): run on a GPU machine")


@pytest.fixture(autouse=True)
def isolated_caches(tmp_path_factory, monkeypatch):
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HF_HOME", str(home / "hf"))
    monkeypatch.setenv("HF_TOKEN_PATH", str(home / "hf" / "token"))
    monkeypatch.setenv("MODELSCOPE_CACHE", str(home / "modelscope"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / "cache"))
    monkeypatch.setenv("XDG_STATE_HOME", str(home / "state"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("MODELSCOPE_API_TOKEN", raising=False)
    monkeypatch.delenv("PERSONA_LORA_DEMO_AUTH", raising=False)
    if "datasets" in sys.modules:  # it read its cache folders from HF_HOME when first imported
        import datasets.config as dc

        cache = home / "hf" / "datasets"
        for name, value in {"HF_CACHE_HOME": str(home / "hf"), "HF_DATASETS_CACHE": cache,
                            "HF_MODULES_CACHE": home / "hf" / "modules",
                            "DOWNLOADED_DATASETS_PATH": cache / "downloads",
                            "EXTRACTED_DATASETS_PATH": cache / "downloads" / "extracted"}.items():
            monkeypatch.setattr(dc, name, value)
    yield


def free_port() -> int:
    """A port nothing listens on now (the OS picks it), for servers a test starts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    from persona_lora.train.tiny_base import TinySpec, build_tiny_base

    return build_tiny_base(tmp_path_factory.mktemp("bases") / "tiny-base", TinySpec())


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    from persona_lora.train.tiny_base import TinySpec, build_tiny_base

    return build_tiny_base(
        tmp_path_factory.mktemp("bases") / "tiny-llama", TinySpec(arch="llama", layers=2, hidden=128)
    )


@pytest.fixture(scope="session")
def tokenizer(tiny_base):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_base)


@pytest.fixture(scope="session")
def small_persona_data(tmp_path_factory) -> Path:
    """16 records of our sample persona data: small enough for a tiny model to memorise in ~60 steps."""
    import json

    records = json.loads((REPO / "examples" / "data" / "persona_zh.json").read_text(encoding="utf-8"))[:16]
    path = tmp_path_factory.mktemp("data") / "small_persona.json"
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return path


def train_args(base: Path, data: Path, out: Path, *extra: str) -> list[str]:
    """CLI args for a short run of configs/tiny.yaml on given base/data (memorises 16 records).

    On the CPU (so in float32) whatever torch build runs the tests: the tests compare losses, weights and answers
    across runs and with references computed on the CPU (GPU tests override `base.device` after these)."""
    return [
        "train", str(REPO / "configs" / "tiny.yaml"),
        "--base", str(base), "--data", str(data), "--output-dir", str(out),
        "--epochs", "30",
        "--set", "base.device=cpu",  # dtype auto: float32 on the CPU
        "--set", "training.batch_size=8",
        "--set", "lora.r=16",
        "--set", "data.eval_fraction=0.125",
        "--set", "training.save_steps=1000",
        "--set", "training.eval_steps=20",
        "--set", "training.samples=2",
        *extra,
    ]


@pytest.fixture(scope="session")
def trained_adapter(tiny_base, small_persona_data, tmp_path_factory) -> Path:
    """A real adapter folder written by `persona-lora train` (all preset, ~60 steps on 16 records)."""
    from persona_lora.cli import main

    out = tmp_path_factory.mktemp("runs") / "tiny-adapter"
    assert main(train_args(tiny_base, small_persona_data, out)) == 0
    return out


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Toy-sized matmuls gain nothing from threads, and on a busy 2-core machine OpenMP's waiting threads make a
    forward pass take seconds instead of milliseconds. Subprocesses (CLI tests) keep torch's default."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
