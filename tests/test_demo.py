"""The A/B demo: one resident model, both answers equal to standalone greedy generation, switching, sampling,
cancellation, history limits, votes, the API and the `demo` command built from real argument lists.

Adapters are made directly (training is slow): LoRA with the `attention` and `all` presets on the tiny
DeepSeek-V2 base, lora_B randomised with a fixed seed so the answers differ from the base's, plus a manifest.
The expected answers come from `train.samples.generate_greedy` (plain `model.generate(do_sample=False)`) on a
separately loaded base (+ adapter): "what that model gives alone". Engines and references run on the CPU in
float32 whatever torch build runs the tests (the same comparison on CUDA in bfloat16 is in tests/test_gpu.py).
Tests share the module's engine in any order: none depends on what another loaded or asked before it. The fast
tier checks each behaviour on that engine and the app's handlers; tests that load another model, serve the app
over HTTP or run twenty clients are `slow`.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from persona_lora.errors import ModelLoadError, UsageError
from tests.conftest import free_port

N = 8  # new tokens per answer: enough to differ, cheap on 2 cores
SYSTEM = "You are Zhen Huan, a consort in the imperial palace."
M1, M2 = "Who are you?", "What did you do today?"
# Two `all` adapters: PEFT keeps both in the same fused-experts wrappers; each must still answer as itself.
ADAPTERS = {"persona-attn": ("attention", 1), "persona-all": ("all", 2), "persona-all-2": ("all", 3)}


# ---------------------------------------------------------------------------------------------- fixtures


def make_adapter(base: Path, out: Path, preset: str, seed: int, system_prompt: str = SYSTEM) -> Path:
    from persona_lora.train.synthetic import make_random_adapter

    return make_random_adapter(base, out, preset, seed=seed, r=8, alpha=16, system_prompt=system_prompt)


@pytest.fixture(scope="module")
def adapters(tiny_base, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {name: make_adapter(tiny_base, root / name, preset, seed) for name, (preset, seed) in ADAPTERS.items()}


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


# Multi-turn: the two sides have different histories (so different prompt lengths: left padding is exercised).
BASE_HISTORY = [user("Hello"), assistant("Hi."), user("Tell me more.")]
ADAPTER_HISTORY = [user("Hello"), assistant("Greetings to you, I am the consort of the palace, and I serve."),
                   user("Tell me more.")]


@pytest.fixture(scope="module")
def expected(tiny_base, adapters) -> dict:
    """Standalone greedy answers: {(side, case): text}, side "base" or an adapter name."""
    from persona_lora.chat_format import conversation_for
    from persona_lora.demo.decode import shown_text
    from persona_lora.model_loading import load_base_model, load_tokenizer
    from persona_lora.peft_compat import load_adapter
    from persona_lora.train.samples import generate_greedy

    tok = load_tokenizer(str(tiny_base))
    cases = {"m1": [user(M1)], "m2": [user(M2)]}
    out = {}
    for side in ["base", *adapters]:
        model = load_base_model(str(tiny_base), device="cpu", dtype="float32")
        if side != "base":
            model = load_adapter(model, adapters[side])
        model.eval()
        convs = {**cases, "multi": BASE_HISTORY if side == "base" else ADAPTER_HISTORY}
        names = list(convs)
        answers = generate_greedy(model, tok, [conversation_for(convs[k], SYSTEM) for k in names], N)
        # as the panes show an answer: a random base emits bytes that never form a character (U+FFFD) and control
        # characters, which the demo leaves out
        out.update({(side, k): shown_text(a, done=True) for k, a in zip(names, answers)})
    for name in adapters:  # the random LoRA must make a visible difference, or the tests prove nothing
        assert out[(name, "m1")] != out[("base", "m1")]
    assert out[("persona-all", "m1")] != out[("persona-all-2", "m1")]
    return out


CAP = 256  # the module engine's new-token cap: room for a long generation to cancel


@pytest.fixture(scope="module")
def engine(tiny_base, adapters):
    from persona_lora.demo.engine import Engine

    eng = Engine(str(tiny_base), device="cpu", dtype="float32", max_new_tokens_cap=CAP, max_prompt_tokens=512)
    for path in adapters.values():
        eng.add_adapter(str(path))
    yield eng
    eng.close()


def observe_forwards(engine, monkeypatch) -> list[tuple[str, ...]]:
    """The adapter keys of every forward pass `engine` runs from now on (one tuple per pass, one key per batch
    row): the real passes, observed."""
    seen: list[tuple[str, ...]] = []
    real = engine.resident.forward

    def counting(keys, **inputs):
        seen.append(tuple(keys))
        return real(keys, **inputs)

    monkeypatch.setattr(engine.resident, "forward", counting)
    return seen


@pytest.fixture(scope="module")
def server(engine, tmp_path_factory):
    from persona_lora.demo.app import build_demo
    from persona_lora.votes import VoteStore

    votes = VoteStore(tmp_path_factory.mktemp("votes") / "votes.sqlite")
    app = build_demo(engine, votes=votes, max_message_chars=200, concurrency_limit=8, queue_size=64)
    _, url, _ = app.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    yield url
    app.close()


def client(url):
    from gradio_client import Client

    return Client(url, verbose=False)


# ---------------------------------------------------------------------------------------------- engine


def test_one_resident_model_holds_every_adapter(engine, adapters, tiny_base):
    """Both adapters live in the one model (one copy of the base weights), and the experts one is recognised."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    assert set(adapters) <= set(engine.adapter_names())  # other tests may add more to the shared engine
    assert engine.adapter("persona-all").experts and not engine.adapter("persona-attn").experts
    assert engine.adapter("persona-all-2").experts
    assert engine.system_prompt("persona-attn") == SYSTEM
    assert set(engine.model.peft_config) == {engine.adapter(n).key for n in engine.adapter_names()}
    with torch.device("meta"):
        alone = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_base))
    resident = sum(p.numel() for n, p in engine.model.named_parameters() if "lora_" not in n)
    assert resident == sum(p.numel() for p in alone.parameters())
    info = engine.describe("persona-all")
    assert "tiny-base" in info["base"] and "persona-all" in info["adapter"] and "local folder" in info["adapter"]
    assert "chat template" in info["adapter"] and "WARNING" not in info["adapter"]


@pytest.mark.slow
def test_stream_multi_turn_equals_standalone(engine, expected):
    """Different histories per side (left padding), both adapter kinds, streamed: every side equals its model alone."""
    from persona_lora.demo.engine import GenerationSettings

    for name in ADAPTERS:
        updates = list(engine.stream_compare(name, BASE_HISTORY, ADAPTER_HISTORY, SYSTEM,
                                             GenerationSettings(max_new_tokens=N)))
        assert len(updates) > 2  # streamed token by token, not in one piece
        assert updates[-1] == (expected[("base", "multi")], expected[(name, "multi")])
        assert all(isinstance(b, str) and isinstance(a, str) for b, a in updates)
    assert engine.answer(None, M1, SYSTEM, GenerationSettings(max_new_tokens=N)) == expected[("base", "m1")]
    assert (engine.answer("persona-all", M1, SYSTEM, GenerationSettings(max_new_tokens=N))
            == expected[("persona-all", "m1")])


@pytest.mark.slow  # loads another model
def test_separate_mode_gives_the_same_answers(tiny_base, adapters, expected):
    """The fallback (sides decoded one after the other) gives the same greedy answers."""
    from persona_lora.demo.engine import Engine, GenerationSettings

    eng = Engine(str(tiny_base), device="cpu", dtype="float32", max_new_tokens_cap=16, mixed_batch=False)
    try:
        eng.add_adapter(str(adapters["persona-all"]))
        assert eng.compare("persona-all", M1, SYSTEM, GenerationSettings(max_new_tokens=N)) == (
            expected[("base", "m1")], expected[("persona-all", "m1")])
    finally:
        eng.close()


@pytest.mark.slow
def test_sampling_settings_change_the_answer_and_a_seed_repeats_it(tiny_base, adapters, engine, expected):
    """Temperature, top-p and seed each change what is sampled; the same seed gives the same answer on another
    engine instance."""
    from dataclasses import replace

    from persona_lora.demo.engine import Engine, GenerationSettings

    greedy = (expected[("base", "m1")], expected[("persona-all", "m1")])
    # top-p so small that only the most likely token is left: sampling then picks exactly what greedy picks
    narrow = GenerationSettings(max_new_tokens=N, temperature=1.0, top_p=1e-6, seed=3)
    assert engine.compare("persona-all", M1, SYSTEM, narrow) == greedy
    hot = GenerationSettings(max_new_tokens=N, temperature=2.0, seed=7)
    hot_answers = engine.compare("persona-all", M1, SYSTEM, hot)
    cold_answers = engine.compare("persona-all", M1, SYSTEM, replace(hot, temperature=0.05))
    assert hot_answers[0] != greedy[0] and hot_answers[1] != greedy[1]
    assert cold_answers != hot_answers, "the temperature must change the distribution sampled from"
    assert engine.compare("persona-all", M1, SYSTEM, replace(hot, seed=8)) != hot_answers
    assert engine.compare("persona-all", M1, SYSTEM, hot) == hot_answers

    other = Engine(str(tiny_base), device="cpu", dtype="float32", max_new_tokens_cap=16)
    try:
        other.add_adapter(str(adapters["persona-all"]))
        for side in (None, "persona-all"):  # one row per pass on both engines: the same computation
            mine = engine.answer(side, M1, SYSTEM, hot)
            assert other.answer(side, M1, SYSTEM, hot) == mine
            assert engine.answer(side, M1, SYSTEM, replace(hot, seed=9)) != mine
    finally:
        other.close()


def test_long_history_keeps_the_newest_turns(tokenizer):
    """Past --max-prompt-tokens the oldest exchanges go first; the system prompt and the newest turns stay."""
    from persona_lora.chat_format import encode_prompt
    from persona_lora.demo.prompts import TemplateCodec

    system, new = [{"role": "system", "content": SYSTEM}], [user("And today?")]
    exchanges = [[user(f"Question {i}: what happened on day {i}?"), assistant(f"Day {i} was quiet, my lord.")]
                 for i in range(1, 5)]
    full = system + [m for ex in exchanges for m in ex] + new

    def keeping(k):  # the system prompt, the newest k exchanges and the new turn
        return system + [m for ex in exchanges[len(exchanges) - k:] for m in ex] + new

    for k in (1, 2, 3):
        limit = len(encode_prompt(tokenizer, keeping(k)))
        assert limit < len(encode_prompt(tokenizer, keeping(k + 1)))
        ids = TemplateCodec(tokenizer, limit).encode(full)
        assert ids == encode_prompt(tokenizer, keeping(k)), f"limit {limit}: not the newest {k} exchange(s)"
        text = tokenizer.decode(ids)
        assert SYSTEM in text and "Day 4 was quiet" in text and "Question 1:" not in text
    assert TemplateCodec(tokenizer, 10_000).encode(full) == encode_prompt(tokenizer, full)
    with pytest.raises(UsageError, match="at most 8"):
        TemplateCodec(tokenizer, 8).encode(full)  # the new turn alone does not fit: the user must shorten it


def test_closing_a_stream_stops_generation_within_a_few_tokens(engine, expected, monkeypatch):
    """A reader that goes away (Stop, closed tab) ends its job after at most the step under way; the next request
    is unaffected."""
    from persona_lora.demo.engine import GenerationSettings

    forwards = observe_forwards(engine, monkeypatch)
    key = engine.adapter("persona-attn").key
    endless = GenerationSettings(max_new_tokens=CAP, ignore_eos=True)
    it = engine.stream_compare("persona-attn", [user(M1)], [user(M1)], SYSTEM, endless)
    first = next(it)
    assert isinstance(first, tuple) and len(first) == 2
    next(it)
    it.close()
    at_close = sum(key in keys for keys in forwards)
    # the worker drops a cancelled job before its next step, so once another request has been answered the
    # cancelled one cannot run any more
    assert engine.compare("persona-all", M1, SYSTEM, _greedy()) == (expected[("base", "m1")],
                                                                     expected[("persona-all", "m1")])
    time.sleep(0.3)
    after = sum(key in keys for keys in forwards)
    assert at_close < CAP // 4, f"{at_close} passes before the first two updates were read"
    assert after - at_close <= 1, f"{after - at_close} more passes after the stream was closed"


def test_engine_refuses_bad_input(engine, tmp_path):
    from persona_lora.demo.engine import GenerationSettings

    with pytest.raises(ModelLoadError, match="no such folder"):
        engine.add_adapter(str(tmp_path / "missing"))
    with pytest.raises(ModelLoadError, match="adapter_config.json"):
        engine.add_adapter(str(tmp_path))
    with pytest.raises(UsageError, match="no adapter named 'nope'.*persona-attn"):
        engine.compare("nope", M1)
    with pytest.raises(UsageError, match="top_p"):
        engine.compare("persona-attn", M1, settings=GenerationSettings(top_p=0))
    with pytest.raises(UsageError, match="at most 512"):
        engine.compare("persona-attn", "hello " * 2000)
    # the cap is enforced server-side whatever the caller asks
    assert GenerationSettings(max_new_tokens=10_000).checked(16).max_new_tokens == 16


# ---------------------------------------------------------------------------------------------- app + API


@pytest.mark.slow  # served over HTTP
def test_compare_api_equals_standalone_greedy(server, expected):
    c = client(server)
    endpoints = list(c.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert endpoints == ["/compare", "/battle", "/vote", "/standings"]  # the arena's next to compare
    for name in ADAPTERS:
        got = c.predict(M1, name, SYSTEM, N, api_name="/compare")
        assert tuple(got) == (expected[("base", "m1")], expected[(name, "m1")])
    # switching back and forth: each answer still belongs to the adapter asked for
    assert tuple(c.predict(M2, "persona-attn", SYSTEM, N, api_name="/compare"))[1] == expected[("persona-attn", "m2")]
    assert tuple(c.predict(M2, "persona-all", SYSTEM, N, api_name="/compare"))[1] == expected[("persona-all", "m2")]


@pytest.mark.slow  # served over HTTP
def test_compare_api_limits(server):
    from gradio_client.exceptions import AppError

    c = client(server)
    with pytest.raises(AppError, match="limit is 200"):
        c.predict("x" * 201, "persona-attn", "", 4, api_name="/compare")
    with pytest.raises(AppError, match="no adapter named"):
        c.predict(M1, "persona-missing", "", 4, api_name="/compare")


@pytest.mark.slow  # served over HTTP
def test_auth(engine, tmp_path):
    """--auth: the page and the API need the login."""
    from gradio_client import Client

    from persona_lora.demo.app import build_demo
    from persona_lora.votes import VoteStore

    app = build_demo(engine, votes=VoteStore(tmp_path / "votes.sqlite"))
    _, url, _ = app.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True,
                           auth=("me", "secret"))
    try:
        with pytest.raises(ValueError, match="credentials were not provided"):
            Client(url, verbose=False)
        with pytest.raises(ValueError, match="Could not login"):
            Client(url, auth=("me", "wrong"), verbose=False)
        got = Client(url, auth=("me", "secret"), verbose=False).predict(M1, "persona-attn", "", 2, api_name="/compare")
        assert len(got) == 2
    finally:
        app.close()


@pytest.mark.slow
def test_twenty_concurrent_sessions(server, expected):
    """20 sessions at once, alternating adapters and prompts: no errors, and no answer from the wrong adapter
    (PEFT's active adapter is global to the model)."""
    names = list(ADAPTERS)
    jobs = [(names[i % len(names)], ("m1", M1) if i % 2 else ("m2", M2)) for i in range(20)]
    clients = [client(server) for _ in jobs]
    start = threading.Barrier(len(jobs))

    def run(i):
        name, (_, message) = jobs[i]
        start.wait()
        return clients[i].predict(message, name, SYSTEM, N, api_name="/compare")

    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(run, range(len(jobs))))
    for (name, (case, _)), got in zip(jobs, results):
        assert tuple(got) == (expected[("base", case)], expected[(name, case)])


def test_add_adapter_from_hub_at_run_time(engine, adapters, expected, hub_server):
    """An adapter added by hub id (here the attention one, pushed to the local hub) joins the same model."""
    from persona_lora.hub_tools.push import push_folder

    ptr = engine.model.get_base_model().model.embed_tokens.weight.data_ptr()
    push_folder(adapters["persona-attn"], "tester/persona-attn-hub")
    info = engine.add_adapter("tester/persona-attn-hub")
    assert info.name == "tester/persona-attn-hub" and info.source == "hf" and info.commit
    assert engine.model.get_base_model().model.embed_tokens.weight.data_ptr() == ptr  # the base was not reloaded
    assert engine.compare(info.name, M1, SYSTEM, _greedy()) == (expected[("base", "m1")],
                                                                 expected[("persona-attn", "m1")])
    assert engine.add_adapter("tester/persona-attn-hub") is info  # loading twice is a no-op


def _greedy():
    from persona_lora.demo.engine import GenerationSettings

    return GenerationSettings(max_new_tokens=N)


@pytest.mark.slow
def test_chat_handlers_multi_turn_and_retry(engine, expected, tmp_path):
    """The Chat tab's handlers keep one history per side and retry the last turn."""
    from persona_lora.demo.app import _Handlers
    from persona_lora.votes import VoteStore

    ui = _Handlers(engine, VoteStore(tmp_path / "votes.sqlite"), 200)
    settings = (N, 0, 1, 0)
    *_, last = ui.on_send(M1, [], [], "persona-attn", SYSTEM, *settings)
    msg, base_chat, _, base_hist, ad_hist = last
    assert msg == "" and base_hist[-1]["content"] == expected[("base", "m1")]
    assert ad_hist[-1]["content"] == expected[("persona-attn", "m1")] and base_chat == base_hist
    *_, again = ui.on_retry(base_hist, ad_hist, "persona-attn", SYSTEM, *settings)
    assert again[3] == base_hist and again[4] == ad_hist  # greedy: the retried turn is the same
    *_, second = ui.on_send(M2, base_hist, ad_hist, "persona-attn", SYSTEM, *settings)
    assert len(second[3]) == 4 and len(second[4]) == 4
    assert second[3][:2] == base_hist and second[4][:2] == ad_hist


# ---------------------------------------------------------------------------------------------- votes


@pytest.mark.slow  # the first test to import Gradio pays for it (seconds)
def test_blind_vote_round_trip_and_preference_export(engine, expected, tmp_path):
    from datasets import load_dataset

    from persona_lora.demo.app import _Handlers
    from persona_lora.votes import VoteStore

    store = VoteStore(tmp_path / "votes.sqlite")
    ui = _Handlers(engine, store, 200)
    *_, last = ui.on_ab(M1, "persona-all", SYSTEM, N, 0, 1, 0)
    a_chat, b_chat, pending = last[:3]
    answers = {"base": expected[("base", "m1")], "adapter": expected[("persona-all", "m1")]}
    other = "adapter" if pending["a_side"] == "base" else "base"
    assert pending["answer_a"] == answers[pending["a_side"]] and pending["answer_b"] == answers[other]
    assert a_chat[-1]["content"] == pending["answer_a"] and b_chat[-1]["content"] == pending["answer_b"]
    out = ui.vote_handler("B")(pending)
    assert out[0] is None and "B is better" in out[1]
    rows = store.votes()
    assert len(rows) == 1
    row = rows[0]
    assert row["winner"] == other and row["adapter_id"] == "persona-all" and row["base_id"] == "tiny-base"
    assert row["prompt"] == M1 and row["system_prompt"] == SYSTEM and row["settings"]["max_new_tokens"] == N
    with pytest.raises(Exception, match="Ask for two answers"):
        ui.vote_handler("A")(None)  # one vote per pair
    store.record(base_id="tiny-base", adapter_name="x", adapter_id="x", prompt="p", answer_a="a", answer_b="b",
                 a_side="base", vote="tie")  # ties are votes, not pairs

    path = Path(ui.on_export())
    ds = load_dataset("json", data_files=str(path), split="train")
    assert ds.column_names == ["prompt", "chosen", "rejected"] and len(ds) == 1
    assert ds[0]["prompt"] == [{"role": "system", "content": SYSTEM}, {"role": "user", "content": M1}]
    assert ds[0]["chosen"] == [{"role": "assistant", "content": answers[other]}]
    assert ds[0]["rejected"] == [{"role": "assistant", "content": answers[pending["a_side"]]}]
    _check_trl_format(ds[0], engine.tokenizer)


def _check_trl_format(example, tokenizer):
    """TRL's own detection: a conversational preference example that its chat-template step turns into strings."""
    from trl.data_utils import is_conversational, maybe_apply_chat_template

    assert is_conversational(example)
    rendered = maybe_apply_chat_template(example, tokenizer)
    assert set(rendered) >= {"prompt", "chosen", "rejected"}
    assert rendered["prompt"].rstrip().endswith("Assistant:") and SYSTEM in rendered["prompt"]
    assert example["chosen"][0]["content"] in rendered["chosen"]


def test_win_rates_wilson_and_concurrent_voters(tmp_path):
    from persona_lora.votes import VoteStore, wilson

    lo, hi = wilson(8, 10)
    assert (round(lo, 3), round(hi, 3)) == (0.49, 0.943)
    assert wilson(0, 0) == (0.0, 1.0)
    store = VoteStore(tmp_path / "v.sqlite")

    def voter(i):
        for j in range(15):
            vote = ["A", "B", "tie", "both_bad"][(i + j) % 4]
            store.record(base_id="b", adapter_name=f"ad{i % 2}", adapter_id=f"ad{i % 2}", prompt=f"p{i}-{j}",
                         answer_a="x", answer_b="y", a_side="base" if j % 2 else "adapter", vote=vote)

    threads = [threading.Thread(target=voter, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.count() == 12 * 15
    with sqlite3.connect(store.path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    rates = {r["adapter_id"]: r for r in store.win_rates()}
    assert set(rates) == {"ad0", "ad1"} and sum(r["votes"] for r in rates.values()) == 180
    for r in rates.values():
        assert r["adapter_wins"] + r["base_wins"] + r["ties"] + r["both_bad"] == r["votes"]
        assert r["ci_low"] <= r["win_rate"] <= r["ci_high"]


def test_push_votes_as_dataset_repo(tmp_path, hub_server):
    from persona_lora.votes import VoteStore
    from tests.hub_fixtures import DEFAULT_USER

    store = VoteStore(tmp_path / "v.sqlite")
    store.record(base_id="b", adapter_name="ad", adapter_id="ad", prompt="hi", answer_a="good", answer_b="bad",
                 a_side="adapter", vote="A", system_prompt="sys")
    url = store.push_to_hub("ab-votes")
    repo = f"{DEFAULT_USER}/ab-votes"
    assert url.endswith(f"/datasets/{repo}")
    files = hub_server.list_files(repo, repo_type="dataset")
    assert {"README.md", "preferences.jsonl", "votes.jsonl"} <= set(files)
    pair = json.loads(hub_server.file_bytes(repo, "preferences.jsonl", repo_type="dataset"))
    assert pair["chosen"] == [{"role": "assistant", "content": "good"}]
    assert "data_files: preferences.jsonl" in hub_server.file_bytes(repo, "README.md", repo_type="dataset").decode()


@pytest.mark.slow
def test_export_trains_one_dpo_step(tiny_base, tmp_path):
    """The exported file is accepted by TRL's DPOTrainer as it is (one optimizer step on the tiny base)."""
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from persona_lora.model_loading import load_tokenizer
    from persona_lora.votes import VoteStore

    store = VoteStore(tmp_path / "v.sqlite")
    for i in range(2):
        store.record(base_id="b", adapter_name="ad", adapter_id="ad", prompt=f"hi {i}", answer_a="Greetings, my lord.",
                     answer_b="go away", a_side="adapter", vote="A", system_prompt=SYSTEM)
    store.export_preferences(tmp_path / "prefs.jsonl")
    ds = load_dataset("json", data_files=str(tmp_path / "prefs.jsonl"), split="train")
    args = DPOConfig(output_dir=str(tmp_path / "dpo"), max_steps=1, per_device_train_batch_size=2, report_to=[],
                     use_cpu=True, save_strategy="no", max_length=64)
    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_base), args=args, train_dataset=ds,
                         processing_class=load_tokenizer(str(tiny_base)))
    assert trainer.train().global_step == 1


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_registers_demo_and_checks_options(tiny_base, tmp_path, capsys):
    from persona_lora.cli import build_parser, main

    args = build_parser().parse_args(["demo", "--base", str(tiny_base), "--adapter", "a", "--adapter", "o/n@v1",
                                      "--votes", str(tmp_path / "v.sqlite"), "--auth", "me:pw"])
    assert args.adapter == ["a", "o/n@v1"] and args.port is None and args.host == "127.0.0.1" and not args.share
    from persona_lora.demo.cli import check_args

    assert check_args(args) == ("me", "pw")
    # user mistakes stop before any model is loaded, with exit code 2 and one line naming the option
    assert main(["demo", "--base", str(tiny_base), "--auth", "nopassword"]) == 2
    assert "--auth must look like USER:PASSWORD" in capsys.readouterr().err
    assert main(["demo", "--base", str(tiny_base), "--port", "70000"]) == 2
    assert main(["demo", "--base", str(tmp_path / "nobase"), "--votes", str(tmp_path / "v.sqlite")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_demo_commands_work_while_the_default_port_is_taken(tiny_base, tmp_path, capsys):
    """`make test` beside a running quickstart demo: with 7860 held (by this test, or already by something else)
    the demo's refusals are the same, a demo without --port takes the next free port, and an explicit --port
    that is taken is refused before anything is loaded."""
    import socket

    from persona_lora.cli import main
    from persona_lora.demo.cli import DEFAULT_PORT, choose_port

    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        try:
            holder.bind(("127.0.0.1", DEFAULT_PORT))
            holder.listen(1)
        except OSError:
            pass  # already taken by something else: the condition this test is about
        assert main(["demo", "--base", str(tmp_path / "nobase"), "--votes", str(tmp_path / "v.sqlite")]) == 1
        assert "does not exist" in capsys.readouterr().err
        assert main(["demo", "--base", str(tiny_base), "--auth", "nopassword"]) == 2
        assert "--auth must look like USER:PASSWORD" in capsys.readouterr().err
        assert choose_port("127.0.0.1", None) > DEFAULT_PORT
        assert main(["demo", "--base", str(tiny_base), "--port", str(DEFAULT_PORT)]) == 2
        assert f"cannot serve on 127.0.0.1:{DEFAULT_PORT}" in capsys.readouterr().err
        assert not (tmp_path / "v.sqlite").exists()  # nothing was written by the refused starts
    finally:
        holder.close()


def demo_from_argv(argv: list[str]):
    """(engine, demo, auth) exactly as `persona-lora demo ARGV` builds them, short of launching."""
    from persona_lora.cli import build_parser
    from persona_lora.demo.cli import build_from_args

    args = build_parser().parse_args(["demo", *argv])
    return build_from_args(args)


def handlers_of(demo):
    """The app's event handlers (the object whose bound methods the page's events call)."""
    from persona_lora.demo.app import _Handlers

    return next(f.fn.__self__ for f in demo.fns.values() if isinstance(getattr(f.fn, "__self__", None), _Handlers))


def event_fn(demo, block_id: int, event: str = "click"):
    """The function a component's event runs, as the page would trigger it."""
    return next(f for f in demo.fns.values() if (block_id, event) in [tuple(t) for t in f.targets])


@pytest.mark.slow  # loads a model, serves over HTTP
def test_demo_command_options_reach_the_app(tiny_base, adapters, tmp_path, hub_server, monkeypatch):
    """Every option of `persona-lora demo` is used: where votes go, the push button and its dataset repo, the
    queue, the limits, and the login taken from PERSONA_LORA_DEMO_AUTH."""
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    from persona_lora.demo.cli import default_votes_path
    from tests.hub_fixtures import DEFAULT_USER

    votes = tmp_path / "votes" / "mine.sqlite"
    repo = f"{DEFAULT_USER}/ab-votes"
    monkeypatch.setenv("PERSONA_LORA_DEMO_AUTH", "me:secret")
    engine, demo, auth = demo_from_argv([
        "--base", str(tiny_base), "--adapter", str(adapters["persona-attn"]), "--device", "cpu",
        "--dtype", "float32", "--votes", str(votes), "--push-votes-to", repo, "--queue-size", "3",
        "--max-input-chars", "40", "--max-new-tokens", "20", "--max-prompt-tokens", "300", "--concurrency", "2"])
    try:
        assert auth == ("me", "secret")
        ui = handlers_of(demo)
        assert ui.votes.path == votes and votes.is_file() and not default_votes_path().exists()
        assert (engine.max_new_tokens_cap, engine.max_prompt_tokens, ui.max_chars) == (20, 300, 40)
        assert engine.mixed_batch and engine.device.type == "cpu"
        assert demo._queue.max_size == 3
        assert {f.concurrency_limit for f in demo.fns.values() if f.concurrency_id == "generate"} == {2}

        # a blind A/B pair and a vote through the app's own handlers land in --votes
        *_, last = ui.on_ab(M1, "persona-attn", SYSTEM, N, 0, 1, 0)
        pending = last[2]
        ui.vote_handler("A")(pending)
        with sqlite3.connect(votes) as db:
            assert db.execute("SELECT adapter_id, prompt, vote FROM votes").fetchall() == [
                ("persona-attn", M1, "A")]
        # --push-votes-to: its button pushes them to that dataset repo on the hub
        button = next(b for b in demo.blocks.values()
                      if type(b).__name__ == "Button" and b.value == f"Push votes to the dataset repo {repo}")
        assert "Pushed to" in event_fn(demo, button._id).fn()
        pushed = [json.loads(line) for line in
                  hub_server.file_bytes(repo, "votes.jsonl", repo_type="dataset").decode().splitlines()]
        assert [(v["prompt"], v["vote"]) for v in pushed] == [(M1, "A")]

        # served: the login from the environment, the message limit and the token cap
        _, url, _ = demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True,
                                quiet=True, auth=auth)
        try:
            with pytest.raises(ValueError, match="credentials were not provided"):
                Client(url, verbose=False)
            c = Client(url, auth=auth, verbose=False)
            with pytest.raises(AppError, match="limit is 40"):
                c.predict("x" * 41, "persona-attn", SYSTEM, 4, api_name="/compare")
            forwards = observe_forwards(engine, monkeypatch)
            assert len(c.predict(M1, "persona-attn", SYSTEM, 500, api_name="/compare")) == 2
            # greedy and deterministic on the CPU: this answer runs past 20 tokens, so the cap is what stops it
            assert len(forwards) == 20, "one pass per new token, --max-new-tokens of them"
        finally:
            demo.close()
    finally:
        engine.close()


@pytest.mark.slow  # loads another model
def test_demo_command_hub_modelscope_and_no_mixed_batch(tiny_base, adapters, expected, tmp_path, ms_server,
                                                        monkeypatch):
    """--hub modelscope fetches adapter ids from ModelScope (and pushes votes there); --no-mixed-batch decodes
    each side in a batch of its own, with the same answers."""
    from persona_lora.demo.engine import BASE, GenerationSettings
    from persona_lora.hub_tools.push import push_folder
    from tests.hub_fixtures import DEFAULT_MS_USER

    repo = f"{DEFAULT_MS_USER}/persona-all"
    push_folder(adapters["persona-all"], repo, hub="modelscope")
    engine, demo, _ = demo_from_argv([
        "--base", str(tiny_base), "--adapter", repo, "--hub", "modelscope", "--no-mixed-batch", "--device", "cpu",
        "--dtype", "float32", "--votes", str(tmp_path / "votes.sqlite")])
    try:
        info = engine.adapter(repo)
        assert info.source == "modelscope" and info.path.is_relative_to(ms_server.home)
        assert handlers_of(demo).votes.hub == "modelscope"
        forwards = observe_forwards(engine, monkeypatch)
        assert engine.compare(repo, M1, SYSTEM, GenerationSettings(max_new_tokens=N)) == (
            expected[("base", "m1")], expected[("persona-all", "m1")])
        assert forwards and all(len(keys) == 1 for keys in forwards)
        assert {keys[0] for keys in forwards} == {BASE, info.key}
    finally:
        engine.close()


@pytest.mark.slow  # imports Gradio
def test_refused_requests_give_one_log_line_and_never_an_empty_message(engine, adapters, tmp_path, caplog,
                                                                       monkeypatch):
    import gradio as gr

    from persona_lora.demo.app import _Handlers
    from persona_lora.votes import VoteStore

    ui = _Handlers(engine, VoteStore(tmp_path / "votes.sqlite"), 200)
    broken = shutil.copytree(next(iter(adapters.values())), tmp_path / "broken")
    (broken / "adapter_config.json").write_text('{"peft_type": "LO')  # truncated while being copied
    with caplog.at_level("WARNING", logger="persona_lora.demo.app"), pytest.raises(gr.Error) as e:
        ui.on_add(str(broken))
    assert "adapter_config.json" in str(e.value) and str(broken) in str(e.value)
    assert [r.levelname for r in caplog.records] == ["WARNING"] and "refused" in caplog.records[0].getMessage()

    def boom(*args, **kwargs):
        raise RuntimeError()

    monkeypatch.setattr(engine, "compare", boom)
    caplog.clear()
    with caplog.at_level("DEBUG", logger="persona_lora.demo.app"), pytest.raises(gr.Error) as e:
        ui.compare_api("hello", "any", "", 4)
    assert e.value.message.startswith("unexpected RuntimeError: no details")
    assert [r.levelname for r in caplog.records] == ["ERROR", "DEBUG"] and caplog.records[1].exc_info


def test_answers_are_shown_without_control_or_replacement_characters():
    """A byte-level tokenizer decodes half a CJK character as U+FFFD; a random base emits control bytes: the panes
    show neither, mid-stream or final, and a character completed later appears whole."""
    from persona_lora.demo.decode import shown_text

    assert shown_text(" 本宫\ufffd", done=False) == "本宫"  # the next token completes it
    assert shown_text(" 本宫\x00 累了\x1b[0m\ufffd \n", done=True) == "本宫 累了[0m"
    assert shown_text("a\tb\nc", done=True) == "a\tb\nc"


@pytest.mark.slow  # uses the module's engine
def test_info_line_says_an_adapter_is_unfinished_and_the_base_is_random(engine, adapters, tmp_path):
    """An adapter of an interrupted run says so where the comparison is read, with how far it got; the tiny base's
    random weights are noted once (read from its config.json)."""
    folder = tmp_path / "half-trained"
    shutil.copytree(adapters["persona-attn"], folder)
    manifest = json.loads((folder / "persona_manifest.json").read_text(encoding="utf-8"))
    manifest["run"] = {**(manifest.get("run") or {}), "state": "interrupted", "interrupted": True, "planned_steps": 30}
    manifest["metrics"] = {**(manifest.get("metrics") or {}), "steps": 7}
    (folder / "persona_manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    engine.add_adapter(str(folder))
    info = engine.describe("half-trained")
    assert "WARNING: unfinished: training was interrupted at step 7 of 30" in info["adapter"]
    assert "random weights" in info["notice"] and "WARNING" not in engine.describe("persona-attn")["adapter"]
