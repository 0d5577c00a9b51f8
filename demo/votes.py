"""Blind A/B votes: stored in SQLite, summarised as win rates, exported as a preference dataset.

Why SQLite in WAL mode with one short connection per operation: Gradio serves votes from a thread pool (and an
operator may run several demo processes on one file); WAL lets readers (the live win-rate table) run while a
vote is written, and every vote is one `BEGIN IMMEDIATE` transaction with a busy timeout, so concurrent voters
wait for each other instead of losing votes.

The export is TRL's *conversational preference* format, one JSON object per line:
`{"prompt": [{"role": "system", ...}, {"role": "user", ...}], "chosen": [{"role": "assistant", ...}],
"rejected": [{"role": "assistant", ...}]}`. `datasets.load_dataset("json", data_files=PATH)` reads it and
`trl.DPOTrainer` applies the model's chat template to it itself (so the system prompt the answers were generated
with stays part of the prompt). Only decisive votes (A or B) become pairs; ties and "both bad" do not.
"""

from __future__ import annotations

import json
import logging
import math
import sqlite3
import tempfile
from contextlib import closing
from datetime import datetime, timezone
from pathlib import Path

from persona_lora.errors import UsageError

log = logging.getLogger(__name__)

VOTES = ("A", "B", "tie", "both_bad")
SIDES = ("base", "adapter")
SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS votes (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created_at TEXT NOT NULL,
    base_id TEXT NOT NULL,
    adapter_name TEXT NOT NULL,
    adapter_id TEXT NOT NULL,
    system_prompt TEXT NOT NULL DEFAULT '',
    prompt TEXT NOT NULL,
    answer_a TEXT NOT NULL,
    answer_b TEXT NOT NULL,
    a_side TEXT NOT NULL CHECK (a_side IN ('base', 'adapter')),
    vote TEXT NOT NULL CHECK (vote IN ('A', 'B', 'tie', 'both_bad')),
    winner TEXT NOT NULL CHECK (winner IN ('base', 'adapter', 'tie', 'both_bad')),
    settings TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS votes_adapter ON votes (adapter_id);
"""
COLUMNS = ("id", "created_at", "base_id", "adapter_name", "adapter_id", "system_prompt", "prompt", "answer_a",
           "answer_b", "a_side", "vote", "winner", "settings")


def wilson(successes: int, trials: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (95% by default); (0, 1) when there are no trials.
    Unlike the normal approximation it stays inside [0, 1] and is sensible for the small counts a demo gets."""
    if trials <= 0:
        return 0.0, 1.0
    p = successes / trials
    denom = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def winner_of(vote: str, a_side: str) -> str:
    """Which model a vote favours, given which model was shown as A."""
    if vote not in VOTES:
        raise UsageError(f"vote must be one of {', '.join(VOTES)}, got {vote!r}")
    if a_side not in SIDES:
        raise UsageError(f"a_side must be 'base' or 'adapter', got {a_side!r}")
    if vote in ("tie", "both_bad"):
        return vote
    b_side = "adapter" if a_side == "base" else "base"
    return a_side if vote == "A" else b_side


class VoteStore:
    """The votes database at `path` (created with its folder when missing); `hub` is where `push_to_hub` goes."""

    def __init__(self, path: str | Path, *, hub: str = "hf"):
        self.path = Path(path).expanduser()
        self.hub = hub
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with closing(self._connect()) as db:
                mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                db.executescript(_SCHEMA)
                db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.DatabaseError as e:
            raise UsageError(
                f"--votes {self.path}: cannot open it as a SQLite database ({e}); choose another file"
            ) from e
        except OSError as e:
            raise UsageError(f"--votes {self.path}: {e}") from e
        if mode.lower() != "wal":  # e.g. a network file system
            log.warning("%s: SQLite WAL mode unavailable (journal_mode=%s); concurrent voters will wait longer",
                        self.path, mode)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA busy_timeout=30000")
        return db

    def record(self, *, base_id: str, adapter_name: str, adapter_id: str, prompt: str, answer_a: str, answer_b: str,
               a_side: str, vote: str, system_prompt: str = "", settings: dict | None = None) -> int:
        """Store one vote; returns its id."""
        winner = winner_of(vote, a_side)
        row = (datetime.now(timezone.utc).isoformat(timespec="seconds"), base_id, adapter_name, adapter_id,
               system_prompt or "", prompt, answer_a, answer_b, a_side, vote, winner,
               json.dumps(settings or {}, sort_keys=True))
        with closing(self._connect()) as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                cur = db.execute(
                    "INSERT INTO votes (created_at, base_id, adapter_name, adapter_id, system_prompt, prompt, "
                    "answer_a, answer_b, a_side, vote, winner, settings) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", row)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return int(cur.lastrowid)

    def votes(self) -> list[dict]:
        with closing(self._connect()) as db:
            db.row_factory = sqlite3.Row
            rows = db.execute(f"SELECT {', '.join(COLUMNS)} FROM votes ORDER BY id").fetchall()
        out = []
        for r in rows:
            d = dict(r)
            d["settings"] = json.loads(d["settings"] or "{}")
            out.append(d)
        return out

    def count(self) -> int:
        with closing(self._connect()) as db:
            return int(db.execute("SELECT COUNT(*) FROM votes").fetchone()[0])

    def win_rates(self) -> list[dict]:
        """Per adapter (vs its base): counts, win rate over decisive votes, and its 95% Wilson interval."""
        with closing(self._connect()) as db:
            rows = db.execute(
                "SELECT adapter_id, MAX(adapter_name), base_id, "
                "SUM(winner = 'adapter'), SUM(winner = 'base'), SUM(winner = 'tie'), SUM(winner = 'both_bad'), "
                "COUNT(*) "
                "FROM votes GROUP BY adapter_id, base_id ORDER BY adapter_id").fetchall()
        table = []
        for adapter_id, name, base_id, wins, losses, ties, bad, n in rows:
            decisive = wins + losses
            lo, hi = wilson(wins, decisive)
            table.append({
                "adapter": name, "adapter_id": adapter_id, "base": base_id, "votes": n, "adapter_wins": wins,
                "base_wins": losses, "ties": ties, "both_bad": bad,
                "win_rate": wins / decisive if decisive else None, "ci_low": lo, "ci_high": hi,
            })
        return table

    def preference_pairs(self, adapter_id: str | None = None) -> list[dict]:
        """Decisive votes as TRL conversational preference records (prompt, chosen, rejected)."""
        pairs = []
        for v in self.votes():
            if v["winner"] not in SIDES or (adapter_id and v["adapter_id"] != adapter_id):
                continue
            answers = {v["a_side"]: v["answer_a"], ("adapter" if v["a_side"] == "base" else "base"): v["answer_b"]}
            loser = "base" if v["winner"] == "adapter" else "adapter"
            prompt = ([{"role": "system", "content": v["system_prompt"]}] if v["system_prompt"] else []) + [
                {"role": "user", "content": v["prompt"]}]
            pairs.append({
                "prompt": prompt,
                "chosen": [{"role": "assistant", "content": answers[v["winner"]]}],
                "rejected": [{"role": "assistant", "content": answers[loser]}],
            })
        return pairs

    def export_preferences(self, out: str | Path, adapter_id: str | None = None) -> int:
        """Write the preference dataset as JSONL; returns the number of pairs."""
        pairs = self.preference_pairs(adapter_id)
        _write_jsonl(Path(out), pairs)
        return len(pairs)

    def export_votes(self, out: str | Path) -> int:
        """Every vote, raw (which side was which, settings, adapter ids), as JSONL."""
        rows = self.votes()
        _write_jsonl(Path(out), rows)
        return len(rows)

    def push_to_hub(self, repo_id: str, *, private: bool = True, token: str | None = None,
                    message: str | None = None) -> str:
        """Upload the votes as a *dataset* repo on the store's hub, in one commit: `preferences.jsonl` (the
        default config, ready for DPO), `votes.jsonl` (raw votes) and a README. Returns the repo URL."""
        from persona_lora.hub_tools.backends import backend

        be = backend(self.hub)
        be.check_commit(repo_id)
        token = be.token(token)
        if not token:
            raise be.missing_token("push votes")
        with tempfile.TemporaryDirectory() as tmp, be.errors("push votes to", repo_id, token=token):
            folder = Path(tmp)
            pairs = self.export_preferences(folder / "preferences.jsonl")
            n = self.export_votes(folder / "votes.jsonl")
            (folder / "README.md").write_text(_dataset_card(pairs, n, self.win_rates()), encoding="utf-8")
            message = message or f"Upload {n} A/B votes ({pairs} preference pairs) with persona-lora"
            result = be.commit(repo_id, folder, ["README.md", "preferences.jsonl", "votes.jsonl"], repo_type="dataset",
                               private=private, message=message, token=token)
        log.info("pushed %d votes (%d pairs) to %s", n, pairs, result.url)
        return result.url


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    tmp.replace(path)


def _dataset_card(pairs: int, votes: int, rates: list[dict]) -> str:
    lines = [
        "---",
        "configs:",
        "- config_name: default",
        "  data_files: preferences.jsonl",
        "- config_name: votes",
        "  data_files: votes.jsonl",
        "tags:",
        "- dpo",
        "- preference",
        "- persona-lora",
        "---",
        "",
        "# Blind A/B votes from the persona-lora demo",
        "",
        (f"{votes} votes; {pairs} decisive ones as preference pairs in TRL's conversational format "
         "(`prompt`, `chosen`, `rejected`; default config). `votes` holds every vote with which side was which, "
         "the generation settings and the adapter ids."),
        "",
        "| adapter | votes | adapter wins | base wins | ties | both bad |",
        "|---|---|---|---|---|---|",
    ]
    for r in rates:
        lines.append(f"| {r['adapter_id']} | {r['votes']} | {r['adapter_wins']} | {r['base_wins']} | "
                     f"{r['ties']} | {r['both_bad']} |")
    return "\n".join(lines) + "\n"
