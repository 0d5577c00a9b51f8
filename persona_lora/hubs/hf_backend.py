"""The Hugging Face Hub backend (`huggingface_hub`), and the one translator of its exceptions.

Why one commit built here instead of `upload_folder`: the selection of files must be reported to the user, and
with hf_xet installed `upload_folder` may split a folder into several commits; a single `create_commit` is
atomic on the Hub — an interrupted push leaves the repo exactly as it was.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path

from persona_lora import __version__
from persona_lora.errors import HubError, PersonaLoraError
from persona_lora.hubs.interface import CommitResult, RemoteFile, causes, redact, transport_error

log = logging.getLogger(__name__)

TOKEN_FIX = "set HF_TOKEN or run `hf auth login`"


def _server_message(e) -> str:
    msg = getattr(e, "server_message", None)
    return f" (hub says: {msg.strip()})" if msg else ""


class HuggingFace:
    name = "hf"
    label = "the Hugging Face Hub"
    default_branch = "main"

    def endpoint(self) -> str:
        """The Hub URL in use. HF_ENDPOINT is read at call time: huggingface_hub reads it only when imported."""
        env = os.environ.get("HF_ENDPOINT")
        if env:
            return env.rstrip("/")
        from huggingface_hub import constants

        return constants.ENDPOINT.rstrip("/")

    def token(self, explicit: str | None = None) -> str | None:
        from huggingface_hub import get_token

        return explicit or get_token()

    @staticmethod
    def offline() -> bool:
        """HF_HUB_OFFLINE as the client sees it (read at call time, as tests and users set it late)."""
        from huggingface_hub import constants

        env = os.environ.get("HF_HUB_OFFLINE")
        return env.strip().lower() in ("1", "true", "yes", "on") if env is not None else constants.HF_HUB_OFFLINE

    def missing_token(self, action: str) -> HubError:
        return HubError(f"{action} needs a Hugging Face token with write access: {TOKEN_FIX}")

    def api(self, token: str | None):
        from huggingface_hub import HfApi

        return HfApi(endpoint=self.endpoint(), token=token, library_name="persona-lora", library_version=__version__)

    # ------------------------------------------------------------------------------------------ errors

    @contextmanager
    def errors(self, action: str, repo_id: str, *, revision: str | None = None, token: str | None = None,
               error_type: type[Exception] = HubError, hint: str = ""):
        """Translate anything huggingface_hub or the network raises inside the block into `error_type`."""
        from huggingface_hub.errors import (
            BadRequestError,
            GatedRepoError,
            HfHubHTTPError,
            LocalEntryNotFoundError,
            LocalTokenNotFoundError,
            RemoteEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        endpoint = self.endpoint()
        page = f"{endpoint}/{repo_id}"

        def fail(message: str):
            return error_type(redact(message + hint, token))

        try:
            yield
        except PersonaLoraError:
            raise
        except LocalTokenNotFoundError:
            raise self.missing_token(action) from None
        except GatedRepoError:
            raise fail(f"{repo_id} is gated: request access at {page} (log in, accept the conditions), then use a "
                       f"token of that account: {TOKEN_FIX}") from None
        except RevisionNotFoundError:
            raise fail(f"revision {revision or 'main'!r} does not exist in {repo_id}: check the branch, tag or commit "
                       f"name (branches are listed at {page}/tree/main)") from None
        except RepositoryNotFoundError:
            if token:
                fix = "check the id; if it is private, the token in use must belong to an account that can see it"
            else:
                fix = f"check the id; if it is private, {TOKEN_FIX}"
            raise fail(f"repository {repo_id} was not found on {endpoint} (or is private): {fix}") from None
        except RemoteEntryNotFoundError as e:
            raise fail(f"a file is missing from {repo_id}: {e}") from None
        except BadRequestError as e:
            raise fail(f"{action} {repo_id}: the hub rejected the request{_server_message(e)}") from None
        except HfHubHTTPError as e:
            status = e.response.status_code if getattr(e, "response", None) is not None else None
            if status == 401:
                raise fail(f"the Hugging Face token was rejected (401 invalid credentials) by {endpoint}: "
                           f"{TOKEN_FIX} with a valid token") from None
            if status == 403:
                raise fail(f"{action} {repo_id}: forbidden (403){_server_message(e)}; use a token with write access "
                           f"to the '{repo_id.split('/')[0]}' namespace (fine-grained tokens need the repo "
                           "permission)") from None
            if status is not None and status >= 500:
                raise fail(f"{action} {repo_id}: {endpoint} answered {status} (a server error) after retries"
                           f"{_server_message(e)}; try again later") from None
            raise fail(f"{action} {repo_id} failed ({status}){_server_message(e)}") from None
        except ValueError as e:
            if "Invalid metadata in README.md" in str(e):
                raise fail(f"README.md has invalid metadata: {e}; fix the YAML header of the card") from None
            raise
        except Exception as e:  # network failures come as httpx, OSError or RuntimeError (uploads)
            transport = transport_error(e)
            if isinstance(e, RuntimeError) and "Error while uploading" in str(e):
                why = (f"the connection dropped ({type(transport).__name__})" if transport is not None
                       else str(e.__cause__ or e))
                raise fail(f"{action} {repo_id}: {str(e).rstrip('.')}: {why}. Nothing was committed, the repo is "
                           "unchanged; run the command again (files already uploaded are not sent twice)") from None
            http = next((c for c in causes(e) if isinstance(c, HfHubHTTPError) and c.response is not None), None)
            if http is not None and transport is None:  # e.g. snapshot_download wrapping a 5xx in "not in cache"
                status = http.response.status_code
                kind = " (a server error) after retries" if status >= 500 else ""
                raise fail(f"{action} {repo_id}: {endpoint} answered {status}{kind}{_server_message(http)}; try "
                           "again later") from None
            if self.offline() and (transport is not None or isinstance(e, LocalEntryNotFoundError)
                                   or type(e).__name__ == "OfflineModeIsEnabled"):
                raise fail(f"HF_HUB_OFFLINE is set and {repo_id}"
                           f"{'@' + revision if revision else ''} is not in the local cache ({action}); unset "
                           "HF_HUB_OFFLINE to download it, or give a local folder") from None
            if transport is not None or isinstance(e, LocalEntryNotFoundError):
                raise fail(f"cannot reach {endpoint}; check your network or HF_ENDPOINT "
                           f"({type(transport or e).__name__} during {action} {repo_id})") from None
            raise

    # ------------------------------------------------------------------------------------------ operations

    def files(self, repo_id: str, *, revision: str | None, token: str | None) -> tuple[str | None, list[RemoteFile]]:
        from huggingface_hub.hf_api import RepoFile

        if self.offline():
            return self._cached_files(repo_id, revision)
        api = self.api(token)
        # explicit calls first: snapshot_download turns some of these errors into "not in local cache"
        sha = api.model_info(repo_id, revision=revision).sha
        entries = api.list_repo_tree(repo_id, revision=sha, recursive=True)
        return sha, [RemoteFile(f.path, f.size, sha256=f.lfs.sha256 if f.lfs else None,
                                git_oid=None if f.lfs else f.blob_id)
                     for f in entries if isinstance(f, RepoFile)]

    def existing_files(self, repo_id: str, *, revision: str | None,
                       token: str | None) -> tuple[str, str | None, list[RemoteFile] | None]:
        api = self.api(token)
        if "/" not in repo_id:
            repo_id = f"{api.whoami()['name']}/{repo_id}"
        if not api.repo_exists(repo_id):
            return repo_id, None, None
        branch = revision if revision and api.revision_exists(repo_id, revision) else None
        return repo_id, branch, self.files(repo_id, revision=branch, token=token)[1]

    def _cached_files(self, repo_id: str, revision: str | None) -> tuple[str, list[RemoteFile]]:
        """Offline, the cache is the only listing there is: each cached file is named after its blob, whose name is
        the file's sha256 (LFS) or git blob id, so the files can still be checked against what the hub sent."""
        from huggingface_hub import constants
        from huggingface_hub.errors import LocalEntryNotFoundError
        from huggingface_hub.file_download import repo_folder_name

        cache = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")
        rev = revision or self.default_branch
        ref = cache / "refs" / rev
        folder = cache / "snapshots" / (ref.read_text().strip() if ref.is_file() else rev)
        if not folder.is_dir():
            raise LocalEntryNotFoundError(f"{repo_id}@{rev} is not in the cache {cache}")
        files = []
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            blob = path.resolve().name
            sha256, git_oid = (blob, None) if len(blob) == 64 else (None, blob) if len(blob) == 40 else (None, None)
            files.append(RemoteFile(path.relative_to(folder).as_posix(), path.stat().st_size, sha256, git_oid))
        return folder.name, files

    def snapshot(self, repo_id: str, *, revision: str | None, commit: str | None, allow_patterns: list[str],
                 local_dir: str | Path | None = None, token: str | None = None) -> Path:
        from huggingface_hub import snapshot_download

        # the cache keeps the branch ref (pass the name); a local_dir has no refs (pin the commit)
        rev = commit if (local_dir and commit) else (revision or self.default_branch)
        return Path(snapshot_download(repo_id, revision=rev, allow_patterns=allow_patterns,
                                      local_dir=str(local_dir) if local_dir else None, token=token,
                                      endpoint=self.endpoint()))

    def check_commit(self, repo_id: str, *, create_pr: bool = False) -> None:
        """Every option of a commit is available on the Hugging Face Hub."""

    def commit(self, repo_id: str, folder: Path, files: list[str], *, repo_type: str = "model", private: bool = False,
               revision: str | None = None, create_pr: bool = False, message: str,
               token: str | None = None) -> CommitResult:
        from huggingface_hub import CommitOperationAdd

        api = self.api(token)
        if "/" not in repo_id:
            repo_id = f"{api.whoami()['name']}/{repo_id}"
        else:
            api.whoami()  # fails early, and clearly, on a bad token
        api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
        branch = None if create_pr or revision in (None, self.default_branch) else revision
        if branch:
            api.create_branch(repo_id, branch=branch, repo_type=repo_type, exist_ok=True)
        operations = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(folder / rel)) for rel in files]
        info = api.create_commit(repo_id, operations, commit_message=message, revision=branch, create_pr=create_pr,
                                 repo_type=repo_type)
        page = f"{self.endpoint()}/{'datasets/' if repo_type == 'dataset' else ''}{repo_id}"
        url = info.pr_url if create_pr and info.pr_url else f"{page}/tree/{branch}" if branch else page
        return CommitResult(url, repo_id, info.oid, info.pr_url)

    def list_adapters(self, base_id: str, token: str | None) -> list[str]:
        """Models tagged `base_model:adapter:<base_id>` (the Hub derives it from an adapter card's base_model)."""
        return sorted(m.id for m in self.api(token).list_models(filter=f"base_model:adapter:{base_id}"))

    def list_tagged(self, tag: str, token: str | None) -> list[str]:
        """Models whose card carries `tag` (e.g. the base identity tag of adapters of a local base)."""
        return sorted(m.id for m in self.api(token).list_models(filter=tag))

    def safetensors_shapes(self, repo_id: str, token: str | None) -> dict[str, list[int]] | None:
        """Tensor shapes from the repo's safetensors headers (HTTP range reads, no weights downloaded); None when
        it has no safetensors."""
        from huggingface_hub.errors import NotASafetensorsRepoError

        api = self.api(token)
        api.model_info(repo_id)  # a clear "not found" / "private" error before the header reads
        try:
            meta = api.get_safetensors_metadata(repo_id)
        except NotASafetensorsRepoError:
            return None
        return {name: list(t.shape) for fm in meta.files_metadata.values() for name, t in fm.tensors.items()}
