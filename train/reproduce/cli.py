"""`persona-lora reproduce ADAPTER_DIR_OR_ID`: train an adapter again from its manifest and compare (see
train/reproduce/run.py). Prints the per-step table and the one-line verdict; exit 0 only for reproduced or close, so
`persona-lora reproduce you/persona && persona-lora push …` stops at a record that does not hold."""

from __future__ import annotations

import argparse

from persona_lora.hub_ids import add_hub_option

TABLE_ROWS = 40  # a longer history prints its first and last rows and the largest difference; the JSON has all


def configure_reproduce(p: argparse.ArgumentParser) -> None:
    p.description = ("Train an adapter again from its manifest alone (nothing from your config files), check "
                     "that the base and the data are the ones recorded, and compare the loss curves step by step. "
                     "Writes OUT/reproduce.json; exit 0 for 'reproduced' (max loss difference <= 1e-4 on the same "
                     "device type) or 'close' (<= 1e-2), 1 for 'different' or 'inconclusive' (the losses compared "
                     "reach fewer than 2 optimizer updates: raise --max-steps as it says).")
    p.add_argument("adapter", metavar="ADAPTER_DIR_OR_ID",
                   help="adapter folder, or a hub id owner/name[@revision] (pulled and verified first)")
    p.add_argument("--data", metavar="PATH_OR_ID",
                   help="the training data, when the recorded one is a local file or not reachable (its sha256 must "
                        "match the record)")
    p.add_argument("--eval-data", metavar="PATH_OR_ID",
                   help="the held-out file the adapter was trained with (data.eval_path), when it is not beside the "
                        "training data under its recorded name (its sha256 must match the record)")
    p.add_argument("--base", metavar="PATH_OR_ID",
                   help="the base model, when the recorded one is a local folder or not reachable (its config.json "
                        "hash must match the record)")
    p.add_argument("--out", metavar="DIR",
                   help="new folder for the reproduction (default: ADAPTER-reproduced next to a local adapter, in "
                        "the working folder for a hub id); never the adapter itself")
    p.add_argument("--max-steps", type=int, metavar="N",
                   help="reproduce only the first N optimizer steps, on the run's own schedule (a quick check)")
    p.add_argument("--allow-changes", action="store_true",
                   help="train even when the data, base or chat template differ from the record (the verdict is "
                        "then 'different' and names what changed)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow a run recorded with base.trust_remote_code: true to run the base repo's code")
    add_hub_option(p, help_prefix="hub of a hub-id ADAPTER: ")


def _num(value: float | None) -> str:
    return "—" if value is None else f"{value:.8f}"


def _diff(value: float | None) -> str:
    return "missing" if value is None else f"{value:+.1e}"


def _table(title: str, rows: list[dict]) -> list[str]:
    if not rows:
        return []
    shown = range(len(rows))
    if len(rows) > TABLE_ROWS:
        worst = max(shown, key=lambda i: -1.0 if rows[i]["diff"] is None else abs(rows[i]["diff"]))
        shown = sorted({*range(TABLE_ROWS // 2), *range(len(rows) - TABLE_ROWS // 2, len(rows)), worst})
    lines = [f"{title:<12} {'original':>14} {'reproduced':>14} {'Δ':>10}"]
    previous = -1
    for i in shown:
        if i != previous + 1:
            lines.append("  …")
        r = rows[i]
        span = r.get("steps")
        label = f"steps {span[0]}-{span[1]}" if span and span[0] != span[1] else f"step {r['step']}"
        lines.append(f"  {label:<11}{_num(r['original']):>14} {_num(r['reproduced']):>14} {_diff(r['diff']):>10}")
        previous = i
    return lines


def format_report(report: dict, written: str | None = None) -> str:
    """The table of both loss curves, what differs, where the report went, and the one-line verdict last."""
    lines = _table("train loss", report["train_loss"]) + _table("eval loss", report["eval_loss"])
    libs = report["libraries"]
    if libs:
        lines.append("libraries (reported, not refused): " + ", ".join(
            f"{name} {v['original'] or '—'} -> {v['reproduced'] or '—'}" for name, v in libs.items()))
    else:
        lines.append("libraries: the versions the original recorded")
    for note in report["notes"]:
        lines.append(f"note: {note}")
    if written:
        lines.append(f"written: {written}")
    lines.append(f"verdict: {report['summary']}")
    return "\n".join(lines)


def run_reproduce(args: argparse.Namespace) -> int:
    from persona_lora.train.reproduce.run import reproduce

    report, path = reproduce(args.adapter, data=args.data, base=args.base, out=args.out, max_steps=args.max_steps,
                       allow_changes=args.allow_changes, hub=args.hub, trust_remote_code=args.trust_remote_code,
                       eval_data=args.eval_data)
    print(format_report(report, str(path)))
    return 0 if report["verdict"] in ("reproduced", "close") else 1
