"""What persona-lora asks of a hub (`HubBackend`), the records it gets back, and the helpers every client module
shares: token redaction and the network-failure finder used by each client's error translator.

The client modules (`hf_backend.py`, `ms_backend.py`) implement this interface; `backends.backend(hub)` picks
one. Keeping the interface apart from the picker keeps the imports one-way: clients → interface ← picker → clients.
Tokens never reach a message: everything shown goes through `redact`.
"""

from __future__ import annotations

import os
import re
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from persona_lora.errors import HubError

TOKEN_VARIABLES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "MODELSCOPE_API_TOKEN")


@dataclass(frozen=True)
class RemoteFile:
    """What the hub says about one file: size and a hash (sha256 for LFS files, else the git blob sha1)."""

    path: str
    size: int | None
    sha256: str | None = None
    git_oid: str | None = None


@dataclass(frozen=True)
class CommitResult:
    url: str
    repo_id: str  # with the owner filled in
    commit: str | None
    pr_url: str | None = None


class HubBackend(Protocol):
    """What persona-lora asks of a hub. `errors(...)` wraps calls and turns the client's exceptions into
    `error_type` (HubError unless the caller is loading a base model) with the fix spelled out."""

    name: str  # "hf" | "modelscope"
    label: str  # for messages: "the Hugging Face Hub", "ModelScope"
    default_branch: str

    def endpoint(self) -> str: ...

    def token(self, explicit: str | None = None) -> str | None: ...

    def errors(self, action: str, repo_id: str, *, revision: str | None = None, token: str | None = None,
               error_type: type[Exception] = HubError, hint: str = "") -> AbstractContextManager: ...

    def files(self, repo_id: str, *, revision: str | None, token: str | None) -> tuple[str | None, list[RemoteFile]]:
        """(commit the listing is of, when the hub says; every file of the repo at `revision`)."""

    def existing_files(self, repo_id: str, *, revision: str | None,
                       token: str | None) -> tuple[str, str | None, list[RemoteFile] | None]:
        """(the repo id with its owner, the revision listed, the files a commit to `revision` would start from):
        that branch's, or the default branch's (revision None) when `revision` does not exist yet; files None when
        the repo does not exist."""

    def snapshot(self, repo_id: str, *, revision: str | None, commit: str | None, allow_patterns: list[str],
                 local_dir: str | Path | None = None, token: str | None = None) -> Path:
        """Download the matching files (into the client's cache unless `local_dir`) and return the folder."""

    def missing_token(self, action: str) -> HubError: ...

    def check_commit(self, repo_id: str, *, create_pr: bool = False) -> None:
        """Refuse, before any network call, what this hub cannot do (UsageError naming the option)."""

    def commit(self, repo_id: str, folder: Path, files: list[str], *, repo_type: str = "model", private: bool = False,
               revision: str | None = None, create_pr: bool = False, message: str,
               token: str | None = None) -> CommitResult:
        """Create the repo if missing and upload `files` (paths relative to `folder`) in one commit."""


def redact(text: str, *secrets: str | None) -> str:
    """Remove tokens (the given ones and the usual env vars) from a message before it is shown or logged."""
    candidates = {s for s in secrets if s}
    for var in TOKEN_VARIABLES:
        if os.environ.get(var):
            candidates.add(os.environ[var])
    for s in sorted(candidates, key=len, reverse=True):
        if len(s) >= 6:
            text = text.replace(s, "***")
    # pre-signed upload/download URLs carry credentials in their query string
    return re.sub(r"(https?://[^\s?'\"]+)\?[^\s'\"]+", r"\1?…", text)


def causes(exc: BaseException):
    """`exc` and the exceptions it was raised from, outermost first."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def transport_error(exc: BaseException) -> BaseException | None:
    """The network-level failure under `exc` (connection refused/reset/dropped, timeout), if any."""
    import httpx2
    import requests

    for e in causes(exc):
        if isinstance(e, (httpx2.TransportError, ConnectionError, TimeoutError, requests.ConnectionError,
                          requests.Timeout)):
            return e
    return None
