"""The demo's adapters: where each comes from, what it is, which chat template and system prompt it answers with.

Why: a comparison is only fair when the adapter side is prompted the way the adapter was trained (its manifest's
system prompt and chat template), and a vote only means something when it records exactly which adapter
answered (hub id and commit, or the local folder). This module finds an adapter (a local folder or a hub id,
pulled), reads its manifest, warns when it was trained on another base, and keeps the loaded ones by name. It
does not touch the model: `AdapterRegistry.add` is given the function that loads an adapter into it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from persona_lora.artifact import MANIFEST_NAME, ChatInfo, read_manifest, require_adapter_files
from persona_lora.chat_format import require_chat_template
from persona_lora.consistency import check_folder
from persona_lora.errors import ModelLoadError, UsageError, VerificationError
from persona_lora.hub_ids import is_commit
from persona_lora.model_loading import has_random_weights
from persona_lora.peft_compat import has_expert_lora

log = logging.getLogger(__name__)



@dataclass
class AdapterInfo:
    """What the demo shows about one loaded adapter (and what the vote records)."""

    name: str  # as shown in the picker: the folder name or the hub id (with @revision when one was asked)
    key: str  # the PEFT adapter name inside the resident model
    path: Path
    source: str  # local | hf | modelscope
    repo_id: str | None
    revision: str | None  # hub revision asked for (None: main)
    commit: str | None  # hub commit actually pulled, when known
    system_prompt: str
    chat_template: str
    template_origin: str
    experts: bool  # LoRA on fused MoE experts (PEFT ParamWrapper)
    preset: str | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def adapter_id(self) -> str:
        """A stable id for votes: hub id@commit, or the folder name for local adapters."""
        if self.repo_id:
            return f"{self.repo_id}@{self.commit or self.revision or 'main'}"
        return self.name

    @property
    def version(self) -> str:
        """The revision shown beside the adapter, with the commit actually pulled when it differs."""
        if self.source == "local":
            return "local folder"
        rev = self.revision or "main"
        return f"{rev} ({self.commit[:10]})" if self.commit and self.commit != rev else rev


def template_sha(template: str) -> str:
    """A short fingerprint of a chat template, so two sides' templates can be told apart at a glance."""
    return hashlib.sha256(template.encode("utf-8")).hexdigest()[:10]


class AdapterRegistry:
    """The adapters loaded into the resident model, by the name shown in the picker. Thread-safe."""

    def __init__(self, base, tokenizer, base_template_origin: str, hub: str):
        self.base = base  # ResolvedBase of the resident model
        self.tokenizer = tokenizer
        self.base_template_origin = base_template_origin
        self.hub = hub
        self._adapters: dict[str, AdapterInfo] = {}
        self._lock = threading.Lock()
        self._adding = threading.Lock()  # one adapter load at a time (names are checked, then claimed)
        self._keys = itertools.count()

    def names(self) -> list[str]:
        """Loaded adapters in load order (the picker's choices)."""
        with self._lock:
            return list(self._adapters)

    def get(self, name: str) -> AdapterInfo:
        """The adapter called `name`; a UsageError naming the loaded ones when there is none (a typo in the API)."""
        with self._lock:
            info = self._adapters.get(name)
        if info is None:
            loaded = ", ".join(self.names()) or "none"
            raise UsageError(f"no adapter named {name!r} is loaded; loaded: {loaded}")
        return info

    def add(self, spec: str, load: Callable[[AdapterInfo], None], *, name: str | None = None,
            revision: str | None = None) -> AdapterInfo:
        """Find and describe the adapter `spec` (local folder or `owner/name[@revision]`), give it a fresh PEFT
        key, and have `load` put it into the model; it is registered only once loaded. The same folder twice
        returns the first load."""
        spec = (spec or "").strip()
        if not spec:
            raise UsageError("give an adapter folder or a hub id (owner/name)")
        with self._adding:
            folder, repo_id, rev, commit, source = self._locate(spec, revision)
            with self._lock:
                for info in self._adapters.values():
                    if info.path == folder:
                        return info
            info = self._describe(folder, repo_id, rev, commit, source, name)
            if info.name in self.names():
                raise UsageError(f"an adapter named {info.name!r} is already loaded; give this one another name")
            info.key = f"a{next(self._keys)}"
            load(info)
            with self._lock:
                self._adapters[info.name] = info
        log.info("adapter %s loaded from %s (%s)", info.name, folder, "experts + linear" if info.experts else "linear")
        return info

    def _locate(self, spec: str, revision: str | None):
        """(folder, repo_id, revision, commit, source) of `spec`: an existing local folder, else a hub id, pulled."""
        from persona_lora.hubs.pull import local_or_pulled

        folder, ref, commit = local_or_pulled(spec, hub=self.hub, revision=revision, what="adapter")
        if ref is None:
            return folder, None, None, None, "local"
        return folder, ref.repo_id, ref.revision, commit, self.hub

    def _describe(self, folder: Path, repo_id, rev, commit, source, name) -> AdapterInfo:
        cfg = check_folder(require_adapter_files(folder)).adapter_config
        warnings: list[str] = []
        if (folder / MANIFEST_NAME).is_file():
            manifest = read_manifest(folder)
            if manifest.kind == "merged":
                raise ModelLoadError(f"{folder} is a merged model, not an adapter; run the demo with --base {folder}")
            chat, preset = manifest.chat or ChatInfo(), (manifest.lora.preset if manifest.lora else None)
            if interrupted := manifest.interrupted_at():  # an unfinished run must not pass for a finished one
                warnings.append(f"unfinished: training was {interrupted}; the weights are from that step")
        else:
            warnings.append(f"no {MANIFEST_NAME}: no system prompt, the base's chat template is assumed")
            log.warning("%s has no %s: it was not written by persona-lora", folder, MANIFEST_NAME)
            chat, preset = ChatInfo(), None
        self._check_base(folder, warnings)
        template, origin = self._template_for(folder, chat)
        shown = name or (f"{repo_id}@{rev}" if repo_id and rev else repo_id) or folder.name
        return AdapterInfo(
            name=shown, key="", path=folder, source=source, repo_id=repo_id, revision=rev, commit=commit,
            system_prompt=chat.system_prompt or "", chat_template=template, template_origin=origin,
            experts=has_expert_lora(cfg), preset=preset, warnings=warnings,
        )

    def _check_base(self, folder: Path, warnings: list[str]) -> None:
        """An adapter trained on another base may still load (same shapes) but means little: say so, visibly."""
        from persona_lora.hubs.verify import check_base

        try:
            check_base(folder, str(self.base.path))
        except VerificationError as e:
            warnings.append(f"trained on a different base: {e}")
            log.warning("%s: %s", folder, e)

    def _template_for(self, folder: Path, chat: ChatInfo) -> tuple[str, str]:
        """The chat template the adapter was trained with: its manifest's, else its own tokenizer files', else the
        base's. A template that differs from the base's is used for both sides (and said so)."""
        base_template = getattr(self.tokenizer, "chat_template", None) or ""
        template = chat.chat_template
        origin = "adapter manifest"
        tokenizer_config = folder / "tokenizer_config.json"
        if not template and tokenizer_config.is_file():
            try:
                template = json.loads(tokenizer_config.read_text(encoding="utf-8")).get("chat_template")
            except ValueError:
                template = None
            origin = "adapter tokenizer files"
        if not template:
            template, origin = base_template, self.base_template_origin
        elif template == base_template:
            origin = f"{self.base_template_origin} (= the adapter's training template)"
        else:
            origin = f"{origin} ({chat.template_source or 'own'} template, not the base tokenizer's)"
        if not template:
            require_chat_template(self.tokenizer, f"the tokenizer of {self.base.id} (and the adapter in {folder})")
        return template, origin

    def describe(self, name: str | None) -> dict[str, str]:
        """Which base, adapter, revision and chat template each side uses (plain text; the UI escapes it), so a
        reader of the comparison knows exactly what answered."""
        base_rev = self.base.revision or ("local folder" if self.base.source == "local" else "main")
        if self.base.source != "local" and is_commit(self.base.path.name) and self.base.path.name != base_rev:
            base_rev = f"{base_rev} ({self.base.path.name[:10]})"  # the snapshot actually loaded
        notice = {"notice": random_base_notice(self.base.id)} if has_random_weights(self.base.path) else {}
        if not name:
            return {"base": f"base {self.base.id} ({base_rev}) · chat template: {self.base_template_origin}",
                    "adapter": "no adapter loaded", **notice}
        info = self.get(name)
        tmpl = f"chat template: {info.template_origin}, sha {template_sha(info.chat_template)}"
        warn = "".join(f" · WARNING: {w}" for w in info.warnings)
        return {
            "base": f"base {self.base.id} ({base_rev}), no adapter · {tmpl}",
            "adapter": f"adapter {info.name} ({info.source}, {info.version}) on base {self.base.id} · {tmpl}{warn}",
            **notice,
        }


def random_base_notice(base_id: str) -> str:
    """One line for a base built with random weights (`persona-lora tiny-base`): what each pane is expected to show."""
    return (f"{base_id} is the tiny test model with random weights: the Base pane writes noise (random characters) "
            "by design; an adapter trained on it answers its training prompts in persona.")
