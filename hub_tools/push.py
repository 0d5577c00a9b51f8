"""Push an adapter (or merged model) folder to a hub as one commit holding only the files that belong.

Why one commit built here instead of `upload_folder`: the selection (files.select_files) must be reported to the
user, and with hf_xet installed `upload_folder` may split a folder into several commits; a single
`create_commit` is atomic on the Hub — an interrupted push leaves the repo exactly as it was.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from persona_lora import __version__
from persona_lora.errors import ModelLoadError, UsageError

from persona_lora.hub_tools.errors import hf_endpoint, hf_errors, missing_token
from persona_lora.artifact import folder_kind
from persona_lora.hub_tools.files import select_files

log = logging.getLogger(__name__)

HUBS = ("hf", "modelscope")


class PushResult(str):
    """The URL of what was pushed (a str), plus what was pushed and what was left out."""

    url: str
    repo_id: str
    commit: str | None
    pushed: list
    skipped: list  # [(relative path, reason)]
    pr_url: str | None

    def __new__(cls, url: str, **attrs):
        obj = super().__new__(cls, url)
        obj.url = url
        obj.repo_id = attrs.get("repo_id", "")
        obj.commit = attrs.get("commit")
        obj.pushed = list(attrs.get("pushed", []))
        obj.skipped = list(attrs.get("skipped", []))
        obj.pr_url = attrs.get("pr_url")
        return obj


@dataclass
class PushPlan:
    folder: Path
    kind: str
    files: list = field(default_factory=list)
    skipped: list = field(default_factory=list)


def plan_push(folder: str | Path, include_extra: list[str] | None = None) -> PushPlan:
    """Decide what a push of `folder` sends, without any network (also used for --dry-run style reports)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ModelLoadError(f"{folder} is not a folder; give the adapter folder `persona-lora train` wrote")
    kind = folder_kind(folder)
    files, skipped = select_files(folder, kind, include_extra)
    for rel, why in skipped:
        log.info("not pushing %s: %s", rel, why)
    return PushPlan(folder, kind, files, skipped)


def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    hub: str = "hf",
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    message: str | None = None,
    include_extra: list[str] | None = None,
    token: str | None = None,
) -> PushResult:
    """Create `repo_id` if missing and upload the folder's adapter/model files in one commit; returns the URL.

    revision=BRANCH commits to that branch (created from main if missing); create_pr=True opens a pull
    request against main instead of committing to it. Skipped files are logged and in `result.skipped`.
    """
    if hub not in HUBS:
        raise UsageError(f"--hub must be one of {', '.join(HUBS)}; got {hub!r}")
    if create_pr and revision not in (None, "main"):
        raise UsageError("--create-pr opens a pull request against main; do not combine it with --revision")
    if not repo_id or repo_id.count("/") > 1 or repo_id.startswith("/") or repo_id.endswith("/"):
        raise UsageError(f"repo id {repo_id!r} must look like owner/name (or just name for your own namespace)")
    plan = plan_push(folder, include_extra)
    message = message or f"Upload {plan.kind} with persona-lora {__version__}"
    if hub == "modelscope":
        from persona_lora.hub_tools import modelscope_hub

        return modelscope_hub.push(plan, repo_id, private=private, revision=revision, create_pr=create_pr,
                                   message=message, token=token)
    return _push_hf(plan, repo_id, private=private, revision=revision, create_pr=create_pr, message=message,
                    token=token)


def _push_hf(plan: PushPlan, repo_id: str, *, private: bool, revision: str | None, create_pr: bool, message: str,
             token: str | None) -> PushResult:
    from huggingface_hub import CommitOperationAdd, HfApi, get_token

    endpoint = hf_endpoint()
    token = token or get_token()
    if not token:
        raise missing_token("push")
    api = HfApi(endpoint=endpoint, token=token, library_name="persona-lora", library_version=__version__)
    with hf_errors("push to", repo_id, revision=revision, endpoint=endpoint, token=token):
        user = api.whoami()["name"]  # fails early, and clearly, on a bad token
        if "/" not in repo_id:
            repo_id = f"{user}/{repo_id}"
        api.create_repo(repo_id, private=private, exist_ok=True)
        branch = None if create_pr or revision in (None, "main") else revision
        if branch:
            api.create_branch(repo_id, branch=branch, exist_ok=True)
        operations = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(plan.folder / rel))
                      for rel in plan.files]
        info = api.create_commit(
            repo_id, operations, commit_message=message, revision=branch, create_pr=create_pr,
        )
    if create_pr and info.pr_url:
        url = info.pr_url
    elif branch:
        url = f"{endpoint}/{repo_id}/tree/{branch}"
    else:
        url = f"{endpoint}/{repo_id}"
    log.info("pushed %d file(s) to %s (commit %s)", len(plan.files), url, info.oid)
    return PushResult(url, repo_id=repo_id, commit=info.oid, pushed=plan.files, skipped=plan.skipped,
                      pr_url=info.pr_url)
