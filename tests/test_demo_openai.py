"""The A/B demo on a serving engine's OpenAI-compatible API (`--backend openai`): the real `openai` client against
a local server that speaks the protocol (tests/openai_server.py), the way the hub tests run the real hub clients
against local hub servers.

What must hold: both panes stream at once (two concurrent streamed requests), the settings reach the engine
(greedy is temperature 0), multi-turn histories, the page's handlers, blind votes and export, and the `compare`
API with its signature unchanged; every failure (wrong key, unreachable endpoint, unknown model, timeout, an
engine error or a cut in the middle of a stream, garbage) gives a message naming the cause and the fix, keeps the
other side's answer and leaves the server serving; the key appears in no output, log, page or error; twenty
sessions at once each get their own answers.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from persona_lora.demo.backend import SideFailed
from persona_lora.demo.decode import GenerationSettings
from persona_lora.errors import UsageError
from tests.conftest import free_port

KEY_ENV = "PERSONA_LORA_TEST_ENGINE_KEY"
KEY = "sk-test-Zq81vXw7-never-shown"
SYSTEM = "You are Zhen Huan, a consort in the imperial palace."
M1 = "Who are you?"


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


@pytest.fixture
def engine_server(openai_server, monkeypatch):
    """The protocol server as an engine serving a base and two adapters, behind a key."""
    openai_server.models = ["tiny-base", "persona-attn", "persona-all"]
    openai_server.parents = {"persona-attn": "tiny-base", "persona-all": "tiny-base"}
    openai_server.api_key = KEY
    monkeypatch.setenv(KEY_ENV, KEY)
    return openai_server


@pytest.fixture
def backend(engine_server):
    from persona_lora.demo.openai_backend import OpenAIBackend

    b = OpenAIBackend(engine_server.url, "tiny-base", ["persona-attn", "persona-all"], api_key_env=KEY_ENV,
                      timeout=5, max_new_tokens_cap=64)
    yield b
    b.close()


def expected(model: str, message: str = M1, turn: int = 1) -> str:
    return f"{model} answers: {message} (turn {turn})"


# ---------------------------------------------------------------------------------------------- the protocol server


def test_protocol_server_answers_the_real_client_streamed_and_not(openai_server):
    """The fixture itself: /v1/models, a whole answer, a stream, stop and max_tokens, scripted answers."""
    import openai

    openai_server.script({"persona": "I am the consort. Bow.", "base": lambda req: f"echo {req.last_user}"})
    client = openai.OpenAI(base_url=openai_server.url, api_key="any", max_retries=0)
    assert [m.id for m in client.models.list()] == ["base", "persona"]
    whole = client.chat.completions.create(model="persona", messages=[user("hi")])
    assert whole.choices[0].message.content == "I am the consort. Bow." and whole.choices[0].finish_reason == "stop"
    cut = client.chat.completions.create(model="persona", messages=[user("hi")], max_tokens=2, stop=["never"])
    assert cut.choices[0].message.content == "I am" and cut.choices[0].finish_reason == "length"
    pieces = [c.choices[0].delta.content for c in client.chat.completions.create(
        model="base", messages=[user("hi there")], stream=True) if c.choices and c.choices[0].delta.content]
    assert pieces == ["echo", " hi", " there"]
    assert [r.model for r in openai_server.requests] == ["persona", "persona", "base"]
    assert openai_server.requests[1].params["stop"] == ["never"]


# ---------------------------------------------------------------------------------------------- generation


def test_both_panes_stream_at_once_greedy(backend, engine_server):
    """Two concurrent streamed requests, one per pane: the engine sends no token until both streams are open
    (`gather`: a backend that ran the sides one after the other never gets there), and greedy is temperature 0
    with the system prompt first."""
    engine_server.token_delay = 0.01
    engine_server.gather(2)
    updates = list(backend.stream_compare("persona-attn", [user(M1)], [user(M1)], SYSTEM,
                                          GenerationSettings(max_new_tokens=32)))
    final = (expected("tiny-base"), expected("persona-attn"))
    assert updates[-1] == final
    assert engine_server.gathered and engine_server.peak_streams == 2, "the two panes did not stream at once"
    base_req, ad_req = sorted(engine_server.requests, key=lambda r: r.model != "tiny-base")
    assert (base_req.model, ad_req.model) == ("tiny-base", "persona-attn")
    for req in (base_req, ad_req):
        assert req.params["stream"] is True and req.params["temperature"] == 0 and req.params["max_tokens"] == 32
        assert "seed" not in req.params
        assert req.messages == [{"role": "system", "content": SYSTEM}, user(M1)]
        assert "authorization" not in req.headers  # recorded without it; the key went in the header


def test_settings_histories_and_the_token_cap_reach_the_engine(backend, engine_server):
    """Sampling settings (same seed on both sides), each side's own history, the server cap on new tokens."""
    base_history = [user("Hello"), assistant("Hi."), user("Tell me more.")]
    ad_history = [user("Hello"), assistant("Greetings, I am the consort."), user("Tell me more.")]
    sampled = GenerationSettings(max_new_tokens=10_000, temperature=0.7, top_p=0.9, seed=5)
    got = list(backend.stream_compare("persona-all", base_history, ad_history, "", sampled))[-1]
    assert got == (expected("tiny-base", "Tell me more.", 2), expected("persona-all", "Tell me more.", 2))
    by_model = {r.model: r for r in engine_server.requests}
    assert by_model["tiny-base"].messages == base_history and by_model["persona-all"].messages == ad_history
    for req in by_model.values():
        assert (req.params["temperature"], req.params["top_p"], req.params["seed"]) == (0.7, 0.9, 5)
        assert req.params["max_tokens"] == 64  # the server cap, whatever was asked
    assert backend.answer(None, M1) == expected("tiny-base")  # the base alone (no adapter picked yet)
    with pytest.raises(UsageError, match="top_p"):
        backend.compare("persona-all", M1, settings=GenerationSettings(top_p=0))
    with pytest.raises(UsageError, match="no adapter named 'nope'.*persona-attn"):
        backend.compare("nope", M1)


def test_adapters_come_from_the_endpoint_and_can_be_added(engine_server, tmp_path):
    """Without --adapter the picker lists every served model but the base; SGLang's base:adapter names are
    accepted when both parts are served; NAME=FOLDER takes the system prompt from that folder's manifest."""
    from persona_lora.artifact import BaseModelInfo, ChatInfo, Manifest, write_manifest
    from persona_lora.demo.openai_backend import OpenAIBackend

    b = OpenAIBackend(engine_server.root, "tiny-base", api_key_env=KEY_ENV)  # …/v1 is added to the root URL
    assert b.adapter_names() == ["persona-attn", "persona-all"] and b.system_prompt("persona-attn") == ""
    assert engine_server.model_listings == 1  # asked once at start-up
    engine_server.models.append("tiny-base:persona-new")
    assert b.add_adapter("tiny-base:persona-new").name in b.adapter_names()
    with pytest.raises(UsageError, match="does not serve it.*lists: tiny-base, persona-attn"):
        b.add_adapter("persona-missing")
    folder = tmp_path / "export"
    folder.mkdir()
    write_manifest(folder, Manifest(kind="adapter", name="persona-attn", base_model=BaseModelInfo(id="other-base"),
                                    chat=ChatInfo(system_prompt=SYSTEM)))
    info = b.add_adapter(f"persona-all={folder}")
    assert info.system_prompt == SYSTEM and b.system_prompt("persona-all") == SYSTEM
    sides = b.describe("persona-all")
    assert "tiny-base" in sides["base"] and "WARNING" in sides["adapter"] and "other-base" in sides["adapter"]
    with pytest.raises(UsageError, match="has no persona_manifest.json"):
        b.add_adapter(f"persona-attn={tmp_path / 'nothing'}")


def test_closing_the_stream_closes_both_requests(backend, engine_server):
    """Stop (or a closed tab) closes both requests, so the engine stops generating for a reader that left."""
    engine_server.token_delay = 0.02
    it = backend.stream_compare("persona-attn", [user(M1)], [user(M1)], "",
                                GenerationSettings(max_new_tokens=64, ignore_eos=True))
    next(it)
    next(it)
    it.close()
    deadline = time.monotonic() + 5
    while engine_server.disconnects < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine_server.disconnects == 2
    assert all(r.finished is None for r in engine_server.requests)
    assert backend.compare("persona-attn", M1)[1] == expected("persona-attn")  # the next turn is unaffected


# ---------------------------------------------------------------------------------------------- failures


@pytest.mark.parametrize("kind, message", [
    ("cut", "connection to the engine at .* was cut mid-answer"),
    ("error_event", "reported an error mid-answer .*illegal memory access"),
    ("garbage", "not the OpenAI chat-completions protocol"),
    ("no_done", "stream ended before the engine finished"),
    ("500", "answered HTTP 500 for model 'persona-attn'"),
    ("404", "does not serve model 'persona-attn' \\(HTTP 404\\)"),
    ("401", f"refused the key in \\${KEY_ENV}"),
    ("hang", "sent nothing for 1 s .*raise --timeout"),
])
def test_a_failing_side_keeps_the_other_answer_and_the_server_serving(engine_server, kind, message):
    from persona_lora.demo.openai_backend import OpenAIBackend

    b = OpenAIBackend(engine_server.url, "tiny-base", ["persona-attn"], api_key_env=KEY_ENV, timeout=1)
    engine_server.fail(kind, model="persona-attn", times=1)
    with pytest.raises(SideFailed, match=message) as e:
        b.compare("persona-attn", M1)
    assert e.value.texts[0] == expected("tiny-base") and set(e.value.failures) == {1}
    assert "the base side's answer is kept" in str(e.value)
    if kind in ("cut", "error_event", "garbage", "no_done", "hang"):
        assert e.value.texts[1] == "persona-attn answers:"  # what came before the failure
    assert b.compare("persona-attn", M1) == (expected("tiny-base"), expected("persona-attn"))  # still serving
    b.close()


def test_start_up_checks_name_the_option_to_fix(engine_server, monkeypatch):
    """/v1/models is asked once at start: wrong or missing key, unreachable endpoint, unknown names, a server that
    is not an OpenAI API; all before anything is served."""
    from persona_lora.demo.openai_backend import OpenAIBackend

    monkeypatch.setenv("WRONG_KEY", "sk-wrong-key-value")
    with pytest.raises(UsageError, match="refused the key in \\$WRONG_KEY.*--api-key-env") as e:
        OpenAIBackend(engine_server.url, "tiny-base", api_key_env="WRONG_KEY")
    assert "sk-wrong-key-value" not in str(e.value)  # the server's 401 body echoes it; the message does not
    with pytest.raises(UsageError, match="needs an API key.*--api-key-env VAR"):
        OpenAIBackend(engine_server.url, "tiny-base")
    with pytest.raises(UsageError, match="--api-key-env UNSET_VAR: the environment variable UNSET_VAR is not set"):
        OpenAIBackend(engine_server.url, "tiny-base", api_key_env="UNSET_VAR")
    with pytest.raises(UsageError, match="cannot reach the engine at http://127.0.0.1:.*is --endpoint right"):
        OpenAIBackend(f"http://127.0.0.1:{free_port()}", "tiny-base", api_key_env=KEY_ENV)
    with pytest.raises(UsageError, match="--base Qwen: the engine .* does not serve it"):
        OpenAIBackend(engine_server.url, "Qwen", api_key_env=KEY_ENV)
    with pytest.raises(UsageError, match="--adapter persona-x: .*lists: tiny-base, persona-attn, persona-all"):
        OpenAIBackend(engine_server.url, "tiny-base", ["persona-x"], api_key_env=KEY_ENV)
    with pytest.raises(UsageError, match="--endpoint must be an http"):
        OpenAIBackend("localhost:8000", "tiny-base")
    engine_server.fail("500", endpoint="models", times=1)
    with pytest.raises(UsageError, match="HTTP 500 for GET /v1/models"):
        OpenAIBackend(engine_server.url, "tiny-base", api_key_env=KEY_ENV)


# ---------------------------------------------------------------------------------------------- the page


@pytest.mark.slow  # imports Gradio
def test_page_handlers_votes_and_export_on_the_openai_backend(backend, engine_server, tmp_path):
    """The page's own handlers: multi-turn chat and retry, a blind pair, a vote, the preference export."""
    from persona_lora.demo.app import _Handlers
    from persona_lora.votes import VoteStore

    store = VoteStore(tmp_path / "votes.sqlite")
    ui = _Handlers(backend, store, 200)
    settings = (16, 0, 1, 0)
    *_, last = ui.on_send(M1, [], [], "persona-attn", SYSTEM, *settings)
    msg, base_chat, ad_chat, base_hist, ad_hist = last
    assert base_hist[-1]["content"] == expected("tiny-base") and ad_hist[-1]["content"] == expected("persona-attn")
    *_, again = ui.on_retry(base_hist, ad_hist, "persona-attn", SYSTEM, *settings)
    assert again[3] == base_hist and again[4] == ad_hist
    *_, second = ui.on_send("And then?", base_hist, ad_hist, "persona-attn", SYSTEM, *settings)
    assert second[4][-1]["content"] == expected("persona-attn", "And then?", 2) and len(second[3]) == 4

    *_, pair = ui.on_ab(M1, "persona-all", SYSTEM, *settings)
    pending = pair[2]
    answers = {"base": expected("tiny-base"), "adapter": expected("persona-all")}
    assert pending["answer_a"] == answers[pending["a_side"]] and pending["base_id"] == "tiny-base"
    assert pending["adapter_id"] == "persona-all" and pending["settings"]["greedy"]
    ui.vote_handler("A")(pending)
    (row,) = store.votes()
    assert row["winner"] == pending["a_side"] and row["adapter_id"] == "persona-all"
    prefs = [json.loads(line) for line in open(ui.on_export(), encoding="utf-8")]
    assert prefs[0]["chosen"] == [{"role": "assistant", "content": answers[pending["a_side"]]}]


@pytest.mark.slow  # imports Gradio
def test_page_keeps_the_other_answer_when_a_side_fails(backend, engine_server, tmp_path):
    """Chat: the failed pane shows why, the other pane and both histories keep what came; the toast says it.
    Blind A/B: no vote on a broken pair, and the message calls the sides A and B. API: the cause and the kept
    answer."""
    import gradio as gr

    from persona_lora.demo.app import _Handlers
    from persona_lora.votes import VoteStore

    ui = _Handlers(backend, VoteStore(tmp_path / "votes.sqlite"), 200)
    engine_server.fail("error_event", model="persona-attn")
    updates = []
    with pytest.raises(gr.Error, match="the adapter side failed: .*illegal memory access"):
        for update in ui.on_send(M1, [], [], "persona-attn", SYSTEM, 16, 0, 1, 0):
            updates.append(update)
    _, base_chat, ad_chat, base_hist, ad_hist = updates[-1]
    assert base_chat[-1]["content"] == base_hist[-1]["content"] == expected("tiny-base")
    assert ad_hist[-1]["content"] == "persona-attn answers:"
    assert "illegal memory access" in ad_chat[-1]["content"] and "⚠" in ad_chat[-1]["content"]

    with pytest.raises(gr.Error) as e:
        list(ui.on_ab(M1, "persona-attn", SYSTEM, 16, 0, 1, 0))
    assert "adapter" not in e.value.message.split("failed:")[0] and "side failed" in e.value.message
    with pytest.raises(gr.Error, match="the base answer: 'tiny-base answers: Who are you\\? \\(turn 1\\)'"):
        ui.compare_api(M1, "persona-attn", "", 16)


@pytest.fixture
def app_url(backend, tmp_path):
    from persona_lora.demo.app import build_demo
    from persona_lora.votes import VoteStore

    app = build_demo(backend, votes=VoteStore(tmp_path / "votes.sqlite"), concurrency_limit=20, queue_size=64)
    _, url, _ = app.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    yield url
    app.close()


@pytest.mark.slow  # served over HTTP
def test_key_never_leaked(app_url, backend, engine_server, caplog, capfd, monkeypatch):
    """The key is in no page, API answer, error or log line (debug level, every logger), even when the engine
    echoes it in a 401 body."""
    import urllib.request

    from gradio_client import Client
    from gradio_client.exceptions import AppError

    c = Client(app_url, verbose=False)
    with caplog.at_level(logging.DEBUG):
        assert tuple(c.predict(M1, "persona-attn", SYSTEM, 8, api_name="/compare"))[1].startswith("persona-attn")
        engine_server.api_key = "sk-rotated"  # the engine now refuses our key and echoes it back
        with pytest.raises(AppError) as e:
            c.predict(M1, "persona-attn", SYSTEM, 8, api_name="/compare")
        assert "refused the key" in str(e.value)
        engine_server.api_key = KEY
        engine_server.fail("500", model="persona-attn", times=1)
        with pytest.raises(AppError):
            c.predict(M1, "persona-attn", SYSTEM, 8, api_name="/compare")
        pages = [urllib.request.urlopen(app_url + path, timeout=10).read().decode()
                 for path in ("", "config", "gradio_api/info")]
    texts = {"error": str(e.value), "logs": caplog.text, "output": "".join(capfd.readouterr()), **dict(
        zip(("page", "config", "api info"), pages)), "describe": json.dumps(backend.describe("persona-attn")),
        "repr": repr(backend) + repr(vars(backend))}
    assert "persona-attn" in texts["config"]  # the page is really there
    assert not [where for where, text in texts.items() if KEY in text], "the key leaked"


@pytest.mark.slow  # served over HTTP, 20 clients
def test_compare_api_and_twenty_concurrent_sessions(app_url, engine_server):
    """The compare API keeps its signature; 20 sessions at once each get their own adapter's answer to their own
    prompt, all streaming together."""
    from gradio_client import Client

    engine_server.token_delay = 0.02
    engine_server.script(lambda req: f"{req.model} on {req.last_user}:" + " word" * 48)  # 50 tokens, 1 s
    c = Client(app_url, verbose=False)
    endpoints = list(c.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert endpoints == ["/compare", "/battle", "/vote", "/standings"]  # the arena's next to compare
    names = ["persona-attn", "persona-all"]
    clients = [Client(app_url, verbose=False) for _ in range(20)]
    start = threading.Barrier(20)

    def run(i):
        start.wait()
        return clients[i].predict(f"question {i}", names[i % 2], SYSTEM, 64, api_name="/compare")

    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(run, range(20)))
    for i, got in enumerate(results):
        assert tuple(got) == tuple(f"{m} on question {i}:" + " word" * 48 for m in ("tiny-base", names[i % 2]))
    assert engine_server.peak_streams >= 10  # the sessions ran together (the clients connect one by one)


def test_twenty_concurrent_sessions_on_the_backend(backend, engine_server):
    """Twenty sessions streaming through one backend at once: every answer is its own, and all 40 requests (two
    sides each) were open at the same time: the engine sends no token until they are (`gather`), which a backend
    that queued them could never reach."""
    engine_server.token_delay = 0.005
    engine_server.gather(40)
    engine_server.script(lambda req: f"{req.model} on {req.last_user}:" + " word" * 38)  # 40 tokens
    names = ["persona-attn", "persona-all"]
    start = threading.Barrier(20)

    def run(i):
        start.wait()
        return list(backend.stream_compare(names[i % 2], [user(f"q{i}")], [user(f"q{i}")], SYSTEM,
                                           GenerationSettings(max_new_tokens=64)))[-1]

    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(run, range(20)))
    for i, got in enumerate(results):
        assert got == tuple(f"{m} on q{i}:" + " word" * 38 for m in ("tiny-base", names[i % 2]))
    assert engine_server.gathered and engine_server.peak_streams == 40


# ---------------------------------------------------------------------------------------------- the command


def demo_from_argv(argv):
    from persona_lora.cli import build_parser
    from persona_lora.demo.cli import build_from_args

    return build_from_args(build_parser().parse_args(["demo", *argv]))


def test_demo_command_refusals_for_the_openai_backend(engine_server, tmp_path, capsys):
    """`persona-lora demo --backend openai`: options of the other backend and a missing --endpoint are refused
    before anything starts; start-up failures are one line naming the option, exit 2."""
    from persona_lora.cli import main

    common = ["--base", "tiny-base", "--votes", str(tmp_path / "v.sqlite")]
    assert main(["demo", "--backend", "openai", *common]) == 2
    assert "--backend openai needs --endpoint URL" in capsys.readouterr().err
    assert main(["demo", "--backend", "openai", "--endpoint", engine_server.url, "--device", "cpu", *common]) == 2
    assert "--device only apply to the local backend" in capsys.readouterr().err
    assert main(["demo", "--endpoint", engine_server.url, *common]) == 2
    assert "--endpoint only apply to --backend openai" in capsys.readouterr().err
    assert main(["demo", "--backend", "openai", "--endpoint", engine_server.url, "--api-key-env", "NOPE_VAR",
                 *common]) == 2
    assert "NOPE_VAR is not set" in capsys.readouterr().err
    assert main(["demo", "--backend", "openai", "--endpoint", engine_server.url, "--api-key-env", KEY_ENV,
                 "--adapter", "persona-gone", *common]) == 2
    assert "--adapter persona-gone: the engine" in capsys.readouterr().err


@pytest.mark.slow  # imports Gradio
def test_demo_command_builds_the_page_on_the_openai_backend(engine_server, tmp_path):
    """The options reach the backend and the page: adapters, timeout, token cap, the generation slots."""
    common = ["--base", "tiny-base", "--votes", str(tmp_path / "v.sqlite")]
    engine, demo, _ = demo_from_argv(["--backend", "openai", "--endpoint", engine_server.url, "--api-key-env",
                                      KEY_ENV, "--adapter", "persona-all", "--timeout", "7", "--max-new-tokens",
                                      "20", "--concurrency", "3", *common])
    try:
        assert type(engine).__name__ == "OpenAIBackend" and engine.adapter_names() == ["persona-all"]
        assert (engine.timeout, engine.max_new_tokens_cap) == (7, 20)
        assert {f.concurrency_limit for f in demo.fns.values() if f.concurrency_id == "generate"} == {3}
        assert engine.compare("persona-all", M1, "", GenerationSettings(max_new_tokens=500))[1] == \
            expected("persona-all")
        assert {r.params["max_tokens"] for r in engine_server.requests} == {20}
    finally:
        engine.close()
