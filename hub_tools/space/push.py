"""Push a planned Space to the Hugging Face Hub: one commit, or nothing.

Order, and why: every refusal that needs the Hub (no token, a namespace the token cannot write to, a Space that
exists with another SDK, a name taken by a Space persona-lora did not write) is found with read-only calls first.
Only then are things written: the adapters' own repos when `--push-adapters`, the Space repo
(`create_repo(repo_type="space", space_sdk="gradio", exist_ok=True)`), the token as the Space secret `HF_TOKEN`
(`add_space_secret`: the Space needs it to push votes or read private repos; it is never in any file), and
then the whole folder as one `create_commit`, which also deletes the files an earlier push wrote that are no
longer part of the Space. A commit is atomic on the Hub: a push that fails leaves the Space as it was.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from persona_lora import __version__
from persona_lora.errors import UsageError
from persona_lora.hub_tools.space.app import SETTINGS_NAME, TOKEN_SECRET, SpaceSettings
from persona_lora.hub_tools.space.plan import SpacePlan, write_space
from persona_lora.hubs.hf_backend import HuggingFace

log = logging.getLogger(__name__)


@dataclass
class SpaceResult:
    url: str
    repo_id: str
    commit: str | None
    files: list[str]
    deleted: list[str] = field(default_factory=list)
    secret_set: bool = False
    created: bool = False
    hardware_requested: str | None = None


@dataclass
class _Existing:
    """What the Hub says about the Space before the push (None fields: it does not exist)."""

    exists: bool
    old_files: list[str] = field(default_factory=list)


def _check_existing(api, repo_id: str, token: str, overwrite: bool) -> _Existing:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError

    try:
        info = api.space_info(repo_id)
    except RepositoryNotFoundError:
        return _Existing(False)
    if info.sdk and info.sdk != "gradio":
        raise UsageError(f"{repo_id} exists and is a {info.sdk} Space, not a Gradio one; persona-lora's demo is a "
                         "Gradio app: give another REPO_ID (or change that Space's SDK on the Hub first)")
    siblings = {s.rfilename for s in info.siblings or []}
    ours = SETTINGS_NAME in siblings and "persona-lora" in (info.tags or [])
    if not ours and not overwrite and siblings - {".gitattributes"}:
        raise UsageError(f"the Space {repo_id} exists and was not written by persona-lora (no {SETTINGS_NAME}); its "
                         "name is taken: give another REPO_ID, or pass --overwrite to replace its app (its other "
                         "files stay)")
    old: list[str] = []
    if SETTINGS_NAME in siblings:
        try:
            path = hf_hub_download(repo_id, SETTINGS_NAME, repo_type="space", token=token, endpoint=api.endpoint)
            old = SpaceSettings.read(Path(path).parent).files
        except (EntryNotFoundError, UsageError) as e:
            log.warning("%s: the previous %s is unreadable (%s); no stale files are removed", repo_id, SETTINGS_NAME,
                        e)
    return _Existing(True, [f for f in old if f in siblings])


def _owner_and_id(api, repo_id: str) -> tuple[str, str]:
    """(full repo id, user); refuses a namespace the token cannot write to before anything is written."""
    me = api.whoami()
    user = me["name"]
    allowed = {user} | {o.get("name") for o in me.get("orgs") or []}
    if "/" not in repo_id:
        repo_id = f"{user}/{repo_id}"
    owner = repo_id.split("/")[0]
    if owner not in allowed:
        raise UsageError(f"REPO_ID {repo_id}: the token belongs to {user}, who cannot create Spaces under {owner!r} "
                         f"(allowed: {', '.join(sorted(a for a in allowed if a))}); use a token of that namespace")
    return repo_id, user


def _private_models(api, ids: list[str]) -> list[str]:
    return [i for i in ids if getattr(api.model_info(i.split("@")[0]), "private", False)]


def push_space(plan: SpacePlan, *, push_adapters: bool = False, overwrite: bool = False, token: str | None = None,
               message: str | None = None) -> SpaceResult:
    """Push the planned Space (see the module docstring for the order); returns what was done."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    be = HuggingFace()
    token = be.token(token)
    if not token:
        raise be.missing_token("persona-lora space")
    with be.errors("push the Space", plan.repo_id, token=token):
        api = be.api(token)
        repo_id, _ = _owner_and_id(api, plan.repo_id)
        plan.repo_id = repo_id
        if plan.settings.votes_dataset and "/" not in plan.settings.votes_dataset:
            plan.settings.votes_dataset = f"{repo_id.split('/')[0]}/{plan.settings.votes_dataset}"
        existing = _check_existing(api, repo_id, token, overwrite)
        needs_token = bool(plan.settings.votes_dataset) or bool(_private_models(api, plan.hub_models))
    if push_adapters:
        _push_adapters(plan, repo_id.split("/")[0], token)
    with tempfile.TemporaryDirectory(prefix="persona-lora-space-") as tmp:
        folder = Path(tmp) / "space"
        files = write_space(plan, folder, option="the Space's temporary folder")
        _refuse_token_in_files(folder, files, token)
        stale = sorted(set(existing.old_files) - set(files))
        with be.errors("push the Space", repo_id, token=token):
            hardware = plan.hardware if plan.hardware_given else None
            api.create_repo(repo_id, repo_type="space", space_sdk="gradio", private=plan.private, exist_ok=True,
                            space_hardware=hardware if not existing.exists else None)
            if plan.settings.votes_dataset:  # created (private) now, so a taken name fails here, not on the Space
                api.create_repo(plan.settings.votes_dataset, repo_type="dataset", private=True, exist_ok=True)
            if needs_token:
                api.add_space_secret(repo_id, TOKEN_SECRET, token,
                                     description="persona-lora: pushes the votes / reads private models")
            operations = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(folder / rel)) for rel in files]
            operations += [CommitOperationDelete(path_in_repo=rel) for rel in stale]
            info = api.create_commit(repo_id, operations, repo_type="space",
                                     commit_message=message or f"Space written by persona-lora {__version__}")
            requested = None
            if hardware and existing.exists:
                api.request_space_hardware(repo_id, hardware)
                requested = hardware
    url = f"{be.endpoint()}/spaces/{repo_id}"
    log.info("pushed %d files to %s (commit %s), removed %d", len(files), url, info.oid, len(stale))
    return SpaceResult(url, repo_id, info.oid, files, stale, needs_token, not existing.exists,
                       requested or (hardware if not existing.exists else None))


def _push_adapters(plan: SpacePlan, owner: str, token: str) -> None:
    """`--push-adapters`: each local adapter becomes its own model repo OWNER/FOLDER_NAME, referenced by the
    Space instead of copied into it."""
    from persona_lora.hub_tools.push import push_folder

    for source in plan.adapters:
        if source.repo_id:
            continue
        result = push_folder(source.folder, f"{owner}/{source.folder.name}", private=plan.private, token=token)
        ref = f"{result.repo_id}@{result.commit}" if result.commit else result.repo_id
        log.info("adapter %s pushed to %s", source.folder, result.url)
        index = plan.settings.adapters.index(source.in_space)
        source.repo_id, source.in_space, source.files = result.repo_id, ref, []
        plan.settings.adapters[index] = ref


def _refuse_token_in_files(folder: Path, files: list[str], token: str) -> None:
    """The token goes into the Space secret only; a file that holds it (a user's file copied in) stops the push."""
    needle = token.encode()
    for rel in files:
        path = folder / rel
        if path.suffix in (".safetensors", ".whl"):
            continue
        if needle in path.read_bytes():
            raise UsageError(f"{rel} contains your Hugging Face token; remove it from that file, nothing was pushed")

