"""An in-process server that speaks the OpenAI chat-completions protocol the way vLLM and SGLang do, for tests and
benchmarks of everything in persona-lora that talks to a serving engine (the demo's `openai` backend, judges).

Why a server of our own: the engines cannot run here (they pin other torch/transformers versions and want a GPU),
and a mocked client would test our guesses about the protocol instead of the real `openai` client against a real
socket. This server answers what the client sends: `GET /v1/models`, `POST /v1/chat/completions` streamed
(server-sent events, `data: [DONE]`) and not, with the engines' error bodies (`{"error": {...}}`), and it can
misbehave on purpose: a wrong key (401, its body echoing the key it got, as hosted APIs do), an unknown model
(404), an engine failure (500), an error event or garbage in the middle of a stream, a connection cut mid-stream,
a stream that stops sending (timeouts).

Use the `openai_server` fixture (function scope, a fresh server per test)::

    def test_x(openai_server):
        openai_server.models = ["base", "persona"]          # what /v1/models lists (and what is served)
        openai_server.api_key = "sk-test"                     # None: no key needed
        openai_server.token_delay = 0.01                      # seconds between streamed tokens
        openai_server.script({"persona": "I am the consort."})  # or a str, or fn(ChatRequest) -> str
        openai_server.fail("cut", model="persona", after=2)   # 400|401|404|429|500|cut|garbage|error_event|hang
        client = OpenAI(base_url=openai_server.url, api_key="sk-test")
        ...
        openai_server.requests          # every chat request received (ChatRequest), in order
        openai_server.peak_streams      # most streams open at once
        openai_server.disconnects       # streams the client closed before the end

Concurrency without clocks: `openai_server.gather(n)` makes every stream wait, before its first token, until n
streams are open at the same time (`gathered` is then True). A client that opened its streams one after the other
never gets there (each stream gives up after `gather_timeout` seconds and answers anyway, `gathered` stays
False), so a test asserts `gathered` instead of a wall-clock bound that a busy machine breaks.

Outside pytest (benchmarks): `with running_openai_server(token_delay=0.02) as server: ...`.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

FAILURES = ("400", "401", "404", "429", "500", "cut", "garbage", "error_event", "hang", "no_done")
_TOKEN = re.compile(r"\s*[\u3000-\u9fff\uff00-\uffef]|\s*[^\s\u3000-\u9fff\uff00-\uffef]+|\s+$")


@dataclass
class ChatRequest:
    """One chat-completions request as the server received it."""

    model: str
    messages: list[dict]
    params: dict  # everything else of the body: stream, temperature, top_p, max_tokens, seed, stop, ...
    headers: dict = field(default_factory=dict)
    started: float = 0.0  # monotonic time the request arrived
    finished: float | None = None  # monotonic time its answer was complete (None: failed or cut)

    @property
    def last_user(self) -> str:
        return next((m.get("content", "") for m in reversed(self.messages) if m.get("role") == "user"), "")


@dataclass
class Failure:
    kind: str
    model: str | None = None  # only requests for this model (None: every one)
    after: int = 2  # tokens sent before a mid-stream failure
    times: int | None = None  # how many requests it hits (None: all)
    endpoint: str = "chat"  # chat | models
    retry_after: str | None = None  # a 429's Retry-After header (e.g. "7"), sent as given


def default_answer(req: ChatRequest) -> str:
    """Distinct per model and per turn, so a test can tell which side answered what."""
    turns = sum(m.get("role") == "user" for m in req.messages)
    return f"{req.model} answers: {req.last_user} (turn {turns})"


def tokens(text: str) -> list[str]:
    """The streamed pieces of `text`: words with their leading space, one piece per CJK character."""
    return _TOKEN.findall(text) or ([text] if text else [])


class OpenAIServer:
    """The server and its settable behaviour; attributes may be changed while it runs."""

    def __init__(self, *, models: list[str] | None = None, api_key: str | None = None, token_delay: float = 0.0):
        self.models: list[str] = list(models or ["base", "persona"])
        self.parents: dict[str, str] = {}  # model -> parent (vLLM lists LoRA adapters with their base as parent)
        self.api_key = api_key
        self.token_delay = token_delay
        self.requests: list[ChatRequest] = []
        self.model_listings = 0
        self.peak_streams = 0
        self.disconnects = 0
        self.gather_streams = 0  # `gather(n)`: streams wait for n open at once before their first token
        self.gather_timeout = 60.0
        self.gathered = False
        self._opened = threading.Condition()
        self._answer: Callable[[ChatRequest], str] = default_answer
        self._failures: list[Failure] = []
        self._active = 0
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ set-up

    @property
    def root(self) -> str:
        assert self._httpd is not None, "start() the server first"
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def url(self) -> str:
        """The base URL an OpenAI client takes (`…/v1`)."""
        return f"{self.root}/v1"

    def script(self, answer: str | dict | Callable[[ChatRequest], str]) -> None:
        """What the models answer: one text for all, {model: text or fn}, or fn(ChatRequest) -> text."""
        if isinstance(answer, str):
            self._answer = lambda req, text=answer: text
        elif isinstance(answer, dict):
            table = dict(answer)

            def by_model(req: ChatRequest) -> str:
                got = table.get(req.model, default_answer)
                return got(req) if callable(got) else got

            self._answer = by_model
        else:
            self._answer = answer

    def fail(self, kind: str, *, model: str | None = None, after: int = 2, times: int | None = None,
             endpoint: str = "chat", retry_after: str | None = None) -> None:
        """Misbehave on the matching requests: `400` (a refused `response_format`), `401`/`404`/`429`/`500` before
        any token; `cut` (connection closed),
        `garbage` (a non-JSON event), `error_event` (an engine error event, as vLLM sends), `hang` (no more
        bytes until the server closes) or `no_done` (the stream ends without a finish reason) after `after`
        tokens. `retry_after`: the Retry-After header of a `429`."""
        if kind not in FAILURES:
            raise ValueError(f"failure kind must be one of {FAILURES}, got {kind!r}")
        self._failures.append(Failure(kind, model, after, times, endpoint, retry_after))

    def serves(self, model: str) -> bool:
        """A listed model, or SGLang's `base:adapter` of two listed ones."""
        head, sep, tail = model.rpartition(":")
        return model in self.models or bool(sep and head in self.models and tail in self.models)

    def clear_failures(self) -> None:
        self._failures.clear()

    def start(self, host: str = "127.0.0.1", port: int = 0) -> OpenAIServer:
        """Listen on `host:port` (port 0: one the OS picks) from a background thread."""
        self._httpd = _Server((host, port), _handler_for(self))
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), name="openai-test-server",
                                        daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._stopping.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    # ------------------------------------------------------------------ behaviour (called by the handler)

    def _failure(self, endpoint: str, model: str | None) -> Failure | None:
        with self._lock:
            for f in self._failures:
                if f.endpoint == endpoint and (f.model is None or f.model == model) and f.times != 0:
                    if f.times is not None:
                        f.times -= 1
                    return f
        return None

    def gather(self, n: int, timeout: float = 60.0) -> None:
        """Hold every stream before its first token until `n` streams are open at once (see the module doc)."""
        self.gather_streams, self.gather_timeout, self.gathered = n, timeout, False

    def _stream_opened(self) -> None:
        with self._lock:
            self._active += 1
            self.peak_streams = max(self.peak_streams, self._active)
        if self.gather_streams:
            with self._opened:
                self._opened.notify_all()
                reached = self._opened.wait_for(lambda: self.gathered or self.peak_streams >= self.gather_streams,
                                                timeout=self.gather_timeout)
                if reached:
                    self.gathered = True
                    self._opened.notify_all()

    def _stream_closed(self, disconnected: bool) -> None:
        with self._lock:
            self._active -= 1
            self.disconnects += disconnected


class _Server(ThreadingHTTPServer):
    request_queue_size = 256  # many sessions connect at once: the default backlog (5) would stall their connects
    daemon_threads = True

    def handle_error(self, request, client_address):
        """A client that closes its connection (a cancelled stream, an idle keep-alive socket) is normal here."""
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def _error(status: int, message: str, kind: str) -> dict:
    return {"error": {"message": message, "type": kind, "param": None, "code": status}}


def _handler_for(server: OpenAIServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format, *args):  # noqa: A002 - quiet: tests read the recorded requests instead
            pass

        # -------------------------------------------------------------- plumbing

        def _json(self, status: int, body: dict, headers: dict | None = None) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

        def _chunk(self, data: bytes) -> None:
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

        def _event(self, payload: Any) -> None:
            text = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
            self._chunk(f"data: {text}\n\n".encode())

        def _authorized(self) -> bool:
            if server.api_key is None:
                return True
            got = (self.headers.get("Authorization") or "").removeprefix("Bearer ").strip()
            if got == server.api_key:
                return True
            # hosted APIs echo the key they got: the client side must never pass this body on verbatim
            self._json(401, _error(401, f"Incorrect API key provided: {got}.", "invalid_api_key"))
            return False

        def _status_failure(self, failure: Failure | None) -> bool:
            if failure is None or failure.kind not in ("400", "401", "404", "429", "500"):
                return False
            status = int(failure.kind)
            messages = {400: "response_format json_schema is not supported by this server.",
                        401: "Incorrect API key provided.", 404: "The model does not exist.",
                        429: "Rate limit reached: too many requests.", 500: "Internal server error: the engine failed."}
            self._json(status, _error(status, messages[status], {400: "BadRequestError", 401: "invalid_api_key",
                                                                  404: "NotFoundError",
                                                                  429: "rate_limit_exceeded",
                                                                  500: "InternalServerError"}[status]),
                       {"Retry-After": failure.retry_after} if status == 429 and failure.retry_after else None)
            return True

        # -------------------------------------------------------------- routes

        def do_GET(self):  # noqa: N802 - http.server's naming
            if self.path.rstrip("/") != "/v1/models":
                self._json(404, _error(404, f"no route {self.path}", "NotFound"))
                return
            if not self._authorized() or self._status_failure(server._failure("models", None)):
                return
            server.model_listings += 1
            data = [{"id": m, "object": "model", "created": 0, "owned_by": "persona-lora-tests", "root": m,
                     "parent": server.parents.get(m)} for m in server.models]
            self._json(200, {"object": "list", "data": data})

        def do_POST(self):  # noqa: N802
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length)
            if self.path.rstrip("/") != "/v1/chat/completions":
                self._json(404, _error(404, f"no route {self.path}", "NotFound"))
                return
            if not self._authorized():
                return
            try:
                body = json.loads(raw)
                model, messages = body.pop("model"), body.pop("messages")
            except (ValueError, KeyError, TypeError):
                self._json(400, _error(400, "the body must be JSON with model and messages", "BadRequestError"))
                return
            headers = {k.lower(): v for k, v in self.headers.items() if k.lower() != "authorization"}
            req = ChatRequest(model, messages, body, headers, started=time.monotonic())
            server.requests.append(req)
            failure = server._failure("chat", model)
            if self._status_failure(failure):
                return
            if not server.serves(model):
                self._json(404, _error(404, f"The model `{model}` does not exist.", "NotFoundError"))
                return
            pieces, finish = self._pieces(req)
            if body.get("stream"):
                self._stream(req, pieces, finish, failure)
            else:
                self._whole(req, pieces, finish, failure)

        # -------------------------------------------------------------- answers

        def _pieces(self, req: ChatRequest) -> tuple[list[str], str]:
            text = server._answer(req)
            for stop in ([req.params["stop"]] if isinstance(req.params.get("stop"), str)
                         else req.params.get("stop") or []):
                text = text.split(stop)[0]
            pieces = tokens(text)
            limit = req.params.get("max_completion_tokens") or req.params.get("max_tokens")
            if req.params.get("ignore_eos") and limit and pieces:  # benchmarks: exactly max_tokens tokens
                pieces = [pieces[i % len(pieces)] for i in range(limit)]
            if limit and len(pieces) > limit:
                return pieces[:limit], "length"
            return pieces, "stop"

        def _whole(self, req, pieces, finish, failure) -> None:
            if failure is not None and failure.kind == "garbage":
                data = b"<html>502 Bad Gateway</html>"
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                return
            if failure is not None and failure.kind == "hang":  # no answer at all: the client's timeout must end it
                server._stopping.wait(120)
                self.close_connection = True
                return
            if failure is not None and failure.kind in ("cut", "error_event", "no_done"):
                self._json(500, _error(500, "the engine failed while generating", "InternalServerError"))
                return
            time.sleep(server.token_delay * len(pieces))
            req.finished = time.monotonic()
            self._json(200, {
                "id": f"chatcmpl-{id(req)}", "object": "chat.completion", "created": int(time.time()),
                "model": req.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(pieces)},
                             "finish_reason": finish, "logprobs": None}],
                "usage": {"prompt_tokens": 1, "completion_tokens": len(pieces), "total_tokens": 1 + len(pieces)},
            })

        def _stream(self, req, pieces, finish, failure) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            server._stream_opened()
            disconnected = False
            try:
                for payload in _events(req, pieces, finish, failure, server.token_delay):
                    if payload is _CUT:
                        self.close_connection = True
                        self.wfile.flush()
                        self.connection.shutdown(2)  # mid-chunk-stream: the client sees an incomplete body
                        return
                    if payload is _HANG:
                        server._stopping.wait(120)
                        self.close_connection = True
                        return
                    if isinstance(payload, float):
                        time.sleep(max(0.0, payload - time.monotonic()))
                        continue
                    self._event(payload)
                self._chunk(b"")  # the last chunk of the body
                if failure is None or failure.kind != "no_done":
                    req.finished = time.monotonic()
            except (BrokenPipeError, ConnectionResetError):
                disconnected = True
                self.close_connection = True
            finally:
                server._stream_closed(disconnected)

    return Handler


_CUT, _HANG = object(), object()


def _events(req: ChatRequest, pieces: list[str], finish: str, failure: Failure | None,
            delay: float) -> Iterator[Any]:
    """The stream's events in order, with the monotonic time each token is due before it (a float): tokens are
    due on a fixed schedule from the request's arrival, so the server's own work never adds to the delay."""
    base = {"id": f"chatcmpl-{id(req)}", "object": "chat.completion.chunk", "created": int(time.time()),
            "model": req.model}

    def chunk(delta: dict, reason: str | None = None) -> dict:
        return {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}]}

    yield chunk({"role": "assistant", "content": ""})
    for i, piece in enumerate(pieces):
        if failure is not None and i == failure.after:
            yield from _mid_stream(failure)
            return
        yield req.started + (i + 1) * delay
        yield chunk({"content": piece})
    if failure is not None and failure.after >= len(pieces):
        yield from _mid_stream(failure)
        return
    yield chunk({}, finish)
    yield "[DONE]"


def _mid_stream(failure: Failure) -> Iterator[Any]:
    if failure.kind == "cut":
        yield _CUT
    elif failure.kind == "hang":
        yield _HANG
    elif failure.kind == "garbage":
        yield "{this is not json"
    elif failure.kind == "error_event":  # vLLM's streaming error: one event with an `error` object, then [DONE]
        yield _error(500, "CUDA error: an illegal memory access was encountered", "InternalServerError")
        yield "[DONE]"
    elif failure.kind == "no_done":
        return


@contextmanager
def running_openai_server(**settings) -> Iterator[OpenAIServer]:
    """A started server with `settings` (models, api_key, token_delay), closed at the end."""
    server = OpenAIServer(**settings).start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def openai_server() -> Iterator[OpenAIServer]:
    """A fresh OpenAI-protocol server for one test (see the module docstring for its settings)."""
    with running_openai_server() as server:
        yield server


def main(argv: list[str] | None = None) -> int:
    """Run the server in a process of its own (benchmarks: an engine never shares the client's interpreter):
    `python -m tests.openai_server --port 8000 --token-delay 0.02 --models base persona --answer TEXT`."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--token-delay", type=float, default=0.0)
    ap.add_argument("--models", nargs="+", default=["base", "persona"])
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--answer", default=None, help="what every model answers (default: an echo naming the model)")
    args = ap.parse_args(argv)
    server = OpenAIServer(models=args.models, api_key=args.api_key, token_delay=args.token_delay)
    if args.answer is not None:
        server.script(args.answer)
    server.start(args.host, args.port)
    print(f"serving {server.url}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
