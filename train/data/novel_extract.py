"""`data extract --format novel`, the endpoint side: each chunk asked once, answers validated, cached and retried.

Why this shape:
- The model is any OpenAI-compatible chat endpoint (vLLM, SGLang, a hosted API), reached with the official
  `openai` client and the key read the way the demo reads it (`persona_lora.openai_endpoint`): from the
  environment variable the user names, never printed, logged or written (server texts are scrubbed of it).
- Each chunk must come back as `{"dialogues": [{"speaker": …, "line": …}, …]}`. The JSON schema is requested
  with `response_format` (servers that reject it are asked again without it, once per run) and every answer is
  validated either way: an answer that is not that JSON is retried with back-off, as are 429s, 5xx, timeouts
  and cut connections, and after the last try the chunk counts as failed; failed chunks are named, never dropped.
  A 429 with `Retry-After: N` (seconds) is retried after N seconds rather than the back-off, at most
  MAX_RETRY_AFTER (a quota reset hours away is not waited for: the chunk fails and a re-run asks again); the wait
  is said in the progress output.
- Every valid answer is written to the cache at once, keyed by (chunk sha256, model, prompt version), one file
  each, written atomically: a re-run, or a resume after Ctrl-C or kill -9, sends only chunks without an answer.
- A refused key or an unknown model fails every chunk the same way, so it stops the run at the first answer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from persona_lora.errors import EndpointError, UsageError
from persona_lora.openai_endpoint import endpoint_url, read_api_key, scrubber, shown_url
from persona_lora.train.data.novel_chunks import Chunk

log = logging.getLogger(__name__)

PROMPT_VERSION = "novel-dialogue-v1"
MAX_RETRY_AFTER = 60.0  # seconds: the longest a 429's Retry-After is waited before one retry
SYSTEM_PROMPT = (
    "You extract the dialogue from a passage of a novel. Return JSON of exactly this shape: "
    '{"dialogues": [{"speaker": "...", "line": "..."}]} listing every spoken line of the passage in reading order. '
    '"speaker": the character who speaks, by the name the passage uses for them (a name rather than a pronoun '
    'whenever the passage makes it clear; "unknown" when it does not). "line": the exact words spoken, without '
    "quotation marks and without the narration around them. Leave out narration, thoughts and quoted writing. "
    'A passage without dialogue gives {"dialogues": []}. Return only the JSON.'
)
ANSWER_SCHEMA = {
    "type": "object",
    "properties": {"dialogues": {"type": "array", "items": {
        "type": "object",
        "properties": {"speaker": {"type": "string"}, "line": {"type": "string"}},
        "required": ["speaker", "line"], "additionalProperties": False}}},
    "required": ["dialogues"], "additionalProperties": False,
}


class InvalidAnswer(Exception):
    """The endpoint answered, but not with the asked JSON."""


@dataclass
class EndpointSettings:
    endpoint: str
    model: str
    api_key_env: str | None = None
    concurrency: int = 4
    retries: int = 3
    backoff: float = 1.0  # seconds before the first retry; doubled each time
    timeout: float = 120.0
    json_schema: bool = True


@dataclass
class ExtractionRun:
    """What happened to each chunk: its answer, or why it failed."""

    answers: dict[int, list[dict]] = field(default_factory=dict)
    failures: dict[int, str] = field(default_factory=dict)
    from_cache: int = 0
    sent: int = 0  # chunks sent to the endpoint
    requests: int = 0  # requests, retries included
    schema_refused: bool = False


def parse_answer(content: str | None) -> list[dict]:
    """The validated dialogues of one answer (a ```json fence around it is tolerated)."""
    text = (content or "").strip()
    if text.startswith("```"):
        text = text.strip("`")
        text = text[text.find("\n") + 1:] if "\n" in text else text
        text = text.removeprefix("json").strip()
    if not text:
        raise InvalidAnswer("the answer was empty")
    try:
        data = json.loads(text)
    except ValueError as e:
        raise InvalidAnswer(f"not JSON ({e.msg} at character {e.pos} of {len(text)})") from None
    if not isinstance(data, dict) or not isinstance(data.get("dialogues"), list):
        raise InvalidAnswer('not {"dialogues": [...]}')
    out = []
    for i, item in enumerate(data["dialogues"]):
        if not isinstance(item, dict) or not isinstance(item.get("speaker"), str) \
                or not isinstance(item.get("line"), str):
            raise InvalidAnswer(f'dialogues[{i}] is not {{"speaker": string, "line": string}}')
        if item["speaker"].strip() and item["line"].strip():
            out.append({"speaker": item["speaker"].strip(), "line": item["line"].strip()})
    return out


class AnswerCache:
    """One JSON file per (chunk sha256, model, prompt version) under `folder`."""

    def __init__(self, folder: Path, model: str):
        self.folder, self.model = folder, model

    def path(self, chunk: Chunk) -> Path:
        key = hashlib.sha256(json.dumps([chunk.sha256, self.model, PROMPT_VERSION]).encode()).hexdigest()
        return self.folder / f"{key}.json"

    def get(self, chunk: Chunk) -> list[dict] | None:
        path = self.path(chunk)
        try:
            item = json.loads(path.read_text(encoding="utf-8"))
            return parse_answer(json.dumps({"dialogues": item["dialogues"]}))
        except (OSError, ValueError, KeyError, TypeError, InvalidAnswer):
            return None  # absent or unreadable: asked again

    def put(self, chunk: Chunk, dialogues: list[dict]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        body = {"chunk_sha256": chunk.sha256, "model": self.model, "prompt_version": PROMPT_VERSION,
                "dialogues": dialogues}
        fd, tmp = tempfile.mkstemp(prefix=".answer.", suffix=".tmp", dir=self.folder)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(body, f, ensure_ascii=False)
        os.replace(tmp, self.path(chunk))


class NovelClient:
    """Asks the endpoint for each chunk's dialogues; thread-safe."""

    def __init__(self, settings: EndpointSettings, *, sleep: Callable[[float], None] = time.sleep,
                 progress: Callable[[str], None] | None = None):
        import openai

        if settings.concurrency < 1:
            raise UsageError(f"--concurrency must be at least 1, got {settings.concurrency}")
        if settings.retries < 0:
            raise UsageError(f"--retries must be 0 or more, got {settings.retries}")
        if not settings.timeout > 0:
            raise UsageError(f"--timeout must be a positive number of seconds, got {settings.timeout}")
        if not (settings.model or "").strip():
            raise UsageError("--model: give the endpoint's model name (GET /v1/models lists them)")
        self.settings = settings
        self.url = endpoint_url(settings.endpoint)
        self.where = shown_url(self.url)
        key = read_api_key(settings.api_key_env)
        self._scrub = scrubber(key)
        self._client = openai.OpenAI(base_url=self.url, api_key=key, max_retries=0,
                                     timeout=openai.Timeout(settings.timeout, connect=min(10.0, settings.timeout)))
        self._sleep = sleep
        self._progress = progress or log.warning
        self._lock = threading.Lock()
        self._use_schema = settings.json_schema
        self.requests = 0
        self.schema_refused = False
        self.stopped = threading.Event()

    def close(self) -> None:
        self._client.close()

    def ask(self, chunk: Chunk) -> list[dict]:
        """The chunk's dialogues; InvalidAnswer/transient errors retried; EndpointError after the last try,
        UsageError for a refusal no retry can fix (key, model, route)."""
        try:
            return self._ask(chunk)
        except UsageError:
            self.stopped.set()  # every other chunk would be refused the same way: none is sent after this
            raise

    def _ask(self, chunk: Chunk) -> list[dict]:
        import openai

        last, asked_wait = "", None
        for attempt in range(self.settings.retries + 1):
            if self.stopped.is_set():
                raise EndpointError("not sent: the run stopped")
            if asked_wait is not None:
                self._sleep(asked_wait)
            elif attempt:
                delay = self.settings.backoff * 2 ** (attempt - 1)
                self._sleep(delay * (0.75 + random.random() / 2))
            asked_wait = None
            try:
                return parse_answer(self._request(chunk))
            except InvalidAnswer as e:
                last = f"the answer was not the asked JSON: {e}"
            except openai.BadRequestError as e:
                said = f"{e.body or ''} {e.message}"
                if self._use_schema and ("response_format" in said or "json_schema" in said):
                    with self._lock:
                        self._use_schema, self.schema_refused = False, True
                    log.warning("the endpoint at %s refused response_format json_schema; asking without it and "
                                "validating the answers", self.where)
                    return self._ask(chunk)
                raise UsageError(self._explain(e)) from None
            except (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError) as e:
                raise UsageError(self._explain(e)) from None
            except openai.RateLimitError as e:
                last = self._explain(e)
                if attempt < self.settings.retries:
                    asked_wait = self._retry_after(e, chunk, attempt)
            except (openai.APIStatusError, openai.APITimeoutError, openai.APIConnectionError,
                    openai.APIResponseValidationError) as e:
                last = self._explain(e)
            log.info("chunk %d: %s (try %d of %d)", chunk.index, last, attempt + 1, self.settings.retries + 1)
        raise EndpointError(last)

    def _retry_after(self, e, chunk: Chunk, attempt: int) -> float | None:
        """The seconds a 429's `Retry-After` asks for (capped at MAX_RETRY_AFTER, said in the progress output);
        None without a header in seconds (then the back-off applies)."""
        response = getattr(e, "response", None)
        raw = response.headers.get("retry-after") if response is not None else None
        try:
            asked = float((raw or "").strip())
        except ValueError:
            return None  # absent, or the HTTP-date form: the back-off
        if not math.isfinite(asked) or asked < 0:
            return None
        wait = min(asked, MAX_RETRY_AFTER)
        capped = f"; waiting {wait:g} s, the most this waits for one retry" if asked > wait else ""
        self._progress(f"chunk {chunk.index + 1}: rate-limited (HTTP 429), the endpoint asks to wait {asked:g} s "
                       f"(Retry-After){capped or f'; waiting {wait:g} s'} before try {attempt + 2} of "
                       f"{self.settings.retries + 1}")
        return wait

    def _request(self, chunk: Chunk) -> str | None:
        with self._lock:
            self.requests += 1
            schema = self._use_schema
        extra = {"response_format": {"type": "json_schema", "json_schema": {
            "name": "dialogues", "strict": True, "schema": ANSWER_SCHEMA}}} if schema else {}
        response = self._client.chat.completions.create(
            model=self.settings.model, temperature=0,
            messages=[{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": chunk.text}],
            **extra)
        if not getattr(response, "choices", None):
            raise InvalidAnswer("the response had no choices")
        return response.choices[0].message.content

    def _explain(self, e: Exception) -> str:
        import openai

        if isinstance(e, openai.APITimeoutError):
            return f"no answer from {self.where} within {self.settings.timeout:g} s (raise --timeout if it is slow)"
        if isinstance(e, openai.APIConnectionError):
            return f"cannot reach {self.where} ({type(e.__cause__).__name__ if e.__cause__ else 'connection error'})"
        if isinstance(e, openai.AuthenticationError | openai.PermissionDeniedError):
            which = f"the key in ${self.settings.api_key_env}" if self.settings.api_key_env else "no key"
            return (f"the endpoint at {self.where} refused {which} (HTTP {e.status_code}); fix: --api-key-env VAR "
                    "naming the variable that holds the endpoint's key")
        if isinstance(e, openai.NotFoundError):
            return (f"the endpoint at {self.where} does not serve model {self.settings.model!r} (HTTP 404); fix: "
                    "--model with a name its GET /v1/models lists, and --endpoint ending in /v1")
        if isinstance(e, openai.RateLimitError):
            return f"the endpoint at {self.where} is rate-limiting (HTTP 429); lower --concurrency"
        if isinstance(e, openai.APIStatusError):
            return f"the endpoint at {self.where} answered HTTP {e.status_code}: {self._relay(e)}"
        return f"the endpoint at {self.where} sent something that is not the chat-completions protocol " \
               f"({type(e).__name__})"

    def _relay(self, e) -> str:
        body = getattr(e, "body", None)
        text = body.get("message") if isinstance(body, dict) else None
        return self._scrub(" ".join(str(text or getattr(e, "message", "") or "no details").split())[:200])


def run_chunks(chunks: list[Chunk], client: NovelClient, cache: AnswerCache, *,
               progress: Callable[[str], None] = print) -> ExtractionRun:
    """Each chunk answered from the cache or asked (`concurrency` at a time); a UsageError (a refusal that fails
    every chunk) stops the run, with what was answered so far kept in the cache."""
    run = ExtractionRun()
    todo = []
    for chunk in chunks:
        cached = cache.get(chunk)
        if cached is None:
            todo.append(chunk)
        else:
            run.answers[chunk.index] = cached
            run.from_cache += 1
    if run.from_cache:
        progress(f"{run.from_cache} of {len(chunks)} chunks answered from the cache {cache.folder}")
    pool = ThreadPoolExecutor(max_workers=client.settings.concurrency, thread_name_prefix="extract")
    futures = {}
    try:
        for chunk in todo:
            futures[pool.submit(client.ask, chunk)] = chunk
        pending = set(futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                chunk = futures[future]
                run.sent += 1
                try:
                    dialogues = future.result()
                except EndpointError as e:
                    run.failures[chunk.index] = str(e)
                    progress(f"chunk {chunk.index + 1}/{len(chunks)} failed: {e}")
                    continue
                cache.put(chunk, dialogues)
                run.answers[chunk.index] = dialogues
                progress(f"chunk {chunk.index + 1}/{len(chunks)}: {len(dialogues)} lines")
    except KeyboardInterrupt:
        client.close()  # cut the requests in flight: what was answered is cached, a re-run sends only the rest
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        run.requests, run.schema_refused = client.requests, client.schema_refused
    return run
