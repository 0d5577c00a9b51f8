"""Shared test fixtures.

- Every test runs with HF_HOME, HF_TOKEN_PATH, MODELSCOPE_CACHE (and the XDG cache and state folders) in a temp
  dir, so no test touches the user's cache, token or votes, and hub access is offline unless a test starts the
  local hub server.
- `tiny_base` is the embedded DeepSeek-V2 toy base, built once per session (a few seconds); `tiny_llama` the
  dense variant. Tests must not modify them (copy first).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.hub_fixtures import fast_retries, hub_server, ms_fast_retries, ms_server  # noqa: F401  (fixtures)

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DISABLE_SAFETENSORS_CONVERSION", "1")


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
    yield


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


REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def small_persona_data(tmp_path_factory) -> Path:
    """16 records of our sample persona data: small enough for a tiny model to memorise in ~60 steps."""
    import json

    records = json.loads((REPO / "examples" / "data" / "persona_zh.json").read_text(encoding="utf-8"))[:16]
    path = tmp_path_factory.mktemp("data") / "small_persona.json"
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return path


def train_args(base: Path, data: Path, out: Path, *extra: str) -> list[str]:
    """CLI args for a short run of configs/tiny.yaml on given base/data (memorises 16 records)."""
    return [
        "train", str(REPO / "configs" / "tiny.yaml"),
        "--base", str(base), "--data", str(data), "--output-dir", str(out),
        "--epochs", "30",
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

    out = tmp_path_factory.mktemp("runs") / "tiny-persona"
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
