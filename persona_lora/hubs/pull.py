"""Pull an adapter (or merged model) from a hub, then verify it before anyone loads it.

Why verify here: hub clients check sizes but not hashes, will happily download pickles, and know nothing about
which base an adapter fits. `pull` refuses pickles unless asked, compares every file with the hub's sha256
(LFS) / git blob id, checks the files parse, and with `base` checks the adapter fits that base.

`local_or_pulled` is the one answer to "a local folder or a hub id" for every command that takes an adapter.
"""

from __future__ import annotations

import logging
from pathlib import Path

from persona_lora.artifact import is_pickle, read_adapter_config
from persona_lora.consistency import check_folder
from persona_lora.errors import HubError, ModelLoadError, PersonaLoraError, UsageError, VerificationError
from persona_lora.hub_ids import HubRef, base_identity_tag, check_repo_id, is_commit, parse_hub_ref
from persona_lora.hubs.backends import backend
from persona_lora.hubs.files import matches_pull_patterns, pull_patterns
from persona_lora.hubs.interface import RemoteFile
from persona_lora.hubs.verify import check_base, discard_files, hash_problems
from persona_lora.output_folder import OutputFolder, check_target
from persona_lora.peft_compat import is_legacy_spelling

log = logging.getLogger(__name__)


def pull(
    repo_id: str,
    *,
    hub: str = "hf",
    revision: str | None = None,
    base: str | None = None,
    allow_pickle: bool = False,
    token: str | None = None,
    local_dir: str | Path | None = None,
    force: bool = False,
) -> Path:
    """Download the adapter/model files of `repo_id` (hub cache unless `local_dir`) and verify them.

    Returns the local folder. Raises HubError (auth, not found, network) or VerificationError (pickles without
    allow_pickle, hash mismatch, an inconsistent folder, an adapter not fitting `base`): files that fail are
    removed again from the cache, so a retry downloads afresh. A `local_dir` pull is staged beside it
    (`persona_lora.output_folder`) and joins it only once verified: a refused pull leaves nothing there, not even
    the hub client's `.cache/` bookkeeping. Files already in `local_dir` are never replaced unless `force`.
    """
    be = backend(hub)
    check_repo_id(repo_id)
    target = check_target(Path(local_dir).expanduser(), option="--local-dir", add=True) if local_dir else None
    token = be.token(token)
    label = f"{repo_id}@{revision}" if revision else repo_id
    with be.errors("pull", repo_id, revision=revision, token=token):
        commit, listed = be.files(repo_id, revision=revision, token=token)
    _refuse_pickles(repo_id, listed, allow_pickle)
    if target is not None and not force:
        _refuse_replacing(target.path, [f.path for f in listed if matches_pull_patterns(f.path, allow_pickle)])
    if target is None:
        return _pull_into(be, hub, repo_id, revision, commit, listed, allow_pickle, base, token, label, None)
    staging = OutputFolder(target)  # the download lands beside --local-dir and joins it only once verified
    try:
        with staging as work:
            _pull_into(be, hub, repo_id, revision, commit, listed, allow_pickle, base, token, label, work)
    except PersonaLoraError as e:  # name the folder the user gave, not the staging folder that is gone again
        e.args = tuple(str(a).replace(str(staging.work), str(target.path)) for a in e.args)
        raise
    return target.path.resolve()


def _pull_into(be, hub: str, repo_id: str, revision: str | None, commit: str | None, listed: list[RemoteFile],
               allow_pickle: bool, base: str | None, token: str | None, label: str, local_dir: Path | None) -> Path:
    """Download into the hub cache (`local_dir` None) or `local_dir`, then verify; returns the folder."""
    with be.errors("pull", repo_id, revision=revision, token=token):
        folder = be.snapshot(repo_id, revision=revision, commit=commit, allow_patterns=pull_patterns(allow_pickle),
                             local_dir=local_dir, token=token)
        if commit and not local_dir and folder.name != commit:  # the branch moved between listing and download
            commit, listed = be.files(repo_id, revision=folder.name, token=token)
            _refuse_pickles(repo_id, listed, allow_pickle)
    remote = {f.path: f for f in listed if matches_pull_patterns(f.path, allow_pickle)}
    if not remote:
        raise VerificationError(f"{repo_id} has no adapter or model files (adapter_config.json, *.safetensors, …) "
                                f"on {be.label}")
    unhashed = [p for p, f in remote.items() if not (f.sha256 or f.git_oid)]
    if unhashed:
        log.warning("%s listed no hash for %s; only their sizes are checked", be.label, ", ".join(unhashed))
    problems = hash_problems(folder, remote)
    if problems:
        discard_files(folder, [p.split(":")[0] for p in problems])
        raise VerificationError(
            f"the download of {label} is corrupt (it does not match what the hub lists):"
            + "".join(f"\n  - {p}" for p in problems)
            + "\nThe bad files were removed again; run pull again. If it keeps failing, a proxy or the hub copy is "
            "at fault."
        )
    try:
        if check_folder(folder, allow_pickle=allow_pickle).kind == "adapter":
            _warn_legacy_spelling(folder, repo_id)
        if base:
            check_base(folder, base, token=token, hub=hub)
    except VerificationError as e:
        discard_files(folder, sorted(remote))
        raise VerificationError(f"{label} was refused and its files removed again: {e}") from None
    log.info("pulled %s into %s (%d files verified)", label, folder, len(remote))
    return folder


def _refuse_replacing(local_dir: Path, paths: list[str]) -> None:
    """UsageError naming the files of `local_dir` a pull would replace (pass --force to allow it)."""
    taken = [p for p in paths if (local_dir / p).exists()]
    if taken:
        raise UsageError(f"--local-dir {local_dir} already holds {', '.join(taken[:6])}"
                         f"{', …' if len(taken) > 6 else ''}: pull would replace them; choose an empty folder or "
                         "pass --force")


def _warn_legacy_spelling(folder: Path, repo_id: str) -> None:
    """A pulled adapter in persona-lora's legacy spelling loads correctly in persona-lora, not in stock PEFT: say
    how to get a portable copy (the hub cache itself must stay as the hub has it)."""
    from persona_lora.artifact import adapter_model_type

    if is_legacy_spelling(read_adapter_config(folder), adapter_model_type(folder)):
        log.warning("%s is in persona-lora's legacy adapter spelling: persona-lora loads it as trained, stock PEFT "
                    "and transformers do not. For a portable copy: persona-lora pull %s --local-dir DIR && "
                    "persona-lora upgrade-adapter DIR", repo_id, repo_id)


def _refuse_pickles(repo_id: str, files: list[RemoteFile], allow_pickle: bool) -> None:
    pickled = sorted(f.path for f in files if is_pickle(f.path))
    if pickled and not allow_pickle:
        raise VerificationError(
            f"{repo_id} contains pickled files ({', '.join(pickled[:5])}{', …' if len(pickled) > 5 else ''}): "
            "loading a pickle runs arbitrary code. Nothing was downloaded. If you trust the repo's author, pass "
            "--allow-pickle (allow_pickle=True)"
        )
    if pickled:
        log.warning("%s contains pickled files %s; downloading them because allow_pickle is set", repo_id, pickled)


def local_or_pulled(spec: str, *, hub: str = "hf", revision: str | None = None,
                    what: str = "ADAPTER") -> tuple[Path, HubRef | None, str | None]:
    """(local folder, hub reference or None, pulled commit or None) for a folder path or `owner/name[@revision]`.

    An existing folder wins; otherwise a hub id is pulled and verified; anything else names the problem. A path
    whose parent folder exists here (`runs/tiny-adaptr`) is a mistyped folder, not a hub id: it is reported as
    such, with the closest names in that folder, and the hub is never asked (a network error would hide the cause)."""
    local = Path(spec).expanduser()
    if local.is_dir():
        return local.resolve(), None, None
    ref = parse_hub_ref(spec)
    parent_here = str(local.parent) not in (".", "") and local.parent.is_dir()
    if ref is None or spec.startswith((".", "/", "~")) or parent_here:
        message = f"{what} {spec}: no such folder"
        if ref is None:
            message += ", and it is not a hub id (owner/name[@revision])"
        elif parent_here:
            message += f" (not tried as a hub id: {local.parent} is a folder here)"
        raise ModelLoadError(message + (_closest(local) if parent_here else ""))
    ref = HubRef(ref.repo_id, revision or ref.revision)
    try:
        folder = pull(ref.repo_id, hub=hub, revision=ref.revision)
    except HubError as e:
        raise HubError(f"{what} {spec}: there is no local folder of that name, and as a hub id: {e}") from e
    return folder.resolve(), ref, folder.name if is_commit(folder.name) else None


def _closest(path: Path) -> str:
    """`; did you mean runs/tiny-adapter?` from the names beside a mistyped folder."""
    import difflib

    try:
        names = [p.name for p in path.parent.iterdir() if p.is_dir()]
    except OSError:
        return ""
    close = difflib.get_close_matches(path.name, names, n=2, cutoff=0.6)
    return f"; did you mean {' or '.join(str(path.parent / c) for c in close)}?" if close else ""


def list_adapters(base_id: str, *, hub: str = "hf", token: str | None = None) -> list[str]:
    """Ids of hub models that are adapters of `base_id`: a hub id (the card's `base_model`) or a local base folder
    (its config.json's sha256, which persona-lora's cards carry as a tag whatever the base's name)."""
    be = backend(hub)
    token = be.token(token)
    folder = Path(base_id).expanduser()
    with be.errors("list adapters of", base_id, token=token):
        if (folder / "config.json").is_file():
            from persona_lora.hashing import sha256_file

            return be.list_tagged(base_identity_tag(sha256_file(folder / "config.json")), token)
        return be.list_adapters(base_id, token)
