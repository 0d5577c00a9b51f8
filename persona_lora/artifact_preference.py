"""The manifest's `preference` section: how an adapter was preference-tuned (DPO or KTO) and on what.

Part of the adapter-folder contract (`persona_lora.artifact`, which holds the rest of the manifest), in a file of
its own for size. An SFT adapter has no such section; a DPO/KTO adapter records the method, the reference its
rewards were measured against, the adapter it continued from (the lineage), what the votes or preference file
became (every count, nothing dropped silently), the demo's win rates when the data was read, and the per-step
preference metrics TRL logged. Cards and the demo read it from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def _f(default: Any = None, help: str = "", **meta):
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **meta})
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class InitAdapterInfo:
    """The adapter a preference run continued from (and, by default, measured its rewards against)."""

    id: str | None = _f(None, "hub id, or the folder's name for a local adapter (never an absolute path)")
    revision: str | None = _f(None, "hub revision asked for")
    commit: str | None = _f(None, "hub commit pulled")
    sha256: str | None = _f(None, "sha256 of its adapter_model.safetensors")
    method: str | None = _f(None, "how it was trained: sft | dpo | kto")


@dataclass
class WinRateRow:
    """Blind A/B votes between two models (base or adapters), as the demo's table showed them."""

    model_a: str | None = _f(None, "one model of the pair: base or an adapter id")
    model_b: str | None = _f(None, "the other model")
    votes: int | None = _f(None, "votes on this pair")
    a_wins: int | None = _f(None, "votes for model_a")
    b_wins: int | None = _f(None, "votes for model_b")
    ties: int | None = _f(None, "ties")
    both_bad: int | None = _f(None, "both answers judged bad")
    win_rate: float | None = _f(None, "model_a's share of the decisive votes")


@dataclass
class PreferenceDataInfo:
    """What the preference data was and what became of it."""

    kind: str | None = _f(None, "votes (the demo's SQLite database) | pairs (prompt/chosen/rejected) | unpaired "
                                "(prompt/completion/label)")
    name: str | None = _f(None, "file name (never an absolute path)")
    sha256: str | None = _f(None, "sha256 of the file bytes")
    counts: dict[str, int] = _f({}, "votes and records by what became of them (pairs, KTO examples, ties dropped, "
                                    "conflicting prompts kept, truncated, dropped)")
    win_rates: list[WinRateRow] = _f([], "the demo's win rates per pair when the votes were read")


@dataclass
class PreferenceStep:
    """One logged training step of a preference run (TRL's metrics)."""

    step: int | None = _f(None, "optimizer step", omit_none=True)
    loss: float | None = _f(None, "DPO or KTO loss", omit_none=True)
    rewards_chosen: float | None = _f(None, "mean implicit reward of the chosen (desirable) answers", omit_none=True)
    rewards_rejected: float | None = _f(None, "mean implicit reward of the rejected (undesirable) answers",
                                        omit_none=True)
    rewards_accuracies: float | None = _f(None, "DPO: share of pairs whose chosen reward is the higher",
                                          omit_none=True)
    rewards_margins: float | None = _f(None, "mean chosen-minus-rejected reward", omit_none=True)
    kl: float | None = _f(None, "KTO: the KL estimate", omit_none=True)


@dataclass
class PreferenceInfo:
    """How the adapter was preference-tuned (method dpo or kto); absent for SFT adapters."""

    method: str | None = _f(None, "dpo | kto")
    beta: float | None = _f(None, "TRL's beta: how far the adapter may move from the reference")
    reference: str | None = _f(None, "init-adapter (the adapter continued from, frozen) | base (adapter disabled)")
    init_adapter: InitAdapterInfo | None = _f(None, "the adapter continued from (its lineage)")
    data: PreferenceDataInfo | None = _f(None, "the votes or preference file")
    history: list[PreferenceStep] = _f([], "rewards, accuracies and margins per logged step")
