"""Pytest fixtures that point the real `huggingface_hub` client at the in-memory `FakeHub` (tests/hub_server.py).

Import them from conftest.py (`from tests.hub_fixtures import hub_server, fast_retries  # noqa: F401`) or from a
test module. Why the constants are patched too: huggingface_hub reads HF_ENDPOINT, HF_HOME, HF_HUB_CACHE,
HF_HUB_DISABLE_XET… into `huggingface_hub.constants` when it is first imported, so setting the environment
variables alone is too late once any test imported it (`datasets` keeps its own copy of the endpoint). Nothing
here ever touches ~/.cache or a real token.
"""

from __future__ import annotations

import os
import sys
import time as _time
import types

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from hub_server import DEFAULT_TOKEN, DEFAULT_USER, FakeHub  # noqa: E402
from modelscope_server import DEFAULT_MS_TOKEN, DEFAULT_MS_USER, FakeModelScope  # noqa: E402

__all__ = ["hub_server", "fast_retries", "ms_server", "ms_fast_retries", "FakeHub", "FakeModelScope", "DEFAULT_TOKEN",
           "DEFAULT_USER", "DEFAULT_MS_TOKEN", "DEFAULT_MS_USER"]


def _point_client_at(monkeypatch, url: str, home: str, token: str | None) -> None:
    import huggingface_hub.constants as c

    hub_cache = os.path.join(home, "hub")
    env = {
        "HF_ENDPOINT": url,
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HOME": home,
        "HF_HUB_CACHE": hub_cache,
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_HUB_OFFLINE": "0",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    for k in ("HF_TOKEN_PATH", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "HF_HUB_ETAG_TIMEOUT",
              "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(k, raising=False)
    if token is None:
        monkeypatch.delenv("HF_TOKEN", raising=False)
    else:
        monkeypatch.setenv("HF_TOKEN", token)

    patched = {
        "ENDPOINT": url,
        "HUGGINGFACE_CO_URL_TEMPLATE": url + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HUB_OFFLINE": False,
        "HF_HOME": home,
        "HF_HUB_CACHE": hub_cache,
        "HUGGINGFACE_HUB_CACHE": hub_cache,
        "HF_ASSETS_CACHE": os.path.join(home, "assets"),
        "HF_XET_CACHE": os.path.join(home, "xet"),
        "HF_TOKEN_PATH": os.path.join(home, "token"),
        "HF_STORED_TOKENS_PATH": os.path.join(home, "stored_tokens"),
    }
    for name, value in patched.items():
        if hasattr(c, name):
            monkeypatch.setattr(c, name, value)
    if "datasets" in sys.modules:  # `datasets` keeps its own copy of HF_ENDPOINT, read when first imported
        import datasets.config as dc

        monkeypatch.setattr(dc, "HF_ENDPOINT", url)
        monkeypatch.setattr(dc, "HUB_DATASETS_URL", url + "/datasets/{repo_id}/resolve/{revision}/{path}")
    _forget_earlier_servers()


def _forget_earlier_servers() -> None:
    """Drop what the client keeps between calls in a process: the shared httpx client's keep-alive connections,
    and HfFileSystem instances (`datasets` reads hub datasets through one; fsspec caches it with its endpoint
    and directory listings), which would still talk to an earlier test's server or answer from its listings."""
    from huggingface_hub import HfFileSystem
    from huggingface_hub.utils import _http

    _http.close_session()
    HfFileSystem.clear_instance_cache()


@pytest.fixture
def hub_server(tmp_path_factory, monkeypatch):
    """A running FakeHub; the client points at it with a valid token in HF_TOKEN. Yields the FakeHub.

    `hub_server.url`, `hub_server.tokens` ({token: {"user", "role"}}), `DEFAULT_TOKEN` / `DEFAULT_USER`.
    """
    home = str(tmp_path_factory.mktemp("hf_home"))
    server = FakeHub().start()
    _point_client_at(monkeypatch, server.url, home, DEFAULT_TOKEN)
    server.hf_home = home
    server.token = DEFAULT_TOKEN
    try:
        yield server
    finally:
        server.stop()
        _forget_earlier_servers()


@pytest.fixture
def fast_retries(monkeypatch):
    """Make the client's retry back-off instant (its sleeps of 1, 2, 4, 8, 8 s would make failure tests slow).

    Only the `time` module *reference* inside huggingface_hub's HTTP helpers is swapped for one whose `sleep`
    returns at once; the client still performs every retry against the server.
    """
    from huggingface_hub import file_download
    from huggingface_hub.utils import _http

    fake_time = types.SimpleNamespace(**{k: getattr(_time, k) for k in dir(_time) if not k.startswith("__")})
    fake_time.sleep = lambda s: None
    monkeypatch.setattr(_http, "time", fake_time)
    monkeypatch.setattr(file_download, "time", fake_time)
    return fake_time


@pytest.fixture
def ms_server(tmp_path_factory, monkeypatch):
    """A running FakeModelScope; the modelscope client points at it (MODELSCOPE_DOMAIN, the variable the docs
    name; MODELSCOPE_ENDPOINT is unset because it would win) with a valid MODELSCOPE_API_TOKEN and its
    home/cache/credentials in tmp. Yields the FakeModelScope."""
    home = tmp_path_factory.mktemp("ms_home")
    server = FakeModelScope().start()
    monkeypatch.delenv("MODELSCOPE_ENDPOINT", raising=False)
    monkeypatch.setenv("MODELSCOPE_DOMAIN", server.url)
    monkeypatch.setenv("MODELSCOPE_API_TOKEN", DEFAULT_MS_TOKEN)
    monkeypatch.setenv("MODELSCOPE_HOME", str(home / "home"))
    monkeypatch.setenv("MODELSCOPE_CACHE", str(home / "cache"))
    monkeypatch.setenv("MODELSCOPE_CREDENTIALS_PATH", str(home / "home" / "credentials"))
    server.home = str(home)
    # modelscope_hub caches one process-wide config (cache dir, endpoint) built from the environment on first use
    from modelscope_hub import config as ms_config

    monkeypatch.setattr(ms_config, "_default_config", None)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def ms_fast_retries(monkeypatch):
    """The modelscope client's back-off made instant: urllib3's retry back-off (its API session) and the sleeps
    of its upload pipeline and file-tree listing. Every retry still reaches the server."""
    import urllib3.util.retry
    from modelscope_hub import _legacy_api, _upload

    monkeypatch.setattr(urllib3.util.retry.Retry, "get_backoff_time", lambda self: 0)
    for module in (_legacy_api, _upload):
        fake_time = types.SimpleNamespace(**{k: getattr(_time, k) for k in dir(_time) if not k.startswith("__")})
        fake_time.sleep = lambda s: None
        monkeypatch.setattr(module, "time", fake_time)
