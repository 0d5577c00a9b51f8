"""Pull an adapter (or merged model) from a hub into the hub's own cache, then verify it before anyone loads it.

Why verify here: huggingface_hub checks sizes but not hashes, will happily download pickles, and knows nothing
about which base an adapter fits. `pull` refuses pickles unless asked, compares every file with the hub's
sha256 (LFS) / git blob id, checks the files parse, and with `base` checks the adapter fits that base.
"""

from __future__ import annotations

import logging
from pathlib import Path

from persona_lora import __version__
from persona_lora.errors import HubError, UsageError, VerificationError

from persona_lora.hub_tools.errors import hf_endpoint, hf_errors
from persona_lora.hub_tools.files import is_pickle, matches_pull_patterns, pull_patterns
from persona_lora.hub_tools.verify import RemoteFile, check_base, discard_files, hash_problems, verify_content

log = logging.getLogger(__name__)

HUBS = ("hf", "modelscope")


def pull(
    repo_id: str,
    *,
    hub: str = "hf",
    revision: str | None = None,
    base: str | None = None,
    allow_pickle: bool = False,
    token: str | None = None,
    local_dir: str | Path | None = None,
) -> Path:
    """Download the adapter/model files of `repo_id` (hub cache unless `local_dir`) and verify them.

    Returns the local folder. Raises HubError (auth, not found, network) or VerificationError (pickles without
    allow_pickle, hash mismatch — the bad files are removed so a retry downloads them again —, unparsable
    files, adapter not fitting `base`).
    """
    if hub not in HUBS:
        raise UsageError(f"--hub must be one of {', '.join(HUBS)}; got {hub!r}")
    if hub == "modelscope":
        from persona_lora.hub_tools import modelscope_hub

        folder, remote = modelscope_hub.pull(repo_id, revision=revision, allow_pickle=allow_pickle, token=token,
                                             local_dir=local_dir)
    else:
        folder, remote = _pull_hf(repo_id, revision=revision, allow_pickle=allow_pickle, token=token,
                                  local_dir=local_dir)
    label = f"{repo_id}@{revision}" if revision else repo_id
    problems = hash_problems(folder, remote)
    if problems:
        bad = [p.split(":")[0] for p in problems]
        discard_files(folder, bad)
        raise VerificationError(
            f"the download of {label} is corrupt (it does not match what the hub lists):"
            + "".join(f"\n  - {p}" for p in problems)
            + "\nThe bad files were removed from the cache; run pull again. If it keeps failing, a proxy or the "
            "hub copy is at fault."
        )
    verify_content(folder, allow_pickle=allow_pickle)
    if base:
        check_base(folder, base, token=token, hub=hub)
    log.info("pulled %s into %s (%d files verified)", label, folder, len(remote))
    return folder


def _pull_hf(repo_id: str, *, revision: str | None, allow_pickle: bool, token: str | None,
             local_dir: str | Path | None) -> tuple[Path, dict[str, RemoteFile]]:
    from huggingface_hub import HfApi, get_token, snapshot_download
    from huggingface_hub.hf_api import RepoFile

    endpoint = hf_endpoint()
    token = token or get_token()
    api = HfApi(endpoint=endpoint, token=token, library_name="persona-lora", library_version=__version__)
    with hf_errors("pull", repo_id, revision=revision, endpoint=endpoint, token=token):
        # Explicit calls first: snapshot_download turns some of these errors into "not in local cache".
        sha = api.model_info(repo_id, revision=revision).sha
        entries = _list_files(api, repo_id, sha)
        _refuse_pickles(repo_id, entries, allow_pickle)
        # Cache mode keeps the branch ref in the cache (pass the name); local_dir has no refs (pin the commit).
        path = Path(snapshot_download(
            repo_id, revision=sha if local_dir else (revision or "main"), allow_patterns=pull_patterns(allow_pickle),
            local_dir=str(local_dir) if local_dir else None, token=token, endpoint=endpoint,
        ))
        if not local_dir and path.name != sha:  # the branch moved between our listing and the download
            sha = path.name
            entries = _list_files(api, repo_id, sha)
            _refuse_pickles(repo_id, entries, allow_pickle)
    remote = {
        f.path: RemoteFile(f.path, f.size, sha256=f.lfs.sha256 if f.lfs else None, git_oid=None if f.lfs else f.blob_id)
        for f in entries if isinstance(f, RepoFile) and matches_pull_patterns(f.path, allow_pickle)
    }
    if not remote:
        raise VerificationError(f"{repo_id} has no adapter or model files (adapter_config.json, *.safetensors, …)")
    return path, remote


def _list_files(api, repo_id: str, sha: str) -> list:
    from huggingface_hub.hf_api import RepoFile

    return [f for f in api.list_repo_tree(repo_id, revision=sha, recursive=True) if isinstance(f, RepoFile)]


def _refuse_pickles(repo_id: str, entries, allow_pickle: bool) -> None:
    pickled = sorted(f.path for f in entries if is_pickle(f.path))
    if pickled and not allow_pickle:
        raise VerificationError(
            f"{repo_id} contains pickled files ({', '.join(pickled[:5])}{', …' if len(pickled) > 5 else ''}): "
            "loading a pickle runs arbitrary code. Nothing was downloaded. If you trust the repo's author, pass "
            "--allow-pickle (allow_pickle=True)"
        )
    if pickled:
        log.warning("%s contains pickled files %s; downloading them because allow_pickle is set", repo_id, pickled)


def list_adapters(base_id: str, *, hub: str = "hf", token: str | None = None) -> list[str]:
    """Ids of Hub models tagged `base_model:adapter:<base_id>` (the tag the Hub derives from a card's
    `base_model:` field on an adapter repo)."""
    if hub == "modelscope":
        raise HubError(
            "listing adapters by base model works on the Hugging Face Hub only (ModelScope has no "
            "base_model:adapter: tag search); use --hub hf"
        )
    if hub not in HUBS:
        raise UsageError(f"--hub must be one of {', '.join(HUBS)}; got {hub!r}")
    from huggingface_hub import HfApi, get_token

    endpoint = hf_endpoint()
    token = token or get_token()
    api = HfApi(endpoint=endpoint, token=token, library_name="persona-lora", library_version=__version__)
    with hf_errors("list adapters of", base_id, endpoint=endpoint, token=token):
        return sorted(m.id for m in api.list_models(filter=f"base_model:adapter:{base_id}"))
