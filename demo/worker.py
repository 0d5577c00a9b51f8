"""The demo's one inference thread, and how a request's updates get back to the session that asked.

Why one thread: PEFT's active adapter and the per-row routing are state of the one resident model, so every
forward pass (and every adapter load) runs on this thread, which sets that state right before the pass;
sessions never see each other's choice. Why round robin: the active jobs are advanced one decode step each in
turn, so every session streams while others do and none waits for another to finish; calls (adapter loads)
run between steps.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Protocol

log = logging.getLogger(__name__)


class Steppable(Protocol):
    """A request the worker can advance: `demo.decode.Job`."""

    def step(self) -> bool:
        """One decode step; True when finished."""
        ...

    def texts(self) -> tuple[str, ...]:
        """What the request has produced so far."""
        ...


class _Stream:
    """A submitted job, the updates for its reader, and the reader's cancel flag."""

    def __init__(self, job: Steppable):
        self.job = job
        self.events: queue.Queue = queue.Queue()
        self.cancelled = threading.Event()


class _Call:
    def __init__(self, fn: Callable):
        self.fn = fn
        self.future: Future = Future()


class Worker(threading.Thread):
    """The one thread that touches the model. Calls run between decode steps; active jobs are advanced one
    step each in turn, so concurrent sessions all stream and none waits for another to finish."""

    def __init__(self):
        super().__init__(name="persona-lora-inference", daemon=True)
        self._inbox: queue.Queue = queue.Queue()
        self._stopping = threading.Event()

    def call(self, fn: Callable) -> Future:
        """Run `fn` on this thread between decode steps (adapter loads: no pass sees a half-loaded model)."""
        item = _Call(fn)
        self._submit(item)
        return item.future

    def stream(self, job: Steppable) -> Iterator[tuple[str, ...]]:
        """Run `job` here and relay its updates, skipping stale partial ones when the reader is slower than the
        model; a failure is raised to the reader. Closing the iterator (client gone, Stop) cancels the job."""
        item = _Stream(job)
        self._submit(item)
        try:
            while True:
                kind, payload = item.events.get()
                while kind == "partial":
                    try:
                        kind, payload = item.events.get_nowait()
                    except queue.Empty:
                        break
                if kind == "error":
                    raise payload
                yield payload
                if kind == "done":
                    return
        finally:
            item.cancelled.set()

    def close(self) -> None:
        """Stop and wait: a thread still inside torch when the interpreter exits aborts the process
        ("terminate called without an active exception")."""
        self._stopping.set()
        self._inbox.put(None)
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout=60)

    def _submit(self, item) -> None:
        if self._stopping.is_set():
            raise RuntimeError("the engine is closed")
        self._inbox.put(item)

    def run(self) -> None:
        """Take in everything submitted (calls run at once, jobs join the round), then give every active job one
        step; block only when there is no job to advance. Jobs still active at close get an error."""
        active: list[_Stream] = []
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
            for item in list(active):
                if item.cancelled.is_set():
                    active.remove(item)
                    continue
                if self._advance(item):
                    active.remove(item)
        for item in active:
            item.events.put(("error", RuntimeError("the engine was closed")))

    @staticmethod
    def _advance(item: _Stream) -> bool:
        """One step of one job, its update posted for the reader; True when the job is over (done or failed)."""
        try:
            finished = item.job.step()
            item.events.put(("done" if finished else "partial", item.job.texts()))
        except Exception as exc:  # every failure goes to the waiting request
            log.debug("generation failed", exc_info=True)
            item.events.put(("error", exc))
            finished = True
        return finished

    @staticmethod
    def _run_call(item: _Call) -> None:
        try:
            item.future.set_result(item.fn())
        except Exception as exc:  # noqa: BLE001 - the caller re-raises it
            item.future.set_exception(exc)
