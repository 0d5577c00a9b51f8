"""Train an adapter again from its manifest alone, and say whether it comes out the same.

Every adapter folder carries the provenance of its run (base id, revision and config hash, the dataset's sha256,
the resolved config, the loss history, library versions). `reproduce` turns that record into a check anyone can
run on a folder or a hub id someone shared: it rebuilds the configuration from the manifest (never from the
user's config files), makes sure the base and the data are the ones recorded, trains into a new folder and
compares the two loss histories step by step. Training on the same device type from the same seed is
deterministic, so a faithful record reproduces to well below 1e-4.

The reproduction logs the loss of every step. The original logged every `logging_steps` (and its first and last
step), each logged loss being Trainer's mean over the steps since the previous log, so each original loss is compared
with the mean of the reproduction's losses over the same steps: every step run up to the last original log is
compared. A loss at step k follows k-1 optimizer updates (an eval loss at step k follows k), so a comparison that
reaches fewer than 2 updates cannot tell a faithful record from one that only shares its starting point: its
verdict is "inconclusive", with the --max-steps that would make it conclusive.

What is refused and what is only reported follows from what changes the run: other data (sha256, record count),
another base (config hash; revision for hub ids), another chat template or a run resumed with changed settings
are different runs, refused unless `--allow-changes` (then the verdict is "different" and names them); other
library versions, another device type or dtype are reported (another device type can at best be "close").

The original adapter is only read: the reproduction goes to a new folder (`<adapter>-reproduced` next to a local
adapter, in the working folder for a hub id), with `reproduce.json` beside the adapter files it trained.
"""

from __future__ import annotations

import copy
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from persona_lora.artifact import Manifest, read_manifest
from persona_lora.errors import ManifestError, UsageError, VerificationError
from persona_lora.train.config import TrainConfig, config_from_dict
from persona_lora.train.reproduce.inputs import (
    check_base,
    check_chat_template,
    check_data,
    check_eval,
    choose_device,
    load_recorded_data,
    load_recorded_eval,
    resolve_recorded_base,
)
from persona_lora.train.reproduce.record import config_dict, original_history

REPORT_NAME = "reproduce.json"
REPORT_SCHEMA = "persona-lora/reproduce@1"
REPRODUCED, CLOSE = 1e-4, 1e-2  # max |loss difference| for "reproduced" (same device type) and "close"
MIN_UPDATES = 2  # optimizer updates the compared losses must reach for any verdict but "inconclusive"
# Run-defining settings where a difference comes from the machine, not the record: reported, never "reproduced"
ENVIRONMENTAL = ("training.dtype", "training.world_size")
# Inputs checked before training: a difference there is refused (or, allowed, a named change)
CHECKED_FIRST = ("base_model.config_sha256", "dataset.sha256", "dataset.eval_file.sha256", "chat.chat_template")


@dataclass
class Original:
    """The adapter being reproduced: where its files are and what its manifest says."""

    folder: Path
    manifest: Manifest
    label: str  # as the user named it: a folder's name or a hub id
    hub_id: str | None = None
    commit: str | None = None


@dataclass
class Plan:
    """Everything checked before training: the config to run, where, and what differs from the record."""

    config: TrainConfig
    config_from: str
    out: Path
    stop_after: int | None  # optimizer step to stop after (--max-steps, or where an interrupted original stopped)
    compare_upto: int | None  # last original step compared
    changes: list[str] = field(default_factory=list)  # allowed differences of the inputs, each naming the field
    inputs: dict = field(default_factory=dict)  # base and data: recorded vs used, for the report
    notes: list[str] = field(default_factory=list)
    template_dir: tempfile.TemporaryDirectory | None = None  # a chat template file rebuilt from the manifest


# ------------------------------------------------------------------------------------------------ the adapter


def open_adapter(spec: str, *, hub: str = "hf") -> Original:
    """A local adapter folder or a hub id (pulled and verified), with its manifest."""
    from persona_lora.hubs.pull import local_or_pulled

    folder, ref, commit = local_or_pulled(spec, hub=hub, what="ADAPTER")
    manifest = read_manifest(folder)
    if manifest.kind != "adapter":
        made_from = manifest.merge.adapter if manifest.merge and manifest.merge.adapter else "its adapter"
        raise UsageError(f"{spec} is a merged model, not an adapter; reproduce the adapter it was made from "
                         f"({made_from}) instead")
    return Original(folder=folder, manifest=manifest, label=str(ref) if ref else folder.name,
                    hub_id=ref.repo_id if ref else None, commit=commit)


def default_out(original: Original) -> Path:
    """A new folder: next to a local adapter, in the working folder for a pulled one (never in the hub cache)."""
    parent = Path.cwd() if original.hub_id else original.folder.parent
    stem = (original.hub_id.split("/")[-1] if original.hub_id else original.folder.name) + "-reproduced"
    out, n = parent / stem, 2
    while out.exists():
        out, n = parent / f"{stem}-{n}", n + 1
    return out


def check_out(out: Path, original: Original) -> Path:
    """`--out` must be a new (or empty) folder outside the adapter: reproduce never writes into the original."""
    out = out.expanduser().resolve()
    adapter = original.folder.resolve()
    if out == adapter or adapter in out.parents or out in adapter.parents:
        raise UsageError(f"--out {out}: that is the adapter's own folder (or holds it); reproduce never writes into "
                         "the adapter it checks. Choose a new folder")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"--out {out} exists and is not empty; reproduce writes a new folder and never replaces "
                         "one. Choose another --out or leave it out (a new folder next to the adapter)")
    return out


# ------------------------------------------------------------------------------------------------ plan and run


def plan_reproduction(original: Original, *, data: str | None = None, base: str | None = None,
                      out: str | Path | None = None, max_steps: int | None = None, allow_changes: bool = False,
                      hub: str = "hf", trust_remote_code: bool = False, eval_data: str | None = None) -> Plan:
    """Rebuild the config from the manifest and check base and data against the record; nothing is written.
    Differences of the inputs are refused (VerificationError naming each) unless `allow_changes`."""
    m = original.manifest
    if max_steps is not None and max_steps < 1:
        raise UsageError(f"--max-steps {max_steps}: give a number of optimizer steps >= 1")
    history = original_history(m, original.folder)
    cfg, config_from = config_dict(m, original.folder, history)
    if cfg["base"].get("trust_remote_code") and not trust_remote_code:
        raise UsageError(f"{original.label} was trained with base.trust_remote_code: true; reproduce runs a hub "
                         "repo's own code only with --trust-remote-code (pass it if you trust the base's author)")
    notes: list[str] = []
    run = m.run
    if run is not None and run.changes and not allow_changes:
        raise VerificationError(f"{original.label} was resumed with changed settings, so no single run reproduces "
                                "it:" + "".join(f"\n  - {c}" for c in run.changes)
                                + "\nPass --allow-changes to run its final settings anyway (the verdict is then "
                                "'different')")
    changes = [f"run.changes: the original was resumed with changed settings ({'; '.join(run.changes)})"] if (
        run is not None and run.changes) else []

    steps = [s for s in history if max_steps is None or s <= max_steps]
    if not steps:
        raise UsageError(f"--max-steps {max_steps}: the original logged its first loss at step {min(history)}; "
                         f"give --max-steps {min(history)} or more")
    stop_after = max_steps
    if run is not None and run.interrupted:  # its history ends where Ctrl-C stopped it: train that far only
        last = max(history)
        stop_after = min(stop_after or last, last)
        notes.append(f"the original run was interrupted at step {last}; reproducing up to there")

    processes = m.training.world_size if m.training else None
    if processes and processes != int(os.environ.get("WORLD_SIZE", "1")):
        notes.append(f"the original trained in {processes} data-parallel processes, this run in "
                     f"{os.environ.get('WORLD_SIZE', '1')}: other batches, so expect 'different' or 'close'")
    out_path = check_out(Path(out) if out else default_out(original), original)
    rb = resolve_recorded_base(m, base, hub)
    base_problems, base_info = check_base(m, rb)
    loaded = load_recorded_data(m, cfg, data)
    data_problems, data_info = check_data(m, loaded)
    held = load_recorded_eval(m, loaded, eval_data)
    eval_problems, eval_info = check_eval(m, held)
    problems = base_problems + data_problems + eval_problems
    template_file = m.chat is not None and m.chat.template_source == "file"  # the run's own, recorded in full
    if template_file and not m.chat.chat_template:
        raise ManifestError(f"{original.folder / 'persona_manifest.json'}: chat.template_source is 'file' but "
                            "chat.chat_template is missing, so the template the run used is unknown")
    if not template_file:
        problems += check_chat_template(m, rb)
    if problems and not allow_changes:
        raise VerificationError(
            f"{original.label} cannot be reproduced with these inputs:" + "".join(f"\n  - {p}" for p in problems)
            + "\nGive the recorded ones with --base/--data/--eval-data, or pass --allow-changes to train on these "
            "anyway (the verdict is then 'different' and names what changed)")
    changes += problems

    if rb.source == "local":
        cfg["base"].update(model=str(rb.path), source="local", revision=None)
    else:
        cfg["base"].update(model=rb.id, source=rb.source, revision=rb.revision)
    cfg["base"]["trust_remote_code"] = bool(cfg["base"].get("trust_remote_code")) and trust_remote_code
    cfg["base"]["device"] = choose_device(m.training.device if m.training else None, cfg["base"].get("device", "auto"))
    cfg["data"]["path"] = loaded.path or loaded.hub_id or loaded.name
    if held is not None:
        cfg["data"]["eval_path"] = held.path or held.hub_id or held.name
    if loaded.source == "local":
        cfg["data"]["revision"] = None
    training = cfg["training"]
    training.update(output_dir=str(out_path), resume="false", overwrite=False, allow_changes=False,
                    logging_steps=1)  # every step's loss: each logged original loss is compared over its steps
    # logging integrations do not shape the result; a reproduction never logs to someone's wandb project
    training["report_to"] = [r for r in training.get("report_to") or [] if r == "tensorboard"] or ["none"]
    template_dir = tempfile.TemporaryDirectory(prefix="persona-lora-reproduce-") if template_file else None
    try:
        if template_dir is not None:
            path = Path(template_dir.name) / Path(cfg["base"].get("chat_template") or "chat_template.jinja").name
            path.write_text(m.chat.chat_template, encoding="utf-8")
            cfg["base"]["chat_template"] = str(path)
        config = config_from_dict(cfg, f"rebuilt from {original.folder / 'persona_manifest.json'}")
    except BaseException:
        if template_dir is not None:
            template_dir.cleanup()
        raise
    return Plan(config=config, config_from=config_from, out=out_path, stop_after=stop_after,
                compare_upto=max(steps), changes=changes,
                inputs={"base": base_info, "data": data_info, **({"eval_data": eval_info} if eval_info else {})},
                notes=notes, template_dir=template_dir)


def run_reproduction(plan: Plan, print_fn=print) -> Manifest:
    """Train the planned run into `plan.out`; the reproduction's manifest."""
    from persona_lora.train.trainer import run_training

    try:
        out = run_training(plan.config, print_fn=print_fn, stop_after=plan.stop_after)
    finally:
        if plan.template_dir is not None:
            plan.template_dir.cleanup()
    return read_manifest(out)


# ------------------------------------------------------------------------------------------------ the verdict


def _points(history, key: str, upto: int | None) -> dict[int, float]:
    out = {}
    for e in history:
        value = getattr(e, key)
        if value is not None and e.step is not None and (upto is None or e.step <= upto):
            out[e.step] = value  # a step logged twice (a resumed run): the later entry
    return out


def _rows(original: dict[int, float], reproduced: dict[int, float]) -> list[dict]:
    """One row per original point, compared at the same step."""
    rows = []
    for step in sorted(original):
        new = reproduced.get(step)
        rows.append({"step": step, "original": original[step], "reproduced": new,
                     "diff": None if new is None else new - original[step]})
    return rows


def _window_rows(original: dict[int, float], reproduced: dict[int, float]) -> list[dict]:
    """One row per original train loss: Trainer logged the mean loss of the steps since its previous log, so it is
    compared with the mean of the reproduction's per-step losses over those same steps (all of them must be
    there). `steps` says which steps each row covers."""
    rows, previous = [], 0
    for step in sorted(original):
        covered = list(range(previous + 1, step + 1))
        values = [reproduced.get(s) for s in covered]
        new = None if any(v is None for v in values) else sum(values) / len(values)
        rows.append({"step": step, "steps": [covered[0], covered[-1]], "original": original[step], "reproduced": new,
                     "diff": None if new is None else new - original[step]})
        previous = step
    return rows


def updates_compared(train: list[dict], evals: list[dict]) -> int:
    """Optimizer updates behind the latest loss compared: a train loss at step k was computed before step k's
    update (k-1 updates), an eval loss at step k after it (k)."""
    done = [r["step"] - 1 for r in train if r["reproduced"] is not None]
    done += [r["step"] for r in evals if r["reproduced"] is not None]
    return max(done, default=0)


def conclusive_steps(history) -> int | None:
    """The smallest --max-steps whose comparison reaches MIN_UPDATES updates, from the original's logged steps."""
    candidates = [e.step for e in history if e.step is not None and (
        (e.loss is not None and e.step - 1 >= MIN_UPDATES) or (e.eval_loss is not None and e.step >= MIN_UPDATES))]
    return min(candidates, default=None)


def _max_abs(rows: list[dict]) -> float:
    diffs = [abs(r["diff"]) for r in rows if r["diff"] is not None]
    return max((math.inf if math.isnan(d) else d for d in diffs), default=0.0)


def compare(original: Original, plan: Plan, reproduced: Manifest) -> dict:
    """The report: per-step losses of both runs, their differences, what differs, and the verdict."""
    from persona_lora.train.provenance import run_changes

    m = original.manifest
    history = m.metrics.history
    new_history = reproduced.metrics.history if reproduced.metrics else []
    train = _window_rows(_points(history, "loss", plan.compare_upto), _points(new_history, "loss", None))
    evals = _rows(_points(history, "eval_loss", plan.compare_upto), _points(new_history, "eval_loss", None))
    missing = [r["step"] for r in train + evals if r["reproduced"] is None]
    max_diff = max(_max_abs(train), _max_abs(evals))
    updates = updates_compared(train, evals)
    steps_run = reproduced.metrics.steps if reproduced.metrics else 0

    changes = list(plan.changes)
    environment = []
    recorded = m
    if m.training is not None and m.training.max_steps is not None and m.training.max_steps < 0:
        recorded = copy.deepcopy(m)  # older manifests wrote -1 for "no step limit", current ones None
        recorded.training.max_steps = None
    for change in run_changes(recorded, reproduced):
        path = change.split(":")[0]
        if path in ENVIRONMENTAL:
            environment.append(change)
        elif path not in CHECKED_FIRST and path != "base_model.revision":
            changes.append(change)
    devices = {"original": m.training.device if m.training else None, "reproduced": reproduced.training.device}
    same_device = (devices["original"] or "").split(":")[0] == (devices["reproduced"] or "").split(":")[0]
    old_libs = m.environment.libraries if m.environment else {}
    new_libs = reproduced.environment.libraries if reproduced.environment else {}
    libraries = {name: {"original": old_libs.get(name), "reproduced": new_libs.get(name)}
                 for name in sorted(set(old_libs) | set(new_libs)) if old_libs.get(name) != new_libs.get(name)}

    verdict, reasons = decide(max_diff, changes, environment, missing, same_device, updates=updates)
    if verdict == "inconclusive":
        logged = sorted({e.step for e in history if e.loss is not None and e.step is not None})
        enough = conclusive_steps(history)
        fix = (f"reproduce with --max-steps {enough} or more" if enough else
               "the original itself ran too few steps for a conclusive comparison")
        shown = ", ".join(map(str, logged[:6])) + (", …" if len(logged) > 6 else "")
        reasons.append(f"the original logged its train loss at steps {shown}; of the {steps_run} step(s) run, the "
                       f"losses compared reach {updates} optimizer update(s): {fix}")
    report = {
        "schema": REPORT_SCHEMA,
        "verdict": verdict,
        "summary": "",
        "reasons": reasons,
        "adapter": {"name": m.name, "source": original.label, "hub_id": original.hub_id, "commit": original.commit},
        "reproduction": plan.out.name,
        "config_from": plan.config_from,
        "max_steps": plan.stop_after,
        "steps_compared": [train[0]["step"], train[-1]["step"]] if train else None,
        "steps_run": steps_run,
        "updates_compared": updates,
        "max_abs_diff": max_diff,
        "thresholds": {"reproduced": REPRODUCED, "close": CLOSE},
        "train_loss": train,
        "eval_loss": evals,
        "missing_steps": sorted(set(missing)),
        "changes": changes,
        "environment": {"device": {**devices, "same_type": same_device}, "differences": environment},
        "libraries": libraries,
        "inputs": plan.inputs,
        "notes": plan.notes,
    }
    report["summary"] = summary_line(report)
    return report


def decide(max_diff: float, changes: list[str], environment: list[str], missing: list[int],
           same_device: bool = True, updates: int = MIN_UPDATES) -> tuple[str, list[str]]:
    """reproduced: max |Δ| <= 1e-4 on the same device type with the same inputs; close: <= 1e-2 (or <= 1e-4 on
    another device type, dtype or process count); otherwise different. Changed inputs, or steps the reproduction
    never reached, make it different whatever the losses say; losses that reach fewer than MIN_UPDATES optimizer
    updates make it inconclusive (the caller adds how to make it conclusive)."""
    reasons = list(changes)
    if missing:
        reasons.append(f"the reproduction logged no loss at step(s) {', '.join(map(str, sorted(set(missing))))}")
    if reasons:
        return "different", reasons
    if updates < MIN_UPDATES:
        return "inconclusive", []
    if not same_device:
        environment = ["'reproduced' needs the device type it was trained on", *environment]
    if max_diff <= REPRODUCED and not environment:
        return "reproduced", []
    return ("close" if max_diff <= CLOSE else "different"), environment


def summary_line(report: dict) -> str:
    """The one-line verdict: the word, the largest difference against its threshold and over what, where it ran,
    the optimizer updates the compared losses reach, then the reasons (e.g. `reproduced — max |Δ loss| 9.5e-07 ≤
    1e-04 over 6 train + 3 eval losses (steps 1-6, 6 optimizer updates, cpu as trained)`)."""
    span = report["steps_compared"]
    steps = f"steps {span[0]}-{span[1]}" if span and span[0] != span[1] else f"step {span[0]}" if span else "no steps"
    device = report["environment"]["device"]
    where = (f"{device['reproduced']} as trained" if device["same_type"] else
             f"trained on {device['original'] or 'an unrecorded device'}, reproduced on {device['reproduced']}")
    diff = report["max_abs_diff"]
    bound = next((f" ≤ {t:.0e}" for t in (REPRODUCED, CLOSE) if diff <= t), f" > {CLOSE:.0e}")
    updates = report.get("updates_compared")
    reach = f", {updates} optimizer update{'s' if updates != 1 else ''}" if updates is not None else ""
    line = (f"{report['verdict']} — max |Δ loss| {diff:.1e}{bound} over {len(report['train_loss'])} train + "
            f"{len(report['eval_loss'])} eval losses ({steps}{reach}, {where})")
    if report["reasons"]:
        line += "; " + "; ".join(r.replace("\n", " ") for r in report["reasons"])
    return line


def write_report(out: Path, report: dict) -> Path:
    path = Path(out) / REPORT_NAME
    path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def reproduce(spec: str, *, data: str | None = None, base: str | None = None, out: str | Path | None = None,
              max_steps: int | None = None, allow_changes: bool = False, hub: str = "hf",
              trust_remote_code: bool = False, eval_data: str | None = None, print_fn=print) -> tuple[dict, Path]:
    """Check, train, compare, write `reproduce.json` into the reproduction's folder; the report and its path."""
    original = open_adapter(spec, hub=hub)
    plan = plan_reproduction(original, data=data, base=base, out=out, max_steps=max_steps,
                             allow_changes=allow_changes, hub=hub, trust_remote_code=trust_remote_code,
                             eval_data=eval_data)
    print_fn(f"reproducing {original.label} ({plan.config_from}) into {plan.out}"
             + (f", first {plan.stop_after} steps" if plan.stop_after else ""))
    for line in plan.changes:
        print_fn(f"changed (--allow-changes): {line}")
    for note in plan.notes:
        print_fn(f"note: {note}")
    reproduced = run_reproduction(plan, print_fn=print_fn)
    report = compare(original, plan, reproduced)
    return report, write_report(plan.out, report)


__all__ = ["reproduce", "open_adapter", "plan_reproduction", "run_reproduction", "compare", "decide", "REPORT_NAME"]
