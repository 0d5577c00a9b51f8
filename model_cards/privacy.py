"""What of a run's manifest may reach a public model card.

A manifest records the run as it happened on someone's machine: the base may be `/home/<user>/models/x`, a
dataset path may sit in a home directory, a URL may carry credentials. Cards are pushed to the Hub, so every
manifest string passes through `scrub` first: absolute local paths are reduced to their last component, home
directories inside free text become `~`, and token-like strings are redacted. Nothing here reads the user name,
`$HOME` or the working directory: the scrubbing works from the text alone, so it cannot depend on who runs it.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any

# Manifest fields whose text is free prose the user wrote or the model produced: reducing them to a path's last
# component would destroy them, so only home directories and tokens inside them are scrubbed.
_FREE_TEXT_FIELDS = {("chat", "system_prompt"), ("chat", "chat_template"), ("samples",)}

_ABS_PATH = re.compile(r"^(?:file://|~[\\/]|/|[A-Za-z]:[\\/]|\\\\)[^\n]*$")
_HOME_IN_TEXT = re.compile(r"(?:/home/|/Users/|[A-Za-z]:\\Users\\)[^/\\\s]+|/root(?=[/\\\s]|$)")
_TOKENS = re.compile(r"\b(?:hf_[A-Za-z0-9]{20,}|ms-[0-9a-fA-F-]{32,}|gh[pousr]_[A-Za-z0-9]{20,})\b")
_URL_USERINFO = re.compile(r"(\b[a-z][a-z0-9+.-]*://)[^/\s@]+@", re.IGNORECASE)


# Control characters (NUL, escapes, …) from model answers or data would corrupt the card file or the terminal
# that shows it; tab, newline and carriage return are text.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _scrub_text(s: str) -> str:
    """Redact tokens and URL credentials, and replace home directories inside any text with `~`."""
    s = _CONTROL.sub("\ufffd", s)
    s = _TOKENS.sub("[redacted token]", s)
    s = _URL_USERINFO.sub(r"\1", s)
    return _HOME_IN_TEXT.sub("~", s)


def path_tail(s: str) -> str:
    """The last component of a path-like string (`/home/x/models/tiny/` -> `tiny`): the name a reader of the
    card can recognise a local base or dataset by, without the private part of the path."""
    s = re.sub(r"^file://", "", s)
    win = PureWindowsPath(s) if "\\" in s or re.match(r"^[A-Za-z]:", s) else None
    name = (win.name if win is not None else PurePosixPath(s).name).strip()
    return name or "local"


def looks_like_local_path(s: str) -> bool:
    """True for absolute, home-relative and file:// paths, never for hub ids like `org/name`: a hub id is public
    and must reach the card (and its metadata) unchanged, a local path must not."""
    return bool(_ABS_PATH.match(s))


def scrub(obj: Any, where: tuple = ()) -> Any:
    """A deep copy of a manifest (the typed `Manifest`, or any part of it at `where`, typed or as JSON) that is
    safe to publish in a card; dataclasses stay dataclasses of the same type."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: scrub(getattr(obj, f.name), where + (f.name,))
                                           for f in dataclasses.fields(obj) if f.init})
    if isinstance(obj, dict):
        return {k: scrub(v, where + (k,)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [scrub(v, where) for v in obj]
    if isinstance(obj, str):
        free = any(where[: len(f)] == f for f in _FREE_TEXT_FIELDS)
        if not free and looks_like_local_path(obj):
            return path_tail(obj)
        return _scrub_text(obj)
    return obj
