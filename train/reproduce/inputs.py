"""What `reproduce` trains on, checked against the record before anything trains: the base (the recorded hub id at
its revision, or `--base`; its config.json hash and, for a hub base, its revision) and the data (the recorded hub
dataset, or `--data`; its sha256), the held-out file when the run had one (`--eval-data`, or found beside the
data under its recorded name; its sha256), and the device type the original trained on. A difference is returned as
a named problem line; `run.plan_reproduction` refuses it unless `--allow-changes`.
"""

from __future__ import annotations

import json
from pathlib import Path

from persona_lora.artifact import Manifest
from persona_lora.errors import UsageError


def short_sha(sha: str | None) -> str:
    return f"{sha[:12]}…" if sha else "unknown"


def resolve_recorded_base(manifest: Manifest, override: str | None, hub: str):
    """The base to train on: `--base` (a local copy or hub id) or the recorded hub id at its recorded revision."""
    from persona_lora.hub_ids import parse_hub_ref
    from persona_lora.model_loading import resolve_base

    recorded = manifest.base_model
    if override is None:
        if recorded.source in (None, "local"):
            raise UsageError(f"the adapter was trained on a local base folder {recorded.id!r} (config.json sha256 "
                             f"{short_sha(recorded.config_sha256)}); give that folder (or a copy) with --base PATH")
        return resolve_base(recorded.id, revision=recorded.revision, source=recorded.source)
    if Path(override).expanduser().exists():
        return resolve_base(override, source="local")
    ref = parse_hub_ref(override)
    if ref is None:
        return resolve_base(override, source="local")  # names the missing folder
    revision = ref.revision or (recorded.revision if ref.repo_id == recorded.id else None)
    source = recorded.source if ref.repo_id == recorded.id and recorded.source in ("hf", "modelscope") else hub
    return resolve_base(ref.repo_id, revision=revision, source=source)


def check_base(manifest: Manifest, rb) -> tuple[list[str], dict]:
    """Differences between the base found and the one recorded (config hash; revision of a hub base)."""
    recorded = manifest.base_model
    used_sha = rb.config_sha256
    problems = []
    if used_sha != recorded.config_sha256:
        kinds = ""
        try:
            used_type = json.loads((rb.path / "config.json").read_text(encoding="utf-8")).get("model_type")
        except (OSError, ValueError):
            used_type = None
        if used_type and recorded.model_type and used_type != recorded.model_type:
            kinds = f" (model_type {used_type}, trained on {recorded.model_type})"
        problems.append(f"base_model.config_sha256: {rb.id}'s config.json has sha256 {short_sha(used_sha)}{kinds}; the "
                        f"adapter was trained on {recorded.id}, config.json sha256 {short_sha(recorded.config_sha256)}")
    if rb.source in ("hf", "modelscope") and rb.id == recorded.id and rb.revision != recorded.revision:
        problems.append(f"base_model.revision: {rb.id} at {rb.revision or 'its default branch'}; the adapter was "
                        f"trained on revision {recorded.revision or 'the default branch'}")
    info = {"recorded": {"id": recorded.id, "revision": recorded.revision, "config_sha256": recorded.config_sha256},
            "used": {"id": rb.id, "revision": rb.revision, "config_sha256": used_sha}}
    return problems, info


def training_rows(ds) -> int | None:
    """Records of the training file: the stats count the held-out file's records too when there was one."""
    if ds is None or ds.stats is None or ds.stats.records is None:
        return None
    held = ds.eval_file.records if ds.eval_file is not None and ds.eval_file.records is not None else 0
    return ds.stats.records - held


def load_recorded_data(manifest: Manifest, cfg: dict, override: str | None):
    """The dataset to train on: `--data` (a local copy or hub id) or the recorded hub dataset."""
    from persona_lora.dataset.reading import load_records

    ds = manifest.dataset
    if override is not None:
        same_hub = ds.hub_id is not None and override == ds.hub_id
        return load_records(override, revision=cfg["data"].get("revision") if same_hub else None)
    if ds.source == "hub" and ds.hub_id:
        return load_records(ds.hub_id, revision=cfg["data"].get("revision"))
    records = training_rows(ds)
    raise UsageError(f"the adapter was trained on a local file {ds.name!r} ({records if records is not None else '?'} "
                     f"records, sha256 {short_sha(ds.sha256)}); give that file (or a copy) with --data PATH")


def check_data(manifest: Manifest, loaded) -> tuple[list[str], dict]:
    """Differences between the data found and the data recorded (sha256, and the record counts to show it)."""
    ds = manifest.dataset
    return _compare("dataset.sha256", loaded, "trained on", ds.hub_id or ds.name, training_rows(ds), ds.sha256)


def _compare(key: str, loaded, what: str, name: str, records: int | None, sha256: str) -> tuple[list[str], dict]:
    """([the difference, named by its manifest key], {recorded, used}) of a file found against the one recorded."""
    problems = []
    if loaded.sha256 != sha256:
        count = records if records is not None else "an unrecorded number of"
        problems.append(f"{key}: {loaded.name} has {len(loaded)} records, sha256 {short_sha(loaded.sha256)}; the "
                        f"adapter was {what} {name} with {count} records, sha256 {short_sha(sha256)}")
    info = {"recorded": {"name": name, "records": records, "sha256": sha256},
            "used": {"name": loaded.hub_id or loaded.name, "records": len(loaded), "sha256": loaded.sha256}}
    return problems, info


def load_recorded_eval(manifest: Manifest, data_loaded, override: str | None):
    """The held-out file (`data.eval_path`) to train with, when the original had one: `--eval-data`, the recorded
    hub dataset, or the recorded file name beside the training file; None when the original held out a fraction."""
    from persona_lora.dataset.reading import load_records

    held = manifest.dataset.eval_file if manifest.dataset else None
    if held is None:
        if override is not None:
            raise UsageError(f"--eval-data {override}: the adapter was trained without a separate held-out file "
                             "(it held out data.eval_fraction of its data); drop --eval-data")
        return None
    if override is not None:
        return load_records(override)
    if held.source == "hub":
        return load_records(held.name)
    beside = Path(data_loaded.path).parent / Path(held.name).name if getattr(data_loaded, "path", None) else None
    if beside is not None and beside.is_file():
        return load_records(str(beside))
    records = held.records if held.records is not None else "?"
    raise UsageError(f"the adapter held out a local file {held.name!r} ({records} records, sha256 "
                     f"{short_sha(held.sha256)}), not found beside the training data; give that file (or a copy) with "
                     "--eval-data PATH")


def check_eval(manifest: Manifest, loaded) -> tuple[list[str], dict | None]:
    """Differences between the held-out file found and the one recorded (sha256 and record count)."""
    held = manifest.dataset.eval_file if manifest.dataset else None
    if held is None or loaded is None:
        return [], None
    return _compare("dataset.eval_file.sha256", loaded, "evaluated on", held.name, held.records, held.sha256)


def check_chat_template(manifest: Manifest, rb) -> list[str]:
    """The base tokenizer's chat template against the recorded one (the base's config hash does not cover it)."""
    from persona_lora.model_loading import load_tokenizer

    recorded = manifest.chat.chat_template if manifest.chat else None
    if recorded is None:
        return []
    if load_tokenizer(rb).chat_template != recorded:
        return [f"chat.chat_template: {rb.id}'s tokenizer has another chat template than the one the adapter was "
                "trained with (same config.json, other tokenizer files)"]
    return []


def choose_device(recorded: str | None, configured: str) -> str:
    """The device type the original trained on when this machine has it (the verdict "reproduced" needs it)."""
    import torch

    kind = (recorded or "").split(":")[0]
    if kind == "cpu":
        return "cpu"
    if kind == "cuda" and torch.cuda.is_available():
        return configured if configured.startswith("cuda") else "cuda"
    return configured
