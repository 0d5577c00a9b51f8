"""The Gradio app: base and adapter side by side (Chat), blind A/B votes (Blind A/B), and a `compare` API.

`build_demo(engine, votes=...)` returns the `gr.Blocks` (queue configured, not launched), so tests and the CLI
build the same app. `engine` is any `demo.backend.DemoBackend`: the local resident model (`demo.engine.Engine`)
or a serving engine behind an OpenAI-compatible API (`demo.openai_backend.OpenAIBackend`); the page, the votes
and the API are the same on both. When one side of a turn fails (a backend whose sides are separate requests
raises `SideFailed`), the other side's answer stays in its pane and history, and the failed pane says why.

Everything the browser shows that came from a user or a model goes through components that sanitize HTML
(`gr.Chatbot(sanitize_html=True)`, `gr.Markdown`), and names are shown in code spans.

Scripted A/B batches (the `compare` endpoint: greedy, one user turn, no history)::

    from gradio_client import Client

    client = Client("http://127.0.0.1:7860/")          # add auth=("user", "password") if started with --auth
    base_answer, adapter_answer = client.predict(
        "Who are you?",          # message
        "zhenhuan-attn",         # adapter, as named in the picker: its folder name or hub id (owner/name)
        "",                      # system prompt ("" = none; the manifest's prompt is what the UI prefills)
        128,                     # max new tokens (clamped to the server's --max-new-tokens cap)
        api_name="/compare",
    )

Any two of {base, adapters…}: the Blind A/B tab's "Against" picker, and `compare`'s optional fifth argument
(`against`, "base" by default: the call above is unchanged), put an adapter against another adapter. Answers come
back as (against, adapter); a vote records both models, and win rates are per pair::

    sft_answer, dpo_answer = client.predict("Who are you?", "zhenhuan-dpo", "", 128, "zhenhuan-attn",
                                            api_name="/compare")

The Arena tab (there with `arena=True`, `persona-lora demo --arena`, or once two adapters are loaded) and its
`battle`, `vote` and `standings` endpoints are built by `demo.arena_page` (its docstring has the gradio_client
example). `client.view_api()` lists the endpoints; the UI's own events are private.
"""

import html
import logging
import random
import re
import tempfile
import time
from pathlib import Path

import gradio as gr

from persona_lora.demo.arena import Arena, weights_sha256
from persona_lora.demo.arena_page import arena_api, arena_tab, arena_visible
from persona_lora.demo.backend import DemoBackend, SideFailed
from persona_lora.demo.decode import GenerationSettings
from persona_lora.errors import PersonaLoraError
from persona_lora.votes import VoteStore

log = logging.getLogger(__name__)

VOTE_LABELS = {"A": "A is better", "B": "B is better", "tie": "Tie", "both_bad": "Both are bad"}
RATE_HEADERS = [
    "adapter", "against", "votes", "adapter wins", "against wins", "ties", "both bad", "win rate", "95% CI (Wilson)"
]
BASE_CHOICE = "base"  # the base, as one of the two models compared (the "Against" picker, `compare`'s `against`)
_random = random.SystemRandom()


def build_demo(
    engine: DemoBackend,
    *,
    votes: VoteStore | None = None,
    max_message_chars: int = 4000,
    default_max_new_tokens: int = 256,
    concurrency_limit: int = 8,
    queue_size: int = 64,
    push_votes_to: str | None = None,
    refresh_seconds: float = 10.0,
    title: str = "persona-lora: base vs adapter",
    arena: bool = False,
) -> gr.Blocks:
    """The demo app for `engine`. `votes` None keeps votes in a temporary database, deleted at exit.

    `concurrency_limit` is how many requests run at once (they share the one model, decoding in turns);
    `queue_size` how many may wait; `push_votes_to` (a dataset repo id) adds a button that pushes the votes
    there with the server's token — only for demos whose users may publish votes."""
    scratch = None
    if votes is None:
        scratch = tempfile.TemporaryDirectory(prefix="persona-lora-votes-")
        votes = VoteStore(Path(scratch.name) / "votes.sqlite")
        log.warning("votes go to a temporary database %s; pass --votes PATH to keep them", votes.path)
    ui = _Handlers(engine, votes, max_message_chars)
    ui.scratch = scratch  # the temporary database lives as long as the app's handlers
    battles = Arena(engine, votes)
    names = engine.adapter_names()
    first = names[0] if names else None
    cap = engine.max_new_tokens_cap

    with gr.Blocks(title=title) as demo:
        gr.Markdown(f"## {html.escape(title)}")
        with gr.Row(equal_height=True):
            adapter = gr.Dropdown(choices=names, value=first, label="Adapter", interactive=True, scale=2,
                                  elem_id="adapter-picker")
            add_spec = gr.Textbox(label="Add an adapter: local folder or hub id (owner/name[@revision])", scale=3,
                                  max_lines=1, elem_id="add-adapter")
            add_btn = gr.Button("Load adapter", scale=1)
        info = gr.Markdown(ui.info_markdown(first), elem_id="sides-info")
        system = gr.Textbox(value=engine.system_prompt(first), lines=2, max_length=max_message_chars,
                            label="System prompt (prefilled from the adapter's manifest; editable; used by both sides)",
                            elem_id="system-prompt")
        with gr.Accordion("Generation settings", open=False), gr.Row():
            max_new = gr.Slider(1, cap, value=min(default_max_new_tokens, cap), step=1,
                                label=f"Max new tokens (server cap {cap})")
            temperature = gr.Slider(0, 2, value=0, step=0.05, label="Temperature (0 = greedy)")
            top_p = gr.Slider(0.05, 1, value=1, step=0.05, label="Top-p (sampling only)")
            seed = gr.Number(value=0, precision=0, label="Seed (sampling only; same for both sides)")
        settings = [max_new, temperature, top_p, seed]

        with gr.Tabs():
            with gr.Tab("Chat", id="chat"):
                base_hist, ad_hist = gr.State([]), gr.State([])
                with gr.Row():
                    base_chat = _chatbot("Base", "base-chat", 420)
                    ad_chat = _chatbot(first or "Adapter", "adapter-chat", 420)
                msg = gr.Textbox(label="Message", placeholder="Type a message; both sides answer at once",
                                 max_length=max_message_chars, lines=2, elem_id="chat-message")
                with gr.Row():
                    send = gr.Button("Send", variant="primary", elem_id="chat-send")
                    retry = gr.Button("Retry", elem_id="chat-retry")
                    stop = gr.Button("Stop")
                    clear = gr.Button("Clear", elem_id="chat-clear")

            with gr.Tab("Blind A/B", id="ab"):
                gr.Markdown("Ask something; the base's and the adapter's answers appear as A and B in random order. "
                            "Vote, then see which was which.")
                pending = gr.State(None)
                ab_msg = gr.Textbox(label="Prompt", max_length=max_message_chars, lines=2, elem_id="ab-message")
                against = gr.Dropdown(choices=[BASE_CHOICE, *names], value=BASE_CHOICE, interactive=True,
                                      label="Against (the base, or another adapter; the adapter is picked above)",
                                      elem_id="ab-against")
                ab_go = gr.Button("Get two answers", variant="primary", elem_id="ab-go")
                with gr.Row():
                    a_chat = _chatbot("A", "a-chat", 300)
                    b_chat = _chatbot("B", "b-chat", 300)
                with gr.Row():
                    vote_btns = [gr.Button(label, interactive=False, elem_id=f"vote-{key}")
                                 for key, label in VOTE_LABELS.items()]
                reveal = gr.Markdown(elem_id="ab-reveal")
                gr.Markdown("### Win rates per pair (decisive votes; ties and 'both bad' are counted apart)")
                rates = gr.Dataframe(value=ui.rates_rows(), headers=RATE_HEADERS, interactive=False,
                                     elem_id="win-rates")
                with gr.Row():
                    export_btn = gr.Button("Export preference dataset (JSONL for TRL DPO)")
                    export_file = gr.File(label="preferences.jsonl", interactive=False, height=90)
                if push_votes_to:
                    push_btn = gr.Button(f"Push votes to the dataset repo {push_votes_to}")
                    push_out = gr.Markdown()
                timer = gr.Timer(refresh_seconds)

            arena_page = arena_tab(  # its events: private, generations in the shared slots, the rest unlimited
                battles, system=system, settings=settings, visible=arena_visible(battles, arena),
                max_chars=max_message_chars, reject=_reject, refresh_seconds=refresh_seconds,
                gen={"api_visibility": "private", "concurrency_limit": concurrency_limit, "concurrency_id": "generate"},
                cheap={"api_visibility": "private", "concurrency_limit": None})

        # Generations share one pool of `concurrency_limit` slots (they decode in turns on the one model); the
        # cheap events (votes, table refresh, picking) get no limit, so they never wait behind a generation.
        private = {"api_visibility": "private"}
        cheap = {**private, "concurrency_limit": None}
        gen = {**private, "concurrency_limit": concurrency_limit, "concurrency_id": "generate"}
        # adapters: picking one updates the system prompt, the info line and the adapter pane; the base stays put
        pick_outputs = [system, info, ad_chat, base_chat, base_hist, ad_hist]
        adapter.change(ui.on_pick, [adapter], pick_outputs, **cheap)
        adapter.focus(ui.refresh_choices, [adapter], [adapter], **cheap)
        for adding in (add_btn.click, add_spec.submit):  # a second adapter brings the Arena tab
            adding(ui.on_add, [add_spec], [adapter, add_spec], **private).success(
                lambda: gr.Tab(visible=arena_visible(battles, arena)), None, [arena_page], **cheap)
        demo.load(ui.refresh_choices, [adapter], [adapter], **cheap)

        chat_in = [msg, base_hist, ad_hist, adapter, system, *settings]
        chat_out = [msg, base_chat, ad_chat, base_hist, ad_hist]
        sending = [send.click(ui.on_send, chat_in, chat_out, **gen),
                   msg.submit(ui.on_send, chat_in, chat_out, **gen),
                   retry.click(ui.on_retry, [base_hist, ad_hist, adapter, system, *settings], chat_out, **gen)]
        stop.click(None, None, None, cancels=sending, **private)
        for clearing in (clear.click, base_chat.clear, ad_chat.clear):  # the panes' own trash icons clear both sides
            clearing(ui.on_clear, None, [msg, base_chat, ad_chat, base_hist, ad_hist], cancels=sending, **cheap)

        ab_in = [ab_msg, adapter, against, system, *settings]
        ab_out = [a_chat, b_chat, pending, reveal, *vote_btns]
        ab_go.click(ui.on_ab_pair, ab_in, ab_out, **gen)
        ab_msg.submit(ui.on_ab_pair, ab_in, ab_out, **gen)
        against.focus(ui.refresh_against, [against], [against], **cheap)
        for key, btn in zip(VOTE_LABELS, vote_btns):
            btn.click(ui.vote_handler(key), [pending], [pending, reveal, rates, *vote_btns], **cheap)
        timer.tick(ui.rates_rows, None, [rates], show_progress="hidden", **cheap)
        export_btn.click(ui.on_export, None, [export_file], **cheap)
        if push_votes_to:
            push_btn.click(lambda: ui.on_push(push_votes_to), None, [push_out], **private)

        gr.api(ui.compare_api, api_name="compare", concurrency_limit=concurrency_limit, concurrency_id="generate",
               api_description="Greedy answers of the base (or of the adapter `against`) and of an adapter to one "
                               "message: (base or against, adapter).")
        arena_api(battles, max_chars=max_message_chars, reject=_reject, concurrency_limit=concurrency_limit)

    demo.queue(max_size=queue_size, default_concurrency_limit=concurrency_limit, api_open=False)
    return demo


class _Handlers:
    """The event handlers, kept apart from the layout. User mistakes become `gr.Error` (shown as a toast)."""

    def __init__(self, engine: DemoBackend, votes: VoteStore, max_message_chars: int):
        self.engine, self.votes, self.max_chars = engine, votes, max_message_chars
        self.scratch: tempfile.TemporaryDirectory | None = None
        # Exports go to a temporary folder (Gradio serves files from the temp folder), made on the first export
        # and deleted at exit, so a demo that never exports leaves nothing behind.
        self._exports: tempfile.TemporaryDirectory | None = None

    # -------------------------------------------------------------- adapters

    def info_markdown(self, name: str | None) -> str:
        sides = self.engine.describe(name)
        notice = f"**Note:** {html.escape(sides['notice'])}  \n" if sides.get("notice") else ""
        return notice + f"**Base pane:** {_code(sides['base'])}  \n**Adapter pane:** {_code(sides['adapter'])}"

    def on_pick(self, name):
        try:
            system = self.engine.system_prompt(name)
        except Exception as e:  # noqa: BLE001 - every failure becomes one message
            raise _reject(e) from e
        return (system, self.info_markdown(name), gr.Chatbot(value=[], label=name or "Adapter"),
                gr.Chatbot(value=[]), [], [])

    def refresh_choices(self, current):
        names = self.engine.adapter_names()
        return gr.Dropdown(choices=names, value=current if current in names else (names[0] if names else None))

    def refresh_against(self, current):
        choices = [BASE_CHOICE, *self.engine.adapter_names()]
        return gr.Dropdown(choices=choices, value=current if current in choices else BASE_CHOICE)

    def on_add(self, spec):
        try:
            info = self.engine.add_adapter(spec)
        except Exception as e:  # noqa: BLE001 - every failure becomes one message
            raise _reject(e) from e
        gr.Info(f"Loaded adapter {info.name}")
        return gr.Dropdown(choices=self.engine.adapter_names(), value=info.name), ""

    # -------------------------------------------------------------- chat

    def _message(self, message) -> str:
        message = (message or "").strip()
        if len(message) > self.max_chars:
            raise _reject(f"The message is {len(message)} characters long; the limit is {self.max_chars}.")
        return message

    @staticmethod
    def _settings(max_new, temperature, top_p, seed) -> GenerationSettings:
        return GenerationSettings(max_new_tokens=int(max_new or 1), temperature=float(temperature or 0),
                                  top_p=float(top_p or 1), seed=int(seed or 0))

    def on_send(self, message, base_hist, ad_hist, adapter, system, *settings):
        message = self._message(message)
        if not message:
            yield gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
            return
        yield from self._chat(message, base_hist or [], ad_hist or [], adapter, system, settings)

    def on_retry(self, base_hist, ad_hist, adapter, system, *settings):
        base_hist, ad_hist = list(base_hist or []), list(ad_hist or [])
        last = max((i for i, m in enumerate(base_hist) if m["role"] == "user"), default=None)
        if last is None:
            raise _reject("Nothing to retry yet.")
        message = base_hist[last]["content"]
        ad_last = max((i for i, m in enumerate(ad_hist) if m["role"] == "user"), default=len(ad_hist))
        yield from self._chat(message, base_hist[:last], ad_hist[:ad_last], adapter, system, settings)

    def _chat(self, message, base_hist, ad_hist, adapter, system, settings):
        user = {"role": "user", "content": message}
        base_turns, ad_turns = [*base_hist, user], [*ad_hist, user]
        try:
            gen = self._settings(*settings)
            if adapter:
                stream = self.engine.stream_compare(adapter, base_turns, ad_turns, system, gen)
            else:  # no adapter loaded yet: the base alone
                stream = ((text, "") for text in self.engine.stream_one(None, base_turns, system, gen))
            for b, a in stream:
                # the states follow the panes, so a stopped answer stays in the context the model sees next
                new_base, new_ad = _with(base_turns, b), (_with(ad_turns, a) if adapter else [])
                yield "", new_base, new_ad, new_base, new_ad
        except SideFailed as e:  # the other side's answer is complete: keep it; the failed pane says why
            sides = (base_turns, ad_turns if adapter else None)  # no adapter: the base alone, one text
            texts = (*e.texts, "")[:2]
            states = [[] if t is None else _with(t, x) for t, x in zip(sides, texts)]
            panes = [[] if t is None else _with(t, _noted(x, e.failures.get(i)))
                     for i, (t, x) in enumerate(zip(sides, texts))]
            yield "", panes[0], panes[1], states[0], states[1]
            raise _reject(e) from e
        except Exception as e:  # noqa: BLE001 - every failure becomes one message
            raise _reject(e) from e

    def on_clear(self):
        return "", [], [], [], []

    # -------------------------------------------------------------- blind A/B

    def on_ab(self, message, adapter, system, *settings):
        """The base against `adapter` (the blind pair as it was before any two models could be compared)."""
        yield from self.on_ab_pair(message, adapter, BASE_CHOICE, system, *settings)

    def on_ab_pair(self, message, adapter, against, system, *settings):
        """`against` (the base, or another adapter: the vote's first slot) and `adapter`, shown as A and B in
        random order."""
        message = self._message(message)
        off = [gr.Button(interactive=False)] * len(VOTE_LABELS)
        if not message:
            raise _reject("Type a prompt first.")
        if not adapter:
            raise _reject("Load an adapter first (top of the page).")
        against = against or BASE_CHOICE
        if against == adapter:
            raise _reject("Pick two different models: the adapter at the top and another one under Against.")
        a_side = "base" if _random.random() < 0.5 else "adapter"
        user = {"role": "user", "content": message}
        try:
            gen = self._settings(*settings)
            info = self.engine.adapter(adapter)
            left = None if against == BASE_CHOICE else self.engine.adapter(against)
            if left is None:
                stream = self.engine.stream_compare(adapter, [user], [user], system, gen)
            elif hasattr(self.engine, "stream_pair"):
                stream = self.engine.stream_pair(against, adapter, [user], [user], system, gen)
            else:
                raise _reject("This backend compares an adapter with the base only; choose Against: base.")
            b = a = ""
            for b, a in stream:
                first, second = (b, a) if a_side == "base" else (a, b)
                yield _with([user], first), _with([user], second), None, "", *off
        except SideFailed as e:  # no vote on a pair with a failed side; the message calls the sides A and B
            raise _reject(e.describe(("A", "B") if a_side == "base" else ("B", "A"))) from e
        except Exception as e:  # noqa: BLE001 - every failure becomes one message
            raise _reject(e) from e
        answer_a, answer_b = (b, a) if a_side == "base" else (a, b)
        pending = {
            "prompt": message, "system_prompt": system or "", "adapter_name": info.name, "adapter_id": info.adapter_id,
            "base_id": self.engine.base_id, "answer_a": answer_a, "answer_b": answer_b, "a_side": a_side,
            "settings": {"max_new_tokens": gen.max_new_tokens, "temperature": gen.temperature, "top_p": gen.top_p,
                         "seed": gen.seed, "greedy": gen.greedy},
        }
        pending["adapter_sha256"] = weights_sha256(info)  # content identity: a renamed folder keeps its votes
        if left is not None:  # adapter against adapter: the first slot names the other adapter
            pending.update(left_id=left.adapter_id, left_name=left.name, left_sha256=weights_sha256(left))
        on = [gr.Button(interactive=True)] * len(VOTE_LABELS)
        yield _with([user], answer_a), _with([user], answer_b), pending, "Which answer is better?", *on

    def vote_handler(self, key: str):
        def cast_vote(pending):  # not `vote`: Gradio names events after their function, and /vote is the API's
            off = [gr.Button(interactive=False)] * len(VOTE_LABELS)
            if not pending:
                raise _reject("Ask for two answers first (each pair takes one vote).")
            self.votes.record(vote=key, **pending)
            first = f"adapter {_code(pending['left_name'])}" if pending.get("left_name") else "the base"
            second = f"adapter {_code(pending['adapter_name'])}"
            a_name, b_name = (first, second) if pending["a_side"] == "base" else (second, first)
            text = f"Thanks! You voted **{VOTE_LABELS[key]}**. A was {a_name}, B was {b_name}."
            return None, text, self.rates_rows(), *off

        return cast_vote

    def rates_rows(self) -> list[list]:
        rows = []
        for r in self.votes.win_rates():
            rate = "n/a" if r["win_rate"] is None else f"{100 * r['win_rate']:.0f}%"
            ci = "n/a" if r["win_rate"] is None else f"{100 * r['ci_low']:.0f}% to {100 * r['ci_high']:.0f}%"
            against = r["against"] if r.get("left_id") else r["base"]
            rows.append([r["adapter"], against, r["votes"], r["adapter_wins"], r["base_wins"], r["ties"],
                         r["both_bad"], rate, ci])
        return rows

    def on_export(self):
        if self._exports is None:
            self._exports = tempfile.TemporaryDirectory(prefix="persona-lora-export-")
        out = Path(self._exports.name) / f"persona-lora-preferences-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
        n = self.votes.export_preferences(out)
        gr.Info(f"Exported {n} preference pair(s).")
        return str(out)

    def on_push(self, repo_id: str) -> str:
        try:
            url = self.votes.push_to_hub(repo_id)
        except Exception as e:  # noqa: BLE001 - every failure becomes one message
            raise _reject(e) from e
        return f"Pushed to {_code(url)}"

    # -------------------------------------------------------------- API

    def compare_api(self, message: str, adapter: str, system_prompt: str, max_new_tokens: int,
                    against: str = BASE_CHOICE) -> tuple[str, str]:
        """Greedy (base answer, adapter answer) to one user message; `adapter` as named in the picker. `against`
        another adapter's name: (that adapter's answer, adapter's answer)."""
        message = (message or "").strip()
        if not message:
            raise _reject("message is empty")
        if len(message) > self.max_chars:
            raise _reject(f"message is {len(message)} characters long; the limit is {self.max_chars}")
        try:
            settings = GenerationSettings(max_new_tokens=int(max_new_tokens))
            if against and against != BASE_CHOICE:
                if not hasattr(self.engine, "compare_pair"):
                    raise _reject("this backend compares an adapter with the base only; leave `against` empty")
                return self.engine.compare_pair(against, adapter, message, system_prompt or "", settings)
            return self.engine.compare(adapter, message, system_prompt or "", settings)
        except SideFailed as e:  # a script gets the cause, and the answer that did come
            kept = "".join(f"; the {e.names[i]} answer: {text!r}" for i, text in enumerate(e.texts)
                           if i not in e.failures)
            raise _reject(f"{e}{kept}") from e
        except Exception as e:  # noqa: BLE001 - every failure becomes one message
            raise _reject(e) from e


def _reject(problem: str | Exception) -> gr.Error:
    """The toast (and API error) for a refused request, logged as one line; never empty. A user's mistake
    (`PersonaLoraError`) shows its message; anything else is named as unexpected, with the traceback in the log
    only at debug level (`-vv`)."""
    if isinstance(problem, gr.Error):
        return problem
    if isinstance(problem, PersonaLoraError) or isinstance(problem, str):
        message = str(problem).strip() or type(problem).__name__
        log.warning("request refused: %s", message.splitlines()[0])
        if isinstance(problem, Exception):
            log.debug("traceback of the refused request", exc_info=problem)
    else:
        message = (f"unexpected {type(problem).__name__}: {str(problem).strip() or 'no details'}; the server log has "
                   "more (run the demo with -vv for the traceback)")
        log.error("request failed: %s", message)
        log.debug("traceback of the failed request", exc_info=problem)
    # print_exception=False: Gradio would print the whole chained traceback for every refusal; the line above says
    # it, and -vv adds the traceback
    return gr.Error(message, print_exception=False)


def _chatbot(label: str, elem_id: str, height: int) -> gr.Chatbot:
    """A chat pane that renders Markdown but never runs HTML from prompts or answers (sanitized, no custom tags)."""
    # min_width: two panes side by side need ~600 px; on a narrower window (a phone) the row wraps them
    return gr.Chatbot(label=label, height=height, sanitize_html=True, allow_tags=False, buttons=["copy", "copy_all"],
                      elem_id=elem_id, min_width=300)


def _with(turns: list[dict], answer: str) -> list[dict]:
    return [*turns, {"role": "assistant", "content": answer}]


def _noted(text: str, failure: str | None) -> str:
    """A failed side's pane: what it produced, then why it stopped (shown only: the history keeps the text)."""
    if failure is None:
        return text
    return f"{text}\n\n> ⚠ {failure}".strip()


def _code(text: str) -> str:
    """Show untrusted text literally in Markdown: a code span renders no HTML and no Markdown."""
    text = re.sub(r"\s+", " ", str(text))
    ticks = "`" * (max((len(m) for m in re.findall(r"`+", text)), default=0) + 1)
    return f"{ticks} {text} {ticks}"
