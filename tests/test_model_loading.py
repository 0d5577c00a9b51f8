"""Finding and loading a base (persona_lora/model_loading.py): local folders, Hugging Face ids (against the local
FakeHub, or a closed port for "no network") and ModelScope ids (against the FakeModelScope)."""

from __future__ import annotations

import shutil
import socket
import time

import pytest
import torch

from persona_lora.chat_templates import DEEPSEEK_V2
from persona_lora.errors import ModelLoadError, UsageError
from persona_lora.hashing import sha256_file
from persona_lora.model_loading import (
    BASE_PATTERNS,
    default_dtype,
    load_base_model,
    load_tokenizer,
    parse_dtype,
    resolve_base,
)

IDS = torch.tensor([[0, 11, 250, 37, 1]])


def dead_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def same_logits(a, b):
    with torch.no_grad():
        torch.testing.assert_close(a(input_ids=IDS).logits, b(input_ids=IDS).logits, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ local folders
def test_local_folder(tiny_base):
    rb = resolve_base(str(tiny_base))
    assert rb.path == tiny_base.resolve() and rb.source == "local" and rb.id == tiny_base.name
    assert rb.config_sha256 == sha256_file(tiny_base / "config.json") and len(rb.config_sha256) == 64
    assert resolve_base(str(tiny_base), source="local") == rb


def test_missing_local_folder_names_it_and_suggests_tiny_base(tmp_path):
    missing = tmp_path / "no-such-base"
    for source in ("auto", "local"):
        with pytest.raises(ModelLoadError) as e:
            resolve_base(str(missing), source=source)
        assert str(missing) in str(e.value) and "persona-lora tiny-base" in str(e.value)
    # a bare relative name that cannot be a hub id is a folder too
    with pytest.raises(ModelLoadError, match="base model folder just-a-name does not exist"):
        resolve_base("just-a-name")


def test_folder_without_config_is_refused(tmp_path):
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="no config.json"):
        resolve_base(str(tmp_path))


def test_existing_folder_that_looks_like_a_hub_id_is_local(tiny_base, tmp_path, monkeypatch):
    shutil.copytree(tiny_base, tmp_path / "owner" / "model")
    monkeypatch.chdir(tmp_path)
    rb = resolve_base("owner/model")
    assert rb.source == "local" and rb.path == (tmp_path / "owner" / "model").resolve()


def test_unknown_source_is_a_usage_error(tiny_base):
    with pytest.raises(UsageError, match="--source"):
        resolve_base(str(tiny_base), source="s3")


# ------------------------------------------------------------------------------------------------ Hugging Face
def test_hub_unreachable_is_reported_quickly(monkeypatch):
    import huggingface_hub.constants as c

    dead = dead_endpoint()
    monkeypatch.setenv("HF_ENDPOINT", dead)
    monkeypatch.setattr(c, "ENDPOINT", dead)
    monkeypatch.setattr(c, "HUGGINGFACE_CO_URL_TEMPLATE", dead + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "2")
    monkeypatch.setenv("HF_HUB_DOWNLOAD_TIMEOUT", "2")
    for name in ("HF_HUB_ETAG_TIMEOUT", "HF_HUB_DOWNLOAD_TIMEOUT"):
        if hasattr(c, name):
            monkeypatch.setattr(c, name, 2)
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", False)
    start = time.monotonic()
    with pytest.raises(ModelLoadError) as e:
        resolve_base("someone/some-model")
    assert time.monotonic() - start < 20
    msg = str(e.value)
    assert "someone/some-model" in msg and "cannot reach" in msg and "HF_ENDPOINT" in msg


def test_missing_hub_repo(hub_server):
    with pytest.raises(ModelLoadError) as e:
        resolve_base("someone/not-there")
    msg = str(e.value)
    assert "someone/not-there was not found on" in msg and "HF_TOKEN" in msg and "no local folder" in msg


@pytest.mark.slow
def test_base_pushed_to_the_hub_resolves_and_loads(hub_server, tiny_base, tmp_path):
    from huggingface_hub import HfApi

    folder = shutil.copytree(tiny_base, tmp_path / "upload")
    (folder / "pytorch_model.bin").write_bytes(b"pickle: must never be downloaded")
    api = HfApi()
    api.create_repo("tester/tiny-base")
    api.upload_folder(folder_path=str(folder), repo_id="tester/tiny-base")

    rb = resolve_base("tester/tiny-base")
    assert rb.source == "hf" and rb.id == "tester/tiny-base" and rb.revision is None
    assert str(rb.path).startswith(hub_server.hf_home)
    got = sorted(p.name for p in rb.path.iterdir())
    assert got == sorted(p.name for p in tiny_base.iterdir())  # everything but the pickle
    assert rb.config_sha256 == sha256_file(tiny_base / "config.json")

    model = load_base_model(rb, device="cpu")
    assert type(model).__name__ == "DeepseekV2ForCausalLM"
    same_logits(model.eval(), load_base_model(str(tiny_base), device="cpu").eval())
    assert load_tokenizer(rb).chat_template == DEEPSEEK_V2
    # by hub id too, and a missing revision has its own message
    assert load_base_model("tester/tiny-base", device="cpu").config.model_type == "deepseek_v2"
    with pytest.raises(ModelLoadError, match="revision 'nope' does not exist in tester/tiny-base"):
        resolve_base("tester/tiny-base", revision="nope")


def test_base_patterns_exclude_pickles():
    import fnmatch

    for name in ("pytorch_model.bin", "model.pt", "weights.pkl", "model.ckpt"):
        assert not any(fnmatch.fnmatch(name, p) for p in BASE_PATTERNS), name
    for name in ("config.json", "model-00001-of-00002.safetensors", "chat_template.jinja", "tokenizer.model"):
        assert any(fnmatch.fnmatch(name, p) for p in BASE_PATTERNS), name


# ------------------------------------------------------------------------------------------------ ModelScope
def test_modelscope_base_resolves_and_loads(ms_server, tiny_base):
    ms_server.add_repo("mstester/tiny-base", {p.name: p.read_bytes() for p in tiny_base.iterdir()})
    rb = resolve_base("mstester/tiny-base", source="modelscope")
    assert rb.source == "modelscope" and rb.id == "mstester/tiny-base"
    assert sorted(p.name for p in rb.path.iterdir()) == sorted(p.name for p in tiny_base.iterdir())
    shard = "model-00001-of-00002.safetensors"
    assert (rb.path / shard).read_bytes() == (tiny_base / shard).read_bytes()
    assert type(load_base_model(rb, device="cpu")).__name__ == "DeepseekV2ForCausalLM"


def test_modelscope_missing_repo(ms_server):
    with pytest.raises(ModelLoadError) as e:
        resolve_base("mstester/not-there", source="modelscope")
    assert "mstester/not-there was not found on ModelScope" in str(e.value) and "MODELSCOPE_API_TOKEN" in str(e.value)


# ------------------------------------------------------------------------------------------------ loading options
def test_load_in_4bit_on_cpu_is_a_usage_error(tiny_base):
    with pytest.raises(UsageError, match="load_in_4bit.*CUDA"):
        load_base_model(str(tiny_base), device="cpu", load_in_4bit=True)


@pytest.mark.parametrize("dtype", ["int8", "float64", "half-precision"])
def test_unknown_dtype_is_a_usage_error(tiny_base, dtype):
    with pytest.raises(UsageError, match=f"dtype must be one of auto.*{dtype}"):
        load_base_model(str(tiny_base), device="cpu", dtype=dtype)


def test_dtypes(tiny_base):
    assert default_dtype("cpu") is torch.float32
    assert parse_dtype(None, "cpu") is parse_dtype("auto", "cpu") is torch.float32
    assert parse_dtype("bf16", "cpu") is torch.bfloat16 and parse_dtype("fp16", "cpu") is torch.float16
    model = load_base_model(str(tiny_base), device="cpu")
    assert model.dtype is torch.float32
    assert all(p.dtype is torch.float32 for p in model.parameters())
    assert load_base_model(str(tiny_base), device="cpu", dtype="bfloat16").dtype is torch.bfloat16


def test_load_tokenizer_with_a_chat_template_file(tiny_base, tmp_path):
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    tok = load_tokenizer(str(tiny_base), chat_template_file=template)
    assert tok.chat_template == template.read_text() and tok.pad_token == tok.eos_token
    with pytest.raises(ModelLoadError, match="--chat-template .* does not exist"):
        load_tokenizer(str(tiny_base), chat_template_file=tmp_path / "missing.jinja")


def test_offline_mode_loads_a_cached_base_and_names_itself(hub_server, tiny_base, tmp_path, monkeypatch):
    import huggingface_hub.constants as c
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo("tester/offline-base")
    api.upload_folder(folder_path=str(tiny_base), repo_id="tester/offline-base")
    online = resolve_base("tester/offline-base")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    assert resolve_base("tester/offline-base").path == online.path
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE is set and tester/not-cached is not in the local cache"):
        resolve_base("tester/not-cached")
