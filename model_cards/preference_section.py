"""The card's "Preference tuning" section: what a DPO or KTO adapter was tuned on, from its manifest alone.

A reader of a preference-tuned adapter needs what an SFT card cannot say: which method, against which reference,
continuing from which adapter (with its hash, so the lineage can be checked), on which votes or preference file
and what became of them (pairs, ties dropped, prompts voted both ways), the demo's win rates when the votes were
read, and how the rewards moved. Everything comes from the manifest's `preference` section; an SFT adapter has
none and its card has no such section.
"""

from __future__ import annotations

from persona_lora.model_cards.markdown import code, esc, is_num, num

METHODS = {"dpo": "DPO (direct preference optimisation, on pairs)", "kto": "KTO (on single judgements)"}
REFERENCES = {"init-adapter": "the adapter it continued from, frozen", "base": "the base model (adapter disabled)"}


def preference_section(m: dict) -> dict | None:
    """The section's values, formatted and escaped; None for an adapter that was not preference-tuned."""
    p = m.get("preference")
    if not isinstance(p, dict) or p.get("method") not in METHODS:
        return None
    rows = [("Method", METHODS[p["method"]])]
    if is_num(p.get("beta")):
        rows.append(("beta", num(p["beta"])))
    if p.get("reference") in REFERENCES:
        rows.append(("Reference", REFERENCES[p["reference"]]))
    init = p.get("init_adapter") or {}
    if isinstance(init.get("id"), str):
        at = f" @ {code(init['commit'] or init['revision'])}" if init.get("commit") or init.get("revision") else ""
        how = f" ({esc(init['method'])})" if isinstance(init.get("method"), str) else ""
        rows.append(("Continued from", f"{code(init['id'])}{at}{how}"))
        if isinstance(init.get("sha256"), str):
            rows.append(("Its adapter_model.safetensors sha256", code(init["sha256"])))
    data = p.get("data") or {}
    kinds = {"votes": "blind A/B votes of the persona-lora demo", "pairs": "preference pairs",
             "unpaired": "single judgements"}
    what = None
    if isinstance(data.get("name"), str):
        what = f"{kinds.get(data.get('kind'), 'preference data')} in {code(data['name'])}"
        if isinstance(data.get("sha256"), str):
            what += f" (sha256 {code(data['sha256'][:12])})"
    counts = [(esc(k), num(v)) for k, v in (data.get("counts") or {}).items() if is_num(v)]
    rates = []
    for r in data.get("win_rates") or []:
        if isinstance(r, dict) and isinstance(r.get("model_a"), str):
            rate = f"{100 * r['win_rate']:.0f}%" if is_num(r.get("win_rate")) else "n/a"
            rates.append((code(r["model_a"]), code(r.get("model_b") or "base"), num(r.get("votes") or 0),
                          f"{num(r.get('a_wins') or 0)}–{num(r.get('b_wins') or 0)}", num(r.get("ties") or 0),
                          num(r.get("both_bad") or 0), rate))
    steps = [h for h in p.get("history") or [] if isinstance(h, dict)]
    last = steps[-1] if steps else {}
    for key, label in (("rewards_chosen", "Final reward, chosen"), ("rewards_rejected", "Final reward, rejected"),
                       ("rewards_margins", "Final reward margin"), ("rewards_accuracies", "Final reward accuracy"),
                       ("kl", "Final KL estimate")):
        if is_num(last.get(key)):
            rows.append((label, f"{last[key]:.4g}"))
    return {"rows": rows, "what": what, "counts": counts, "rates": rates}
