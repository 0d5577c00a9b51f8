"""The same push/pull on ModelScope (modelscope.cn), through the `modelscope` client.

Why separate: ModelScope's client (modelscope 1.40 delegates to the `modelscope_hub` package) has its own
repo API, default branch (`master`), token (MODELSCOPE_API_TOKEN or `modelscope login`'s cache) and
endpoint (MODELSCOPE_ENDPOINT, or the older MODELSCOPE_DOMAIN), and raises its own exception types. This module
keeps those differences in one place and returns what `pull.pull` verifies (folder + remote file metadata).

Not available on ModelScope: pull requests (`create_pr`) and listing adapters by base model.
"""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager, redirect_stdout
from pathlib import Path

from persona_lora.errors import HubError, PersonaLoraError, UsageError, VerificationError

from persona_lora.hub_tools.errors import _transport_error, missing_token, redact
from persona_lora.hub_tools.files import is_pickle, matches_pull_patterns, pull_patterns
from persona_lora.hub_tools.verify import RemoteFile

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "https://www.modelscope.cn"
DEFAULT_BRANCH = "master"
TOKEN_FIX = "set MODELSCOPE_API_TOKEN or run `modelscope login`"


def ms_endpoint() -> str:
    """The endpoint the modelscope client will use (same precedence as its config)."""
    value = os.environ.get("MODELSCOPE_ENDPOINT") or os.environ.get("MODELSCOPE_DOMAIN") or DEFAULT_ENDPOINT
    value = value.strip().rstrip("/")
    return value if "://" in value else f"https://{value}"


def ms_token(token: str | None = None) -> str | None:
    """Explicit token, else MODELSCOPE_API_TOKEN, else the token `modelscope login` stored."""
    if token:
        return token
    if os.environ.get("MODELSCOPE_API_TOKEN"):
        return os.environ["MODELSCOPE_API_TOKEN"]
    try:
        from modelscope.hub.api import ModelScopeConfig

        return ModelScopeConfig.get_token() or None
    except Exception:  # pragma: no cover - a broken credentials dir means "no token"
        return None


@contextmanager
def ms_errors(action: str, repo_id: str, *, revision: str | None = None, token: str | None = None):
    """Translate modelscope / requests exceptions into HubError."""
    endpoint = ms_endpoint()
    try:
        yield
    except PersonaLoraError:
        raise
    except Exception as e:
        name = type(e).__name__
        text = redact(str(e), token)
        low = text.lower()
        if "hash mismatch" in low or name in ("FileIntegrityError", "FileSizeMismatchError"):
            raise VerificationError(
                f"the download of {repo_id} from ModelScope is corrupt (it does not match the hub's hashes): {text}. "
                "Run pull again; if it keeps failing, a proxy or the hub copy is at fault") from None
        if _transport_error(e) is not None or name in ("NetworkError", "RequestTimeoutError"):
            raise HubError(f"cannot reach {endpoint}; check your network or MODELSCOPE_DOMAIN "
                           f"({name} during {action} {repo_id})") from None
        if name == "AuthenticationError" or " 401" in text or "unauthorized" in low:
            raise HubError(f"ModelScope rejected the token (401) at {endpoint}: {TOKEN_FIX} with a valid token") \
                from None
        if name == "PermissionDeniedError" or " 403" in text or "forbidden" in low:
            raise HubError(f"{action} {repo_id}: forbidden (403) on ModelScope; use a token with write access to "
                           f"'{repo_id.split('/')[0]}' (or request access on {endpoint}/models/{repo_id})") from None
        if name in ("NotExistError", "FileNotFoundError") or "not exist" in low or "not found" in low or " 404" in text:
            if revision and "revision" in low:
                raise HubError(f"revision {revision!r} does not exist in {repo_id} on ModelScope; "
                               "check the branch/tag name") from None
            raise HubError(f"{repo_id} was not found on ModelScope ({endpoint}), or it is private: check the id; "
                           f"for a private repo {TOKEN_FIX}") from None
        if name == "ServerError":
            raise HubError(f"{action} {repo_id}: ModelScope server error ({text}); try again later") from None
        raise HubError(f"{action} {repo_id} on ModelScope failed: {name}: {text}") from None


def _api(token: str | None):
    from modelscope.hub.api import HubApi

    return HubApi(endpoint=ms_endpoint(), token=token)


def push(plan, repo_id: str, *, private: bool, revision: str | None, create_pr: bool, message: str,
         token: str | None):
    """Create the repo if missing and upload `plan.files` with one `upload_folder` call."""
    from persona_lora.hub_tools.push import PushResult

    if create_pr:
        raise UsageError("--create-pr is a Hugging Face feature; ModelScope has no pull requests through its API")
    token = ms_token(token)
    if not token:
        raise missing_token("push", "modelscope")
    if "/" not in repo_id:
        raise UsageError(f"on ModelScope give the full repo id owner/name, not {repo_id!r}")
    branch = revision or DEFAULT_BRANCH
    # the client prints an "Upload Report" on stdout; our stdout is the URL only (scripts read it)
    with ms_errors("push to", repo_id, revision=revision, token=token), redirect_stdout(sys.stderr):
        api = _api(token)
        api.create_repo(repo_id, repo_type="model", visibility="private" if private else "public", exist_ok=True)
        try:
            result = api.upload_folder(
                repo_id=repo_id, folder_path=str(plan.folder), repo_type="model", revision=branch,
                allow_patterns=list(plan.files), commit_message=message,
            )
        except Exception as e:
            if "failed to upload" not in str(e):
                raise
            # Unlike the Hugging Face Hub, the ModelScope client commits the files that did upload.
            raise HubError(_partial_push_message(repo_id, branch, plan.files, token, e)) from None
    url = f"{ms_endpoint()}/models/{repo_id}" + (f"/files?revision={branch}" if revision else "")
    commit = None
    if isinstance(result, dict):
        commit = result.get("sha") or result.get("commit_id") or result.get("CommitId")
    return PushResult(url, repo_id=repo_id, commit=commit, pushed=plan.files, skipped=plan.skipped, pr_url=None)


def _partial_push_message(repo_id: str, branch: str, files: list, token: str | None, error: Exception) -> str:
    try:
        there = {f.path: f for f in remote_files(repo_id, branch, token)}
        missing = [f for f in files if f not in there]
        state = (f"the repo is missing {', '.join(missing)}" if missing else
                 "some files on the repo may be older versions")
    except Exception:  # the listing failed too: say what we know
        state = "which files made it could not be checked"
    cause = redact(str(error), token).splitlines()[0]
    return (f"push to {repo_id} on ModelScope was incomplete ({cause}). The ModelScope client commits the files "
            f"that uploaded, so {repo_id}@{branch} may now hold a partial adapter: {state}. Run the same push again "
            "(uploaded files are skipped); do not pull it before that succeeds")


def remote_files(repo_id: str, revision: str, token: str | None) -> list[RemoteFile]:
    api = _api(token)
    out = []
    for f in api.list_repo_files(repo_id, "model", revision=revision, recursive=True):
        if getattr(f, "is_dir", False):
            continue
        out.append(RemoteFile(f.path, f.size, sha256=f.sha256 or None))
    return out


def pull(repo_id: str, *, revision: str | None, allow_pickle: bool, token: str | None,
         local_dir: str | Path | None) -> tuple[Path, dict[str, RemoteFile]]:
    from modelscope import snapshot_download

    token = ms_token(token)
    branch = revision or DEFAULT_BRANCH
    with ms_errors("pull", repo_id, revision=revision, token=token), redirect_stdout(sys.stderr):
        files = remote_files(repo_id, branch, token)
        pickled = sorted(f.path for f in files if is_pickle(f.path))
        if pickled and not allow_pickle:
            raise VerificationError(
                f"{repo_id} contains pickled files ({', '.join(pickled[:5])}): loading a pickle runs arbitrary code. "
                "Nothing was downloaded. If you trust the repo's author, pass --allow-pickle"
            )
        kwargs = {"revision": branch, "allow_patterns": pull_patterns(allow_pickle), "endpoint": ms_endpoint()}
        if local_dir:
            kwargs["local_dir"] = str(local_dir)
        if token:
            kwargs["token"] = token
        path = Path(snapshot_download(repo_id, **kwargs))
    remote = {f.path: f for f in files if matches_pull_patterns(f.path, allow_pickle)}
    if not remote:
        raise VerificationError(f"{repo_id} has no adapter or model files on ModelScope")
    missing_hashes = [p for p, f in remote.items() if not f.sha256]
    if missing_hashes:
        log.warning("ModelScope listed no sha256 for %s; only their sizes are checked", ", ".join(missing_hashes))
    return path, remote
