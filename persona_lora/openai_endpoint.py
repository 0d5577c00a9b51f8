"""What every client of an OpenAI-compatible endpoint here shares: the `/v1` base URL from what the user typed,
the URL as messages show it, the API key read from the environment variable the user names, and a scrubber.

The demo's `openai` backend and `data extract --format novel` both talk to such endpoints; they must read the
key the same way and never let it reach a message, a log line, a page or a file.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from urllib.parse import urlsplit, urlunsplit

from persona_lora.errors import UsageError

NO_KEY = "EMPTY"  # what vLLM's and SGLang's examples send when the engine was started without --api-key


def endpoint_url(endpoint: str) -> str:
    """The client's base URL: `http://host:8000` and `http://host:8000/v1` both mean the engine's `/v1` API."""
    endpoint = (endpoint or "").strip()
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UsageError(f"--endpoint must be an http(s) URL such as http://127.0.0.1:8000/v1, got {endpoint!r}")
    path = parts.path.rstrip("/")
    if not path.endswith("/v1"):
        path += "/v1"
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


def shown_url(url: str) -> str:
    """The endpoint as messages and the page show it: without user:password or query (where secrets go)."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def read_api_key(env: str | None, *, option: str = "--api-key-env") -> str:
    """The key from the environment variable named by `option`; without one, the placeholder the engines
    ignore (never the user's OPENAI_API_KEY: that key belongs to another service)."""
    if not env:
        return NO_KEY
    key = os.environ.get(env, "").strip()
    if not key:
        if not looks_like_variable_name(env):  # most likely the key itself: never print it back
            raise UsageError(f"{option} takes the name of an environment variable holding the key, and what was "
                             f"given is no variable name (it may be the key itself, so it is not shown); run "
                             f"`export ENGINE_API_KEY=<the key>` and pass {option} ENGINE_API_KEY")
        raise UsageError(f"{option} {env}: the environment variable {env} is not set or empty; export it with "
                         f"the key the endpoint expects, or leave {option} out for an endpoint without a key")
    return key


def looks_like_variable_name(name: str) -> bool:
    """An environment variable name as shells write them (upper case, digits, underscores). Anything else given
    where a variable name belongs, such as `sk-…` or a hex token, is treated as a secret and never echoed."""
    return bool(re.fullmatch(r"[A-Z_][A-Z0-9_]{0,63}", name))


def scrubber(secret: str | None) -> Callable[[str], str]:
    """A function that blanks `secret` out of a text; a closure, so the key is no attribute anything could dump."""
    if not secret or secret == NO_KEY:
        return lambda text: text
    return lambda text: text.replace(secret, "***")
