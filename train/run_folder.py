"""The training run's output folder: claim it without ever silently replacing anything, find checkpoints.

The adapter folder a run writes is also where its checkpoints (`checkpoints/`) and logs (`logs/`) live, so a
second run into the same folder either continues the first (`--resume`) or replaces it (`--overwrite`), and
refuses otherwise.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from persona_lora.artifact import ADAPTER_CONFIG, MANIFEST_NAME
from persona_lora.errors import UsageError
from persona_lora.train.config import TrainConfig

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
LOGS = "logs"
RUN_MARKERS = (MANIFEST_NAME, ADAPTER_CONFIG, CHECKPOINTS)  # what a run folder of ours holds


def prepare_output_dir(cfg: TrainConfig) -> tuple[Path, Path | None]:
    """Return (output_dir, checkpoint to resume or None); never silently overwrite anything."""
    out = Path(cfg.training.output_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output-dir {out} is a file, not a folder; choose a folder for the adapter")
    ckpt = latest_checkpoint(out)
    resume = cfg.training.resume
    if resume == "true" and ckpt is None:
        raise UsageError(f"--resume: no checkpoint found in {out / CHECKPOINTS}; start without --resume")
    if resume in ("true", "auto") and ckpt is not None:
        return out, ckpt
    if out.exists() and any(out.iterdir()):
        if not cfg.training.overwrite:
            raise UsageError(
                f"output folder {out} exists and is not empty; pass --overwrite to replace it, "
                f"--resume to continue its latest checkpoint, or choose another --output-dir"
            )
        if not any((out / m).exists() for m in RUN_MARKERS):
            raise UsageError(f"--overwrite refused: {out} does not look like a persona-lora run folder (no "
                             f"{MANIFEST_NAME}, adapter or checkpoints); remove it yourself if you mean it")
        log.warning("--overwrite: removing %s", out)
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out, None


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint (Trainer writes trainer_state.json last)."""
    root = out / CHECKPOINTS
    if not root.is_dir():
        return None
    done = [p for p in root.glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
    return max(done, key=lambda p: int(p.name.split("-")[-1]), default=None)
