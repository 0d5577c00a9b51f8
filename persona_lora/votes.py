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

Which two models a vote compared: the "adapter" slot is one adapter (`adapter_name`, `adapter_id`); the other
slot is the base, or, for adapter-against-adapter votes, another adapter (`left_id`, `left_name`; NULL means the
base). `a_side` and `winner` keep their values for both kinds: "base" names the first slot, whatever it holds, so
databases written before the pair columns existed read the same. Win rates are per pair of models.
`read_votes(path)` reads a database without writing to it: `persona-lora train --method dpo|kto --data` and
`data check` use it (`persona_lora.train.preference_data` turns votes into training data).

Schema 3 makes votes mergeable and models identifiable by content: `uid` is a random id given when the vote is
cast, so the same vote read from the database, its JSONL export and a hub dataset is counted once (integer ids
restart in every database); `adapter_sha256` / `left_sha256` are the sha256 of the weights file of the adapter in
each slot, so renaming an adapter's folder keeps its votes together, and two different adapters with one name
stay apart (`persona_lora.vote_sources.model_keys`). Older votes have none of them (NULL): their uid is derived
from their content, their model from its recorded id.
"""

from __future__ import annotations

import json
import logging
import math
import sqlite3
import tempfile
import uuid
from contextlib import closing
from datetime import datetime, timezone
from pathlib import Path

from persona_lora.errors import UsageError

log = logging.getLogger(__name__)

VOTES = ("A", "B", "tie", "both_bad")
SIDES = ("base", "adapter")
SCHEMA_VERSION = 3  # 2: the pair columns left_id / left_name (adapter against adapter); 3: uid and content ids
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
           "answer_b", "a_side", "vote", "winner", "settings", "left_id", "left_name", "uid", "adapter_sha256",
           "left_sha256")
PAIR_COLUMNS = (("left_id", "TEXT"), ("left_name", "TEXT"))  # added by schema 2; NULL: the first slot is the base
CONTENT_COLUMNS = (("uid", "TEXT"), ("adapter_sha256", "TEXT"), ("left_sha256", "TEXT"))  # added by schema 3
ADDED_COLUMNS = PAIR_COLUMNS + CONTENT_COLUMNS


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
                present = {row[1] for row in db.execute("PRAGMA table_info(votes)")}
                for name, kind in ADDED_COLUMNS:
                    if name not in present:  # an older database: its votes keep NULL there (see the docstring)
                        db.execute(f"ALTER TABLE votes ADD COLUMN {name} {kind}")
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
               a_side: str, vote: str, system_prompt: str = "", settings: dict | None = None,
               left_id: str | None = None, left_name: str | None = None, adapter_sha256: str | None = None,
               left_sha256: str | None = None, uid: str | None = None) -> int:
        """Store one vote; returns its id. `left_id`/`left_name` name the adapter in the first slot when two
        adapters were compared (None: the base); `a_side` "base" then means that adapter was shown as A.
        `adapter_sha256`/`left_sha256`: the weights' sha256 of each slot's adapter (content identity); `uid`
        is made here unless the caller already gave the vote one."""
        winner = winner_of(vote, a_side)
        row = (datetime.now(timezone.utc).isoformat(timespec="seconds"), base_id, adapter_name, adapter_id,
               system_prompt or "", prompt, answer_a, answer_b, a_side, vote, winner,
               json.dumps(settings or {}, sort_keys=True), left_id or None, (left_name or left_id) or None,
               uid or uuid.uuid4().hex, adapter_sha256 or None, (left_sha256 if left_id else None) or None)
        with closing(self._connect()) as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                cur = db.execute(
                    "INSERT INTO votes (created_at, base_id, adapter_name, adapter_id, system_prompt, prompt, "
                    "answer_a, answer_b, a_side, vote, winner, settings, left_id, left_name, uid, adapter_sha256, "
                    "left_sha256) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", row)
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
        """Per pair of models: counts, the adapter slot's win rate over decisive votes, and its 95% Wilson interval.
        `base`/`base_wins` are the first slot's (the base, or the adapter in `left_id` for adapter-vs-adapter
        votes); `against` names it for display. Models are grouped by content (weights sha256, else the recorded
        id) and shown with the ids and names of their newest vote, so a renamed folder is one row."""
        with closing(self._connect()) as db:
            rows = db.execute(
                "SELECT adapter_id, adapter_name, base_id, left_id, left_name, "
                "SUM(winner = 'adapter'), SUM(winner = 'base'), SUM(winner = 'tie'), SUM(winner = 'both_bad'), "
                "COUNT(*), MAX(id) "  # the one MAX: SQLite takes the bare columns from the newest vote's row
                "FROM votes GROUP BY COALESCE(adapter_sha256, adapter_id), base_id, COALESCE(left_sha256, left_id) "
                "ORDER BY adapter_id, left_id").fetchall()
        return [_rate_row(*row[:-1]) for row in rows]

    def preference_pairs(self, adapter_id: str | None = None) -> list[dict]:
        """Decisive votes as TRL conversational preference records (prompt, chosen, rejected); a vote between two
        identical answers, or with an empty one, is no preference and is left out."""
        pairs = []
        for v in self.votes():
            if v["winner"] not in SIDES or (adapter_id and v["adapter_id"] != adapter_id):
                continue
            if v["answer_a"] == v["answer_b"] or not v["answer_a"].strip() or not v["answer_b"].strip():
                continue  # no preference to learn (training drops these too, and counts them)
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
        from persona_lora.hubs.backends import backend

        be = backend(self.hub)
        be.check_commit(repo_id)
        token = be.token(token)
        if not token:
            raise be.missing_token("push votes")
        with tempfile.TemporaryDirectory() as tmp, be.errors("push votes to", repo_id, token=token):
            folder = Path(tmp)
            pairs = self.export_preferences(folder / "preferences.jsonl")
            n = self.export_votes(folder / "votes.jsonl")
            (folder / "README.md").write_text(dataset_card(pairs, n, self.win_rates()), encoding="utf-8")
            message = message or f"Upload {n} A/B votes ({pairs} preference pairs) with persona-lora"
            result = be.commit(repo_id, folder, ["README.md", "preferences.jsonl", "votes.jsonl"], repo_type="dataset",
                               private=private, message=message, token=token)
        log.info("pushed %d votes (%d pairs) to %s", n, pairs, result.url)
        return result.url


def _rate_row(adapter_id, name, base_id, left_id, left_name, wins, losses, ties, bad, n) -> dict:
    decisive = wins + losses
    lo, hi = wilson(wins, decisive)
    return {
        "adapter": name, "adapter_id": adapter_id, "base": left_id or base_id, "base_id": base_id,
        "left_id": left_id, "against": left_name or left_id or "base", "votes": n, "adapter_wins": wins,
        "base_wins": losses, "ties": ties, "both_bad": bad,
        "win_rate": wins / decisive if decisive else None, "ci_low": lo, "ci_high": hi,
    }


def read_votes(path: str | Path) -> list[dict]:
    """Every vote of the database at `path`, oldest first, without writing to it (no schema change, no WAL
    switch): for training on the votes and for `data check`. A database of schema 1 reads with the pair columns
    None (every vote compared the base and an adapter). UsageError naming the file when it is no vote database."""
    path = Path(path)
    try:
        with closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=30)) as db:
            db.row_factory = sqlite3.Row
            present = {row[1] for row in db.execute("PRAGMA table_info(votes)")}
            missing = [c for c in COLUMNS if c not in present and c not in dict(ADDED_COLUMNS)]
            if missing:
                raise UsageError(f"{path}: a SQLite database, but not the demo's votes (no votes table with "
                                 f"{', '.join(missing)}); give the --votes file of `persona-lora demo`")
            cols = [c if c in present else f"NULL AS {c}" for c in COLUMNS]
            rows = db.execute(f"SELECT {', '.join(cols)} FROM votes ORDER BY id").fetchall()
    except sqlite3.DatabaseError as e:
        raise UsageError(f"{path}: cannot read it as a SQLite database ({e}); give the --votes file of "
                         "`persona-lora demo`") from e
    out = []
    for r in rows:
        d = dict(r)
        try:
            d["settings"] = json.loads(d["settings"] or "{}")
        except ValueError:
            d["settings"] = {}
        out.append(d)
    return out


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    """The file is replaced whole or not at all (a failed write leaves the old one and no temporary file)."""
    from persona_lora.output_folder import FilesTogether

    path.parent.mkdir(parents=True, exist_ok=True)
    with FilesTogether() as files, open(files.temp(path), "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def dataset_card(pairs: int, votes: int, rates: list[dict]) -> str:
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
        "| adapter | against | votes | adapter wins | against wins | ties | both bad |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rates:
        lines.append(f"| {r['adapter_id']} | {r['left_id'] or 'base'} | {r['votes']} | {r['adapter_wins']} | "
                     f"{r['base_wins']} | {r['ties']} | {r['both_bad']} |")
    return "\n".join(lines) + "\n"
