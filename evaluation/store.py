"""The `--out` folder of an evaluation: rows appended as they finish, so an interrupted run loses nothing and a
rerun with the same `--out` continues where it stopped.

- `run.json`: the fingerprint of the settings (see `plan.Plan.fingerprint`); a rerun must match it, or it would
  mix rows made under other settings into one report.
- `rows.jsonl`: one JSON object per finished row (an answer with its loss, or one judgement), flushed and
  fsynced batch by batch. A line cut short by a kill is ignored on reading and the next row starts on a line of
  its own.
- `report.json`, `report.html`: rebuilt from the rows at the end of every run.

A folder that holds other files and no `run.json` is not ours: nothing is written into it. The folder is checked
when the store opens (`persona_lora.output_folder.check_target`, like every command's output) but created (and,
with `--overwrite`, the old evaluation's files removed) only when the first row is written (`claim`): an evaluation
refused at start-up (an adapter that does not load, say) leaves no folder and loses no earlier rows.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from persona_lora.errors import UsageError
from persona_lora.output_folder import FilesTogether, check_target

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
ROWS_FILE = "rows.jsonl"
REPORT_JSON = "report.json"
REPORT_HTML = "report.html"
OURS = (RUN_FILE, ROWS_FILE, REPORT_JSON, REPORT_HTML)


def row_key(row: dict) -> tuple:
    """What makes a row unique: a second row with the same key (a rerun after a late kill) replaces nothing."""
    if row.get("kind") == "judge":
        return ("judge", row.get("index"), row.get("model"), row.get("order"), row.get("judge"))
    return ("answer", row.get("set"), row.get("index"), row.get("model"))


def _changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _changes(a, b, f"{prefix}{key}.")
        elif a != b:
            shown = [v if len(repr(v)) <= 40 else "(other)" for v in (a, b)]
            out.append(f"{prefix}{key}: {shown[0]!r} -> {shown[1]!r}")
    return out


class RowStore:
    """Rows of one evaluation on disk; `resumed` says whether finished rows were found."""

    def __init__(self, out: Path, fingerprint: dict, *, overwrite: bool = False):
        self.out = Path(out)
        self.rows_path = self.out / ROWS_FILE
        self._fingerprint, self._overwrite, self._claimed = fingerprint, overwrite, False
        self._check(fingerprint, overwrite)
        self._rows: dict[tuple, dict] = {}
        for row in ([] if overwrite else self._read()):
            self._rows.setdefault(row_key(row), row)
        self.resumed = bool(self._rows)

    def _check(self, fingerprint: dict, overwrite: bool) -> None:
        """Refuse an `--out` this evaluation may not use; changes nothing."""
        out = self.out
        if out.exists() and not out.is_dir():
            raise UsageError(f"--out {out} is a file; give a folder for the report")
        check_target(out, option="--out", add=True)  # an unwritable place is refused before any model loads
        run = out / RUN_FILE
        if out.is_dir() and not run.is_file() and any(p.name not in OURS for p in out.iterdir()):
            raise UsageError(f"--out {out} holds other files and no {RUN_FILE}: it is not an evaluation folder; give "
                             "an empty or new folder")
        if not overwrite and run.is_file():
            try:
                old = json.loads(run.read_text(encoding="utf-8"))
            except ValueError:
                raise UsageError(f"{run} is corrupt; rerun with --overwrite to start this evaluation again") from None
            if old != fingerprint:
                changed = "; ".join(_changes(old, fingerprint)[:6])
                raise UsageError(f"--out {out} holds an evaluation with other settings ({changed}); rerun with the "
                                 "same settings to resume it, give another --out, or --overwrite to start over")

    def claim(self) -> None:
        """Create the folder with its `run.json` (with `--overwrite`, the old evaluation's files go now); done
        once, before the first row or the report is written."""
        if self._claimed:
            return
        out, run = self.out, self.out / RUN_FILE
        if self._overwrite:
            for name in OURS:
                (out / name).unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)
        with FilesTogether() as files:
            files.temp(run).write_text(json.dumps(self._fingerprint, ensure_ascii=False, indent=1, sort_keys=True)
                                       + "\n", encoding="utf-8")
        self._claimed = True

    def _read(self) -> list[dict]:
        if not self.rows_path.is_file():
            return []
        rows = []
        for n, line in enumerate(self.rows_path.read_text(encoding="utf-8", errors="replace").split("\n"), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                log.warning("%s, line %d: cut short (the run was killed while writing it); that row is redone",
                            self.rows_path, n)
                continue
            if isinstance(row, dict):
                rows.append(row)
        return rows

    def has(self, row: dict) -> bool:
        return row_key(row) in self._rows

    def get(self, **key) -> dict | None:
        return self._rows.get(row_key(key))

    def append(self, rows: list[dict]) -> None:
        """Write finished rows for good (flushed and synced) before anything else happens."""
        if not rows:
            return
        self.claim()
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        with open(self.rows_path, "a+b") as f:
            if f.tell() > 0:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":  # a line cut short: start on a fresh line
                    text = "\n" + text
            f.write(text.encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
        for r in rows:
            self._rows.setdefault(row_key(r), r)

    def rows(self) -> list[dict]:
        return list(self._rows.values())
