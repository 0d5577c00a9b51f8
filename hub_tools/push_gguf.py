"""`persona-lora push EXPORT_DIR REPO`: a GGUF export (`export --for llama.cpp|ollama`) sent to a hub, either into a
repo of its own (`OWNER/NAME-GGUF`) or into the adapter's own repo, without ever replacing the adapter's card.

Where the files go is decided by what the repo already holds, read from the hub before anything is uploaded:
- nothing (or a GGUF export of ours): the files at the root, with a README whose Hub metadata lists the repo as a
  GGUF of the persona: `base_model` the adapter's repo with `base_model_relation: quantized` when the repo is named
  `<adapter repo>-GGUF` and that repo holds the very adapter weights the export was merged from (checked by
  sha256), else the base the persona was merged into with `finetune`; tags gguf, llama.cpp, ollama;
- the adapter the export was made from: the files under `gguf/`, and the adapter's README keeps every line except
  its "Run it locally" section, rewritten to name the file, the repo and the folder (a README without that
  section's markers is left as it is, with a warning saying how to add it); an adapter other than the exported
  one is refused;
- anything else: refused, since the export's README would replace what is there.
A push that succeeds is recorded in the export's record, so `card ADAPTER --gguf EXPORT_DIR` names the repo.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from pathlib import Path

from persona_lora import __version__
from persona_lora.artifact import ADAPTER_CONFIG, ADAPTER_WEIGHTS, CARD_NAME
from persona_lora.errors import UsageError
from persona_lora.gguf_record import (
    ADAPTER_REPO_FOLDER,
    EXPORT_RECORD,
    GgufRecord,
    PushedTo,
    add_push,
    check_gguf_export,
    read_record,
)
from persona_lora.hubs.interface import CommitResult, HubBackend, RemoteFile

log = logging.getLogger(__name__)

GGUF_REPO_SUFFIX = "-GGUF"


def repo_page(be: HubBackend, repo_id: str, revision: str | None) -> str:
    """The repo's page (at `revision` when it is not the default branch), as the card links it."""
    branch = revision if revision not in (None, be.default_branch) else None
    if be.name == "modelscope":
        return f"{be.endpoint()}/models/{repo_id}" + (f"/files?revision={branch}" if branch else "")
    return f"{be.endpoint()}/{repo_id}" + (f"/tree/{branch}" if branch else "")


def _same_adapter(record: GgufRecord, remote: RemoteFile | None) -> bool:
    return remote is not None and bool(record.adapter_sha256) and remote.sha256 == record.adapter_sha256


def _link(src: Path, dest: Path) -> None:
    """`src` at `dest` without copying gigabytes: a hard link (same file system), else a symbolic link."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dest)
    except OSError:
        os.symlink(src.resolve(), dest)


def _staging(near: Path) -> tempfile.TemporaryDirectory:
    """The folder the commit is laid out in: beside the export (hard links), else the system's temp folder."""
    try:
        return tempfile.TemporaryDirectory(prefix=".persona-lora-push-", dir=near)
    except OSError:  # a read-only parent: symbolic links from the temp folder
        return tempfile.TemporaryDirectory(prefix="persona-lora-push-")


def _sibling_adapter(be: HubBackend, record: GgufRecord, repo_id: str, token: str) -> str | None:
    """`OWNER/NAME` when pushing to `OWNER/NAME-GGUF` and that repo holds the adapter weights this export was merged
    from; None otherwise (no such repo, another adapter, or not a -GGUF name)."""
    if not repo_id.upper().endswith(GGUF_REPO_SUFFIX.upper()):
        return None
    sibling = repo_id[: -len(GGUF_REPO_SUFFIX)]
    with be.errors("look up the adapter repo", sibling, token=token):
        _, _, files = be.existing_files(sibling, revision=None, token=token)
    weights = next((f for f in files or [] if f.path == ADAPTER_WEIGHTS), None)
    return sibling if _same_adapter(record, weights) else None


def _adapter_card(be: HubBackend, record: GgufRecord, repo_id: str, revision: str | None, token: str,
                  place: PushedTo) -> str | None:
    """The adapter repo's README (at `revision`, the branch the commit starts from) with its "Run it locally"
    section naming this push; None when it has no such section (left as it is)."""
    from persona_lora.model_cards.markdown import tidy
    from persona_lora.model_cards.run_locally import render_run_locally, with_section

    with be.errors("read the card of", repo_id, revision=revision, token=token):
        folder = be.snapshot(repo_id, revision=revision, commit=None, allow_patterns=[CARD_NAME], token=token)
    readme = Path(folder) / CARD_NAME
    if not readme.is_file():
        return None
    others = [p for p in record.pushed if (p.hub, p.repo_id, p.folder) != (place.hub, place.repo_id, place.folder)]
    section = render_run_locally([dataclasses.replace(record, pushed=[*others, place])])
    new = with_section(readme.read_text(encoding="utf-8"), section)
    return tidy(new) if new is not None else None


def push_gguf_export(folder: Path, repo_id: str, be: HubBackend, *, token: str, private: bool,
                     revision: str | None, create_pr: bool, message: str | None) -> tuple[CommitResult, list[str]]:
    """Push the export in `folder` to `repo_id` (see the module docstring for where its files go); returns the
    commit and the paths written in the repo."""
    from persona_lora.hub_tools.export.gguf import render_readme

    record = read_record(folder)
    files = check_gguf_export(record.folder)
    with be.errors("push to", repo_id, revision=revision, token=token):
        repo_id, listed, remote = be.existing_files(repo_id, revision=revision, token=token)
    there = {f.path: f for f in remote or []}
    beside_adapter = ADAPTER_WEIGHTS in there or ADAPTER_CONFIG in there
    if beside_adapter and not _same_adapter(record, there.get(ADAPTER_WEIGHTS)):
        raise UsageError(f"{repo_id} holds another adapter than the one {record.folder} was exported from (its "
                         f"{ADAPTER_WEIGHTS} is not the one merged, sha256 {record.adapter_sha256}); push the export "
                         f"to {repo_id}{GGUF_REPO_SUFFIX}, or export the adapter of {repo_id}")
    foreign = sorted(set(there) - {".gitattributes", EXPORT_RECORD, *files})
    if not beside_adapter and foreign and EXPORT_RECORD not in there:
        raise UsageError(f"{repo_id} holds files that are neither an adapter nor a GGUF export of persona-lora "
                         f"({', '.join(foreign[:4])}{', …' if len(foreign) > 4 else ''}); the export's README.md would "
                         f"replace its card there. Push to a new repo (e.g. {repo_id}{GGUF_REPO_SUFFIX})")
    sub = ADAPTER_REPO_FOLDER if beside_adapter else ""
    place = PushedTo(be.name, repo_id, sub, revision, None, repo_page(be, repo_id, revision))
    with _staging(record.folder.parent) as tmp:
        stage = Path(tmp)
        paths = []
        for name in files:
            if name == CARD_NAME and not sub:
                continue  # written below, with the repo's metadata
            rel = f"{sub}/{name}" if sub else name
            _link(record.folder / name, stage / rel)
            paths.append(rel)
        if sub:
            card = _adapter_card(be, record, repo_id, listed, token, place)
            if card is None:
                log.warning("%s's README.md has no \"Run it locally\" section to fill in, so it was left as it is; "
                            "regenerate the card with `persona-lora card ADAPTER_DIR --gguf %s` and push the adapter "
                            "again", repo_id, record.folder)
            else:
                (stage / CARD_NAME).write_text(card, encoding="utf-8")
                paths.append(CARD_NAME)
        else:
            sibling = _sibling_adapter(be, record, repo_id, token)
            readme = render_readme(record, base_model=sibling, relation="quantized" if sibling else None)
            (stage / CARD_NAME).write_text(readme, encoding="utf-8")
            paths.append(CARD_NAME)
        what = f"GGUF export {record.gguf}" + (f" into {sub}/" if sub else "")
        with be.errors("push to", repo_id, revision=revision, token=token):
            result = be.commit(repo_id, stage, sorted(paths), private=private, revision=revision,
                               create_pr=create_pr, message=message or f"Upload {what} with persona-lora "
                               f"{__version__}", token=token)
    if create_pr:
        log.warning("opened %s; the export's record names this repo once you push again after it is merged",
                    result.pr_url)
    else:
        add_push(record.folder, dataclasses.replace(place, commit=result.commit))
    return result, sorted(paths)

