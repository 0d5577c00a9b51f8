"""One resident model that answers as the base and as any loaded adapter, both at once, streaming.

Why it is built this way:
- Memory: the base weights are loaded once and every adapter is a PEFT adapter on that one model, so adding
  adapters costs only their LoRA weights (`persona_lora.resident`).
- Both sides in one forward pass: the base row and the adapter row form one left-padded batch, and each row
  gets its own adapter through `persona_lora.row_routing.RowRouting` (a per-row LoRA scaling on linear layers;
  rows split by hand on PEFT's fused-experts `ParamWrapper`, which refuses mixed batches). Every row gets
  exactly the computation its model does alone, so each side's greedy answer equals standalone
  `generate(do_sample=False)` with that model (tested for attention-only and `all` adapters).
- Global state: PEFT's active adapter and the row routing are state of the one model, so every forward pass
  and every adapter load runs on one inference thread (`demo.worker`), and concurrent requests are advanced
  one decode step each in turn (`demo.decode`), so every session streams while others do.
- Formatting is never re-implemented: prompts come from `train.chat_format.encode_prompt` with the adapter's
  chat template (the one its manifest records, i.e. the one training used; `demo.registry`). The base side is
  formatted with the same template and system prompt, so both sides read the same tokens (`demo.prompts`).

`Engine` is the facade the app, the CLI, the tests and the benchmarks use; it wires those modules together.
"""

from __future__ import annotations

from collections.abc import Iterator

from persona_lora.chat_format import conversation_for
from persona_lora.demo.backend import final
from persona_lora.demo.decode import GenerationSettings, Job, Row
from persona_lora.demo.prompts import PromptFormatter
from persona_lora.demo.registry import AdapterInfo, AdapterRegistry, template_sha
from persona_lora.demo.worker import Worker
from persona_lora.errors import UsageError
from persona_lora.model_loading import load_base_model, load_tokenizer, resolve_base
from persona_lora.resident import BASE, ResidentModel

__all__ = ["BASE", "BASE_CHOICE", "AdapterInfo", "Engine", "GenerationSettings", "template_sha"]
BASE_CHOICE = "base"  # how the page and the compare API name the base as one of two models compared


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
        self.resident = ResidentModel(model, self.tokenizer, self.base.id)
        self.device = self.resident.device
        self._prompts = PromptFormatter(self.tokenizer, max_prompt_tokens)
        self._registry = AdapterRegistry(self.base, self.tokenizer, self.base_template_origin, hub)
        self._worker = Worker()
        self._worker.start()

    @property
    def base_id(self) -> str:
        """The base as a vote records it (`demo.backend.DemoBackend`)."""
        return self.base.id

    @property
    def model(self):
        """The resident model (a PeftModel once an adapter is loaded); only the inference thread may run it."""
        return self.resident.model

    # ------------------------------------------------------------------ adapters

    def adapter_names(self) -> list[str]:
        """Loaded adapters in load order (the picker's choices)."""
        return self._registry.names()

    def adapter(self, name: str) -> AdapterInfo:
        """The loaded adapter called `name` (UsageError naming the loaded ones when there is none)."""
        return self._registry.get(name)

    def add_adapter(self, spec: str, *, name: str | None = None, revision: str | None = None) -> AdapterInfo:
        """Load an adapter from a local folder or a hub id (`owner/name`, optionally `owner/name@revision`) into
        the resident model. The base is never reloaded. Loading the same folder twice returns the first load."""
        return self._registry.add(spec, self._load_into_model, name=name, revision=revision)

    def _load_into_model(self, info: AdapterInfo) -> None:
        """On the inference thread, between decode steps: no forward pass sees a half-loaded adapter."""
        self._worker.call(lambda: self.resident.load(info.path, info.key, info.name)).result()

    # ------------------------------------------------------------------ describing

    def describe(self, name: str | None) -> dict[str, str]:
        """Which base, adapter, revision and chat template each side uses (plain text; the UI escapes it)."""
        return self._registry.describe(name)

    def system_prompt(self, name: str | None) -> str:
        """The adapter's training system prompt (the UI's default for both sides); none for the base alone."""
        return self.adapter(name).system_prompt if name else ""

    # ------------------------------------------------------------------ generation

    def stream_compare(self, adapter: str, base_history: list[dict], adapter_history: list[dict],
                       system_prompt: str | None = None,
                       settings: GenerationSettings | None = None) -> Iterator[tuple[str, str]]:
        """Yield (base text, adapter text) as both grow, token by token, from one batched decode.

        Each history is the conversation of that side (user/assistant turns, ending with the new user turn);
        `system_prompt` None means the adapter's manifest prompt, "" means none."""
        info = self.adapter(adapter)
        system = info.system_prompt if system_prompt is None else system_prompt
        rows = [Row(conversation_for(base_history, system), BASE),
                Row(conversation_for(adapter_history, system), info.key)]
        yield from self._stream(rows, info.chat_template, settings)

    def compare(self, adapter: str, message: str, system_prompt: str | None = None,
                settings: GenerationSettings | None = None) -> tuple[str, str]:
        """(base answer, adapter answer) to one user message."""
        turn = [{"role": "user", "content": message}]
        return final(self.stream_compare(adapter, turn, turn, system_prompt, settings), ("", ""))

    def stream_pair(self, left: str | None, right: str, left_history: list[dict], right_history: list[dict],
                    system_prompt: str | None = None,
                    settings: GenerationSettings | None = None) -> Iterator[tuple[str, str]]:
        """Any two models side by side: (left text, right text), where `left` is None or "base" (the base: the
        same as `stream_compare`) or another adapter. Two adapters are decoded as a batch of one row each,
        alternately (a batch's rows share one active adapter besides the base), so each answer is exactly what
        that adapter gives alone; both must use one chat template, and `system_prompt` None means the right
        adapter's."""
        if left in (None, "", BASE_CHOICE):
            yield from self.stream_compare(right, left_history, right_history, system_prompt, settings)
            return
        a, b = self.adapter(left), self.adapter(right)
        if a.key == b.key:
            raise UsageError(f"{left} and {right} are the same adapter; compare two different models")
        if a.chat_template != b.chat_template:
            raise UsageError(f"{a.name} and {b.name} were trained with different chat templates, so one prompt "
                             "cannot be fair to both; compare each of them against the base instead")
        system = b.system_prompt if system_prompt is None else system_prompt
        rows = [Row(conversation_for(left_history, system), a.key), Row(conversation_for(right_history, system), b.key)]
        yield from self._stream(rows, b.chat_template, settings)

    def compare_pair(self, left: str | None, right: str, message: str, system_prompt: str | None = None,
                     settings: GenerationSettings | None = None) -> tuple[str, str]:
        """(left answer, right answer) to one user message; `left` None or "base" is the base."""
        turn = [{"role": "user", "content": message}]
        return final(self.stream_pair(left, right, turn, turn, system_prompt, settings), ("", ""))

    def stream_one(self, adapter: str | None, history: list[dict], system_prompt: str | None = None,
                   settings: GenerationSettings | None = None) -> Iterator[str]:
        """One side alone (adapter None: the base), for the chat tab before an adapter is picked."""
        info = self.adapter(adapter) if adapter else None
        system = (info.system_prompt if info else "") if system_prompt is None else system_prompt
        template = info.chat_template if info else (getattr(self.tokenizer, "chat_template", None) or "")
        rows = [Row(conversation_for(history, system), info.key if info else BASE)]
        for texts in self._stream(rows, template, settings):
            yield texts[0]

    def answer(self, adapter: str | None, message: str, system_prompt: str | None = None,
               settings: GenerationSettings | None = None) -> str:
        """One side's whole answer to one user message (CLI checks and benchmarks)."""
        return final(self.stream_one(adapter, [{"role": "user", "content": message}], system_prompt, settings), "")

    def close(self) -> None:
        """Stop the inference thread and wait for it: a thread still inside torch when the interpreter exits
        aborts the process ("terminate called without an active exception")."""
        self._worker.close()

    def one_batch_for(self, rows: list[Row]) -> bool:
        """Whether `rows` decode as one batch: with mixed batches on, and at most one adapter among them besides
        the base (two adapters are decoded one row per batch, alternately)."""
        return self.mixed_batch and len({r.key for r in rows} - {BASE}) <= 1

    def _stream(self, rows: list[Row], template: str,
                settings: GenerationSettings | None) -> Iterator[tuple[str, ...]]:
        """Decode `rows` on the inference thread and relay their texts; closing the iterator cancels the job."""
        checked = (settings or GenerationSettings()).checked(self.max_new_tokens_cap)
        job = Job(self.resident, self._prompts.codec, rows, template, checked, one_batch=self.one_batch_for(rows))
        yield from self._worker.stream(job)
