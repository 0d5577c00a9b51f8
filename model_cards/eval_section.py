"""The card's "Evaluation" section and the Hub's `model-index` entries, from a `persona-lora eval` report.

Why from the report and only for these weights: a card's figures must be true of the adapter it describes, so
`persona-lora card ADAPTER --eval DIR` takes the adapter's figures from `DIR/report.json` only when the report
evaluated exactly this adapter (its `adapter_model.safetensors` has the sha256 the report recorded). The table is
the report's own summary table (`persona_lora.evaluation.table`), so the card, the HTML page and the JSON agree;
a figure the report does not have is left out, and a report whose prompts include the adapter's training records
says so. Every text is escaped like the rest of the card.
"""

from __future__ import annotations

import json
from pathlib import Path

from persona_lora.artifact import ADAPTER_WEIGHTS
from persona_lora.errors import UsageError
from persona_lora.hashing import sha256_file
from persona_lora.model_cards.markdown import code, esc, is_num, num

REPORT_JSON = "report.json"
REPORT_SCHEMA = "persona-lora/eval@1"


def read_report(folder: str | Path) -> dict:
    """`folder/report.json` (an `--eval DIR`), checked enough to render; UsageError naming the fix otherwise."""
    path = Path(folder) / REPORT_JSON
    if not path.is_file():
        raise UsageError(f"--eval {folder}: no {REPORT_JSON} there; give the --out folder of `persona-lora eval`")
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise UsageError(f"--eval {path}: not a readable JSON report ({e}); run `persona-lora eval` again") from None
    if not isinstance(report, dict) or report.get("schema") != REPORT_SCHEMA:
        raise UsageError(f"--eval {path}: not a persona-lora eval report (schema {REPORT_SCHEMA}); run "
                         "`persona-lora eval` again with this persona-lora")
    for key, kind in (("summary", dict), ("models", list), ("adapters", list), ("data", dict), ("settings", dict)):
        if not isinstance(report.get(key), kind):
            raise UsageError(f"--eval {path}: its {key!r} is missing or malformed; run `persona-lora eval` again")
    return report


def adapter_name(report: dict, folder: Path, where: str) -> str:
    """The name under which the report evaluated the weights in `folder`; UsageError when it did not."""
    sha = sha256_file(Path(folder) / ADAPTER_WEIGHTS)
    for a in report["adapters"]:
        if isinstance(a, dict) and a.get("weights_sha256") == sha and a.get("name") in report["summary"]:
            return a["name"]
    names = ", ".join(str(a.get("name")) for a in report["adapters"] if isinstance(a, dict)) or "none"
    raise UsageError(f"--eval {where} evaluated other weights ({names}), not the {ADAPTER_WEIGHTS} in {folder}; run "
                     f"`persona-lora eval {folder} --base BASE --out DIR` and pass that DIR")


def _what(report: dict) -> str:
    d = report["data"]
    name = code(d.get("name") or "the data")
    split = d.get("split")
    if split == "held-out" and d.get("held_out_file"):
        what = f"the held-out file {name} training evaluated on"
    elif split == "held-out":
        what = f"the held-out split of {name} (seed {esc(d.get('seed'))}, eval fraction {esc(d.get('eval_fraction'))})"
    elif split == "train":
        what = f"the training split of {name}"
    else:
        what = f"records of {name}"
    evaluated = d.get("evaluated")
    count = f"{num(evaluated)} prompt{'s' if evaluated != 1 else ''}" if is_num(evaluated) else "the prompts"
    sample = (f", sampled with seed {esc(d['sample_seed'])} from {num(d['available'])}"
              if d.get("sample_seed") is not None and is_num(d.get("available")) else "")
    proof = ", data sha256 equal to the training data's" if d.get("sha256_matches_training") else (
        ", sha256 equal to the one the adapter's manifest records" if d.get("sha256_matches_held_out_file") else "")
    return f"{count} from {what}{sample}{proof}"


def _decoding(report: dict) -> str:
    s = report["settings"]
    system = s.get("system_prompt")
    parts = ["greedy decoding"]
    if is_num(s.get("max_new_tokens")):
        parts.append(f"at most {num(s['max_new_tokens'])} new tokens")
    parts.append(f"system prompt {code(system)}" if isinstance(system, str) and system else "no system prompt")
    if isinstance(s.get("chat_template"), str):
        parts.append(f"chat template: {esc(s['chat_template'])}")
    return ", ".join(parts)


def evaluation_section(report: dict, name: str) -> dict:
    """The section's values for the adapter `name` of the report, formatted and escaped."""
    from persona_lora.evaluation.table import summary_table

    rows = [(esc(row["label"]), *(esc(c["text"]) for c in row["cells"]))
            for row in summary_table(report, ["base", name])]
    adapter = next(a for a in report["adapters"] if a.get("name") == name)
    notes = []
    if adapter.get("held_out") is False:
        notes.append("These prompts include records this adapter was trained on: the figures are not held-out "
                     "figures.")
    guard = report.get("guard") if isinstance(report.get("guard"), dict) else None
    f = ((report.get("forgetting") or {}).get("adapters") or {}).get(name) or {}
    base_loss = (report.get("forgetting") or {}).get("base_loss")
    if guard and is_num(f.get("delta")) and is_num(f.get("loss")) and is_num(base_loss):
        notes.append(f"Forgetting guard: {num(guard.get('evaluated'))} general prompts ({esc(guard.get('name'))}) "
                     f"without a system prompt; this adapter's loss there is {f['loss']:.4f} against the base's "
                     f"{base_loss:.4f} ({f['delta']:+.4f}).")
    judge = (report["summary"].get(name) or {}).get("judge")
    if isinstance(judge, dict) and is_num(judge.get("prompts")):
        notes.append(f"Judge {code(str(judge.get('judge', '')).split('@')[0])}, both answer orders per prompt: "
                     f"{num(judge.get('wins'))} wins, {num(judge.get('ties'))} ties, {num(judge.get('losses'))} "
                     f"losses, {num(judge.get('invalid'))} without a readable verdict, of {num(judge['prompts'])} "
                     "prompts.")
    return {"what": _what(report), "decoding": _decoding(report), "rows": rows, "notes": notes}


def eval_results(report: dict, name: str) -> list:
    """`model-index` entries (huggingface_hub `EvalResult`s): this adapter's loss and perplexity on the evaluated
    set and its loss on the forgetting guard."""
    from huggingface_hub import EvalResult

    summary = report["summary"].get(name) or {}
    d = report["data"]
    split = d.get("split") if isinstance(d.get("split"), str) else None
    dataset = {"dataset_type": d["name"] if d.get("source") == "hub" and d.get("name") else "local",
               "dataset_name": str(d.get("name") or "evaluation prompts"), "dataset_split": split}
    label = {"held-out": "Held-out", "train": "Training-split"}.get(split or "", "Evaluation")
    out = []
    for key, metric_name in (("loss", f"{label} loss"), ("perplexity", f"{label} perplexity")):
        if is_num(summary.get(key)):
            out.append(EvalResult(task_type="text-generation", metric_type=key, metric_value=round(summary[key], 4),
                                  metric_name=metric_name, **dataset))
    guard = report.get("guard") if isinstance(report.get("guard"), dict) else None
    guard_loss = (summary.get("guard") or {}).get("loss")
    if guard and is_num(guard_loss):
        out.append(EvalResult(task_type="text-generation", dataset_type="local",
                              dataset_name=str(guard.get("name") or "forgetting guard"), metric_type="loss",
                              metric_value=round(guard_loss, 4), metric_name="Forgetting-guard loss"))
    return out
