"""Bradley–Terry ratings and the votes they are fitted to: known strengths recovered with honest intervals, ties,
finiteness, votes counted once across stores and exports, models identified by content, and one message per bad
source. Simulated votes are drawn here from strengths we choose; nothing is copied from anywhere."""

from __future__ import annotations

import json
import sqlite3

import numpy as np
import pytest

from persona_lora.errors import UsageError
from persona_lora.ratings import ELO_SCALE, bradley_terry, tally
from persona_lora.vote_sources import load_votes, model_keys
from persona_lora.votes import VoteStore


def simulate(theta: list[float], votes: int, rng: np.random.Generator) -> list[tuple[str, str, str]]:
    """Votes between uniformly drawn pairs, each won with the BT probability of the true log-strengths."""
    t = np.asarray(theta)
    i = rng.integers(0, len(t), votes)
    j = (i + rng.integers(1, len(t), votes)) % len(t)  # another model, uniformly
    left_wins = rng.random(votes) < 1.0 / (1.0 + np.exp(-(t[i] - t[j])))
    return [(f"m{a}", f"m{b}", "left" if w else "right") for a, b, w in zip(i, j, left_wins)]


def true_elo(theta: list[float]) -> np.ndarray:
    t = np.asarray(theta)
    return 1000 + ELO_SCALE * (t - t.mean())


def test_simulated_strengths_recover_order_and_truth_within_intervals():
    theta = [0.0, 0.4, 0.8, 1.2]  # about 70 Elo points apart
    truth = true_elo(theta)
    seeds = 200
    ordered, covered = 0, np.zeros(len(theta))
    for seed in range(seeds):
        r = bradley_terry(tally(simulate(theta, 1200, np.random.default_rng(seed))), rounds=200, seed=seed)
        assert r.models == [f"m{i}" for i in range(len(theta))]
        ordered += r.order() == [3, 2, 1, 0]
        covered += (r.ci_low <= truth) & (truth <= r.ci_high)
    assert ordered / seeds >= 0.9, ordered
    assert (covered / seeds >= 0.9).all(), covered / seeds  # every model's truth inside its interval, ≥ 90% of seeds


def test_identical_strengths_give_overlapping_intervals():
    """Per pair, two equal models' intervals overlap in ≥ 95% of seeds; all of three models' at once in ≥ 90%.
    (With more models, more pairs can separate by chance: five equal models give ten pairs, and all ten overlap
    in about four seeds of five.)"""
    for k, share in ((5, "pair"), (3, "all")):
        seeds, all_overlap, pairs = 100, 0, []
        for seed in range(seeds):
            r = bradley_terry(tally(simulate([0.0] * k, 1000, np.random.default_rng(seed))), rounds=200, seed=seed)
            overlaps = [r.overlap(i, j) > 0 for i in range(k) for j in range(i + 1, k)]
            all_overlap += all(overlaps)
            pairs += overlaps
        if share == "pair":
            assert sum(pairs) / len(pairs) >= 0.95, sum(pairs) / len(pairs)
        else:
            assert all_overlap / seeds >= 0.9, all_overlap


def test_a_model_with_no_wins_stays_finite_and_last():
    votes = [("strong", "loser", "left")] * 20 + [("loser", "mid", "right")] * 20 + \
            [("strong", "mid", "left")] * 12 + [("strong", "mid", "right")] * 8
    r = bradley_terry(tally(votes), rounds=300)
    assert np.isfinite(r.rating).all() and np.isfinite(r.ci_low).all() and np.isfinite(r.ci_high).all()
    assert r.models[r.order()[-1]] == "loser"
    p = r.predicted()
    i, j = r.models.index("loser"), r.models.index("strong")
    assert 0 < p[i, j] < 0.5
    assert r.win_rate()[i] == 0


def test_ties_count_as_half_a_win_and_never_order_dependent():
    two_ties = bradley_terry(tally([("a", "b", "tie")] * 2 + [("a", "c", "left")] * 3), rounds=0)
    win_and_loss = bradley_terry(tally([("a", "b", "left"), ("b", "a", "left")] + [("c", "a", "right")] * 3),
                                 rounds=0)
    assert np.allclose(two_ties.rating, win_and_loss.rating)
    votes = simulate([0.0, 0.5, 1.0], 300, np.random.default_rng(1))
    forward = bradley_terry(tally(votes), seed=3, rounds=100)
    backward = bradley_terry(tally(votes[::-1]), seed=3, rounds=100)
    assert np.array_equal(forward.rating, backward.rating) and np.array_equal(forward.ci_low, backward.ci_low)


def test_models_without_votes_claim_no_interval_and_disconnected_groups_are_reported():
    r = bradley_terry(tally([("a", "b", "left")] * 5 + [("c", "d", "left")] * 5, models=["e"]), rounds=50)
    e = r.models.index("e")
    assert np.isinf(r.ci_low[e]) and np.isinf(r.ci_high[e]) and r.votes[e] == 0
    assert sorted(map(sorted, r.groups)) == [["a", "b"], ["c", "d"], ["e"]]


# ------------------------------------------------------------------------------------------ stores and sources


def record(store: VoteStore, left: str | None, right: str, vote: str, *, sha: dict | None = None, n: int = 0,
           name: str | None = None) -> int:
    sha = sha or {}
    pair = {"left_id": left, "left_name": left, "left_sha256": sha.get(left)} if left else {}
    return store.record(base_id="tiny-base", adapter_name=name or right, adapter_id=right,
                        adapter_sha256=sha.get(right), prompt=f"prompt {n}", answer_a=f"a{n}", answer_b=f"b{n}",
                        a_side="base", vote=vote, **pair)


VOTE_PLAN = [(None, "x", "A"), (None, "x", "B"), ("x", "y", "A"), (None, "y", "tie"), ("x", "y", "both_bad"),
             (None, "y", "B"), ("x", "y", "B"), (None, "x", "B")] * 5


def test_two_stores_merged_rate_as_one_store_and_no_vote_counts_twice(tmp_path):
    whole, first, second = (VoteStore(tmp_path / f"{n}.sqlite") for n in ("whole", "first", "second"))
    for n, (left, right, vote) in enumerate(VOTE_PLAN):
        record(whole, left, right, vote, n=n)
        record(first if n % 2 else second, left, right, vote, n=n)
    one = load_votes([str(whole.path)])
    merged = load_votes([str(first.path), str(second.path)])
    a, b = (bradley_terry(tally(s.battles()), rounds=200, seed=7) for s in (one, merged))
    assert a.models == b.models and np.array_equal(a.rating, b.rating) and np.array_equal(a.ci_low, b.ci_low)
    # the same votes again, from the database, its JSONL export and the database twice: each counted once
    whole.export_votes(tmp_path / "votes.jsonl")
    again = load_votes([str(whole.path), str(tmp_path / "votes.jsonl"), str(whole.path)])
    assert len(again.votes) == len(VOTE_PLAN) and again.duplicates == 2 * len(VOTE_PLAN)


def test_votes_from_before_uids_merge_with_their_export(tmp_path):
    """A database of schema 2 (no uid or sha columns): read as is, and its export is recognised as the same votes."""
    path = tmp_path / "old.sqlite"
    store = VoteStore(path)
    for n, (left, right, vote) in enumerate(VOTE_PLAN[:6]):
        record(store, left, right, vote, n=n)
    with sqlite3.connect(path) as db:  # back to schema 2: drop the columns schema 3 added
        for column in ("uid", "adapter_sha256", "left_sha256"):
            db.execute(f"ALTER TABLE votes DROP COLUMN {column}")
    rows = [{k: v for k, v in row.items() if k not in ("uid", "adapter_sha256", "left_sha256")}
            for row in load_votes([str(path)]).votes]
    (tmp_path / "old.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    merged = load_votes([str(path), str(tmp_path / "old.jsonl")])
    assert len(merged.votes) == 6 and merged.duplicates == 6


def test_models_are_identified_by_content_not_by_name(tmp_path):
    store = VoteStore(tmp_path / "votes.sqlite")
    sha = {"run-1": "1" * 64, "renamed": "1" * 64, "other": "2" * 64}
    record(store, None, "run-1", "B", sha=sha)
    record(store, None, "renamed", "B", sha=sha, n=1)  # the same weights in a renamed folder: one model
    record(store, None, "other", "A", sha=sha, n=2, name="run-1")  # another adapter under the first one's name
    votes = load_votes([str(store.path)])
    keys = {model_keys(v)[1] for v in votes.votes}
    assert keys == {"sha256:" + "1" * 64 + "@tiny-base", "sha256:" + "2" * 64 + "@tiny-base"}
    same = "sha256:" + "1" * 64 + "@tiny-base"
    assert votes.names[same] == "renamed" and votes.aliases[same] == ["run-1"]
    rates = {r["adapter_id"]: r for r in store.win_rates()}  # the demo's win-rate table groups by content too
    assert rates["renamed"]["votes"] == 2 and rates["other"]["votes"] == 1


def test_bad_sources_get_one_message_each(tmp_path):
    empty = VoteStore(tmp_path / "empty.sqlite")
    with pytest.raises(UsageError, match="no votes yet"):
        load_votes([str(empty.path)])
    prefs = tmp_path / "preferences.jsonl"
    prefs.write_text(json.dumps({"prompt": [], "chosen": [], "rejected": []}) + "\n", encoding="utf-8")
    with pytest.raises(UsageError, match=r"line 1: not a vote.*preference pairs, not votes"):
        load_votes([str(prefs)])
    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE votes (id INTEGER, colour TEXT)")
    with pytest.raises(UsageError, match="not the demo's votes"):
        load_votes([str(other)])
    broken = tmp_path / "votes.jsonl"
    broken.write_text("{not json\n", encoding="utf-8")
    with pytest.raises(UsageError, match="line 1: not JSON"):
        load_votes([str(broken)])
    with pytest.raises(UsageError, match="no such file"):
        load_votes([str(tmp_path / "missing.sqlite")])


def test_a_hub_dataset_of_votes_loads_and_one_that_is_not_votes_is_refused(hub_server, tmp_path):
    from persona_lora.hubs.backends import backend
    from tests.hub_fixtures import DEFAULT_USER

    store = VoteStore(tmp_path / "votes.sqlite")
    for n, (left, right, vote) in enumerate(VOTE_PLAN[:8]):
        record(store, left, right, vote, n=n)
    store.push_to_hub(f"{DEFAULT_USER}/arena-votes")
    from_hub = load_votes([f"{DEFAULT_USER}/arena-votes", str(store.path)])
    assert len(from_hub.votes) == 8 and from_hub.duplicates == 8  # the hub copy and the database: one set
    folder = tmp_path / "not-votes"
    folder.mkdir()
    (folder / "data.jsonl").write_text(json.dumps({"text": "hello"}) + "\n", encoding="utf-8")
    be = backend("hf")
    be.commit(f"{DEFAULT_USER}/plain-text", folder, ["data.jsonl"], repo_type="dataset", message="data",
              token=be.token(None))
    with pytest.raises(UsageError, match="plain-text: a hub dataset without a `votes` config, so not the votes"):
        load_votes([f"{DEFAULT_USER}/plain-text"])
