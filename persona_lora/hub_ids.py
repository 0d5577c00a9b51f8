"""Hub references: what counts as `owner/name[@revision]`, and the hub and source choices of every command.

Every command that takes "a local folder or a hub id" (train's base and data, merge's adapter, the demo's
adapters, pull, push) decides with the same rules, so one string means the same thing everywhere: an existing
local path wins; otherwise `owner/name` (optionally `@revision`) is a hub id; anything else is a missing path.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from persona_lora.errors import UsageError

HUBS = ("hf", "modelscope")
SOURCES = ("auto", "local", *HUBS)
HUB_HELP = ("hf = Hugging Face (HF_TOKEN, HF_ENDPOINT); modelscope = ModelScope (MODELSCOPE_API_TOKEN, "
            "MODELSCOPE_DOMAIN)")
SOURCE_HELP = "where it lives: auto (a local folder if it exists, else Hugging Face), local, hf, modelscope"

_PART = r"[A-Za-z0-9][A-Za-z0-9_.-]*"
_REPO_ID = re.compile(rf"^{_PART}/{_PART}$")
_NAME = re.compile(rf"^{_PART}$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True)
class HubRef:
    """`owner/name` on a hub, at `revision` (None: the hub's default branch)."""

    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return f"{self.repo_id}@{self.revision}" if self.revision else self.repo_id


def is_repo_id(text: str, *, owner_optional: bool = False) -> bool:
    """`owner/name`, each part starting with a letter or digit (no path syntax, no `..`); with `owner_optional`
    also a bare `name` (canonical Hugging Face models such as `gpt2` have no owner)."""
    pattern = _NAME if owner_optional and "/" not in text else _REPO_ID
    return bool(pattern.match(text)) and ".." not in text


def is_commit(text: str) -> bool:
    """A full git commit id (what a hub snapshot folder is named after)."""
    return bool(_COMMIT.match(text))


def parse_hub_ref(text: str) -> HubRef | None:
    """`owner/name` or `owner/name@revision` as a HubRef; None when `text` is not one."""
    repo_id, at, revision = text.strip().partition("@")
    if not is_repo_id(repo_id) or (at and not revision):
        return None
    return HubRef(repo_id, revision or None)


def check_repo_id(repo_id: str, *, owner_optional: bool = False, option: str = "REPO_ID") -> str:
    """A repo id a push may create: `owner/name` (or `name` for the token's own namespace when allowed)."""
    if is_repo_id(repo_id, owner_optional=owner_optional):
        return repo_id
    form = "owner/name (or just name for your own namespace)" if owner_optional else "owner/name"
    raise UsageError(f"{option} {repo_id!r} must look like {form}: letters, digits, '-', '_' and '.', each part "
                     "starting with a letter or digit")


def add_hub_option(parser, *, help_prefix: str = "") -> None:
    parser.add_argument("--hub", choices=HUBS, default="hf", help=f"{help_prefix}{HUB_HELP}")


def add_source_option(parser, flag: str = "--source", *, what: str = "--base") -> None:
    parser.add_argument(flag, choices=SOURCES, default="auto", help=f"{what}: {SOURCE_HELP}")


BASE_TAG_PREFIX = "persona-lora-base:"


def base_identity_tag(config_sha256: str) -> str:
    """The card tag naming an adapter's base by the sha256 of its config.json (first 16 hex digits): a base that
    is a local folder has no hub id for `base_model`, so `persona-lora list --base FOLDER` searches this tag."""
    return BASE_TAG_PREFIX + config_sha256[:16]
