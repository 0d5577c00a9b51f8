"""The card's "Preference tuning" section: what a DPO or KTO adapter was tuned on, from its manifest alone.

A reader of a preference-tuned adapter needs what an SFT card cannot say: which method, against which reference,
continuing from which adapter (with its hash, so the lineage can be checked), on which votes or preference file
and what became of them (pairs, ties dropped, prompts voted both ways), the demo's win rates when the votes were
read, and how the rewards moved. Everything comes from the manifest's `preference` section; an SFT adapter has
none and its card has no such section.
"""

from __future__ import annotations

from persona_lora.artifact import Manifest
from persona_lora.artifact_preference import PreferenceDataInfo
from persona_lora.model_cards.markdown import code, esc, is_num, num

METHODS = {"dpo": "DPO (direct preference optimisation, on pairs)", "kto": "KTO (on single judgements)"}
REFERENCES = {"init-adapter": "the adapter it continued from, frozen", "base": "the base model (adapter disabled)"}
DATA_KINDS = {"votes": "blind A/B votes of the persona-lora demo", "pairs": "preference pairs",
              "unpaired": "single judgements"}
# The last logged step's preference metrics the section shows: (field of PreferenceStep, label).
FINAL_METRICS = (("rewards_chosen", "Final reward, chosen"), ("rewards_rejected", "Final reward, rejected"),
                 ("rewards_margins", "Final reward margin"), ("rewards_accuracies", "Final reward accuracy"),
                 ("kl", "Final KL estimate"))


def preference_section(m: Manifest) -> dict | None:
    """The section's values, formatted and escaped; None for an adapter that was not preference-tuned."""
    p = m.preference
    if p is None or p.method not in METHODS:
        return None
    rows = [("Method", METHODS[p.method])]
    if is_num(p.beta):
        rows.append(("beta", num(p.beta)))
    if p.reference in REFERENCES:
        rows.append(("Reference", REFERENCES[p.reference]))
    init = p.init_adapter
    if init is not None and init.id is not None:
        at = f" @ {code(init.commit or init.revision)}" if init.commit or init.revision else ""
        how = f" ({esc(init.method)})" if init.method is not None else ""
        rows.append(("Continued from", f"{code(init.id)}{at}{how}"))
        if init.sha256 is not None:
            rows.append(("Its adapter_model.safetensors sha256", code(init.sha256)))
    data = p.data or PreferenceDataInfo()
    what = None
    if data.name is not None:
        what = f"{DATA_KINDS.get(data.kind, 'preference data')} in {code(data.name)}"
        if data.sha256 is not None:
            what += f" (sha256 {code(data.sha256[:12])})"
    counts = [(esc(k), num(v)) for k, v in data.counts.items() if is_num(v)]
    rates = []
    for r in data.win_rates:
        if r.model_a is not None:
            rate = f"{100 * r.win_rate:.0f}%" if is_num(r.win_rate) else "n/a"
            rates.append((code(r.model_a), code(r.model_b or "base"), num(r.votes or 0),
                          f"{num(r.a_wins or 0)}–{num(r.b_wins or 0)}", num(r.ties or 0), num(r.both_bad or 0), rate))
    last = p.history[-1] if p.history else None
    for key, label in FINAL_METRICS:
        value = getattr(last, key) if last is not None else None
        if is_num(value):
            rows.append((label, f"{value:.4g}"))
    return {"rows": rows, "what": what, "counts": counts, "rates": rates}
