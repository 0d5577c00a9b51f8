"""The Arena tab and the `battle` / `vote` / `standings` API endpoints, built inside `demo.app.build_demo`.

Why apart from `demo.app`: the tab is the arena's page (`demo.arena.Arena` holds its battles, votes and live
table), and the page and the API call the same `Arena` methods, so a scripted vote goes through the checks a
click does (one vote per battle, unknown or expired battles refused). `reject` is the app's one way of turning a
refused request into a toast or an API error, passed in so both tabs word and log refusals alike.

Scripted battles (greedy answers; the names are revealed by the vote)::

    from gradio_client import Client

    client = Client("http://127.0.0.1:7860/")
    battle_id, answer_a, answer_b = client.predict(
        "Who are you?",   # message
        "",               # system prompt ("" = none), used by both models
        128,              # max new tokens (clamped to the server's cap)
        api_name="/battle",
    )
    revealed = client.predict(battle_id, "A", api_name="/vote")   # "A", "B", "tie" or "both_bad"
    # {"vote_id": 12, "vote": "A", "A": "zhenhuan-dpo", "B": "base: deepseek-ai/…"}
    table = client.predict(api_name="/standings")  # the live table: rank, model, rating, 95% CI, votes, win rate
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable

import gradio as gr

from persona_lora.demo.arena import Arena, Standings
from persona_lora.demo.decode import GenerationSettings

VOTE_LABELS = {"A": "A is better", "B": "B is better", "tie": "Tie", "both_bad": "Both are bad"}  # votes.VOTES


def arena_tab(arena: Arena, *, system: gr.Textbox, settings: list, visible: bool, max_chars: int,
              reject: Callable[[object], gr.Error], gen: dict, cheap: dict, refresh_seconds: float) -> gr.Tab:
    """The Arena tab (call inside the app's `gr.Tabs`); its events share the app's generation slots (`gen`) and
    cheap-event settings (`cheap`). Returns the tab (its visibility follows `arena_visible`)."""
    page = _ArenaPage(arena, max_chars, reject)
    with gr.Tab("Arena", id="arena", visible=visible, elem_id="arena-tab") as tab:
        gr.Markdown("Two models drawn from the base and the loaded adapters answer the same prompt; their names are "
                    "shown after your vote. Both get the system prompt and the generation settings above. Ratings are "
                    "Bradley–Terry fits of all votes with bootstrap 95% intervals.")
        battle = gr.State(None)
        message = gr.Textbox(label="Prompt", max_length=max_chars, lines=2, elem_id="arena-message")
        go = gr.Button("Battle: get two anonymous answers", variant="primary", elem_id="arena-go")
        with gr.Row():
            a_chat = _pane("Model A", "arena-a")
            b_chat = _pane("Model B", "arena-b")
        with gr.Row():
            buttons = [gr.Button(label, interactive=False, elem_id=f"arena-vote-{key}")
                       for key, label in VOTE_LABELS.items()]
        reveal = gr.Markdown(elem_id="arena-reveal")
        gr.Markdown("### Leaderboard (this demo's base)")
        table = gr.Dataframe(value=page.rows(), headers=list(Standings.HEADERS), interactive=False,
                             elem_id="arena-table")
        note = gr.Markdown(page.note(), elem_id="arena-note")
        timer = gr.Timer(refresh_seconds)

    outputs = [a_chat, b_chat, battle, reveal, *buttons]
    go.click(page.on_battle, [message, system, *settings], outputs, **gen)
    message.submit(page.on_battle, [message, system, *settings], outputs, **gen)
    for key, button in zip(VOTE_LABELS, buttons):
        button.click(page.vote_handler(key), [battle], [battle, reveal, table, note, *buttons], **cheap)
    timer.tick(page.refresh, None, [table, note], show_progress="hidden", **cheap)
    return tab


def arena_api(arena: Arena, *, max_chars: int, reject: Callable[[object], gr.Error], concurrency_limit: int) -> None:
    """The `battle`, `vote` and `standings` endpoints (call inside the app's `gr.Blocks`)."""
    page = _ArenaPage(arena, max_chars, reject)
    gr.api(page.battle_api, api_name="battle", concurrency_limit=concurrency_limit, concurrency_id="generate",
           api_description="A blind battle: two models drawn from the base and the adapters answer one message "
                           "(greedy). Returns (battle id, answer A, answer B); vote with /vote.")
    gr.api(page.vote_api, api_name="vote", concurrency_limit=None,
           api_description="Vote on a battle: 'A', 'B', 'tie' or 'both_bad'; once per battle. Returns the vote id "
                           "and which model was A and which B.")
    gr.api(page.standings_api, api_name="standings", concurrency_limit=None,
           api_description="The arena's live table: one row per model (rank, model, rating, 95% CI, votes, "
                           "win rate).")


def arena_visible(arena: Arena, forced: bool) -> bool:
    """The tab shows when asked for (`--arena`) or once two adapters are loaded."""
    return forced or len(arena.engine.adapter_names()) >= 2


class _ArenaPage:
    def __init__(self, arena: Arena, max_chars: int, reject: Callable[[object], gr.Error]):
        self.arena, self.max_chars, self.reject = arena, max_chars, reject

    def _message(self, message) -> str:
        message = (message or "").strip()
        if not message:
            raise self.reject("Type a prompt first.")
        if len(message) > self.max_chars:
            raise self.reject(f"The message is {len(message)} characters long; the limit is {self.max_chars}.")
        return message

    def on_battle(self, message, system, max_new, temperature, top_p, seed):
        message = self._message(message)
        off = [gr.Button(interactive=False)] * len(VOTE_LABELS)
        user = {"role": "user", "content": message}
        try:
            gen = GenerationSettings(max_new_tokens=int(max_new or 1), temperature=float(temperature or 0),
                                     top_p=float(top_p or 1), seed=int(seed or 0))
            for a, b, battle in self.arena.stream_battle(message, system or "", gen):
                chats = [user, {"role": "assistant", "content": a}], [user, {"role": "assistant", "content": b}]
                if battle is None:
                    yield *chats, None, "", *off
                else:
                    on = [gr.Button(interactive=True)] * len(VOTE_LABELS)
                    yield *chats, battle.id, "Which answer is better?", *on
        except Exception as e:  # noqa: BLE001 - every failure becomes one message
            raise self.reject(e) from e

    def vote_handler(self, key: str):
        def cast_arena_vote(battle_id):  # not `vote`: Gradio names events after their function; /vote is the API
            off = [gr.Button(interactive=False)] * len(VOTE_LABELS)
            if not battle_id:
                raise self.reject("Start a battle first (each battle takes one vote).")
            try:
                shown = self.arena.vote(battle_id, key)
            except Exception as e:  # noqa: BLE001 - every failure becomes one message
                raise self.reject(e) from e
            text = (f"Thanks! You voted **{VOTE_LABELS[key]}**. A was {_code(shown['A'])}, "
                    f"B was {_code(shown['B'])}.")
            return None, text, self.rows(), self.note(), *off

        return cast_arena_vote

    def rows(self) -> list[list]:
        return self.arena.standings().rows()

    def note(self) -> str:
        return html.escape(self.arena.standings().note())

    def refresh(self):
        return self.rows(), self.note()

    # ------------------------------------------------------------------ API

    def battle_api(self, message: str, system_prompt: str, max_new_tokens: int) -> tuple[str, str, str]:
        """(battle id, answer A, answer B), greedy."""
        message = self._message(message)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, float)) or max_new_tokens % 1:
            raise self.reject(f"max_new_tokens must be a whole number, got {max_new_tokens!r}")
        try:
            battle = self.arena.battle(message, system_prompt or "",
                                       GenerationSettings(max_new_tokens=int(max_new_tokens)))
        except Exception as e:  # noqa: BLE001 - every failure becomes one message
            raise self.reject(e) from e
        return battle.id, battle.answer_a, battle.answer_b

    def vote_api(self, battle_id: str, vote: str) -> dict:
        try:
            return self.arena.vote(battle_id, vote)
        except Exception as e:  # noqa: BLE001 - every failure becomes one message
            raise self.reject(e) from e

    def standings_api(self) -> list[dict]:
        return [dict(zip(Standings.HEADERS, row)) for row in self.rows()]


def _pane(label: str, elem_id: str) -> gr.Chatbot:
    """A chat pane that renders Markdown but never runs HTML from prompts or answers (sanitized, no custom tags)."""
    return gr.Chatbot(label=label, height=300, sanitize_html=True, allow_tags=False, buttons=["copy"],
                      elem_id=elem_id)


def _code(text: str) -> str:
    """Untrusted text shown literally in Markdown (a code span renders no HTML and no Markdown)."""
    text = re.sub(r"\s+", " ", str(text))
    ticks = "`" * (max((len(m) for m in re.findall(r"`+", text)), default=0) + 1)
    return f"{ticks} {text} {ticks}"
