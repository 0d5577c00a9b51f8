"""What a long command shows while it works: one live line on a terminal, plain lines in a log.

Training, preference tuning, evaluation and merging run for minutes to hours; a newcomer reads their terminal to
know whether it is working, how long it will take and what to do next. Libraries each print their own way (tqdm
bars, dicts of quoted numbers, deprecation warnings), which reads as noise or as a fault. Every stage reports
through `ProgressLine` instead:

- on a terminal (TTY) one line is rewritten in place (`\\r` + erase to the end of the line), and `note` prints a
  lasting line above it (an evaluation, a warning) without tearing it;
- in a log or CI (not a TTY) the same fields are printed as plain lines, at most one every `every_s` seconds
  and always for the last update, so a log stays short and never holds carriage returns.

`quiet_libraries` hides the library output we replace (transformers' and datasets' progress bars); at `-v` they
are left alone, and `verbose()` tells the stages whether the user asked for library output.
"""

from __future__ import annotations

import logging
import sys
import time

__all__ = ["ProgressLine", "format_duration", "format_lr", "format_count", "quiet_libraries", "verbose",
           "invocation", "set_invocation"]

_invocation: list[str] | None = None


def set_invocation(argv: list[str]) -> None:
    """The command line as typed (after `persona-lora`), recorded by the CLI so that a stage can print the exact
    command that continues its work (e.g. `train ... --resume` after Ctrl-C)."""
    global _invocation
    _invocation = list(argv)


def invocation() -> list[str] | None:
    """The command line `set_invocation` recorded, or None when the stage was called as a library."""
    return _invocation


def verbose() -> bool:
    """Whether the user asked for more output (`persona-lora -v`): library bars and logs are then shown too."""
    return logging.getLogger().getEffectiveLevel() <= logging.INFO


def quiet_libraries() -> None:
    """Hide the progress bars of the libraries whose progress we report ourselves (weights loading, dataset
    mapping), unless `-v`. Hub downloads keep their bars: a download of many GiB is worth a bar of its own."""
    if verbose():
        return
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    try:
        from datasets.utils.logging import disable_progress_bar

        disable_progress_bar()
    except ImportError:  # pragma: no cover - datasets is a dependency
        pass


def format_duration(seconds: float | None) -> str:
    """`42s`, `3m05s`, `1h02m`: short enough for a live line; `?` when not known yet."""
    if seconds is None or seconds != seconds or seconds < 0:
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def format_lr(lr: float | None) -> str:
    """Learning rates in scientific notation (`2.00e-03`, `0.00e+00` at the first warm-up step): a rounded
    `0.002` next to a `0` reads like a bug."""
    return "?" if lr is None else f"{float(lr):.2e}"


def format_count(value: float) -> str:
    """`1,234` or `12.3` (rates below 100 keep a decimal)."""
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


class ProgressLine:
    """One status line for `total` units of work (steps, prompts, shards); `update(done, fields)` refreshes it."""

    def __init__(self, label: str, total: int | None, *, stream=None, every_s: float = 30.0, live: bool | None = None):
        self.label, self.total = label, total
        self.stream = stream if stream is not None else sys.stderr
        isatty = getattr(self.stream, "isatty", None)
        self.live = bool(isatty and isatty()) if live is None else live
        self.every_s = every_s
        self.started = time.monotonic()
        self._first_done: tuple[int, float] | None = None  # (units, time) of the first update: ETA from the pace since
        self._last_plain = self.started  # plain mode: the first periodic line after every_s seconds
        self._shown = ""  # the live line now on screen ("" when none)
        self.done = 0

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def eta(self, done: int) -> float | None:
        """Seconds left at the pace since the first update (the first unit holds start-up costs)."""
        if not self.total or self._first_done is None:
            return None
        first, since = self._first_done
        if done <= first:
            return None
        return (time.monotonic() - since) / (done - first) * (self.total - done)

    def text(self, done: int, fields: list[str]) -> str:
        count = f"{done}/{self.total}" if self.total else str(done)
        times = f"{format_duration(self.elapsed())}"
        if self.total and done < self.total:
            times += f" < {format_duration(self.eta(done))}"
        return " · ".join([f"{self.label} {count}", *[f for f in fields if f], times])

    def update(self, done: int, fields: list[str] | None = None, *, force: bool = False) -> None:
        """Show `done` of `total` with `fields` (already formatted, e.g. `loss 2.314`). Plain mode prints a line when
        `force` (a log point, the last unit) and otherwise at most one per `every_s` seconds."""
        if self._first_done is None:
            self._first_done = (done, time.monotonic())
        self.done = done
        line = self.text(done, fields or [])
        if self.live:
            self._write("\r" + line + "\x1b[K")
            self._shown = line
            return
        now = time.monotonic()
        if force or now - self._last_plain >= self.every_s:
            self._last_plain = now
            self._write(line + "\n")

    def note(self, line: str) -> None:
        """A lasting line (an evaluation, a warning) printed above the live line, which is then redrawn."""
        if self.live and self._shown:
            self._write("\r\x1b[K" + line + "\n" + self._shown + "\x1b[K")
        else:
            self._write(line + "\n")

    def close(self) -> None:
        """End the live line (it stays on screen as the last state)."""
        if self.live and self._shown:
            self._write("\n")
        self._shown = ""

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream must not end the work it reports on
            pass
