"""The training run's output folder: decide what a run may do with it, change nothing until everything checked.

The adapter folder a run writes is also where its checkpoints (`checkpoints/`) and logs (`logs/`) live, so a
second run into the same folder either continues the first (`--resume`) or replaces it (`--overwrite`), and
refuses otherwise. Nothing the user made is lost on the way:

- `plan_output` only looks: it names every reason the folder cannot be used before the data is read or the
  model is loaded;
- `claim_output` acts, after the data and the model were validated and the disk was found to have room: it
  creates the folder, or, to replace a previous run, the hidden staging sibling of `persona_lora.output_folder`
  that takes the folder's place only when the new run has finished (`complete_output`); a failed replacement is
  removed (`abandon_output`), an interrupted one is kept to be continued, and either way the previous run stays
  as it was;
- `--overwrite` only ever replaces a folder whose manifest says persona-lora wrote it (every run writes one
  before its first step), through `output_folder.check_target`, the check every command's output passes;
- a checkpoint whose files are incomplete or corrupt is skipped for the newest intact one.
"""

from __future__ import annotations

import json
import logging
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

from persona_lora.artifact import MANIFEST_NAME, Manifest, is_ours, read_manifest
from persona_lora.errors import ManifestError, TrainingInterrupted, UsageError, VerificationError
from persona_lora.output_folder import OutputFolder, Target, check_free_space, check_target
from persona_lora.train.config import TrainConfig

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
LOGS = "logs"
OPTION = "--output-dir"


@dataclass
class OutputPlan:
    """Where this run writes and what it continues or replaces."""

    out: Path  # the folder the user named
    resume_from: Path | None  # the checkpoint to continue
    previous: Manifest | None  # the manifest already in `out` (the run resumed or replaced)
    target: Target | None = None  # set when the run replaces `out`: written through a staging sibling
    staging: OutputFolder | None = None

    def __post_init__(self):
        if self.target is not None and self.target.replaces:
            # every process of a multi-process run names the one staging folder after their launcher
            owner = os.getppid() if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
            self.staging = OutputFolder(self.target, keep_on=(TrainingInterrupted,), owner=owner)

    @property
    def replaces(self) -> bool:
        return self.staging is not None

    @property
    def work(self) -> Path:
        """Where this run writes: `out`, or the hidden sibling that replaces `out` at the end."""
        return self.staging.work if self.staging is not None else self.out


def plan_output(cfg: TrainConfig) -> OutputPlan:
    """Decide what this run does with its output folder; changes nothing, refuses with the reason and the fix."""
    out = Path(cfg.training.output_dir)
    resume = cfg.training.resume
    ckpt = None
    if out.is_dir() and resume in ("true", "auto"):
        ckpt = latest_checkpoint(out)
    if resume == "true" and ckpt is None:
        check_target(out, option=OPTION, add=True)  # a file in the way or an unwritable place says so first
        raise UsageError(f"--resume: no checkpoint found in {out / CHECKPOINTS}; start without --resume")
    if ckpt is not None:
        check_target(out, option=OPTION, add=True)  # continued in place
        return OutputPlan(out, ckpt, _previous_manifest(out))
    target = check_target(
        out, option=OPTION, replace=cfg.training.overwrite, ours=is_ours,
        foreign=f"does not look like a persona-lora run folder (no readable {MANIFEST_NAME})",
        occupied_hint="pass --overwrite to replace it, --resume to continue its latest checkpoint, or choose another "
                      "--output-dir")
    return OutputPlan(out, None, _previous_manifest(out) if target.replaces else None, target)


def _previous_manifest(out: Path) -> Manifest | None:
    if not (out / MANIFEST_NAME).is_file():
        return None
    try:
        return read_manifest(out)
    except ManifestError as e:
        log.warning("the previous run's manifest cannot be read (%s)", e)
        return None


def claim_output(plan: OutputPlan, need_bytes: int) -> None:
    """Create the folder this run writes in, once every check passed and the disk has room for its files (checked
    first, so a refusal leaves no folder behind)."""
    check_free_space(plan.out, need_bytes, option=OPTION, what="the run (its adapter and checkpoints)")
    if plan.staging is not None:
        plan.staging.begin()  # an earlier replacement that was killed is removed here: ours by its marker
    else:
        plan.out.mkdir(parents=True, exist_ok=True)


def complete_output(plan: OutputPlan) -> Path:
    """Put a finished replacement in place of the previous run (removed only now); returns the output folder."""
    if plan.staging is not None:
        plan.staging.commit()
    return plan.out


def abandon_output(plan: OutputPlan, error: BaseException) -> None:
    """A run that failed: a replacement's staging folder is removed (the previous run stays as it was), unless
    the run was interrupted with a checkpoint that `--resume --output-dir` can continue."""
    if plan.staging is not None and not isinstance(error, TrainingInterrupted):
        plan.staging.discard()


def latest_checkpoint(out: Path) -> Path | None:
    """The newest checkpoint whose files are complete and readable; a broken one is skipped, with a warning."""
    root = out / CHECKPOINTS
    if not root.is_dir():
        return None
    candidates = sorted((p for p in root.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
                        key=lambda p: int(p.name.split("-")[-1]), reverse=True)
    for ckpt in candidates:
        problem = checkpoint_problem(ckpt)
        if problem is None:
            return ckpt
        if (ckpt / "trainer_state.json").is_file():  # a checkpoint that was written and is now damaged
            log.warning("%s cannot be resumed from (%s); trying the one before it", ckpt.name, problem)
    return None


def checkpoint_problem(ckpt: Path) -> str | None:
    """Why `ckpt` cannot be resumed from, or None. Trainer writes trainer_state.json last, so its absence means
    an unfinished save; the weights' header and the optimizer and scheduler archives are checked for damage."""
    from persona_lora.safetensors_io import read_safetensors_header

    state = ckpt / "trainer_state.json"
    if not state.is_file():
        return "trainer_state.json is missing: the save did not finish"
    try:
        json.loads(state.read_text(encoding="utf-8"))["global_step"]
    except (ValueError, KeyError, TypeError) as e:
        return f"trainer_state.json is corrupt ({e})"
    try:
        read_safetensors_header(ckpt / "adapter_model.safetensors")
    except (OSError, VerificationError) as e:
        return f"adapter_model.safetensors: {e}"
    for name in ("optimizer.pt", "scheduler.pt"):
        path = ckpt / name
        if not path.is_file():
            return f"{name} is missing"
        try:
            with zipfile.ZipFile(path) as archive:  # torch.save writes a zip archive with a CRC per entry
                bad = archive.testzip()
        except (OSError, zipfile.BadZipFile) as e:
            return f"{name} is truncated or corrupt ({e})"
        if bad is not None:
            return f"{name} is corrupt (entry {bad})"
    return None
