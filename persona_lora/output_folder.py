"""The one way a command writes an output folder: checked first, staged next to it, renamed over it when complete.

Why one way: train, merge, export, `space --dry-run`, eval and `pull --local-dir` all create folders, and each
can be refused, interrupted (Ctrl-C) or meet a full disk halfway. Written in place, such a command leaves an empty
or half-written folder that looks like a result; replacing a previous result first loses it when the new one
fails. So every command goes through these steps:

1. `check_target` only looks, before any work: a file in the way, an unwritable place, a folder that is not
   empty. A non-empty folder is replaced only when the command was asked to (`--overwrite`) *and* the caller's
   `ours` test says persona-lora wrote it (an empty folder may always be used); with `add` (pull) files join an
   existing folder. Every refusal names the option, the folder and the fix, and nothing has changed.
2. `check_free_space` refuses what the disk has no room for, before the first byte.
3. `OutputFolder` (a context manager) writes into a hidden sibling `.NAME.partial-<pid>` — on the target's own
   disk, so the final rename is atomic — and when the block completes renames it over the target. A previous
   folder being replaced is removed only then; with `add`, the staged files are moved in. If anything stops the
   block (an error, Ctrl-C), the sibling and every parent folder it created are removed, and a full disk becomes
   one message naming the output, not whichever source file was being copied. A sibling left by a process that
   was killed is removed by the next write to the same target.

Outputs that are meant to be continued (a training run's checkpoints, an evaluation's rows) are written in place
once claimed; they still pass through `check_target` and `check_free_space`, so a refused start leaves nothing.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from persona_lora.errors import UsageError

log = logging.getLogger(__name__)

MARKER = ".persona-lora-partial"  # inside a staging folder: it is ours and incomplete, safe to delete
STAGING = ".{name}.partial-{pid}"
DISK_MARGIN = 64 << 20  # bytes kept free beyond the output, for small files and the file system itself
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


@dataclass(frozen=True)
class Target:
    """An output folder that passed `check_target`, and what writing it will do to what is there."""

    path: Path
    option: str  # how the command line names it, for messages: "--out", "--output-dir", …
    replaces: bool = False  # a non-empty folder of ours is there; it is replaced once the new one is complete
    adds: bool = False  # files are added to a folder that already holds others (pull --local-dir)


def check_target(path: str | Path, *, option: str, replace: bool = False, ours: Callable[[Path], bool] | None = None,
                 foreign: str = "was not written by persona-lora", occupied_hint: str = "choose a new folder",
                 add: bool = False) -> Target:
    """The output folder `path` if it may be written; UsageError naming `option`, the reason and the fix if not.

    replace: the user asked for a non-empty folder to be replaced (`--overwrite`); it is, only if `ours(path)`
    says persona-lora wrote it. foreign: why a refused folder is not ours ("is not a model folder …").
    occupied_hint: the fix for a non-empty folder without `replace`. add: a non-empty folder is fine, files are
    added to it (the caller refuses names it would replace)."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise UsageError(f"{option} {path} exists and is not a folder; choose a folder for the output")
    check_writable(path, option=option)
    if not path.is_dir() or is_empty(path):
        return Target(path, option)
    if add:
        return Target(path, option, adds=True)
    if not replace:
        raise UsageError(f"{option} {path} exists and is not empty; {occupied_hint} (nothing was changed)")
    if ours is None or not ours(path):
        raise UsageError(f"--overwrite refused: {option} {path} {foreign}; nothing was changed; choose another "
                         "folder, or remove that one yourself if you mean it")
    return Target(path, option, replaces=True)


def is_empty(folder: Path) -> bool:
    """Whether `folder` holds nothing (a staging folder's marker does not count): what a writer that only writes
    into an empty folder asks, so it can be handed a staging folder."""
    return not any(p.name != MARKER for p in Path(folder).iterdir())


def nearest_existing(path: Path) -> Path:
    """`path` or its closest ancestor that exists: where a folder about to be created will live."""
    path = Path(path).absolute()
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def check_writable(path: str | Path, *, option: str) -> None:
    """Refuse an output that cannot be created or written (a file in the way, read-only file system, no
    permission) now, not after minutes of loading and computing."""
    path = Path(path).expanduser()
    probe_in = nearest_existing(path)
    if not probe_in.is_dir():
        raise UsageError(f"{option} {path}: {probe_in} is a file, so the folder cannot be created there")
    try:
        tempfile.TemporaryDirectory(dir=probe_in, prefix=".persona-lora-probe-").cleanup()
    except OSError as e:
        raise UsageError(f"{option} {path} cannot be written ({e.strerror} in {probe_in}); choose a folder on a "
                         "writable disk") from None


def human_size(n: float) -> str:
    """Bytes in decimal units, as disks and the hub show them ('1.2 GB')."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


def check_free_space(path: str | Path, need: int, *, option: str, what: str) -> None:
    """Refuse writing `need` bytes of `what` to `path` when its disk has no room (a previous output being
    replaced is still there while the new one is written)."""
    where = nearest_existing(Path(path).expanduser())
    free = shutil.disk_usage(where).free
    if need + DISK_MARGIN > free:
        raise UsageError(f"not enough disk space for {option} {path}: {what} needs about {human_size(need)}, "
                         f"{where} has {human_size(free)} free; free some space or choose a folder on another disk")


def staging_path(target: Path, pid: int | None = None) -> Path:
    """The hidden sibling a write to `target` is staged in (same folder, so the same disk)."""
    return target.parent / STAGING.format(name=target.name, pid=os.getpid() if pid is None else pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_abandoned(target: Path) -> list[Path]:
    """Remove staging folders of `target` left by a process that no longer runs (killed mid-write); only folders
    that carry the marker, so nothing of the user's is touched. Returns what was removed."""
    pattern = re.compile(re.escape(f".{target.name}.partial-") + r"(\d+)")
    removed = []
    if not target.parent.is_dir():
        return removed
    for sibling in target.parent.iterdir():
        m = pattern.fullmatch(sibling.name)
        if not m or not sibling.is_dir() or not (sibling / MARKER).is_file():
            continue
        pid = int(m.group(1))
        if pid != os.getpid() and _alive(pid):
            continue  # another command is writing it now
        shutil.rmtree(sibling, ignore_errors=True)
        log.info("removed %s, left by an earlier write that did not finish", sibling)
        removed.append(sibling)
    return removed


def disk_full_error(target: Target, e: OSError) -> UsageError:
    """A full disk met while writing, as one message about the output (the system names the source file of a
    copy, which is not what is wrong)."""
    return UsageError(f"the disk is full: {target.option} {target.path} could not be written ({e.strerror}); "
                      "nothing was left behind; free some space or choose a folder on another disk")


class OutputFolder:
    """Write `target` through a staging folder: `with OutputFolder(target) as work: …write into work…`.

    On a clean exit the staging folder takes the target's place (`path` then names it); on any exception,
    Ctrl-C included, it is removed, with the parent folders it created, and the exception goes on (a full disk as
    `disk_full_error`). `keep_on`: exception types after which the staged work is kept where it is, because it
    can be continued (a training run interrupted with checkpoints). `owner`: the process the staging folder is
    named after, when several processes write one output (the launcher of a multi-process run); default this one.
    """

    def __init__(self, target: Target, *, keep_on: tuple[type[BaseException], ...] = (), owner: int | None = None):
        self.target = target
        self.work = staging_path(target.path, owner)
        self.keep_on = keep_on
        self._created: Path | None = None  # the first parent folder this write created

    @property
    def path(self) -> Path:
        return self.target.path

    def __enter__(self) -> Path:
        return self.begin()

    def __exit__(self, kind, exc, tb) -> bool:
        if exc is None:
            self.commit()
            return False
        if isinstance(exc, self.keep_on):
            return False
        self.discard()
        if isinstance(exc, OSError) and exc.errno in DISK_FULL:
            raise disk_full_error(self.target, exc) from None
        return False

    def begin(self) -> Path:
        """Create the staging folder (and missing parents); returns it."""
        remove_abandoned(self.target.path)
        parent = self.target.path.parent
        first_missing = None
        probe = parent.absolute()
        while not probe.exists():
            first_missing = probe
            probe = probe.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            self._created = first_missing
            if self.work.exists():  # our own pid's leftover (a reused pid): ours by the marker, else refuse
                if not (self.work / MARKER).is_file():
                    raise UsageError(f"{self.work} exists and was not made by persona-lora; remove it or choose "
                                     f"another {self.target.option}")
                shutil.rmtree(self.work)
            self.work.mkdir()
            (self.work / MARKER).write_text("an incomplete persona-lora output; safe to delete\n", encoding="utf-8")
        except BaseException as e:
            self.discard()
            if isinstance(e, OSError) and e.errno in DISK_FULL:
                raise disk_full_error(self.target, e) from None
            raise
        return self.work

    def discard(self) -> None:
        """Remove the staging folder and the parents this write created."""
        shutil.rmtree(self.work, ignore_errors=True)
        if self._created is not None:
            folder = self.target.path.parent.absolute()
            while True:
                try:
                    folder.rmdir()  # only while empty
                except OSError:
                    break
                if folder == self._created:
                    break
                folder = folder.parent
            self._created = None

    def commit(self) -> Path:
        """Put the staged folder in the target's place; returns the target."""
        target = self.target
        (self.work / MARKER).unlink(missing_ok=True)
        if target.adds and target.path.is_dir():
            _move_into(self.work, target.path)
            shutil.rmtree(self.work)
            return target.path
        if target.path.is_dir() and not any(target.path.iterdir()):
            target.path.rmdir()  # an empty folder the user gave
        if target.path.exists() and not target.replaces:
            self.discard()
            raise UsageError(f"{target.option} {target.path} was created by something else while this command ran; "
                             "nothing of it was changed; run the command again")
        if target.path.exists():
            old = target.path.parent / f".{target.path.name}.replaced-{os.getpid()}"
            target.path.rename(old)
            self.work.rename(target.path)
            shutil.rmtree(old)
            log.info("the previous %s was replaced", target.path)
        else:
            self.work.rename(target.path)
        self._created = None
        return target.path


def _move_into(staged: Path, folder: Path) -> None:
    """Move every file under `staged` to the same place under `folder`, replacing files of the same name (the
    caller refused those unless the user allowed it)."""
    for src in sorted(p for p in staged.rglob("*") if p.is_file() or p.is_symlink()):
        dest = folder / src.relative_to(staged)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dest)


class FilesTogether:
    """Write several files of one folder as one change: `with FilesTogether() as files: write to files.temp(path)`.

    Each `temp(path)` is a hidden sibling of `path` to write into; when the block completes, every temp that was
    written replaces its file, in the order they were asked for (put the one most likely to be refused first);
    if the block fails, the temps are removed and no file has changed. Why: a command that rewrites two files
    (the card's README.md and its loss curve) must not leave one new and one old when the second is refused."""

    def __init__(self):
        self._temps: list[tuple[Path, Path]] = []

    def temp(self, final: Path) -> Path:
        tmp = final.parent / STAGING.format(name=final.name, pid=os.getpid())
        self._temps.append((final, tmp))
        return tmp

    def __enter__(self) -> FilesTogether:
        return self

    def __exit__(self, kind, exc, tb) -> bool:
        try:
            if exc is None:
                for final, tmp in self._temps:
                    if tmp.exists():
                        try:
                            os.replace(tmp, final)
                        except OSError as e:  # name the file the user knows, not our temporary name
                            raise OSError(e.errno, e.strerror, str(final)) from None
        finally:
            for _, tmp in self._temps:
                if tmp.is_file() or tmp.is_symlink():
                    tmp.unlink()
        return False
