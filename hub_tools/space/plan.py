"""`persona-lora space`: what goes into a Space folder, checked before anything is written or pushed.

Why a plan first: a Space that is pushed and then fails to start (a base that does not fit the hardware, an
adapter of another base, a base the Space cannot reach) costs the user a build and a debugging session on a
remote machine. Every such problem is found here, on this machine, and reported as one message before the
folder is written; `push` then sends the folder as one commit, or nothing.

The folder (`write_space`):
- `README.md`: a Space card (`huggingface_hub.SpaceCard`, template `templates/README.md`): sdk gradio at the
  installed Gradio version, app file, title, short description, hardware suggested from the base's size, the
  models (hub ids), licence, and a body that says what the page does and how to call its API;
- `app.py` (`templates/app.py`): starts `persona-lora demo`'s app from `persona_space.json`
  (`hub_tools.space.app`); no UI code of its own;
- `requirements.txt`: what persona-lora needs, pinned to the versions installed here; persona-lora itself is
  not on a package index, so its wheel is shipped in `wheels/` and installed by `app.py` at start (a Space
  installs `requirements.txt` before the repository's other files are copied in, so the wheel cannot be named
  there);
- `adapters/NAME/` for adapters given as local folders, `base/` for `--include-base`; hub ids are referenced.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from persona_lora import __version__
from persona_lora.errors import ModelLoadError, UsageError, VerificationError
from persona_lora.hub_ids import is_repo_id
from persona_lora.hub_tools.space.app import SETTINGS_NAME, SpaceSettings
from persona_lora.hub_tools.space.files import (
    APP_FILE,
    CARD_NAME,
    REQUIREMENTS,
    WHEELS_DIR,
    build_wheel,
    render_card,
    requirements_text,
    template_path,
)
from persona_lora.hub_tools.space.spec import (
    HARDWARE,
    INCLUDE_BASE_LIMIT,
    AdapterSource,
    SpacePlan,
    check_hardware,
    parameter_count,
    suggest_hardware,
)
from persona_lora.output_folder import OutputFolder, check_free_space, check_target

log = logging.getLogger(__name__)

def _base_size(base: str, base_folder: Path | None) -> int | None:
    from persona_lora.hubs.verify import hub_base_shapes, local_base_shapes

    try:
        shapes = local_base_shapes(base_folder) if base_folder is not None else hub_base_shapes(base)
    except VerificationError as e:
        raise ModelLoadError(f"--base {base}: {e}") from None
    return parameter_count(shapes) if shapes is not None else None


def _resolve_adapter(spec: str) -> AdapterSource:
    """A local folder (copied into the Space) or a hub id (pulled here to be checked, referenced there)."""
    from persona_lora.hubs.pull import local_or_pulled

    folder, ref, _ = local_or_pulled(spec, what="--adapter")
    if ref is None:
        from persona_lora.hub_tools.push import plan_push, refuse_interrupted_run

        pushed = plan_push(folder)
        if pushed.kind != "adapter":
            raise UsageError(f"--adapter {spec} is a model folder, not an adapter; a merged model is a base: pass "
                             "it as --base")
        refuse_interrupted_run(folder)
        return AdapterSource(spec, folder, None, f"adapters/{folder.name}", pushed.files)
    return AdapterSource(spec, folder, ref.repo_id, str(ref))


def check_adapter_base(source: AdapterSource, base: str) -> None:
    """UsageError when the adapter was trained on another base (id, config or tensor shapes)."""
    from persona_lora.hubs.verify import check_base

    try:
        check_base(source.folder, base)
    except VerificationError as e:
        raise UsageError(f"--adapter {source.spec} does not belong to --base {base}: {e}. A Space shows an adapter "
                         "beside the base it was trained on; give that base, or leave this adapter out") from None


def plan_space(repo_id: str, *, base: str, adapters: list[str], base_revision: str | None = None,
               hardware: str | None = None, zerogpu: bool = False, gpu_duration: int = 60, private: bool = False,
               votes_dataset: str | None = None, votes_every: float = 5.0, include_base: bool = False,
               title: str | None = None, short_description: str | None = None, license: str | None = None,
               max_new_tokens: int = 256, wheel: str | None = None) -> SpacePlan:
    """Check every option, the base, its size against the hardware and every adapter against the base."""
    from persona_lora.hub_ids import check_repo_id

    check_repo_id(repo_id, owner_optional=True, option="REPO_ID")
    if votes_dataset:
        check_repo_id(votes_dataset, owner_optional=True, option="--votes-dataset")
    if not adapters:
        raise UsageError("give at least one --adapter (a folder or a hub id): the Space compares it with the base")
    if hardware is not None and hardware not in HARDWARE:
        raise UsageError(f"--hardware {hardware!r} is not a Space hardware flavour; choose one of "
                         f"{', '.join(HARDWARE)}")
    if zerogpu and hardware not in (None, "zero-a10g"):
        raise UsageError(f"--zerogpu runs on ZeroGPU hardware (zero-a10g); it cannot be combined with --hardware "
                         f"{hardware}")
    if gpu_duration < 1 or max_new_tokens < 1 or not votes_every > 0:
        raise UsageError("--gpu-duration, --max-new-tokens and --votes-every must be positive")
    if short_description and len(short_description) > 60:
        raise UsageError(f"--short-description is {len(short_description)} characters; a Space card allows 60")
    local = Path(base).expanduser()
    base_folder = local.resolve() if local.is_dir() else None
    if base_folder is None and not is_repo_id(base):
        raise ModelLoadError(f"--base {base}: no such folder, and it is not a hub id (owner/name)")
    if base_folder is not None and not include_base:
        raise UsageError(f"--base {base} is a local folder, which the Space cannot read: pass --include-base to "
                         "upload it into the Space (small bases), or push it first (`persona-lora push`) and give "
                         "its hub id")
    if base_folder is None and include_base:
        raise UsageError(f"--include-base uploads a local base folder; --base {base} is a hub id, which the Space "
                         "downloads itself: drop --include-base")
    if base_folder is not None and base_revision:
        raise UsageError("--revision applies to a hub base; a local base folder has none")
    base_files: list[str] = []
    if base_folder is not None:
        base_files = _base_files(base_folder)
    params = _base_size(base, base_folder)
    if params is None:
        log.warning("the size of base %s is unknown (no safetensors headers): hardware %s is not checked", base,
                    hardware or "cpu-basic")
    chosen = hardware or suggest_hardware(params, zerogpu)
    check_hardware(chosen, params, base)
    sources = [_resolve_adapter(spec) for spec in adapters]
    names = [s.in_space for s in sources if not s.repo_id]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UsageError(f"two local adapters share the folder name {dupes[0].split('/')[-1]!r}; the Space names "
                         "adapters by folder: rename one")
    check_base_at = str(base_folder) if base_folder is not None else base
    for source in sources:
        check_adapter_base(source, check_base_at)
    first = sources[0]
    settings = SpaceSettings(
        base="base" if base_folder is not None else base, adapters=[s.in_space for s in sources],
        base_revision=base_revision, max_new_tokens=max_new_tokens, zerogpu=zerogpu, gpu_duration=gpu_duration,
        votes_dataset=votes_dataset, votes_every_minutes=votes_every, persona_lora_version=__version__,
        title=title or f"{_short_name(first)} vs its base",
    )
    description = short_description or f"Chat with {_short_name(first)} and its base side by side"
    return SpacePlan(
        repo_id=repo_id, base=base, base_revision=base_revision, base_folder=base_folder, base_files=base_files,
        base_params=params, hardware=chosen, hardware_given=hardware is not None, adapters=sources,
        settings=settings, title=settings.title, short_description=description[:60],
        license=license or _adapter_license(first) or "other", private=private,
        wheel=Path(wheel).expanduser() if wheel else None,
    )


def _short_name(source: AdapterSource) -> str:
    return (source.repo_id or source.folder.name).split("/")[-1][:40]


def _adapter_license(source: AdapterSource) -> str | None:
    """The licence the adapter's card declares (the Space shows that adapter's answers)."""
    from huggingface_hub import ModelCard

    card = source.folder / CARD_NAME
    if not card.is_file():
        return None
    try:
        return ModelCard.load(card).data.to_dict().get("license")
    except Exception:  # noqa: BLE001 - a card we cannot read gives no licence; the user can pass --license
        return None


def _base_files(folder: Path) -> list[str]:
    """The base folder's model files (what `persona-lora push` would send), refused above the size limit."""
    from persona_lora.hub_tools.push import plan_push

    plan = plan_push(folder)
    if plan.kind != "model":
        raise UsageError(f"--base {folder} is an adapter folder; give the base model's folder")
    size = sum((folder / rel).stat().st_size for rel in plan.files)
    if size > INCLUDE_BASE_LIMIT:
        raise UsageError(
            f"--include-base: {folder} holds {size / 1024**3:.1f} GiB of files; a Space repository should stay small "
            f"(limit here {INCLUDE_BASE_LIMIT / 1024**3:.0f} GiB) because every restart copies it. Push the base as "
            "its own model repo (`persona-lora push FOLDER OWNER/NAME`) and give its hub id as --base")
    return plan.files


def space_bytes(plan: SpacePlan) -> int:
    """The bytes of the files a Space folder copies (adapters, the base, a given wheel): what the disk needs."""
    size = sum((s.folder / rel).stat().st_size for s in plan.adapters if not s.repo_id for rel in s.files)
    if plan.base_folder is not None:
        size += sum((plan.base_folder / rel).stat().st_size for rel in plan.base_files)
    if plan.wheel is not None and plan.wheel.is_file():
        size += plan.wheel.stat().st_size
    return size


def write_space(plan: SpacePlan, out: str | Path, *, option: str = "--dry-run") -> list[str]:
    """Write the Space folder into `out` (which must be missing or empty); returns the files written, relative.
    `plan.settings.files` is filled in and saved, so a later push knows which files persona-lora owns. The disk
    is checked for room first, and the folder is staged beside `out` (`persona_lora.output_folder`): a failure
    (a full disk, a wheel that does not build, Ctrl-C) leaves nothing. `option` names `out` in messages."""
    target = check_target(Path(out).expanduser(), option=option, occupied_hint="give a new or empty folder")
    check_free_space(target.path, space_bytes(plan), option=option, what="the Space folder")
    with OutputFolder(target) as work:
        return _write_space_files(plan, work)


def _write_space_files(plan: SpacePlan, out: Path) -> list[str]:
    files: list[str] = []
    for source in plan.adapters:
        if not source.repo_id:
            files += _copy(source.folder, source.files, out / source.in_space, source.in_space)
    if plan.base_folder is not None:
        files += _copy(plan.base_folder, plan.base_files, out / "base", "base")
    wheel = _place_wheel(plan, out / WHEELS_DIR)
    plan.settings.wheel = f"{WHEELS_DIR}/{wheel.name}"
    files.append(plan.settings.wheel)
    shutil.copyfile(template_path(APP_FILE), out / APP_FILE)
    (out / REQUIREMENTS).write_text(requirements_text(wheel.name, plan.settings.zerogpu), encoding="utf-8")
    card = render_card(plan)
    card.save(out / CARD_NAME)
    files += [APP_FILE, REQUIREMENTS, CARD_NAME, SETTINGS_NAME]
    plan.settings.files = sorted(files)
    plan.settings.write(out)
    return plan.settings.files


def _copy(src: Path, rels: list[str], dest: Path, prefix: str) -> list[str]:
    dest.mkdir(parents=True, exist_ok=True)
    for rel in rels:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / rel, dest / rel)
    return [f"{prefix}/{rel}" for rel in rels]


def _place_wheel(plan: SpacePlan, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if plan.wheel is None:
        return build_wheel(folder)
    if not plan.wheel.is_file() or not plan.wheel.name.startswith("persona_lora-") or plan.wheel.suffix != ".whl":
        raise UsageError(f"--wheel {plan.wheel}: not a persona_lora-*.whl file")
    version = plan.wheel.name.split("-")[1]
    if version != __version__:
        raise UsageError(f"--wheel {plan.wheel} is persona-lora {version}, but this is {__version__}: the Space "
                         "must run the code that checked it; build the wheel from this version")
    return Path(shutil.copy(plan.wheel, folder / plan.wheel.name))

