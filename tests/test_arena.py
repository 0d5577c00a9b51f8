"""The arena: pair sampling, battles and votes on the real engine (tiny base, adapters made here), one vote per
battle, content identity, arena votes as DPO data, the `battle` / `vote` / `standings` API over HTTP, the openai
backend, and the `leaderboard` command on the votes the arena cast."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from persona_lora.errors import UsageError
from tests.conftest import free_port
from tests.test_demo import make_adapter

N = 6  # new tokens per answer


@pytest.fixture(scope="module")
def adapters(tiny_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("arena-adapters")
    return {name: make_adapter(tiny_base, root / name, "attention", seed) for name, seed in (("one", 1), ("two", 2))}


@pytest.fixture(scope="module")
def engine(tiny_base, adapters):
    from persona_lora.demo.engine import Engine

    eng = Engine(str(tiny_base), device="cpu", dtype="float32", max_new_tokens_cap=32, max_prompt_tokens=256)
    for path in adapters.values():
        eng.add_adapter(str(path))
    yield eng
    eng.close()


def greedy():
    from persona_lora.demo.decode import GenerationSettings

    return GenerationSettings(max_new_tokens=N)


# ---------------------------------------------------------------------------------------------- sampling


def test_pair_weights_favour_possible_leaders_and_models_with_few_votes():
    from persona_lora.demo.arena import FLOOR, contention, pair_weights
    from persona_lora.ratings import bradley_terry, tally

    rng = np.random.default_rng(0)
    votes = [("a", "b", "left" if rng.random() < 0.5 else "right") for _ in range(200)]  # a, b: equal, on top
    votes += [("c", "e", "left" if rng.random() < 0.5 else "right") for _ in range(100)]  # c, e: equal, below
    for low in "ce":
        votes += [("a", low, "left")] * 190 + [("a", low, "right")] * 10
    votes += [("b", "d", "left"), ("d", "b", "left")]  # d: two votes only
    r = bradley_terry(tally(votes), rounds=300)
    keys = ["a", "b", "c", "d", "e", "new"]
    c = contention(keys, r)
    assert c["new"] == 1 and max(c["a"], c["b"]) == 1 and min(c["a"], c["b"]) > 0.5  # the leader and its rival
    assert c["c"] == 0 and c["e"] == 0  # certainly below the leader
    assert c["d"] > 0.5  # few votes: a wide interval that still reaches the leader's
    w = pair_weights(keys, r)
    assert w[("c", "e")] == pytest.approx(FLOOR)  # a settled pair keeps a small share
    assert w[("a", "b")] > w[("a", "c")] > w[("c", "e")]
    assert w[("b", "d")] > w[("a", "c")] and w[("a", "new")] > w[("a", "c")]


# ---------------------------------------------------------------------------------------------- battles


def test_battle_vote_reveal_and_one_vote_per_battle(engine, tmp_path):
    from persona_lora.demo.arena import Arena
    from persona_lora.votes import VoteStore

    store = VoteStore(tmp_path / "votes.sqlite")
    arena = Arena(engine, store, rounds=100)
    one, two = arena.contestant("one"), arena.contestant("two")
    assert one.sha256 and one.key == f"sha256:{one.sha256}@{engine.base_id}" and one.key != two.key
    battle = arena.battle("Who are you?", "", greedy())
    assert {battle.a.key, battle.b.key} <= {c.key for c in arena.contestants()} and battle.a.key != battle.b.key
    shown = arena.vote(battle.id, "A")
    assert shown == {"vote_id": 1, "vote": "A", "A": battle.a.name, "B": battle.b.name}
    with pytest.raises(UsageError, match="already has its vote"):
        arena.vote(battle.id, "B")
    with pytest.raises(UsageError, match="no battle 'nope' is waiting"):
        arena.vote("nope", "A")
    second = arena.battle("Who are you?", "", greedy())
    with pytest.raises(UsageError, match="vote must be one of"):
        arena.vote(second.id, "C")
    arena.vote(second.id, "tie")  # a refused vote left the battle waiting
    rows = store.votes()
    assert len(rows) == 2 and rows[0]["uid"] == battle.id and rows[0]["settings"]["mode"] == "arena"
    first = rows[0]
    winner_answer = first["answer_a"]  # A won: the answer shown as A
    assert winner_answer == battle.answer_a
    # the stored slots are in the fixed order and name the winner's content
    from persona_lora.vote_sources import model_keys

    left, right = model_keys(first)
    assert {left, right} == {battle.a.key, battle.b.key}
    assert (left if first["winner"] == "base" else right) == battle.a.key


def test_the_same_weights_under_another_name_are_one_model(engine, adapters, tmp_path):
    from persona_lora.demo.arena import Arena
    from persona_lora.votes import VoteStore

    arena = Arena(engine, VoteStore(tmp_path / "votes.sqlite"))
    before = [c.key for c in arena.contestants()]
    renamed = tmp_path / "renamed-copy"
    shutil.copytree(adapters["one"], renamed)
    engine.add_adapter(str(renamed))
    assert "renamed-copy" in engine.adapter_names()
    assert [c.key for c in arena.contestants()] == before  # one contestant: its votes stay together
    assert arena.contestant("renamed-copy").key == arena.contestant("one").key


def test_arena_votes_between_adapters_become_dpo_pairs_with_the_usual_filters(engine, tmp_path):
    from persona_lora.demo.arena import Arena
    from persona_lora.train.preference_data import load_preferences
    from persona_lora.votes import VoteStore

    store = VoteStore(tmp_path / "votes.sqlite")
    arena = Arena(engine, store)
    pair = (arena.contestant("one"), arena.contestant("two"))
    kept = None
    for vote in ("B", "tie"):
        battle = arena.battle("Tell me about the palace.", "", greedy(), pair=pair)
        arena.vote(battle.id, vote)
        kept = kept or battle
    assert all(v["left_id"] for v in store.votes())  # adapter against adapter
    prefs = load_preferences(str(store.path))
    assert len(prefs.pairs) == 1  # the tie is dropped, as for any vote
    assert prefs.pairs[0]["chosen"] == kept.answer_b and prefs.pairs[0]["rejected"] == kept.answer_a


def test_live_standings_mark_models_not_loaded_and_votes_of_other_bases(engine, tmp_path):
    from persona_lora.demo.arena import Arena
    from persona_lora.votes import VoteStore

    store = VoteStore(tmp_path / "votes.sqlite")
    arena = Arena(engine, store, rounds=100)
    assert arena.standings().rows() == []
    store.record(base_id=engine.base_id, adapter_name="gone", adapter_id="gone", prompt="p", answer_a="x",
                 answer_b="y", a_side="base", vote="B")
    store.record(base_id="another-base", adapter_name="elsewhere", adapter_id="elsewhere", prompt="p", answer_a="x",
                 answer_b="y", a_side="base", vote="A")
    standings = arena.standings()
    names = [row[1] for row in standings.rows()]
    assert "gone (not loaded)" in names and "elsewhere" not in " ".join(names)
    assert "one" in names and "no votes" in [row[2] for row in standings.rows() if row[1] == "one"]
    assert "1 vote(s) of other bases" in standings.note() and "(not loaded)" in standings.note()


def test_a_backend_without_pairs_battles_against_the_base_only(engine, tmp_path):
    from persona_lora.demo.arena import Arena
    from persona_lora.votes import VoteStore

    class BaseOnly:  # the engine without stream_pair: what a backend that cannot pair two adapters offers
        def __init__(self, inner):
            self._inner = inner

        def __getattr__(self, name):
            if name in ("stream_pair", "compare_pair"):
                raise AttributeError(name)
            return getattr(self._inner, name)

    arena = Arena(BaseOnly(engine), VoteStore(tmp_path / "votes.sqlite"))
    assert not arena.pairs_adapters
    for _ in range(20):
        a, b = arena.draw()
        assert None in (a.slot, b.slot)


# ---------------------------------------------------------------------------------------------- API and command


@pytest.mark.slow  # serves the app over HTTP
def test_arena_through_its_api_and_the_leaderboard_of_its_votes(engine, tmp_path, capsys):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    from persona_lora.cli import main
    from persona_lora.demo.app import build_demo
    from persona_lora.votes import VoteStore

    store = VoteStore(tmp_path / "votes.sqlite")
    app = build_demo(engine, votes=store, max_message_chars=100)
    _, url, _ = app.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    try:
        client = Client(url, verbose=False)
        assert {"/battle", "/vote", "/standings", "/compare"} <= set(client.view_api(print_info=False,
                                                                                   return_format="dict")
                                                                    ["named_endpoints"])
        revealed = []
        for n in range(4):
            battle_id, answer_a, answer_b = client.predict("Who are you?", "", N, api_name="/battle")
            assert answer_a.strip() and answer_b.strip()
            revealed.append(client.predict(battle_id, "AB"[n % 2], api_name="/vote"))
        with pytest.raises(AppError, match="already has its vote"):
            client.predict(battle_id, "A", api_name="/vote")
        with pytest.raises(AppError, match="is waiting for a vote"):
            client.predict("0" * 32, "A", api_name="/vote")
        with pytest.raises(AppError, match="limit is 100"):
            client.predict("x" * 101, "", N, api_name="/battle")
        table = client.predict(api_name="/standings")
    finally:
        app.close()
    assert store.count() == 4 and [r["vote_id"] for r in revealed] == [1, 2, 3, 4]
    assert {row["model"] for row in table} >= {r["A"] for r in revealed} | {r["B"] for r in revealed}
    assert sum(row["votes"] for row in table) == 2 * 4

    out = tmp_path / "board"
    assert main(["leaderboard", str(store.path), str(store.path), "--out", str(out), "--rounds", "200"]) == 0
    report = json.loads((out / "leaderboard.json").read_text(encoding="utf-8"))
    assert report["votes"] == 4 and report["duplicates_left_out"] == 4  # the store given twice: counted once
    assert sum(m["votes"] for m in report["models"]) == 8
    assert (out / "ratings.png").stat().st_size and (out / "win_rates.png").stat().st_size
    page = (out / "leaderboard.html").read_text(encoding="utf-8")
    assert "<script" not in page and all(m["name"] in page for m in report["models"])
    assert main(["leaderboard", str(store.path), "--out", str(out)]) == 2  # not silently replaced
    assert "add --overwrite" in capsys.readouterr().err
    assert main(["leaderboard", str(store.path), "--out", str(out), "--overwrite"]) == 0


def test_leaderboard_refusals_are_one_line_each(tmp_path, capsys):
    from persona_lora.cli import main
    from persona_lora.votes import VoteStore

    empty = VoteStore(tmp_path / "empty.sqlite")
    other = tmp_path / "notes"
    other.mkdir()
    (other / "mine.txt").write_text("keep me", encoding="utf-8")
    cases = [([str(empty.path), "--out", str(tmp_path / "a")], "no votes yet"),
             ([str(tmp_path / "missing.sqlite"), "--out", str(tmp_path / "b")], "no such file"),
             ([str(empty.path), "--out", str(other), "--overwrite"], "holds no leaderboard.json")]
    for argv, message in cases:
        assert main(["leaderboard", *argv]) != 0
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert (other / "mine.txt").read_text(encoding="utf-8") == "keep me"
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # a refused command leaves nothing


def test_arena_on_the_openai_backend(openai_server, tmp_path):
    from persona_lora.demo.arena import Arena
    from persona_lora.demo.decode import GenerationSettings
    from persona_lora.demo.openai_backend import OpenAIBackend
    from persona_lora.votes import VoteStore

    openai_server.models = ["tiny-base", "persona-a", "persona-b"]
    backend = OpenAIBackend(openai_server.url, "tiny-base", ["persona-a", "persona-b"], timeout=5,
                            max_new_tokens_cap=32)
    try:
        store = VoteStore(tmp_path / "votes.sqlite")
        arena = Arena(backend, store)
        assert arena.pairs_adapters
        pair = (arena.contestant("persona-b"), arena.contestant("persona-a"))
        assert pair[0].key == "id:persona-b@tiny-base"  # served by name alone: known by that name
        battle = arena.battle("Who are you?", "", GenerationSettings(max_new_tokens=32), pair=pair)
        assert battle.answer_a == "persona-b answers: Who are you? (turn 1)"
        assert battle.answer_b == "persona-a answers: Who are you? (turn 1)"
        arena.vote(battle.id, "A")
        [row] = store.votes()
        assert (row["left_id"], row["adapter_id"], row["winner"]) == ("persona-a", "persona-b", "adapter")
    finally:
        backend.close()


def test_demo_command_takes_arena():
    from persona_lora.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["demo", "--base", "b", "--arena"]).arena is True
    assert parser.parse_args(["demo", "--base", "b"]).arena is False


def test_leaderboard_page_shows_names_as_text(tmp_path):
    from persona_lora.cli import main
    from persona_lora.votes import VoteStore

    store = VoteStore(tmp_path / "votes.sqlite")
    evil = '<script>window.x=1</script><img src=x onerror="alert(1)"> $\\frac{a}{b}$'
    for n, vote in enumerate(["A", "B", "A", "tie"]):
        store.record(base_id="tiny-base", adapter_name=evil, adapter_id="evil", prompt=f"p{n}", answer_a="x",
                     answer_b="y", a_side="base", vote=vote, adapter_sha256="e" * 64)
    out = tmp_path / "board"
    assert main(["leaderboard", str(store.path), "--out", str(out), "--rounds", "50"]) == 0
    page = (out / "leaderboard.html").read_text(encoding="utf-8")
    assert "<script>" not in page and "<img" not in page and "&lt;script&gt;" in page
    report = json.loads((out / "leaderboard.json").read_text(encoding="utf-8"))
    assert [m["name"] for m in report["models"]] == ["base: tiny-base", evil]  # base won 2, lost 1, tied 1
    assert report["models"][0]["wins"] == 2 and report["models"][0]["ties"] == 1
