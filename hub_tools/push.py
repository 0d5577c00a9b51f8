"""Push an adapter (or merged model) folder to a hub as one commit holding only the files that belong.

What belongs is decided by `files.select_files` (adapter/model files, card, manifest, tokenizer; never
checkpoints, logs or pickles unless named with --include) and reported: the user sees what was left out. A GGUF
export folder sends exactly the files its record lists, placed by `push_gguf`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from persona_lora import __version__
from persona_lora.artifact import MANIFEST_NAME, folder_kind, is_pickle, read_adapter_config, read_manifest
from persona_lora.consistency import check_folder
from persona_lora.errors import ModelLoadError, UsageError
from persona_lora.hub_ids import check_repo_id
from persona_lora.hubs.backends import backend
from persona_lora.hubs.files import select_files
from persona_lora.peft_compat import is_legacy_spelling

log = logging.getLogger(__name__)


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
    """Decide what a push of `folder` sends, without any network."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ModelLoadError(f"{folder} is not a folder; give the adapter folder `persona-lora train` wrote")
    from persona_lora.gguf_record import check_gguf_export, is_gguf_export

    if is_gguf_export(folder):  # `export --for llama.cpp|ollama`: exactly the files its record lists
        return PushPlan(folder, "gguf", check_gguf_export(folder), [])
    kind = folder_kind(folder)
    files, skipped = select_files(folder, kind, include_extra)
    check_folder(folder, allow_pickle=any(is_pickle(f) for f in files))
    for rel, why in skipped:
        log.info("not pushing %s: %s", rel, why)
    return PushPlan(folder, kind, files, skipped)


def refuse_legacy_spelling(folder: Path) -> None:
    """UsageError for an adapter of ours whose config is in the legacy spelling, naming the fix."""
    from persona_lora.artifact import adapter_model_type

    if is_legacy_spelling(read_adapter_config(folder), adapter_model_type(folder)):
        raise UsageError(
            f"{folder}: adapter_config.json is in persona-lora's legacy spelling, which stock PEFT and transformers "
            f"load onto the wrong weights of this MoE model; run `persona-lora upgrade-adapter {folder}` first "
            "(same tensors, identical outputs), or pass --legacy to push it as it is")


def refuse_interrupted_run(folder: Path) -> None:
    """UsageError for a folder whose manifest says its training run did not finish."""
    if not (folder / MANIFEST_NAME).is_file():
        return
    run = read_manifest(folder).run
    if run is not None and run.interrupted:
        raise UsageError(f"{folder}: its training run was interrupted (the weights are from the last step reached, "
                         "and the card says so); finish it with `persona-lora train ... --resume`, or pass "
                         "--allow-interrupted to push it as it is")


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
    legacy: bool = False,
    allow_interrupted: bool = False,
) -> PushResult:
    """Create `repo_id` if missing and upload the folder's adapter/model files in one commit; returns the URL.

    revision=BRANCH commits to that branch (created from main if missing); create_pr=True opens a pull
    request against main instead of committing to it. Skipped files are logged and in `result.skipped`.
    An adapter in persona-lora's legacy spelling is refused unless `legacy`: other people's PEFT would load it
    onto the wrong weights. A run that was interrupted is refused unless `allow_interrupted`.
    """
    be = backend(hub)
    if create_pr and revision not in (None, "main"):
        raise UsageError("--create-pr opens a pull request against main; do not combine it with --revision")
    check_repo_id(repo_id, owner_optional=True)
    be.check_commit(repo_id, create_pr=create_pr)
    plan = plan_push(folder, include_extra)
    if plan.kind == "adapter" and not legacy:
        refuse_legacy_spelling(plan.folder)
    if not allow_interrupted:
        refuse_interrupted_run(plan.folder)
    token = be.token(token)
    if not token:
        raise be.missing_token("push")
    if plan.kind == "gguf":  # its own repo, or beside the adapter it was made from (`push_gguf`)
        from persona_lora.hub_tools.push_gguf import push_gguf_export

        result, pushed = push_gguf_export(plan.folder, repo_id, be, token=token, private=private, revision=revision,
                                          create_pr=create_pr, message=message)
        log.info("pushed %d file(s) to %s (commit %s)", len(pushed), result.url, result.commit)
        return PushResult(result.url, repo_id=result.repo_id, commit=result.commit, pushed=pushed, skipped=[],
                          pr_url=result.pr_url)
    with be.errors("push to", repo_id, revision=revision, token=token):
        result = be.commit(repo_id, plan.folder, plan.files, private=private, revision=revision, create_pr=create_pr,
                           message=message or f"Upload {plan.kind} with persona-lora {__version__}", token=token)
    log.info("pushed %d file(s) to %s (commit %s)", len(plan.files), result.url, result.commit)
    return PushResult(result.url, repo_id=result.repo_id, commit=result.commit, pushed=plan.files,
                      skipped=plan.skipped, pr_url=result.pr_url)
