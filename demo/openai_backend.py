"""The `openai` demo backend: both sides answered by a serving engine (vLLM, SGLang) through its OpenAI-compatible
chat-completions API, for demos shared with many people at once.

Why this shape:
- The engine batches and schedules; we only ask. Each pane is one streamed request (`model` = the base's served
  name or the adapter's), and the two requests of a turn run at once, each read by a thread of its own, so both
  panes stream together and neither waits for the other (`stream_sides`; the page is updated at most 20 times a
  second). Greedy is `temperature=0`.
- The official `openai` client speaks the protocol (streaming, error bodies, timeouts); this module decides
  only what to ask and how each failure reads. Retries are off: a half-streamed answer cannot be retried
  transparently, and the page's Retry button is the user's choice.
- Failures are per side: an unreachable engine, a wrong key, an unknown model, a timeout or an engine error in
  the middle of a stream ends that side with a message that names the cause and the fix (`SideFailed`); the
  other side's answer is complete and kept. At start-up `/v1/models` is asked once, so a wrong key or a missing
  model is refused before anyone opens the page.
- The key is read from the environment variable the user names, handed to the client, and otherwise never kept:
  no message, log line or page built here contains it (server error bodies are not relayed for auth failures,
  and every relayed text is scrubbed of it).
- Requests per session are bounded as in the local backend: the page's shared concurrency limit and queue, the
  message length cap, and the server-side new-token cap clamp what reaches the engine.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from persona_lora.demo.backend import SideFailed, final
from persona_lora.demo.decode import GenerationSettings, shown_text
from persona_lora.errors import UsageError
from persona_lora.openai_endpoint import endpoint_url, read_api_key, scrubber, shown_url

log = logging.getLogger(__name__)

# Page updates per turn are at most one every UPDATE_SECONDS: an engine streams a token per event (50+ per second
# per side), and each update is a page diff Gradio computes and sends; 20 a second reads as live streaming and
# keeps the demo's own work small when many sessions stream at once.
UPDATE_SECONDS = 0.05
_CUT = "the stream ended before the engine finished the answer (no finish reason): the connection was cut or the " \
       "engine stopped; press Retry"


@dataclass
class ServedAdapter:
    """An adapter as the engine serves it (`name` is the request's `model`), with what its manifest says when the
    demo was told where the adapter came from (`--adapter NAME=FOLDER`)."""

    name: str
    system_prompt: str = ""
    folder: Path | None = None
    trained_on: str | None = None  # the manifest's base id
    warnings: list[str] = field(default_factory=list)

    @property
    def adapter_id(self) -> str:
        """Votes group by the served name: it is what answered."""
        return self.name


def parse_adapter_spec(spec: str) -> ServedAdapter:
    """`NAME` (the engine's model name) or `NAME=FOLDER` (an adapter or export folder whose manifest gives the
    system prompt it was trained with)."""
    name, sep, folder = (spec or "").partition("=")
    name = name.strip()
    if not name:
        raise UsageError(f"--adapter {spec!r}: give the engine's model name, optionally NAME=FOLDER")
    if not sep:
        return ServedAdapter(name)
    from persona_lora.artifact import MANIFEST_NAME, read_manifest

    path = Path(folder.strip()).expanduser()
    if not (path / MANIFEST_NAME).is_file():
        raise UsageError(f"--adapter {spec}: {path} has no {MANIFEST_NAME}; give an adapter or export folder "
                         "(persona-lora export writes one), or the name alone")
    manifest = read_manifest(path)
    system = manifest.chat.system_prompt if manifest.chat and manifest.chat.system_prompt else ""
    return ServedAdapter(name, system, path.resolve(), manifest.base_model.id)


class OpenAIBackend:
    """The demo's two sides on an OpenAI-compatible engine. Thread-safe; see the module docstring."""

    def __init__(self, endpoint: str, base: str, adapters: list[str] | tuple[str, ...] = (), *,
                 api_key_env: str | None = None, timeout: float = 60.0, max_new_tokens_cap: int = 512):
        import openai

        if max_new_tokens_cap < 1:
            raise UsageError(f"--max-new-tokens must be at least 1, got {max_new_tokens_cap}")
        if not timeout > 0:
            raise UsageError(f"--timeout must be a positive number of seconds, got {timeout}")
        self.url = endpoint_url(endpoint)
        self.where = shown_url(self.url)
        self.base = base.strip()
        if not self.base:
            raise UsageError("--base: give the engine's served model name of the base (GET /v1/models lists them)")
        self.api_key_env = api_key_env
        self.timeout = float(timeout)
        self.max_new_tokens_cap = max_new_tokens_cap
        key = read_api_key(api_key_env)
        self._scrub = scrubber(key)
        self._client = openai.OpenAI(base_url=self.url, api_key=key, max_retries=0,
                                     timeout=openai.Timeout(self.timeout, connect=min(10.0, self.timeout)))
        self._lock = threading.Lock()
        self._adapters: dict[str, ServedAdapter] = {}
        try:
            served = self.served_models()
            self._require(self.base, served, "--base")
            specs = [parse_adapter_spec(s) for s in adapters]
            if not specs:  # the picker's list comes from the endpoint: every served model but the base
                specs = [ServedAdapter(m) for m in served if m != self.base]
            for info in specs:
                self._require(info.name, served, "--adapter")
                self._register(info)
        except BaseException:
            self._client.close()
            raise
        log.info("OpenAI-compatible engine at %s: base %s, adapters %s", self.where, self.base,
                 ", ".join(self._adapters) or "none")

    # ------------------------------------------------------------------ models

    @property
    def base_id(self) -> str:
        return self.base

    def served_models(self) -> list[str]:
        """The ids `GET /v1/models` lists; a failure is a UsageError naming the option to fix."""
        try:
            return [m.id for m in self._client.models.list()]
        except Exception as e:  # noqa: BLE001 - every failure becomes one message naming the option
            raise UsageError(self._explain(e, None)) from None

    def _require(self, name: str, served: list[str], option: str) -> None:
        """`name` must be served. SGLang's adapter form `base:adapter` is served when the base is and the adapter
        is listed (SGLang lists loaded adapters by their own name)."""
        if name in served:
            return
        head, sep, tail = name.rpartition(":")
        if sep and head in served and tail in served:
            return
        listed = ", ".join(served) or "nothing"
        raise UsageError(f"{option} {name}: the engine at {self.where} does not serve it (GET /v1/models lists: "
                         f"{listed}); use a listed name (vLLM: --served-model-name and --lora-modules names; "
                         "SGLang: base:adapter) or start the engine with it (`persona-lora serve`)")

    def _register(self, info: ServedAdapter) -> ServedAdapter:
        if info.trained_on and info.trained_on not in (self.base, Path(self.base).name):
            info.warnings.append(f"its manifest says it was trained on {info.trained_on}, the base here is "
                                 f"served as {self.base}")
        with self._lock:  # the newest spec of a name wins (it may bring the adapter's manifest); its place stays
            self._adapters[info.name] = info
        return info

    def adapter_names(self) -> list[str]:
        with self._lock:
            return list(self._adapters)

    def adapter(self, name: str) -> ServedAdapter:
        with self._lock:
            info = self._adapters.get(name)
        if info is None:
            raise UsageError(f"no adapter named {name!r} is served here; served: {', '.join(self.adapter_names())}")
        return info

    def add_adapter(self, spec: str) -> ServedAdapter:
        """Another of the engine's models as an adapter (checked against `/v1/models` now)."""
        info = parse_adapter_spec(spec)
        self._require(info.name, self.served_models(), "adapter")
        return self._register(info)

    def describe(self, name: str | None) -> dict[str, str]:
        engine = f"served by {self.where} (OpenAI-compatible API; chat template: the engine's)"
        if not name:
            return {"base": f"base {self.base} {engine}", "adapter": "no adapter loaded"}
        info = self.adapter(name)
        origin = f" · system prompt from {info.folder}" if info.folder else ""
        warn = "".join(f" · WARNING: {w}" for w in info.warnings)
        return {"base": f"base {self.base}, no adapter, {engine}",
                "adapter": f"adapter {info.name} on base {self.base}, {engine}{origin}{warn}"}

    def system_prompt(self, name: str | None) -> str:
        return self.adapter(name).system_prompt if name else ""

    # ------------------------------------------------------------------ generation

    def stream_compare(self, adapter: str, base_history: list[dict], adapter_history: list[dict],
                       system_prompt: str | None = None,
                       settings: GenerationSettings | None = None) -> Iterator[tuple[str, str]]:
        info = self.adapter(adapter)
        system = info.system_prompt if system_prompt is None else system_prompt
        yield from self.stream_sides([(self.base, _messages(base_history, system)),
                                      (info.name, _messages(adapter_history, system))], settings)

    def stream_one(self, adapter: str | None, history: list[dict], system_prompt: str | None = None,
                   settings: GenerationSettings | None = None) -> Iterator[str]:
        info = self.adapter(adapter) if adapter else None
        system = (info.system_prompt if info else "") if system_prompt is None else system_prompt
        for texts in self.stream_sides([(info.name if info else self.base, _messages(history, system))], settings):
            yield texts[0]

    def compare(self, adapter: str, message: str, system_prompt: str | None = None,
                settings: GenerationSettings | None = None) -> tuple[str, str]:
        turn = [{"role": "user", "content": message}]
        return final(self.stream_compare(adapter, turn, turn, system_prompt, settings), ("", ""))

    def answer(self, adapter: str | None, message: str, system_prompt: str | None = None,
               settings: GenerationSettings | None = None) -> str:
        return final(self.stream_one(adapter, [{"role": "user", "content": message}], system_prompt, settings), "")

    def stream_pair(self, left: str | None, right: str, left_history: list[dict], right_history: list[dict],
                    system_prompt: str | None = None,
                    settings: GenerationSettings | None = None) -> Iterator[tuple[str, str]]:
        """Any two served models side by side: (left text, right text), `left` None or "base" the base. Each side
        is its own request, as in `stream_compare`; `system_prompt` None means the right adapter's."""
        if left in (None, "", "base"):
            yield from self.stream_compare(right, left_history, right_history, system_prompt, settings)
            return
        a, b = self.adapter(left), self.adapter(right)
        if a.name == b.name:
            raise UsageError(f"{left} and {right} are the same model; compare two different models")
        system = b.system_prompt if system_prompt is None else system_prompt
        yield from self.stream_sides([(a.name, _messages(left_history, system)),
                                      (b.name, _messages(right_history, system))], settings)

    def compare_pair(self, left: str | None, right: str, message: str, system_prompt: str | None = None,
                     settings: GenerationSettings | None = None) -> tuple[str, str]:
        """(left answer, right answer) to one user message; `left` None or "base" is the base."""
        turn = [{"role": "user", "content": message}]
        return final(self.stream_pair(left, right, turn, turn, system_prompt, settings), ("", ""))

    def close(self) -> None:
        self._client.close()

    def stream_sides(self, sides: list[tuple[str, list[dict]]],
                     settings: GenerationSettings | None) -> Iterator[tuple[str, ...]]:
        """Stream one request per side at once; yield every side's text as they grow, at most every
        `UPDATE_SECONDS` (the last update at once). Raises `SideFailed` at the end when a side failed (after the
        others finished). Closing the iterator stops every side."""
        params = self._params((settings or GenerationSettings()).checked(self.max_new_tokens_cap))
        events: queue.Queue = queue.Queue()
        streams = [_SideStream(i, model, messages) for i, (model, messages) in enumerate(sides)]
        for s in streams:
            threading.Thread(target=self._run_side, args=(s, params, events), daemon=True,
                             name=f"persona-lora-side-{s.index}").start()
        texts = [""] * len(streams)
        failures: dict[int, str] = {}
        running, shown, pending = len(streams), 0.0, False
        try:
            while running:
                wait = max(0.0, shown + UPDATE_SECONDS - time.monotonic()) if pending else None
                try:
                    kind, i, value = events.get(timeout=wait)
                except queue.Empty:  # nothing new since a change that was held back: show it now
                    shown, pending = time.monotonic(), False
                    yield tuple(texts)
                    continue
                texts[i] = value if kind != "error" else value[1]
                if kind == "error":
                    failures[i] = value[0]
                running -= kind != "text"
                pending = True
                if not running or time.monotonic() - shown >= UPDATE_SECONDS:
                    shown, pending = time.monotonic(), False
                    yield tuple(texts)
        finally:
            for s in streams:
                s.cancel()
        if failures:
            raise SideFailed(tuple(texts), failures, ("base", "adapter") if len(texts) == 2 else ("answer",))

    def _params(self, s: GenerationSettings) -> dict:
        params = {"max_tokens": s.max_new_tokens, "temperature": 0.0 if s.greedy else s.temperature,
                  "top_p": 1.0 if s.greedy else s.top_p}
        if not s.greedy:
            params["seed"] = s.seed  # the same seed on both sides, as the local backend does
        if s.ignore_eos:
            params["extra_body"] = {"ignore_eos": True}  # vLLM's and SGLang's extension (benchmarks)
        return params

    def _run_side(self, side: _SideStream, params: dict, events: queue.Queue) -> None:
        """One side's request, on its own thread: text updates, then ("done", final) or ("error", (why, text))."""
        text, finished = "", None
        try:
            stream = self._client.chat.completions.create(model=side.model, messages=side.messages, stream=True,
                                                          **params)
            side.attach(stream)
            for chunk in stream:
                if side.cancelled.is_set():
                    return
                for choice in chunk.choices or []:
                    piece = choice.delta.content if choice.delta is not None else None
                    if piece:
                        text += piece
                        events.put(("text", side.index, shown_text(text, done=False)))
                    finished = choice.finish_reason or finished
            if side.cancelled.is_set():
                return
            if finished is None:
                raise _StreamCut()
            events.put(("done", side.index, shown_text(text, done=True)))
        except Exception as e:  # noqa: BLE001 - every failure ends this side with one message
            if side.cancelled.is_set():
                return
            why = self._explain(e, side.model, mid_answer=side.attached)
            log.warning("%s side (%s) failed: %s", "base" if side.model == self.base else "adapter", side.model, why)
            events.put(("error", side.index, (why, shown_text(text, done=True))))
        finally:
            side.cancel()

    # ------------------------------------------------------------------ messages

    def _explain(self, e: Exception, model: str | None, *, mid_answer: bool = False) -> str:
        """One message for a failed request (`mid_answer`: after the engine had started answering): the cause
        and the fix, never the key."""
        import openai

        what = f"model {model!r}" if model else "GET /v1/models"
        if isinstance(e, _StreamCut):
            return _CUT
        if isinstance(e, openai.APITimeoutError):
            return (f"the engine at {self.where} sent nothing for {self.timeout:g} s ({what}); it may be overloaded "
                    "or stuck: retry, or raise --timeout")
        if isinstance(e, openai.APIConnectionError):
            cause = type(e.__cause__).__name__ if e.__cause__ else "connection error"
            if mid_answer:
                return f"the connection to the engine at {self.where} was cut mid-answer ({cause}); press Retry"
            return (f"cannot reach the engine at {self.where} ({cause}): is it running and is --endpoint right? "
                    "(`persona-lora serve … --engine-python PATH` starts one)")
        if isinstance(e, openai.AuthenticationError | openai.PermissionDeniedError):
            if self.api_key_env:
                return (f"the engine at {self.where} refused the key in ${self.api_key_env} (HTTP {e.status_code}): "
                        f"set --api-key-env to the variable holding the key the engine was started with")
            return (f"the engine at {self.where} needs an API key (HTTP {e.status_code}): put it in an environment "
                    "variable and pass --api-key-env VAR")
        if isinstance(e, openai.NotFoundError):
            return (f"the engine at {self.where} does not serve {what} (HTTP 404): check the name against its "
                    "GET /v1/models, or restart the engine with that adapter")
        if isinstance(e, openai.APIStatusError):
            return (f"the engine at {self.where} answered HTTP {e.status_code} for {what}: "
                    f"{self._relay(_server_message(e))}")
        if isinstance(e, openai.APIError):  # an error event in the middle of a stream
            return f"the engine at {self.where} reported an error mid-answer ({what}): {self._relay(e.message)}"
        return (f"the engine at {self.where} sent something that is not the OpenAI chat-completions protocol "
                f"({type(e).__name__}, {what}): is --endpoint an OpenAI-compatible API (…/v1)?")

    def _relay(self, text: str | None) -> str:
        """A server's own words, shortened and scrubbed of the key (some servers echo what they received)."""
        return self._scrub(" ".join(str(text or "no details").split())[:300])


class _StreamCut(Exception):
    """The stream ended cleanly but without a finish reason."""


class _SideStream:
    """One side's request: its open stream (to close it when the reader goes away) and the cancel flag."""

    def __init__(self, index: int, model: str, messages: list[dict]):
        self.index, self.model, self.messages = index, model, messages
        self.cancelled = threading.Event()
        self.attached = False  # the engine answered with a stream (failures after this are mid-answer)
        self._stream = None
        self._lock = threading.Lock()

    def attach(self, stream) -> None:
        with self._lock:
            self._stream, self.attached = stream, True
            if self.cancelled.is_set():
                stream.close()

    def cancel(self) -> None:
        """Stop reading and close the response: the engine sees the client go and stops generating."""
        with self._lock:
            self.cancelled.set()
            stream, self._stream = self._stream, None
        if stream is not None:
            try:
                stream.close()
            except Exception:  # noqa: BLE001 - closing a stream another thread reads may race; it is closed anyway
                pass


def _messages(history: list[dict], system: str | None) -> list[dict]:
    """The request's messages: the system prompt (unless the history has its own), then role and content only."""
    turns = [{"role": m["role"], "content": m["content"]} for m in history]
    if system and not (turns and turns[0]["role"] == "system"):
        turns.insert(0, {"role": "system", "content": system})
    return turns


def _server_message(e) -> str:
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
        if body.get("message"):
            return str(body["message"])
    try:
        return json.dumps(body)[:300] if body is not None else e.message
    except (TypeError, ValueError):
        return e.message
