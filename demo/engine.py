"""One resident model that answers as the base and as any loaded adapter, both at once, streaming.

Why it is built this way:
- Memory: the tutorial's demo loaded a second model copy for the tuned side. Here the base weights are loaded
  once and every adapter is a PEFT adapter on that one model (`train.adapters.load_adapter`, which keeps
  PEFT from re-targeting our MoE adapters), so adding adapters costs only their LoRA weights.
- Both sides in one forward pass: the base row and the adapter row form one left-padded batch. LoRA on linear
  layers takes per-row adapters through PEFT's `adapter_names` mechanism. LoRA on fused MoE experts (PEFT's
  `ParamWrapper`, which our `all` preset produces) refuses mixed batches, so for those modules the rows are
  split here: base rows go through the bare experts module, adapter rows through the wrapper (`_route_rows`).
  Every row gets exactly the computation the model does alone, so each side's greedy answer equals
  standalone `generate(do_sample=False)` with that model (tested for attention-only and `all` adapters).
- Global state: PEFT's active adapter and the row routing above are state of the one model. Every forward
  pass therefore runs on one inference thread (`_Worker`) that sets that state right before the pass, so
  sessions never see each other's choice. Concurrent requests are advanced one decode step at a time, round
  robin, so every session streams while others do. The routing hooks are installed once per adapter load and
  read the current rows from the engine (toggling PEFT's `disable_adapter()` per step cost more than a whole
  decode step of the toy model).
- Formatting is never re-implemented: prompts come from `train.chat_format.encode_prompt` with the adapter's
  chat template (the one its manifest records, i.e. the one training used). The base side is formatted with
  the same template and system prompt, so both sides read the same tokens.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import inspect
import itertools
import json
import logging
import queue
import re
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from pathlib import Path

from persona_lora.errors import (
    HubError,
    ManifestError,
    ModelLoadError,
    UsageError,
    VerificationError,
)
from persona_lora.artifact import MANIFEST_NAME, ChatInfo, read_adapter_config, read_manifest, require_adapter_files
from persona_lora.peft_compat import BASE_ROW, RowRouting, load_adapter
from persona_lora.train.chat_format import conversation_for, encode_prompt, require_chat_template
from persona_lora.train.model_loading import load_base_model, load_tokenizer, resolve_base

log = logging.getLogger(__name__)

BASE = BASE_ROW  # a row without adapter
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True)
class GenerationSettings:
    """How to decode. Temperature 0 (the default) is greedy; `seed` makes sampling repeatable."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    ignore_eos: bool = False  # benchmarks only: always produce max_new_tokens tokens

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    def checked(self, cap: int) -> GenerationSettings:
        """Validate, and clamp max_new_tokens to the server's cap (the UI cannot exceed it; API callers may)."""
        problems = []
        try:
            n = int(self.max_new_tokens)
        except (TypeError, ValueError):
            raise UsageError(f"max_new_tokens must be a whole number, got {self.max_new_tokens!r}") from None
        if n < 1:
            problems.append(f"max_new_tokens must be at least 1, got {n}")
        if not (self.temperature is not None and 0 <= float(self.temperature) <= 5):
            problems.append(f"temperature must be between 0 (greedy) and 5, got {self.temperature!r}")
        if not (self.top_p is not None and 0 < float(self.top_p) <= 1):
            problems.append(f"top_p must be in (0, 1], got {self.top_p!r}")
        if problems:
            raise UsageError("; ".join(problems))
        if n > cap:
            log.info("max_new_tokens %d clamped to the server cap %d", n, cap)
        return replace(self, max_new_tokens=min(n, cap), temperature=float(self.temperature), top_p=float(self.top_p),
                       seed=int(self.seed or 0))


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
        if self.source == "local":
            return "local folder"
        rev = self.revision or "main"
        return f"{rev} ({self.commit[:10]})" if self.commit and self.commit != rev else rev


def template_sha(template: str) -> str:
    return hashlib.sha256(template.encode("utf-8")).hexdigest()[:10]


class Engine:
    """The resident model plus the adapters loaded into it. Thread-safe: any thread may call the public methods;
    all model work happens on the engine's one inference thread."""

    def __init__(
        self,
        base: str,
        *,
        revision: str | None = None,
        source: str = "auto",
        device: str | None = None,
        dtype: str | None = "auto",
        chat_template: str | None = None,
        max_new_tokens_cap: int = 512,
        max_prompt_tokens: int = 2048,
        trust_remote_code: bool = False,
        hub: str = "hf",
        mixed_batch: bool = True,
    ):
        if max_new_tokens_cap < 1 or max_prompt_tokens < 8:
            raise UsageError("max_new_tokens_cap must be >= 1 and max_prompt_tokens >= 8")
        self.base = resolve_base(base, revision=revision, source=source)
        self.hub = hub
        self.mixed_batch = mixed_batch
        self.max_new_tokens_cap = max_new_tokens_cap
        self.max_prompt_tokens = max_prompt_tokens
        self.tokenizer = load_tokenizer(self.base, chat_template_file=chat_template)
        self.base_template_origin = "file given with --chat-template" if chat_template else "base tokenizer"
        model = load_base_model(self.base, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
        model.eval()
        self.model = model  # becomes a PeftModel when the first adapter is loaded
        self.device = next(model.parameters()).device
        self._eos = self._eos_ids(model) | ({self.tokenizer.eos_token_id} if self.tokenizer.eos_token_id is not None else set())
        self._cache_kwarg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self._keep_kwarg = "logits_to_keep" in inspect.signature(model.forward).parameters
        self._adapters: dict[str, AdapterInfo] = {}
        self._registry = threading.Lock()
        self._adding = threading.Lock()  # one adapter load at a time (names are checked, then claimed)
        self._keys = itertools.count()
        self._tokenizers: dict[str, object] = {}
        self._active: str | None = None  # PEFT active adapter as last set by the worker
        self._routing = RowRouting()  # per-row adapters in one batch (reinstalled on every adapter load)
        self._worker = _Worker()
        self._worker.start()

    # ------------------------------------------------------------------ adapters

    def adapter_names(self) -> list[str]:
        with self._registry:
            return list(self._adapters)

    def adapter(self, name: str) -> AdapterInfo:
        with self._registry:
            info = self._adapters.get(name)
        if info is None:
            raise UsageError(f"no adapter named {name!r} is loaded; loaded: {', '.join(self.adapter_names()) or 'none'}")
        return info

    def add_adapter(self, spec: str, *, name: str | None = None, revision: str | None = None) -> AdapterInfo:
        """Load an adapter from a local folder or a hub id (`owner/name`, optionally `owner/name@revision`) into
        the resident model. The base is never reloaded. Loading the same folder twice returns the first load."""
        spec = (spec or "").strip()
        if not spec:
            raise UsageError("give an adapter folder or a hub id (owner/name)")
        with self._adding:
            folder, repo_id, rev, commit, source = self._locate(spec, revision)
            with self._registry:
                for info in self._adapters.values():
                    if info.path == folder:
                        return info
            info = self._describe(folder, repo_id, rev, commit, source, name)
            if info.name in self.adapter_names():
                raise UsageError(f"an adapter named {info.name!r} is already loaded; give this one another name")
            info.key = f"a{next(self._keys)}"
            self._worker.call(lambda: self._load_into_model(info)).result()
            with self._registry:
                self._adapters[info.name] = info
        log.info("adapter %s loaded from %s (%s)", info.name, folder, "experts + linear" if info.experts else "linear")
        return info

    def _locate(self, spec: str, revision: str | None):
        local = Path(spec).expanduser()
        if local.is_dir():
            return local.resolve(), None, None, None, "local"
        repo_id, _, at_rev = spec.partition("@")
        if not _HUB_ID.match(repo_id) or spec.startswith((".", "/", "~")):
            raise ModelLoadError(f"adapter {spec}: no such folder, and it is not a hub id (owner/name[@revision])")
        rev = revision or at_rev or None
        from persona_lora.hub_tools.pull import pull

        try:
            folder = Path(pull(repo_id, hub=self.hub, revision=rev))
        except HubError as e:
            raise HubError(f"{e} (adapter {spec} was tried as a hub id: there is no local folder of that name)") from e
        commit = folder.name if _COMMIT.match(folder.name) else None
        return folder.resolve(), repo_id, rev, commit, self.hub

    def _describe(self, folder: Path, repo_id, rev, commit, source, name) -> AdapterInfo:
        cfg = read_adapter_config(require_adapter_files(folder))
        warnings: list[str] = []
        if (folder / MANIFEST_NAME).is_file():
            manifest = read_manifest(folder)
            if manifest.kind == "merged":
                raise ModelLoadError(f"{folder} is a merged model, not an adapter; run the demo with --base {folder}")
            chat, preset = manifest.chat or ChatInfo(), (manifest.lora.preset if manifest.lora else None)
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
            experts=bool(cfg.get("target_parameters")), preset=preset, warnings=warnings,
        )

    def _check_base(self, folder: Path, warnings: list[str]) -> None:
        """An adapter trained on another base may still load (same shapes) but means little: say so, visibly."""
        from persona_lora.hub_tools.verify import check_base

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
        if not template and (folder / "tokenizer_config.json").is_file():
            try:
                template = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template")
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

    def _load_into_model(self, info: AdapterInfo) -> None:
        """Runs on the inference thread: no forward pass sees a half-loaded adapter."""
        try:
            self.model = load_adapter(self.model, info.path, info.key)
        except (RuntimeError, ValueError, KeyError, OSError) as e:  # shapes or names that do not fit this base
            if hasattr(self.model, "peft_config") and info.key in self.model.peft_config:
                self.model.delete_adapter(info.key)
                self._routing.install(self.model)
            self._active = None
            raise ModelLoadError(f"cannot load adapter {info.name} from {info.path} onto {self.base.id}: {e}") from e
        self.model.eval()
        self._active = None
        self._routing.install(self.model)

    # ------------------------------------------------------------------ describing

    def describe(self, name: str | None) -> dict[str, str]:
        """Which base, adapter, revision and chat template each side uses (plain text; the UI escapes it)."""
        base_rev = self.base.revision or ("local folder" if self.base.source == "local" else "main")
        if self.base.source != "local" and _COMMIT.match(self.base.path.name) and self.base.path.name != base_rev:
            base_rev = f"{base_rev} ({self.base.path.name[:10]})"  # the snapshot actually loaded
        if not name:
            return {"base": f"base {self.base.id} ({base_rev}) · chat template: {self.base_template_origin}",
                    "adapter": "no adapter loaded"}
        info = self.adapter(name)
        tmpl = f"chat template: {info.template_origin}, sha {template_sha(info.chat_template)}"
        warn = "".join(f" · WARNING: {w}" for w in info.warnings)
        return {
            "base": f"base {self.base.id} ({base_rev}), no adapter · {tmpl}",
            "adapter": f"adapter {info.name} ({info.source}, {info.version}) on base {self.base.id} · {tmpl}{warn}",
        }

    def system_prompt(self, name: str | None) -> str:
        return self.adapter(name).system_prompt if name else ""

    # ------------------------------------------------------------------ generation

    def stream_compare(self, adapter: str, base_history: list[dict], adapter_history: list[dict],
                       system_prompt: str | None = None, settings: GenerationSettings | None = None) -> Iterator[tuple[str, str]]:
        """Yield (base text, adapter text) as both grow, token by token, from one batched decode.

        Each history is the conversation of that side (user/assistant turns, ending with the new user turn);
        `system_prompt` None means the adapter's manifest prompt, "" means none."""
        info = self.adapter(adapter)
        system = info.system_prompt if system_prompt is None else system_prompt
        rows = [_Row(conversation_for(base_history, system), BASE), _Row(conversation_for(adapter_history, system), info.key)]
        yield from self._stream(_Job(self, rows, info.chat_template, self._settings(settings)))

    def compare(self, adapter: str, message: str, system_prompt: str | None = None,
                settings: GenerationSettings | None = None) -> tuple[str, str]:
        """(base answer, adapter answer) to one user message."""
        turn = [{"role": "user", "content": message}]
        last = ("", "")
        for last in self.stream_compare(adapter, turn, turn, system_prompt, settings):
            pass
        return last

    def stream_one(self, adapter: str | None, history: list[dict], system_prompt: str | None = None,
                   settings: GenerationSettings | None = None) -> Iterator[str]:
        """One side alone (adapter None: the base)."""
        info = self.adapter(adapter) if adapter else None
        system = (info.system_prompt if info else "") if system_prompt is None else system_prompt
        template = info.chat_template if info else (getattr(self.tokenizer, "chat_template", None) or "")
        job = _Job(self, [_Row(conversation_for(history, system), info.key if info else BASE)], template, self._settings(settings))
        for texts in self._stream(job):
            yield texts[0]

    def answer(self, adapter: str | None, message: str, system_prompt: str | None = None,
               settings: GenerationSettings | None = None) -> str:
        last = ""
        for last in self.stream_one(adapter, [{"role": "user", "content": message}], system_prompt, settings):
            pass
        return last

    def close(self) -> None:
        """Stop the inference thread and wait for it: a thread still inside torch when the interpreter exits
        aborts the process ("terminate called without an active exception")."""
        self._worker.stop()
        if self._worker.is_alive() and threading.current_thread() is not self._worker:
            self._worker.join(timeout=60)

    def _settings(self, settings: GenerationSettings | None) -> GenerationSettings:
        return (settings or GenerationSettings()).checked(self.max_new_tokens_cap)

    def _stream(self, job: _Job) -> Iterator[tuple[str, ...]]:
        """Hand the job to the inference thread and relay its updates, skipping stale partial ones when the
        reader is slower than the model. Closing the iterator (client gone, Stop) cancels the job."""
        self._worker.submit(job)
        try:
            while True:
                kind, payload = job.events.get()
                while kind == "partial":
                    try:
                        kind, payload = job.events.get_nowait()
                    except queue.Empty:
                        break
                if kind == "error":
                    raise payload
                yield payload
                if kind == "done":
                    return
        finally:
            job.cancelled.set()

    # ------------------------------------------------------------------ inference-thread internals

    def _tokenizer_for(self, template: str):
        """A tokenizer carrying `template` (copies are cached; only the inference thread uses them)."""
        tok = self._tokenizers.get(template)
        if tok is None:
            tok = self.tokenizer if template == getattr(self.tokenizer, "chat_template", None) else copy.deepcopy(self.tokenizer)
            tok.chat_template = template
            self._tokenizers[template] = tok
        return tok

    def _encode(self, tokenizer, conversation: list[dict]) -> list[int]:
        """The prompt through the one formatting path; the oldest turns are dropped when it is over the limit."""
        conv = list(conversation)
        while True:
            ids = encode_prompt(tokenizer, conv)
            if len(ids) <= self.max_prompt_tokens:
                return ids
            first = 1 if conv and conv[0]["role"] == "system" else 0
            if len(conv) - first <= 1:
                raise UsageError(f"the prompt is {len(ids)} tokens long; this demo accepts at most {self.max_prompt_tokens} "
                                 "(shorten the message or the system prompt)")
            conv = conv[:first] + conv[first + 2:]  # drop the oldest user/assistant exchange

    @staticmethod
    def _eos_ids(model) -> set[int]:
        ids = set()
        gen = getattr(model, "generation_config", None)
        for source in (getattr(gen, "eos_token_id", None), getattr(model.config, "eos_token_id", None)):
            if isinstance(source, int):
                ids.add(source)
            elif isinstance(source, (list, tuple)):
                ids.update(int(i) for i in source)
        return ids

    def _forward(self, keys: list[str], **inputs):
        """One forward pass of the resident model with each row's adapter (inference thread only)."""
        inner = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        with self._rows(keys):
            return inner(**inputs).logits[:, -1, :]

    @contextlib.contextmanager
    def _rows(self, keys: list[str]):
        """Set the model's state for a batch whose rows use `keys` (BASE and at most one adapter)."""
        adapters = set(keys) - {BASE}
        if len(adapters) > 1:
            raise ValueError(f"one batch mixes several adapters {sorted(adapters)}; the engine pairs base with one")
        if not hasattr(self.model, "peft_config"):
            if adapters:
                raise ValueError("no adapter is loaded")
            yield
            return
        # the active adapter is the batch's one; for a base-only batch any, as long as it is known (`_inject_rows`)
        key = next(iter(adapters)) if adapters else (self._active or next(iter(self.model.peft_config)))
        if self._active != key:
            self.model.set_adapter(key, inference_mode=True)
            self._active = key
        # a base-only batch is routed too: cheaper than toggling `disable_adapter()`, same bare computation
        with self._routing.rows(keys, key):
            yield


# ---------------------------------------------------------------------- jobs and the inference thread


@dataclass
class _Row:
    conversation: list[dict]
    key: str
    ids: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    done: bool = False
    generator: object = None


@dataclass
class _Batch:
    """Rows decoded in one forward pass, with their KV cache, attention mask and positions."""

    rows: list[_Row]
    cache: object = None
    mask: object = None
    positions: object = None


class _Job:
    """One request: a few rows decoded together, one decode step per `step()`.

    Mixed mode (default) puts all rows in one batch; separate mode (`mixed_batch=False`) gives each row its own
    batch of one, decoded alternately: twice the passes, for models whose MoE layout the row split cannot serve."""

    def __init__(self, engine: Engine, rows: list[_Row], template: str, settings: GenerationSettings):
        self.engine, self.rows, self.template, self.settings = engine, rows, template, settings
        self.batches = [_Batch(rows)] if engine.mixed_batch else [_Batch([r]) for r in rows]
        self.events: queue.Queue = queue.Queue()
        self.cancelled = threading.Event()
        self.tokenizer = None

    def step(self) -> bool:
        """Advance every unfinished batch by one forward pass; True when all rows hit EOS or max_new_tokens."""
        import torch

        with torch.inference_mode():
            if self.tokenizer is None:
                self._encode(torch)
            for batch in self.batches:
                if all(r.done for r in batch.rows):
                    continue
                logits = self._prefill(torch, batch) if batch.cache is None else self._decode(torch, batch)
                self._pick(torch, batch.rows, logits)
        texts = tuple(self._text(r) for r in self.rows)
        finished = all(r.done for r in self.rows)
        self.events.put(("done" if finished else "partial", texts))
        return finished

    def _encode(self, torch) -> None:
        self.tokenizer = self.engine._tokenizer_for(self.template)
        for r in self.rows:
            r.ids = self.engine._encode(self.tokenizer, r.conversation)
            if not self.settings.greedy:  # same seed on every side: a fair comparison, and repeatable
                r.generator = torch.Generator(device="cpu").manual_seed(self.settings.seed)

    def _prefill(self, torch, batch: _Batch):
        from transformers import DynamicCache

        e = self.engine
        width = max(len(r.ids) for r in batch.rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(batch.rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch.rows), width), dtype=torch.long)
        for i, r in enumerate(batch.rows):  # left padding: every row's last prompt token is in the last column
            ids[i, width - len(r.ids):] = torch.tensor(r.ids)
            mask[i, width - len(r.ids):] = 1
        batch.mask = mask.to(e.device)
        batch.positions = (batch.mask.cumsum(1) - 1).clamp(min=0)
        batch.cache = DynamicCache(config=e.model.config)
        extra = {"logits_to_keep": 1} if e._keep_kwarg else {}
        return e._forward([r.key for r in batch.rows], input_ids=ids.to(e.device), attention_mask=batch.mask,
                          position_ids=batch.positions, use_cache=True, **{e._cache_kwarg: batch.cache}, **extra)

    def _decode(self, torch, batch: _Batch):
        e = self.engine
        nxt = torch.tensor([[r.tokens[-1]] for r in batch.rows], device=e.device)  # finished rows: ignored
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones((len(batch.rows), 1))], dim=1)
        batch.positions = batch.positions[:, -1:] + 1
        return e._forward([r.key for r in batch.rows], input_ids=nxt, attention_mask=batch.mask,
                          position_ids=batch.positions, use_cache=True, **{e._cache_kwarg: batch.cache})

    def _pick(self, torch, rows: list[_Row], logits) -> None:
        s = self.settings
        for i, r in enumerate(rows):
            if r.done:
                continue
            if s.greedy:
                token = int(torch.argmax(logits[i]))
            else:
                probs = torch.softmax(logits[i].float().cpu() / s.temperature, dim=-1)
                if s.top_p < 1:
                    sorted_p, order = torch.sort(probs, descending=True)
                    sorted_p[sorted_p.cumsum(0) - sorted_p > s.top_p] = 0  # the smallest set reaching top_p
                    probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
                token = int(torch.multinomial(probs / probs.sum(), 1, generator=r.generator))
            r.tokens.append(token)
            if (token in self.engine._eos and not s.ignore_eos) or len(r.tokens) >= s.max_new_tokens:
                r.done = True

    def _text(self, r: _Row) -> str:
        if self.tokenizer is None:
            return ""
        text = self.tokenizer.decode(r.tokens, skip_special_tokens=True)
        return text.strip() if r.done else text.lstrip().rstrip("\ufffd")  # no half UTF-8 character mid-stream


class _Call:
    def __init__(self, fn):
        self.fn = fn
        self.future: Future = Future()


class _Worker(threading.Thread):
    """The one thread that touches the model. Calls (adapter loads) run between decode steps; active jobs are
    advanced one step each in turn, so concurrent sessions all stream and none waits for another to finish."""

    def __init__(self):
        super().__init__(name="persona-lora-inference", daemon=True)
        self._inbox: queue.Queue = queue.Queue()
        self._stopping = threading.Event()

    def submit(self, job: _Job) -> None:
        if self._stopping.is_set():
            raise RuntimeError("the engine is closed")
        self._inbox.put(job)

    def call(self, fn) -> Future:
        item = _Call(fn)
        self.submit(item)
        return item.future

    def stop(self) -> None:
        self._stopping.set()
        self._inbox.put(None)

    def run(self) -> None:
        active: list[_Job] = []
        while not self._stopping.is_set():
            try:
                item = self._inbox.get(block=not active)
            except queue.Empty:
                item = False
            while item is not False:
                if item is None:
                    break
                if isinstance(item, _Call):
                    self._run_call(item)
                else:
                    active.append(item)
                try:
                    item = self._inbox.get_nowait()
                except queue.Empty:
                    item = False
            for job in list(active):
                if job.cancelled.is_set():
                    active.remove(job)
                    continue
                try:
                    finished = job.step()
                except Exception as exc:  # every failure goes to the waiting request
                    log.debug("generation failed", exc_info=True)
                    job.events.put(("error", exc))
                    finished = True
                if finished:
                    active.remove(job)
        for job in active:
            job.events.put(("error", RuntimeError("the engine was closed")))

    @staticmethod
    def _run_call(item: _Call) -> None:
        try:
            item.future.set_result(item.fn())
        except Exception as exc:  # noqa: BLE001 - the caller re-raises it
            item.future.set_exception(exc)
