"""Turning hub client exceptions into one `HubError` sentence that names the repo and the fix.

Why: huggingface_hub raises a dozen exception types (and httpx ones underneath) whose messages are long and
aimed at library developers; a user who typed `persona-lora pull` needs "revision 'v2' does not exist in
me/persona" or "cannot reach http://…; check your network or HF_ENDPOINT". Tokens never appear in these
messages: everything that reaches the user goes through `redact`.
"""

from __future__ import annotations

import logging
import os
import re
from contextlib import contextmanager

from persona_lora.errors import HubError, PersonaLoraError

log = logging.getLogger(__name__)

TOKEN_FIX = "set HF_TOKEN or run `hf auth login`"


def hf_endpoint() -> str:
    """The Hub URL in use. HF_ENDPOINT is read at call time: huggingface_hub only reads it when first imported."""
    env = os.environ.get("HF_ENDPOINT")
    if env:
        return env.rstrip("/")
    from huggingface_hub import constants

    return constants.ENDPOINT.rstrip("/")


def redact(text: str, *secrets: str | None) -> str:
    """Remove tokens (the given ones and the usual env vars) from a message before it is shown or logged."""
    candidates = set(s for s in secrets if s)
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "MODELSCOPE_API_TOKEN"):
        if os.environ.get(var):
            candidates.add(os.environ[var])
    for s in sorted(candidates, key=len, reverse=True):
        if len(s) >= 6:
            text = text.replace(s, "***")
    # pre-signed upload/download URLs carry credentials in their query string
    return re.sub(r"(https?://[^\s?'\"]+)\?[^\s'\"]+", r"\1?…", text)


def missing_token(action: str, hub: str = "hf") -> HubError:
    if hub == "modelscope":
        return HubError(
            f"{action} needs a ModelScope token: set MODELSCOPE_API_TOKEN or run `modelscope login` "
            "(create one at https://modelscope.cn/my/myaccesstoken)"
        )
    return HubError(f"{action} needs a Hugging Face token with write access: {TOKEN_FIX}")


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _transport_error(exc: BaseException) -> BaseException | None:
    """The network-level failure under `exc` (connection refused/reset/dropped, timeout), if any."""
    import httpx2

    for e in _chain(exc):
        if isinstance(e, (httpx2.TransportError, ConnectionError, TimeoutError)):
            return e
        try:
            import requests

            if isinstance(e, (requests.ConnectionError, requests.Timeout)):
                return e
        except ImportError:  # pragma: no cover
            pass
    return None


def _server_message(e) -> str:
    msg = getattr(e, "server_message", None)
    return f" (hub says: {msg.strip()})" if msg else ""


@contextmanager
def hf_errors(action: str, repo_id: str, *, revision: str | None = None, endpoint: str | None = None,
              token: str | None = None):
    """Translate anything huggingface_hub / the network raises inside the block into a HubError."""
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

    endpoint = endpoint or hf_endpoint()
    page = f"{endpoint}/{repo_id}"
    try:
        yield
    except PersonaLoraError:
        raise
    except LocalTokenNotFoundError:
        raise missing_token(action) from None
    except GatedRepoError:
        raise HubError(
            f"{repo_id} is gated: request access at {page} (log in, accept the conditions), then use a token of "
            f"that account: {TOKEN_FIX}"
        ) from None
    except RevisionNotFoundError:
        raise HubError(
            f"revision {revision or 'main'!r} does not exist in {repo_id}: check the branch, tag or commit name "
            f"(branches are listed at {page}/tree/main)"
        ) from None
    except RepositoryNotFoundError:
        if token:
            fix = "check the id; if it is private, the token in use must belong to an account that can see it"
        else:
            fix = f"check the id; if it is private, {TOKEN_FIX}"
        raise HubError(f"repository {repo_id} was not found on {endpoint} (or is private): {fix}") from None
    except RemoteEntryNotFoundError as e:
        raise HubError(redact(f"a file is missing from {repo_id}: {e}", token)) from None
    except BadRequestError as e:
        raise HubError(redact(f"{action} {repo_id}: the hub rejected the request{_server_message(e)}", token)) from None
    except HfHubHTTPError as e:
        status = e.response.status_code if getattr(e, "response", None) is not None else None
        if status == 401:
            raise HubError(
                f"the Hugging Face token was rejected (401 invalid credentials) by {endpoint}: {TOKEN_FIX} "
                "with a valid token"
            ) from None
        if status == 403:
            raise HubError(redact(
                f"{action} {repo_id}: forbidden (403){_server_message(e)}; use a token with write access to the "
                f"'{repo_id.split('/')[0]}' namespace (fine-grained tokens need the repo permission)", token)) from None
        if status is not None and status >= 500:
            raise HubError(redact(
                f"{action} {repo_id}: {endpoint} answered {status} (a server error) after retries"
                f"{_server_message(e)}; try again later", token)) from None
        raise HubError(redact(f"{action} {repo_id} failed ({status}){_server_message(e)}", token)) from None
    except ValueError as e:
        if "Invalid metadata in README.md" in str(e):
            msg = f"README.md has invalid metadata: {e}; fix the YAML header of the card"
            raise HubError(redact(msg, token)) from None
        raise
    except Exception as e:  # network failures come as httpx, OSError or RuntimeError (uploads)
        transport = _transport_error(e)
        upload_failed = isinstance(e, RuntimeError) and "Error while uploading" in str(e)
        if upload_failed:
            if transport is not None:
                why = f"the connection dropped ({type(transport).__name__})"
            else:
                why = redact(str(e.__cause__ or e), token)
            raise HubError(redact(
                f"{action} {repo_id}: {str(e).rstrip('.')}: {why}. Nothing was committed, the repo is unchanged; "
                "run the command again (files already uploaded are not sent twice)", token)) from None
        http = next((c for c in _chain(e) if isinstance(c, HfHubHTTPError) and c.response is not None), None)
        if http is not None and transport is None:  # e.g. snapshot_download wrapping a 5xx in "not in cache"
            status = http.response.status_code
            kind = " (a server error) after retries" if status >= 500 else ""
            raise HubError(redact(
                f"{action} {repo_id}: {endpoint} answered {status}{kind}{_server_message(http)}; try again later",
                token)) from None
        if transport is not None or isinstance(e, LocalEntryNotFoundError):
            raise HubError(
                f"cannot reach {endpoint}; check your network or HF_ENDPOINT "
                f"({type(transport or e).__name__} during {action} {repo_id})"
            ) from None
        raise
