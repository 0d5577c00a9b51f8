"""The Space's votes, copied to a dataset repo on a schedule (`huggingface_hub.CommitScheduler`).

Why a schedule and not a push per vote: a public page may get many votes a minute, and a commit per vote would
flood the dataset's history and hit the Hub's rate limits; the scheduler commits at most once per interval, from
a background thread, and once more when the app exits. Why an export and not the SQLite file: the database is
being written while the page runs (WAL mode), so a copy of the file may be torn; the export is a consistent
snapshot in the formats `persona-lora demo`'s own push writes (`preferences.jsonl` for TRL's DPO, `votes.jsonl`
with every vote, a dataset card), made only when the number of votes changed.

The token is the Space's `HF_TOKEN` secret, which `huggingface_hub` reads from the environment by itself.
"""

from __future__ import annotations

import logging
from pathlib import Path

from huggingface_hub import CommitScheduler

from persona_lora.votes import VoteStore, dataset_card

log = logging.getLogger(__name__)


class VotesScheduler(CommitScheduler):
    """Every `every` minutes: export `store` into a staging folder beside the database when votes were added, and
    let `CommitScheduler` commit the files that changed to the dataset `repo_id` (private when created here)."""

    def __init__(self, store: VoteStore, repo_id: str, *, every: float = 5.0, token: str | None = None,
                 private: bool = True):
        self.store = store
        self.exported: int | None = None  # the vote count of the last export
        staging = Path(store.path).parent / "votes-dataset"
        staging.mkdir(parents=True, exist_ok=True)
        # the parent starts the thread, which pushes at once: the attributes above must exist before
        super().__init__(repo_id=repo_id, repo_type="dataset", folder_path=staging, every=every, token=token,
                         private=private, allow_patterns=["*.jsonl", "README.md"])

    def push_to_hub(self):
        n = self.store.count()
        if n == 0:
            return None
        if n != self.exported:
            folder = Path(self.folder_path)
            pairs = self.store.export_preferences(folder / "preferences.jsonl")
            self.store.export_votes(folder / "votes.jsonl")
            (folder / "README.md").write_text(dataset_card(pairs, n, self.store.win_rates()), encoding="utf-8")
            self.exported = n
            log.info("exported %d votes (%d preference pairs) for %s", n, pairs, self.repo_id)
        return super().push_to_hub()
