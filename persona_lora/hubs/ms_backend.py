"""The ModelScope backend (modelscope.cn, through the `modelscope` client), and the one translator of its errors.

ModelScope's client has its own repo API, default branch (`master`), token (MODELSCOPE_API_TOKEN or
`modelscope login`'s cache) and endpoint (MODELSCOPE_ENDPOINT, or the older MODELSCOPE_DOMAIN), and raises its
own exception types (often plain exceptions whose text is the only clue). Unlike the Hugging Face Hub it commits
the files that did upload when others fail, which the push error message says.

Not available on ModelScope: pull requests (`create_pr`) and listing adapters by base model.
"""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager, redirect_stdout
from pathlib import Path

from persona_lora.errors import HubError, PersonaLoraError, UsageError, VerificationError
from persona_lora.hubs.interface import CommitResult, RemoteFile, redact, transport_error

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "https://www.modelscope.cn"
TOKEN_FIX = "set MODELSCOPE_API_TOKEN or run `modelscope login`"


def ms_endpoint() -> str:
    """The endpoint the modelscope client will use (same precedence as its config)."""
    value = os.environ.get("MODELSCOPE_ENDPOINT") or os.environ.get("MODELSCOPE_DOMAIN") or DEFAULT_ENDPOINT
    value = value.strip().rstrip("/")
    return value if "://" in value else f"https://{value}"


class ModelScope:
    name = "modelscope"
    label = "ModelScope"
    default_branch = "master"

    def endpoint(self) -> str:
        return ms_endpoint()

    def token(self, explicit: str | None = None) -> str | None:
        """Explicit token, else MODELSCOPE_API_TOKEN, else the token `modelscope login` stored."""
        if explicit:
            return explicit
        if os.environ.get("MODELSCOPE_API_TOKEN"):
            return os.environ["MODELSCOPE_API_TOKEN"]
        try:
            from modelscope.hub.api import ModelScopeConfig

            return ModelScopeConfig.get_token() or None
        except Exception:  # a broken credentials folder means "no token"
            return None

    def missing_token(self, action: str) -> HubError:
        return HubError(f"{action} needs a ModelScope token: {TOKEN_FIX} (create one at "
                        "https://modelscope.cn/my/myaccesstoken)")

    def _api(self, token: str | None):
        from modelscope.hub.api import HubApi

        return HubApi(endpoint=self.endpoint(), token=token)

    @contextmanager
    def errors(self, action: str, repo_id: str, *, revision: str | None = None, token: str | None = None,
               error_type: type[Exception] = HubError, hint: str = ""):
        """Translate modelscope / requests exceptions (recognised by type name and text) into `error_type`.
        The client prints reports on stdout; our stdout carries results only, so they go to stderr."""
        endpoint = self.endpoint()

        def fail(message: str):
            return error_type(redact(message + hint, token))

        try:
            with redirect_stdout(sys.stderr):
                yield
        except PersonaLoraError:
            raise
        except Exception as e:
            name = type(e).__name__
            text = redact(str(e), token)
            low = text.lower()
            if "hash mismatch" in low or name in ("FileIntegrityError", "FileSizeMismatchError"):
                raise VerificationError(
                    f"the download of {repo_id} from ModelScope is corrupt (it does not match the hub's hashes): "
                    f"{text}. Run pull again; if it keeps failing, a proxy or the hub copy is at fault") from None
            if transport_error(e) is not None or name in ("NetworkError", "RequestTimeoutError"):
                raise fail(f"cannot reach {endpoint}; check your network or MODELSCOPE_DOMAIN "
                           f"({name} during {action} {repo_id})") from None
            if name == "AuthenticationError" or " 401" in text or "unauthorized" in low:
                raise fail(f"ModelScope rejected the token (401) at {endpoint}: {TOKEN_FIX} with a valid token") \
                    from None
            if name == "PermissionDeniedError" or " 403" in text or "forbidden" in low:
                raise fail(f"{action} {repo_id}: forbidden (403) on ModelScope; use a token with write access to "
                           f"'{repo_id.split('/')[0]}' (or request access on {endpoint}/models/{repo_id})") from None
            if name in ("NotExistError", "FileNotFoundError") or "not exist" in low or "not found" in low \
                    or " 404" in text:
                if revision and "revision" in low:
                    raise fail(f"revision {revision!r} does not exist in {repo_id} on ModelScope; check the "
                               "branch/tag name") from None
                raise fail(f"{repo_id} was not found on ModelScope ({endpoint}), or it is private: check the id; "
                           f"for a private repo {TOKEN_FIX}") from None
            if name == "ServerError":
                raise fail(f"{action} {repo_id}: ModelScope server error ({text}); try again later") from None
            raise fail(f"{action} {repo_id} on ModelScope failed: {name}: {text}") from None

    def files(self, repo_id: str, *, revision: str | None, token: str | None) -> tuple[str | None, list[RemoteFile]]:
        out = []
        for f in self._api(token).list_repo_files(repo_id, "model", revision=revision or self.default_branch,
                                                  recursive=True):
            if not getattr(f, "is_dir", False):
                out.append(RemoteFile(f.path, f.size, sha256=f.sha256 or None))
        return None, out

    def existing_files(self, repo_id: str, *, revision: str | None,
                       token: str | None) -> tuple[str, str | None, list[RemoteFile] | None]:
        if not self._api(token).repo_exists(repo_id, repo_type="model", token=token):
            return repo_id, None, None
        try:
            return repo_id, revision, self.files(repo_id, revision=revision, token=token)[1]
        except Exception:  # a branch that does not exist yet: the commit starts from the default branch
            if revision in (None, self.default_branch):
                raise
            return repo_id, None, self.files(repo_id, revision=None, token=token)[1]

    def snapshot(self, repo_id: str, *, revision: str | None, commit: str | None, allow_patterns: list[str],
                 local_dir: str | Path | None = None, token: str | None = None) -> Path:
        from modelscope import snapshot_download

        kwargs = {"revision": revision or self.default_branch, "allow_patterns": allow_patterns,
                  "endpoint": self.endpoint()}
        if local_dir:
            kwargs["local_dir"] = str(local_dir)
        if token:
            kwargs["token"] = token
        return Path(snapshot_download(repo_id, **kwargs))

    def check_commit(self, repo_id: str, *, create_pr: bool = False) -> None:
        if create_pr:
            raise UsageError("--create-pr is a Hugging Face feature; ModelScope has no pull requests through its API")
        if "/" not in repo_id:
            raise UsageError(f"on ModelScope give the full repo id owner/name, not {repo_id!r}")

    def commit(self, repo_id: str, folder: Path, files: list[str], *, repo_type: str = "model", private: bool = False,
               revision: str | None = None, create_pr: bool = False, message: str,
               token: str | None = None) -> CommitResult:
        """Create the repo if missing and upload `files` with one `upload_folder` call."""
        self.check_commit(repo_id, create_pr=create_pr)
        branch = revision or self.default_branch
        api = self._api(token)
        api.create_repo(repo_id, repo_type=repo_type, visibility="private" if private else "public", exist_ok=True)
        try:
            result = api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type=repo_type,
                                       revision=branch, allow_patterns=list(files), commit_message=message)
        except Exception as e:
            if "failed to upload" not in str(e):
                raise
            raise HubError(self._partial_push_message(repo_id, branch, files, token, e)) from None
        kind = "datasets" if repo_type == "dataset" else "models"
        url = f"{self.endpoint()}/{kind}/{repo_id}" + (f"/files?revision={branch}" if revision else "")
        commit = None
        if isinstance(result, dict):
            commit = result.get("sha") or result.get("commit_id") or result.get("CommitId")
        return CommitResult(url, repo_id, commit)

    def _partial_push_message(self, repo_id: str, branch: str, files: list[str], token: str | None,
                              error: Exception) -> str:
        try:
            _, listed = self.files(repo_id, revision=branch, token=token)
            there = {f.path for f in listed}
            missing = [f for f in files if f not in there]
            state = (f"the repo is missing {', '.join(missing)}" if missing
                     else "some files on the repo may be older versions")
        except Exception:  # the listing failed too: say what we know
            state = "which files made it could not be checked"
        cause = redact(str(error), token).splitlines()[0]
        return (f"push to {repo_id} on ModelScope was incomplete ({cause}). The ModelScope client commits the "
                f"files that uploaded, so {repo_id}@{branch} may now hold a partial adapter: {state}. Run the same "
                "push again (uploaded files are skipped); do not pull it before that succeeds")

    def list_adapters(self, base_id: str, token: str | None) -> list[str]:
        raise HubError("listing adapters by base model works on the Hugging Face Hub only (ModelScope has no "
                       "base_model:adapter: tag search); use --hub hf")

    def list_tagged(self, tag: str, token: str | None) -> list[str]:
        raise HubError("listing adapters by base model works on the Hugging Face Hub only (ModelScope has no tag "
                       "search); use --hub hf")

    def safetensors_shapes(self, repo_id: str, token: str | None) -> dict[str, list[int]] | None:
        """ModelScope has no header API: shapes are not checked (None)."""
        return None
