"""Generation on ZeroGPU hardware: the demo's engine with each request decoded inside `spaces.GPU`.

Why a variant of the engine: on ZeroGPU a GPU exists only inside a function decorated with
`@spaces.GPU(duration=...)`, and the decorator runs that function in a *forked* process, sending its arguments and
its result through pickles. The engine's one inference thread does not exist in the fork, and state set in the
fork (an adapter loaded there) does not come back. So here a request is one synchronous call: the rows to answer
(plain conversations and adapter keys), the chat template, the settings and the adapters the rows need go in;
the finished texts come out. The fork decodes with the same `demo.decode.Job` the engine's thread runs, against
the resident model it inherited, loading any adapter the fork does not hold yet (one added from the page after the
fork was made). The page then shows each answer when it is complete instead of token by token.

Where it runs:
- on ZeroGPU (`spaces` imported and `SPACES_ZERO_GPU` set) the call goes through `spaces.GPU` from the request's
  own thread (the decorator reads the request to charge the right user's quota); each fork is the only user of
  its copy of the model;
- anywhere else (`spaces` not installed, or installed off ZeroGPU, where its decorator does nothing) the same
  function runs on the engine's inference thread, which keeps the one-thread rule of the resident model.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

from persona_lora.demo.decode import GenerationSettings, Job, Row
from persona_lora.demo.engine import Engine

log = logging.getLogger(__name__)

ZERO_GPU_ENV = "SPACES_ZERO_GPU"  # set by the Space runtime on ZeroGPU hardware

_ENGINE: ZeroGPUEngine | None = None  # the fork finds the engine here (module state is copied by fork)


def on_zero_gpu() -> bool:
    return os.environ.get(ZERO_GPU_ENV, "").strip().lower() in ("1", "true", "yes")


def generate_on_gpu(rows: list[tuple[list[dict], str]], template: str, settings: GenerationSettings,
                    adapters: dict[str, tuple[str, str]], one_batch: bool) -> tuple[str, ...]:
    """Decode `rows` (conversation, adapter key) to the end and return their texts. Arguments and result are
    plain, picklable values: on ZeroGPU this runs in a forked process."""
    if _ENGINE is None:
        raise RuntimeError("no ZeroGPU engine was created in this process")
    return _ENGINE.decode_here(rows, template, settings, adapters, one_batch)


def _wrap(duration: int):
    """`generate_on_gpu` wrapped by `spaces.GPU(duration=...)` when on ZeroGPU with `spaces` importable; else
    None (the caller runs it on the inference thread)."""
    if not on_zero_gpu():
        return None
    try:
        import spaces
    except ImportError:
        log.warning("%s is set but the `spaces` package is not installed: generating without it", ZERO_GPU_ENV)
        return None
    return spaces.GPU(duration=duration)(generate_on_gpu)


class ZeroGPUEngine(Engine):
    """`demo.engine.Engine` whose requests are decoded by one synchronous call (in `spaces.GPU` on ZeroGPU)."""

    def __init__(self, *args, gpu_duration: int = 60, **kwargs):
        global _ENGINE
        if gpu_duration < 1:
            raise ValueError(f"gpu_duration must be at least 1 second, got {gpu_duration}")
        super().__init__(*args, **kwargs)
        self.gpu_duration = gpu_duration
        self._on_gpu = _wrap(gpu_duration)
        _ENGINE = self
        where = "inside spaces.GPU (forked)" if self._on_gpu else "on the inference thread (no ZeroGPU here)"
        log.info("ZeroGPU engine: each request is decoded %s, up to %d s per call", where, gpu_duration)

    @property
    def forks(self) -> bool:
        """True when requests run in `spaces.GPU` (ZeroGPU), False when on the inference thread."""
        return self._on_gpu is not None

    def _stream(self, rows: list[Row], template: str,
                settings: GenerationSettings | None) -> Iterator[tuple[str, ...]]:
        checked = (settings or GenerationSettings()).checked(self.max_new_tokens_cap)
        keys = {r.key for r in rows}
        adapters = {}
        for name in self.adapter_names():
            info = self.adapter(name)
            if info.key in keys:
                adapters[info.key] = (str(info.path), info.name)
        plain = [(r.conversation, r.key) for r in rows]
        if self._on_gpu is not None:
            texts = self._on_gpu(plain, template, checked, adapters, self.one_batch_for(rows))
        else:
            texts = self._worker.call(
                lambda: self.decode_here(plain, template, checked, adapters, self.one_batch_for(rows))).result()
        yield tuple(texts)

    def decode_here(self, rows: list[tuple[list[dict], str]], template: str, settings: GenerationSettings,
                    adapters: dict[str, tuple[str, str]], one_batch: bool) -> tuple[str, ...]:
        """Decode in this thread, to the end. Only the thread that owns the model here may call it: the engine's
        inference thread, or the forked process of a `spaces.GPU` call."""
        loaded = set(getattr(self.resident.model, "peft_config", None) or ())
        for key, (path, name) in adapters.items():
            if key not in loaded:  # added from the page after this fork was made
                self.resident.load(Path(path), key, name)
        job = Job(self.resident, self._prompts.codec, [Row(conv, key) for conv, key in rows], template, settings,
                  one_batch=one_batch)
        while not job.step():
            pass
        return job.texts()
