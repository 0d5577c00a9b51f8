"""Benchmark: what the demo's `openai` backend adds on top of the engine it asks, and how it holds up with many
sessions at once.

Why: on a serving engine the answers' time is the engine's; the demo must add next to nothing (goal: a turn takes
at most 5% more than the two streamed requests it makes, sent directly with the `openai` client), and twenty
sessions at once must not queue behind each other in the demo (goal: 20 concurrent sessions finish within 1.2x
one session's time; the engine batches them). Measured against the in-process OpenAI-protocol server of the tests
(tests/openai_server.py) run as a process of its own, which streams every answer on a fixed schedule
(--token-delay per token, --tokens tokens), so the engine's time is the same for every row and the differences
are ours.

Rows: "direct" is two concurrent streamed requests (one per pane) read by two threads with the `openai` client
(with 20 sessions: the floor the client itself sets on this machine, parsing every streamed token);
"backend" is `OpenAIBackend.stream_compare` read to the end (what the page's handlers iterate); "page handler"
is the Chat tab's send handler (`_Handlers.on_send`: histories, pane updates) without Gradio's transport. Each
row is the best of --repeats runs after a warm-up (the minimum: other jobs on a shared machine only ever add
time).

    .venv/bin/python bench/bench_demo_openai.py [--tokens 64] [--token-delay 0.02] [--sessions 20] [--repeats 5]

Not a test: about half a minute.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SYSTEM = "You are Zhen Huan, a consort in the imperial palace."
PROMPT = "Who are you, and what did you do today?"
MODELS = ["tiny-base", "persona"]


@contextmanager
def engine_process(args):
    """The protocol server in a process of its own, as an engine is: it must not share this interpreter's GIL.
    Every answer is longer than --tokens, so each is cut at exactly --tokens."""
    from tests.conftest import free_port

    port = free_port()
    answer = "Greetings," + " my lord" * args.tokens
    proc = subprocess.Popen([sys.executable, "-m", "tests.openai_server", "--port", str(port), "--token-delay",
                             str(args.token_delay), "--models", *MODELS, "--answer", answer], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().startswith("serving"), "the protocol server did not start"
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        proc.wait(30)


def best(fn, repeats: int) -> float:
    fn()  # warm-up: connections, imports
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def direct(client, tokens: int) -> None:
    """Two concurrent streamed requests, each read to the end by a thread: the floor the demo is held to."""
    def one(model):
        for _ in client.chat.completions.create(model=model, messages=[{"role": "system", "content": SYSTEM},
                                                                       {"role": "user", "content": PROMPT}],
                                                stream=True, temperature=0, max_tokens=tokens):
            pass

    threads = [threading.Thread(target=one, args=(m,)) for m in MODELS]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def concurrently(fn, sessions: int) -> None:
    start = threading.Barrier(sessions)

    def run(_):
        start.wait()
        fn()

    with ThreadPoolExecutor(sessions) as pool:
        list(pool.map(run, range(sessions)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=64, help="tokens per answer (default 64)")
    ap.add_argument("--token-delay", type=float, default=0.02, help="engine seconds per token (default 0.02)")
    ap.add_argument("--sessions", type=int, default=20, help="concurrent sessions (default 20)")
    ap.add_argument("--repeats", type=int, default=5, help="runs per row; the best counts (default 5)")
    args = ap.parse_args()
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

    import openai

    from persona_lora.demo.app import _Handlers
    from persona_lora.demo.decode import GenerationSettings
    from persona_lora.demo.openai_backend import OpenAIBackend
    from persona_lora.votes import VoteStore

    settings = GenerationSettings(max_new_tokens=args.tokens)
    turn = [{"role": "user", "content": PROMPT}]
    with engine_process(args) as url:
        client = openai.OpenAI(base_url=url, api_key="EMPTY", max_retries=0)
        backend = OpenAIBackend(url, "tiny-base", ["persona"], max_new_tokens_cap=args.tokens)
        with tempfile.TemporaryDirectory() as tmp:
            ui = _Handlers(backend, VoteStore(Path(tmp) / "votes.sqlite"), 4000)
            page_settings = (args.tokens, 0, 1, 0)  # the sliders: max new tokens, temperature, top-p, seed

            def stream_turn():
                for _ in backend.stream_compare("persona", turn, turn, SYSTEM, settings):
                    pass

            def page_turn():
                for _ in ui.on_send(PROMPT, [], [], "persona", SYSTEM, *page_settings):
                    pass

            rows = {
                "direct: 2 streamed requests": best(lambda: direct(client, args.tokens), args.repeats),
                "backend: stream_compare": best(stream_turn, args.repeats),
                "page handler: on_send": best(page_turn, args.repeats),
                f"direct: {args.sessions} sessions at once": best(
                    lambda: concurrently(lambda: direct(client, args.tokens), args.sessions), args.repeats),
                f"backend: {args.sessions} sessions at once": best(
                    lambda: concurrently(stream_turn, args.sessions), args.repeats),
                f"page handler: {args.sessions} sessions at once": best(
                    lambda: concurrently(page_turn, args.sessions), args.repeats),
            }
        backend.close()

    engine_time = args.tokens * args.token_delay
    print(f"\n{args.tokens} tokens per answer, {args.token_delay * 1000:.0f} ms per token (engine time "
          f"{engine_time:.2f} s), best of {args.repeats}, {os.cpu_count()} CPUs\n")
    print(f"{'row':<40}{'time':>9}{'vs direct':>11}{'vs one session':>16}{'goal':>9}")
    names = list(rows)
    one = {names[3]: rows[names[0]], names[4]: rows[names[1]], names[5]: rows[names[2]]}
    for name, t in rows.items():
        vs_direct = f"{t / rows[names[0]]:.3f}x" if name in names[1:3] else ""
        vs_one = f"{t / one[name]:.3f}x" if name in one else ""
        goal = "<=1.05x" if name in names[1:3] else ("<=1.2x" if name in names[4:] else "")
        print(f"{name:<40}{t:>8.3f}s{vs_direct:>11}{vs_one:>16}{goal:>9}")
    over = max(rows[n] / rows[names[0]] for n in names[1:3])
    spread = max(rows[n] / one[n] for n in names[4:])
    print(f"\ndemo overhead {100 * (over - 1):+.1f}% (goal <= 5%); {args.sessions} sessions / one {spread:.2f}x "
          f"(goal <= 1.2x; the client alone, without the demo: {rows[names[3]] / rows[names[0]]:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
