"""The training run's output folder: decide what a run may do with it, change nothing until everything checked.

The adapter folder a run writes is also where its checkpoints (`checkpoints/`) and logs (`logs/`) live, so a
second run into the same folder either continues the first (`--resume`) or replaces it (`--overwrite`), and
refuses otherwise. Nothing the user made is lost on the way:

- `plan_output` only looks: it names every reason the folder cannot be used before the data is read or the
  model is loaded;
- `claim_output` acts, after the data and the model were validated: it creates the folder, or, to replace a
  previous run, a hidden sibling that takes the folder's place only when the new run has finished
  (`complete_output`); a failed or interrupted replacement leaves the previous run as it was;
- `--overwrite` only ever replaces a folder whose manifest says persona-lora wrote it (every run writes one
  before its first step);
- a checkpoint whose files are incomplete or corrupt is skipped for the newest intact one.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from persona_lora.artifact import MANIFEST_NAME, Manifest, is_ours, read_manifest
from persona_lora.errors import ManifestError, UsageError, VerificationError
from persona_lora.train.config import TrainConfig

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
LOGS = "logs"
REPLACEMENT = ".{name}.replacement"  # the hidden sibling a replacing run trains in
DISK_MARGIN = 64 << 20


@dataclass
class OutputPlan:
    """Where this run writes and what it continues or replaces."""

    out: Path  # the folder the user named
    work: Path  # where this run writes: `out`, or a hidden sibling that replaces `out` at the end
    resume_from: Path | None  # the checkpoint to continue
    previous: Manifest | None  # the manifest already in `out` (the run resumed or replaced)

    @property
    def replaces(self) -> bool:
        return self.work != self.out


def plan_output(cfg: TrainConfig) -> OutputPlan:
    """Decide what this run does with its output folder; changes nothing, refuses with the reason and the fix."""
    out = Path(cfg.training.output_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output-dir {out} is a file, not a folder; choose a folder for the adapter")
    check_writable(out)
    previous = _previous_manifest(out)
    resume = cfg.training.resume
    ckpt = latest_checkpoint(out) if resume in ("true", "auto") else None
    if resume == "true" and ckpt is None:
        raise UsageError(f"--resume: no checkpoint found in {out / CHECKPOINTS}; start without --resume")
    if ckpt is not None:
        return OutputPlan(out, out, ckpt, previous)
    if out.exists() and any(out.iterdir()):
        if not cfg.training.overwrite:
            raise UsageError(f"output folder {out} exists and is not empty; pass --overwrite to replace it, --resume "
                             "to continue its latest checkpoint, or choose another --output-dir")
        if not is_ours(out):
            raise UsageError(f"--overwrite refused: {out} does not look like a persona-lora run folder (no readable "
                             f"{MANIFEST_NAME}); nothing was changed; remove it yourself if you mean it")
        return OutputPlan(out, out.parent / REPLACEMENT.format(name=out.name), None, previous)
    return OutputPlan(out, out, None, None)


def check_writable(out: Path) -> None:
    """Refuse an output folder that cannot be written (read-only file system, no permission, a file in the way)
    now, not after minutes of loading and training."""
    probe_in = out
    while not probe_in.exists():
        if probe_in.parent == probe_in:
            break
        probe_in = probe_in.parent
    if probe_in.exists() and not probe_in.is_dir():
        raise UsageError(f"--output-dir {out}: {probe_in} is a file, so the folder cannot be created there")
    try:
        tempfile.TemporaryDirectory(dir=probe_in, prefix=".persona-lora-probe-").cleanup()
    except OSError as e:
        raise UsageError(f"--output-dir {out} cannot be written ({e.strerror} in {probe_in}); choose a folder on a "
                         "writable disk") from None


def _previous_manifest(out: Path) -> Manifest | None:
    if not (out / MANIFEST_NAME).is_file():
        return None
    try:
        return read_manifest(out)
    except ManifestError as e:
        log.warning("the previous run's manifest cannot be read (%s)", e)
        return None


def claim_output(plan: OutputPlan, need_bytes: int) -> None:
    """Create the folder this run writes in (after every check passed), with room for its files."""
    if plan.replaces and plan.work.exists():
        shutil.rmtree(plan.work)  # an earlier replacement that did not finish: ours, never the user's folder
    plan.work.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(plan.work).free
    if need_bytes + DISK_MARGIN > free:
        raise UsageError(f"not enough disk space in {plan.work}: the adapter and its checkpoints need about "
                         f"{need_bytes / 1e9:.2f} GB, {free / 1e9:.2f} GB are free; free some space or choose "
                         "another --output-dir")


def complete_output(plan: OutputPlan) -> Path:
    """Put a finished replacement in place of the previous run (removed only now); returns the output folder."""
    if not plan.replaces:
        return plan.out
    old = plan.out.parent / f".{plan.out.name}.replaced"
    if old.exists():
        shutil.rmtree(old)
    plan.out.rename(old)
    plan.work.rename(plan.out)
    shutil.rmtree(old)
    log.info("the previous run in %s was replaced", plan.out)
    return plan.out


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
