"""The one chat-formatting path: training, inference, cards and the demo all go through here.

Training and chatting must see the same tokens, so both use the tokenizer's own chat template, through here. \
Training text is cut into segments at the points where inference would stop and let
the model speak: for every assistant turn k, the prompt segment is what `apply_chat_template(messages[:k],
add_generation_prompt=True)` renders beyond the previous turn, and the answer segment is the rest of that
turn (content + the template's end-of-turn, which must be one EOS). Each segment is tokenized on its own with
`add_special_tokens=False`, so:

- the tokens of a training prompt are exactly the tokens `encode_prompt` feeds at inference (which encodes the
  same segments the same way), and for byte-level BPE templates they equal
  `apply_chat_template(..., tokenize=True)` (tested);
- labels cover assistant content and its single EOS, nothing else; no EOS is appended twice;
- over-long examples are cut from the left of the prompt, never through the answer or its EOS.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from persona_lora.errors import ConfigError, DataError, ModelLoadError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
TRAIN_ON = ("all", "last")
OVERLONG = ("truncate", "drop")


@dataclass
class Encoded:
    """One training example. `truncated` says the prompt was cut from the left to fit `max_length`."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False


def conversation_for(messages: list[dict], system_prompt: str | None) -> list[dict]:
    """The record's messages with the system prompt applied: a record's own system message wins, else the
    configured one is prepended (when given and non-empty)."""
    if messages and messages[0]["role"] == "system":
        return list(messages)
    if system_prompt:
        return [{"role": "system", "content": system_prompt}, *messages]
    return list(messages)


def require_chat_template(tokenizer, where: str = "the base model's tokenizer") -> None:
    """A tokenizer without a chat template cannot be formatted consistently: say how to supply one."""
    if not getattr(tokenizer, "chat_template", None):
        raise ModelLoadError(
            f"{where} has no chat template, so training and inference prompts cannot be made the same; "
            "pass one with --chat-template FILE (a Jinja file, e.g. the DeepSeek-V2 template) or set "
            "`chat_template:` in the config"
        )


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def segments(tokenizer, messages: list[dict], *, add_generation_prompt: bool = False) -> list[tuple[str, bool]]:
    """Split a conversation's rendered text into (text, trained) segments at assistant-turn boundaries.

    Requires the template to be prefix-stable (each rendering is a prefix of the next), which holds for
    DeepSeek, Llama, Qwen and ChatML templates; a template that is not gets a clear error."""
    parts: list[tuple[str, bool]] = []
    done = ""
    for k, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:k], add_generation_prompt=True)
        full = _render(tokenizer, messages[: k + 1], add_generation_prompt=False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise ConfigError(
                "the chat template is not prefix-stable (rendering a conversation turn by turn does not extend "
                "the previous rendering), so prompt and training tokens could differ; use a template where each "
                "turn only appends text (--chat-template FILE)"
            )
        parts.append((prompt[len(done):], False))
        parts.append((full[len(prompt):], True))
        done = full
    if add_generation_prompt:
        tail = _render(tokenizer, messages, add_generation_prompt=True)
        if not tail.startswith(done):
            raise ConfigError(
                "the chat template is not prefix-stable; use a template where each turn only appends text"
            )
        parts.append((tail[len(done):], False))
    elif done != _render(tokenizer, messages, add_generation_prompt=False):
        # text after the last assistant turn (a trailing user turn) would silently be ignored
        raise DataError("conversation must end with an assistant turn")
    return parts


def _special_texts(tokenizer) -> list[str]:
    return [t for t in dict.fromkeys(tokenizer.all_special_tokens) if t]


def _refuse_special_text(messages: list[dict], specials: list[str], tokenizer) -> None:
    """Special-token text typed into a message would become the special token itself (a second BOS or EOS in
    the middle of a prompt); refuse it rather than train or prompt on it."""
    for msg in messages:
        for tok in specials:
            if tok in msg["content"]:
                what = "end-of-sequence" if tok == tokenizer.eos_token else "special"
                raise DataError(f"a {msg['role']} turn contains the {what} token text {tok!r}; remove it from the text")


def encode_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids that inference feeds the model for `messages` (ending in a user turn)."""
    require_chat_template(tokenizer)
    _refuse_special_text(messages, _special_texts(tokenizer), tokenizer)
    texts = [text for text, _ in segments(tokenizer, messages, add_generation_prompt=True)]
    return [i for ids in _tokenize(tokenizer, texts) for i in ids]


def _tokenize(tokenizer, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []


def _eos_ids(tokenizer) -> set[int]:
    return {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()


def encode_examples(
    tokenizer,
    conversations: list[list[dict]],
    *,
    max_length: int,
    train_on: str = "all",
    overlong: str = "truncate",
) -> list[Encoded | None]:
    """Encode many conversations with one batched tokenizer call (fast path for whole datasets).

    Returns one `Encoded` per conversation, or None where `overlong="drop"` dropped it or even the final
    answer with its EOS does not fit `max_length` (the caller counts and reports these)."""
    if train_on not in TRAIN_ON:
        raise ConfigError(f"train_on must be one of {TRAIN_ON}, got {train_on!r}")
    if overlong not in OVERLONG:
        raise ConfigError(f"overlong must be one of {OVERLONG}, got {overlong!r}")
    require_chat_template(tokenizer)
    specials = _special_texts(tokenizer)
    for conv in conversations:
        _refuse_special_text(conv, specials, tokenizer)
    all_segments = [segments(tokenizer, conv) for conv in conversations]
    flat = [text for segs in all_segments for text, _ in segs]
    flat_ids = iter(_tokenize(tokenizer, flat))
    eos = _eos_ids(tokenizer)
    out: list[Encoded | None] = []
    for segs in all_segments:
        ids: list[int] = []
        labels: list[int] = []
        answers = [i for i, (_, trained) in enumerate(segs) if trained]
        for i, (text, trained) in enumerate(segs):
            seg_ids = next(flat_ids)
            tail: list[int] = []
            if trained:
                seg_ids, tail = _split_answer(seg_ids, eos, tokenizer)
            learn = trained and (train_on == "all" or i == answers[-1])
            ids.extend(seg_ids)
            labels.extend(seg_ids if learn else [IGNORE_INDEX] * len(seg_ids))
            ids.extend(tail)
            labels.extend([IGNORE_INDEX] * len(tail))
        out.append(_fit(ids, labels, max_length, overlong, _last_span_len(labels)))
    return out


def _last_span_len(labels: list[int]) -> int:
    """Length of the final trained span (the last answer and its EOS), which truncation must keep whole."""
    n = 0
    while n < len(labels) and labels[-1 - n] != IGNORE_INDEX:
        n += 1
    return n


def _split_answer(seg_ids: list[int], eos: set[int], tokenizer) -> tuple[list[int], list[int]]:
    """Split an answer segment into (trained ids, untrained tail).

    The trained part is the answer and the template's end of turn: through its one EOS when the template ends
    turns with EOS (DeepSeek, Llama-2; ChatML with eos `<|im_end|>`, whose "\n" after it is prompt text for the
    next turn, so it is not trained); templates that end turns with another marker (ChatML with a different eos)
    keep their own marker and nothing is appended, so later prompts stay exactly what inference feeds. An EOS
    inside the answer text is an error: it would teach the model to stop early."""
    if not eos:
        raise ModelLoadError("the tokenizer has no eos_token; set one (e.g. in tokenizer_config.json) before training")
    at = [k for k, t in enumerate(seg_ids) if t in eos]
    if len(at) > 1 or (at and any(not tokenizer.decode([t]).isspace() for t in seg_ids[at[0] + 1:])):
        raise DataError(f"an assistant answer contains the end-of-sequence token {tokenizer.eos_token!r} in its text; "
                        "remove it from the data")
    if not at:
        return seg_ids, []
    return seg_ids[: at[0] + 1], seg_ids[at[0] + 1:]


def _fit(ids: list[int], labels: list[int], max_length: int, overlong: str, keep_tail: int) -> Encoded | None:
    """Make an example fit: drop it, or cut prompt tokens from the left, always keeping the first token (bos)
    and the whole last answer with its EOS. None when even that does not fit."""
    if len(ids) <= max_length:
        return Encoded(ids, labels)
    if overlong == "drop" or keep_tail == 0 or keep_tail + 1 > max_length:
        return None
    cut = len(ids) - max_length
    return Encoded(ids[:1] + ids[1 + cut:], labels[:1] + labels[1 + cut:], truncated=True)


def encode_example(
    tokenizer, messages: list[dict], *, max_length: int, train_on: str = "all", overlong: str = "truncate"
) -> Encoded | None:
    """Encode one conversation (see `encode_examples`)."""
    return encode_examples(tokenizer, [messages], max_length=max_length, train_on=train_on, overlong=overlong)[0]


def render_marked(tokenizer, enc: Encoded, start: str = "⟦", end: str = "⟧") -> str:
    """The exact training text with trained spans wrapped in markers (for `data preview`)."""
    out, span, trained = [], [], False
    for tok, lab in zip(enc.input_ids, enc.labels):
        now = lab != IGNORE_INDEX
        if now != trained and span:
            text = tokenizer.decode(span, skip_special_tokens=False)
            out.append(f"{start}{text}{end}" if trained else text)
            span = []
        trained = now
        span.append(tok)
    if span:
        text = tokenizer.decode(span, skip_special_tokens=False)
        out.append(f"{start}{text}{end}" if trained else text)
    return "".join(out)
