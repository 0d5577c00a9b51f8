"""What the A/B page needs from whatever answers as the base and as an adapter: the `DemoBackend` interface.

Why an interface: the page, its blind votes and its `compare` API are the same whether the answers come from the
one resident model in this process (`demo.engine.Engine`, the `local` backend: a laptop, the embedded tiny base)
or from a serving engine with continuous batching and multi-LoRA behind an OpenAI-compatible API
(`demo.openai_backend.OpenAIBackend`: vLLM or SGLang, for a demo link shared with a class or a team). The app
(`demo.app`) is written against this interface only, so a vote means the same thing on both.

`SideFailed` is how a backend whose two sides are two independent requests reports that one of them failed:
the other side's answer is complete and kept (the page shows it, the history keeps it), and the message names
the side that failed and why.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol, TypeVar

from persona_lora.demo.decode import GenerationSettings
from persona_lora.errors import PersonaLoraError

SIDES = ("base", "adapter")


class AdapterView(Protocol):
    """What the page and a vote record of one adapter."""

    name: str  # as shown in the picker, and as the compare API takes it
    adapter_id: str  # what a vote records: stable across restarts (hub id@commit, folder name, served name)
    system_prompt: str  # the adapter's training system prompt: the page's default for both sides


T = TypeVar("T")


def final(stream: Iterator[T], empty: T) -> T:
    """The last value a streaming call yields: the whole answer(s), what the non-streaming calls return."""
    last = empty
    for last in stream:
        pass
    return last


class DemoBackend(Protocol):
    """Answers as the base and as an adapter, both sides at once, streaming. Thread-safe: the page calls it from
    many sessions at once. User mistakes and refused requests are `persona_lora.errors` exceptions."""

    max_new_tokens_cap: int  # the server-side cap on new tokens (requests are clamped to it)

    @property
    def base_id(self) -> str:
        """The base as a vote records it."""
        ...

    def adapter_names(self) -> list[str]:
        """The picker's choices, in the order they were added."""
        ...

    def adapter(self, name: str) -> AdapterView:
        """The adapter called `name` (UsageError naming the known ones when there is none)."""
        ...

    def add_adapter(self, spec: str) -> AdapterView:
        """Make another adapter available at run time (the page's "Load adapter")."""
        ...

    def describe(self, name: str | None) -> dict[str, str]:
        """{"base": …, "adapter": …}: what answers on each side (plain text; the page escapes it)."""
        ...

    def system_prompt(self, name: str | None) -> str:
        """The adapter's training system prompt ("" for none or no adapter)."""
        ...

    def stream_compare(self, adapter: str, base_history: list[dict], adapter_history: list[dict],
                       system_prompt: str | None = None,
                       settings: GenerationSettings | None = None) -> Iterator[tuple[str, str]]:
        """(base text, adapter text) as both grow. Each history ends with the new user turn; `system_prompt`
        None means the adapter's, "" none. Closing the iterator stops both sides."""
        ...

    def stream_one(self, adapter: str | None, history: list[dict], system_prompt: str | None = None,
                   settings: GenerationSettings | None = None) -> Iterator[str]:
        """One side alone (adapter None: the base)."""
        ...

    def compare(self, adapter: str, message: str, system_prompt: str | None = None,
                settings: GenerationSettings | None = None) -> tuple[str, str]:
        """(base answer, adapter answer) to one user message."""
        ...

    def close(self) -> None:
        """Release what the backend holds (threads, connections)."""
        ...

    # Optional: `stream_pair(left, right, left_history, right_history, system_prompt, settings)` and
    # `compare_pair(left, right, message, system_prompt, settings)` put two adapters side by side (left None or
    # "base": the base). The page, the arena and the `compare` API offer adapter-against-adapter only on backends
    # that have them (the local `Engine` and `OpenAIBackend` do); others compare an adapter with the base.


class SideFailed(PersonaLoraError):
    """One side (or both) failed while the other went on. `texts` holds what each side produced (the complete
    answer of a side that did not fail); `failures` maps the index of each failed side (0 base, 1 adapter) to
    the reason, a message that names the cause and the fix."""

    def __init__(self, texts: tuple[str, ...], failures: dict[int, str], names: tuple[str, ...] = SIDES):
        self.texts, self.failures, self.names = tuple(texts), dict(failures), tuple(names)
        super().__init__(self.describe())

    def describe(self, labels: tuple[str, ...] | None = None) -> str:
        """The message with each side called by `labels` (the blind A/B tab calls them A and B, so an error never
        reveals which answer was the adapter's)."""
        labels = labels or self.names
        reasons = set(self.failures.values())
        if len(self.failures) == len(self.texts) and len(reasons) == 1:
            return f"both sides failed: {next(iter(reasons))}"
        parts = [f"the {labels[i]} side failed: {reason}" for i, reason in sorted(self.failures.items())]
        kept = [labels[i] for i in range(len(self.texts)) if i not in self.failures]
        if kept:
            parts.append(f"the {' and '.join(kept)} side's answer is kept")
        return "; ".join(parts)
