"""`persona-lora eval ADAPTER [ADAPTER…] --base BASE [--data FILE_OR_ID] --out DIR`: base vs adapters over a
whole prompt set, written as `DIR/report.json` and `DIR/report.html` (see `runner`).

Exit codes: 0 done; 1 an error in data, models or files; 2 wrong use of options; 3 `--fail-if-forgetting` tripped
(an adapter's loss on the forgetting guard exceeds the base's by more than the allowed difference), so a CI job
can stop a release on it; 130 interrupted (the finished rows are kept; the same command continues).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from persona_lora.errors import UsageError
from persona_lora.hub_ids import add_hub_option, add_source_option

FORGETTING_EXIT = 3
GUARD_MODES = ("full", "loss", "off")
# Longest greedy answer eval writes: beyond it a typo (an extra zero) would decode for hours; the demo's cap is 512
MAX_NEW_TOKENS_CAP = 4096


def configure_eval(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Evaluate the base and each adapter on one prompt set: loss and perplexity on the reference answers, "
        "greedy answers side by side, answer length, distinct-1/2, persona-marker rate, a forgetting guard on "
        "general prompts and, when asked, an LLM judge. Writes DIR/report.json and a self-contained DIR/report.html; "
        "rows are saved as they finish, so an interrupted run continues when rerun with the same --out.")
    p.add_argument("adapters", nargs="+", metavar="ADAPTER", help="adapter folder or hub id (owner/name[@rev])")
    p.add_argument("--base", required=True, metavar="BASE", help="base model: local folder or hub id")
    p.add_argument("--revision", metavar="REV", help="revision of a hub base")
    add_source_option(p)
    add_hub_option(p, help_prefix="adapters given as hub ids: ")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="folder for report.json, report.html and "
                   "the rows (rerun with the same DIR to continue an interrupted evaluation)")
    p.add_argument("--data", metavar="FILE_OR_ID", help="prompts with reference answers, in any format training "
                   "reads (default: the first adapter's held-out split, rebuilt from its manifest)")
    p.add_argument("--split", choices=("held-out", "train", "all"),
                   help="which records of the data: the adapter's held-out or training split (the data must be the "
                        "file it was trained on, proven by its sha256) or all (default: all with --data, else "
                        "held-out)")
    p.add_argument("-n", type=int, metavar="N", help="evaluate N prompts, sampled with --seed (default: all)")
    p.add_argument("--max-new-tokens", type=int, default=128, metavar="N", help="tokens per greedy answer "
                   f"(default 128, at most {MAX_NEW_TOKENS_CAP})")
    p.add_argument("--system", metavar="TEXT", help="system prompt for records without one (default: the one the "
                   "adapters were trained with; \"\" for none)")
    p.add_argument("--seed", type=int, default=0, help="seed of the -n sample (default 0)")
    p.add_argument("--markers", action="append", metavar="WORD[,WORD…]", help="persona markers whose rate in the "
                   "answers is reported (default: data.markers of the adapters' training configs); repeatable")
    p.add_argument("--batch-size", type=int, default=8, metavar="N", help="prompts per batch (default 8; 1: one "
                   "prompt at a time)")
    p.add_argument("--max-length", type=int, metavar="N", help="tokens per scored example (default: the adapters' "
                   "training max length)")
    p.add_argument("--guard", choices=GUARD_MODES, default="loss", help="forgetting guard on ~50 general prompts: "
                   "loss (their loss per model, seconds; default), full (their greedy answers too: base and each "
                   "adapter decode every guard prompt, the longest part of an evaluation) or off")
    p.add_argument("--guard-data", metavar="FILE_OR_ID", help="replace the shipped guard prompts (general questions "
                   "in Chinese and English)")
    p.add_argument("--fail-if-forgetting", type=float, metavar="X", help="exit with code 3 when an adapter's loss "
                   "on the guard prompts exceeds the base's by more than X")
    p.add_argument("--judge-endpoint", metavar="URL", help="OpenAI-compatible API base of a judge model, e.g. "
                   "http://127.0.0.1:8000/v1 (never called unless given)")
    p.add_argument("--judge-model", metavar="NAME", help="the judge model's name at the endpoint")
    p.add_argument("--judge-key-env", metavar="VAR", help="environment variable holding the judge's API key "
                   "(never the key itself)")
    p.add_argument("--judge-rubric", type=Path, metavar="FILE", help="the judge's instructions, with {prompt}, "
                   "{answer_a}, {answer_b} (and optionally {system_prompt}, {reference}); default: the shipped one")
    p.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda when available)")
    p.add_argument("--dtype", default="auto", help="weights dtype: auto (bf16 on a capable GPU, else fp32), "
                   "float32, bfloat16, float16")
    p.add_argument("--overwrite", action="store_true", help="start over in --out instead of continuing")


def options_from_args(args: argparse.Namespace):
    """Check the options against each other; every problem at once, each naming the option and the fix."""
    from persona_lora.evaluation.plan import EvalOptions

    problems = []
    for flag, value, low in (("-n", args.n, 1), ("--max-new-tokens", args.max_new_tokens, 1),
                             ("--batch-size", args.batch_size, 1), ("--max-length", args.max_length, 8)):
        if value is not None and value < low:
            problems.append(f"{flag} must be at least {low}, got {value}")
    if args.max_new_tokens is not None and args.max_new_tokens > MAX_NEW_TOKENS_CAP:
        problems.append(f"--max-new-tokens {args.max_new_tokens} is more than {MAX_NEW_TOKENS_CAP} tokens per answer "
                        f"(every prompt of every model would decode that far); give at most {MAX_NEW_TOKENS_CAP}")
    x = args.fail_if_forgetting
    if x is not None and (not math.isfinite(x) or x < 0):
        problems.append(f"--fail-if-forgetting must be a difference in loss >= 0, got {x}")
    if x is not None and args.guard == "off":
        problems.append("--fail-if-forgetting needs the guard: drop --guard off")
    judge = {"--judge-endpoint": args.judge_endpoint, "--judge-model": args.judge_model}
    if any(judge.values()) and not all(judge.values()):
        missing = [k for k, v in judge.items() if not v]
        problems.append(f"the judge needs {' and '.join(judge)}: {', '.join(missing)} is missing")
    if not args.judge_endpoint and (args.judge_key_env or args.judge_rubric):
        problems.append("--judge-key-env and --judge-rubric only apply with --judge-endpoint")
    if args.judge_endpoint and not args.judge_endpoint.startswith(("http://", "https://")):
        problems.append(f"--judge-endpoint {args.judge_endpoint!r} is not an http(s) URL; give the API base, e.g. "
                        "http://127.0.0.1:8000/v1")
    markers = None
    if args.markers is not None:
        markers = [m.strip() for group in args.markers for m in group.split(",") if m.strip()]
    if problems:
        raise UsageError("; ".join(problems))
    return EvalOptions(
        adapters=list(args.adapters), base=args.base, out=args.out, data=args.data, split=args.split, n=args.n,
        max_new_tokens=args.max_new_tokens, system=args.system, seed=args.seed, markers=markers,
        batch_size=args.batch_size, max_length=args.max_length, guard=args.guard, guard_data=args.guard_data,
        fail_if_forgetting=x, judge_endpoint=args.judge_endpoint, judge_model=args.judge_model,
        judge_key_env=args.judge_key_env, judge_rubric=args.judge_rubric, base_revision=args.revision,
        source=args.source, hub=args.hub, device=args.device, dtype=args.dtype, overwrite=args.overwrite)


def run_eval(args: argparse.Namespace) -> int:
    from persona_lora.evaluation.runner import evaluate
    from persona_lora.evaluation.store import REPORT_HTML, REPORT_JSON

    options = options_from_args(args)
    report = evaluate(options)
    print(options.out / REPORT_JSON)
    print(options.out / REPORT_HTML)
    forgot = [(name, f) for name, f in ((report.get("forgetting") or {}).get("adapters") or {}).items()
              if f.get("exceeded")]
    for name, f in forgot:
        print(f"persona-lora eval: {name} forgot: its loss on the guard prompts is {f['loss']:.4f}, the base's "
              f"{report['forgetting']['base_loss']:.4f} (+{f['delta']:.4f} > --fail-if-forgetting "
              f"{options.fail_if_forgetting})", file=sys.stderr)
    return FORGETTING_EXIT if forgot else 0


def configure_leaderboard(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Rate every model the votes compared (arena battles and blind A/B votes of `persona-lora demo` or a Space): "
        "Bradley-Terry ratings (ties as half wins) with bootstrap 95%% intervals, votes and win rate per model, the "
        "pairwise win-rate and predicted win-probability matrices. Writes DIR/leaderboard.json, a self-contained "
        "DIR/leaderboard.html, DIR/ratings.png and DIR/win_rates.png. Several sources are merged, each vote "
        "counted once; models are identified by content (an adapter's weights sha256), not by folder name.")
    p.add_argument("votes", nargs="+", metavar="VOTES",
                   help="the demo's votes.sqlite, a votes.jsonl export, or a hub dataset of votes (owner/name, its "
                        "`votes` config); several are merged")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="folder for the leaderboard's files")
    p.add_argument("--overwrite", action="store_true", help="replace DIR when it holds an earlier leaderboard")
    p.add_argument("--rounds", type=int, default=1000, metavar="N", help="bootstrap rounds (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0: the same votes give the same page)")
    p.add_argument("--revision", metavar="REV", help="revision of a hub dataset source")


def run_leaderboard(args: argparse.Namespace) -> int:
    from persona_lora.evaluation.leaderboard import FILES, rate, table_lines, write
    from persona_lora.output_folder import OutputFolder, check_target
    from persona_lora.vote_sources import load_votes

    if not 1 <= args.rounds <= 100_000:
        raise UsageError(f"--rounds must be between 1 and 100000, got {args.rounds}")
    target = check_target(args.out, option="--out", replace=args.overwrite,
                          ours=lambda folder: (folder / FILES[0]).is_file(),
                          foreign="holds no leaderboard.json", occupied_hint="choose a new folder or add --overwrite")
    votes = load_votes(list(args.votes), revision=args.revision)
    report, _ = rate(votes, rounds=args.rounds, seed=args.seed)
    with OutputFolder(target) as work:
        write(report, work)
    print("\n".join(table_lines(report)))
    if votes.duplicates:
        print(f"{votes.duplicates} repeated vote(s) among the sources were counted once", file=sys.stderr)
    if report["groups"]:
        print(f"warning: the models fall into {len(report['groups'])} groups never compared with each other; "
              "ratings are comparable only within a group", file=sys.stderr)
    for name in FILES:
        print(args.out / name)
    return 0
