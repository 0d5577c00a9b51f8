"""`persona-lora demo`: serve the A/B demo for one base and any number of adapters.

Backends: `--backend local` (the default) loads the base into this process and answers both sides with the one
resident model (`demo.engine`); `--backend openai --endpoint URL` asks a serving engine (vLLM, SGLang) that
already serves the base and the adapters through its OpenAI-compatible API (`demo.openai_backend`): the way to
serve a demo to many people at once. `--base` and `--adapter` then name the engine's models (its served names),
and the key, if the engine has one, is read from the environment variable `--api-key-env` names, so it never
appears in the process list, the page or a log.

Sharing: `--share` asks Gradio for a public *.gradio.live link, which needs the internet (Gradio's share
server) and exposes the demo to anyone holding the link: combine it with `--auth`. `--host 0.0.0.0` exposes it
on your network the same way. Neither is exercised by the tests (no internet there).
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from pathlib import Path

from persona_lora.errors import UsageError
from persona_lora.hub_ids import add_hub_option, add_source_option

log = logging.getLogger(__name__)

DEFAULT_PORT, PORT_TRIES = 7860, 100  # Gradio's own default port and search range

AUTH_ENV = "PERSONA_LORA_DEMO_AUTH"
BACKENDS = ("local", "openai")


def default_votes_path() -> Path:
    """Votes are state the user creates: they live in the user's state folder (`$XDG_STATE_HOME`, by default
    ~/.local/state), never in the working tree."""
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "persona-lora" / "votes.sqlite"


def configure_demo(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Serve a Gradio app: the base's and an adapter's answers side by side (streaming, one resident model for "
        "all adapters), blind A/B votes stored in SQLite with win rates, export of the votes as a DPO preference "
        "dataset, and a `compare` API endpoint for scripts (gradio_client).")
    p.add_argument("--backend", choices=BACKENDS, default="local",
                   help="local: load the base here (default); openai: a serving engine's OpenAI-compatible API "
                        "(vLLM, SGLang) answers both sides")
    p.add_argument("--base", required=True, metavar="BASE",
                   help="base model: local folder or hub id (openai: the engine's served model name)")
    p.add_argument("--revision", metavar="REV", help="revision of a hub base")
    add_source_option(p)
    p.add_argument("--adapter", action="append", default=[], metavar="DIR_OR_REPO_ID",
                   help="an adapter folder or hub id (owner/name[@revision]); repeat for several. More can be added "
                        "from the page while it runs. openai: the engine's model name (vLLM: a --lora-modules name; "
                        "SGLang: base:adapter), or NAME=FOLDER to take the system prompt from that adapter's (or "
                        "export's) manifest; none: every model the endpoint lists but the base")
    p.add_argument("--endpoint", metavar="URL",
                   help="openai: the engine's API, e.g. http://127.0.0.1:8000/v1 (`persona-lora serve` prints it)")
    p.add_argument("--api-key-env", metavar="VAR",
                   help="openai: the environment variable holding the engine's API key (never the key itself)")
    p.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                   help="openai: longest wait for the engine's next token before a side fails (default 60)")
    add_hub_option(p, help_prefix="hub for adapter ids and the votes push: ")
    p.add_argument("--chat-template", metavar="FILE", help="Jinja chat template for a base whose tokenizer has none")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=None,
                   help=f"port (default {DEFAULT_PORT}, or the next free one up to {DEFAULT_PORT + PORT_TRIES - 1} "
                        "when it is taken, e.g. by another demo)")
    p.add_argument("--share", action="store_true",
                   help="also open a public gradio.live link (needs the internet; use with --auth)")
    p.add_argument("--auth", metavar="USER:PASSWORD",
                   help=f"require this login (or set {AUTH_ENV}=USER:PASSWORD to keep it out of the process list)")
    p.add_argument("--votes", metavar="PATH", default=None,
                   help="SQLite file for A/B votes (default: persona-lora/votes.sqlite in $XDG_STATE_HOME, "
                        "~/.local/state when unset)")
    p.add_argument("--arena", action="store_true",
                   help="show the Arena tab (blind battles between any two of the base and the adapters, with a live "
                        "Bradley-Terry leaderboard) even with one adapter; it is there anyway with two or more")
    p.add_argument("--push-votes-to", metavar="REPO_ID",
                   help="add a button that pushes the votes to this dataset repo on --hub (server's token)")
    p.add_argument("--max-new-tokens", type=int, default=512, metavar="N",
                   help="server-side cap on new tokens (default 512)")
    p.add_argument("--max-input-chars", type=int, default=4000, metavar="N",
                   help="longest accepted message (default 4000)")
    p.add_argument("--max-prompt-tokens", type=int, default=2048, metavar="N",
                   help="longest prompt; older turns are dropped beyond it (default 2048)")
    p.add_argument("--concurrency", type=int, default=8, metavar="N", help="requests decoded at once (default 8)")
    p.add_argument("--queue-size", type=int, default=64, metavar="N", help="requests allowed to wait (default 64)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 … (default: cuda when available)")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16")
    p.add_argument("--no-mixed-batch", action="store_true",
                   help="decode the two sides one after the other instead of in one batch (slower; a fallback for "
                        "MoE layouts the batched path does not know)")


def parse_auth(value: str | None) -> tuple[str, str] | None:
    if not value:
        return None
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise UsageError("--auth must look like USER:PASSWORD (both non-empty)")
    return user, password


LOCAL_ONLY = {"revision": None, "chat_template": None, "device": None, "no_mixed_batch": False}
OPENAI_ONLY = {"endpoint": None, "api_key_env": None}


def check_backend_options(args: argparse.Namespace) -> None:
    """Options of one backend given to the other are refused: silently ignoring them would demo something else
    than asked (a --device that is not used, an --endpoint that is not asked)."""
    if args.backend == "openai" and not args.endpoint:
        raise UsageError("--backend openai needs --endpoint URL (the engine's OpenAI-compatible API, e.g. "
                         "http://127.0.0.1:8000/v1)")
    other = LOCAL_ONLY if args.backend == "openai" else OPENAI_ONLY
    given = [f"--{k.replace('_', '-')}" for k, default in other.items() if getattr(args, k, default) != default]
    if given:
        which = "the local backend" if args.backend == "openai" else "--backend openai"
        raise UsageError(f"{', '.join(given)} only apply to {which}; drop them or choose that backend")
    if not args.timeout > 0:
        raise UsageError(f"--timeout must be a positive number of seconds, got {args.timeout}")


def check_args(args: argparse.Namespace) -> tuple[str, str] | None:
    """Validate the options that need no model; returns the auth pair."""
    check_backend_options(args)
    if args.port is not None and not 0 < args.port < 65536:
        raise UsageError(f"--port must be between 1 and 65535, got {args.port}")
    for opt in ("max_new_tokens", "max_input_chars", "concurrency", "queue_size"):
        if getattr(args, opt) < 1:
            raise UsageError(f"--{opt.replace('_', '-')} must be at least 1, got {getattr(args, opt)}")
    if args.max_prompt_tokens < 8:
        raise UsageError(f"--max-prompt-tokens must be at least 8, got {args.max_prompt_tokens}")
    auth = parse_auth(args.auth or os.environ.get(AUTH_ENV))
    if (args.share or args.host not in ("127.0.0.1", "localhost", "::1")) and not auth:
        log.warning("the demo is reachable by others (--share or --host %s) without --auth", args.host)
    return auth


def build_from_args(args: argparse.Namespace, *, engine_factory=None):
    """(engine, demo, auth) from parsed options, without launching: what `run_demo` serves. `engine_factory`
    (takes `Engine`'s arguments) swaps the local engine class: a ZeroGPU Space generates inside `spaces.GPU`."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    auth = check_args(args)
    from persona_lora.votes import VoteStore

    votes_path = Path(args.votes) if args.votes else default_votes_path()
    # an existing votes file is opened (and so checked) now; a new one is created only once the engine and the
    # page stand, so a start that fails leaves no empty database behind
    votes = VoteStore(votes_path, hub=args.hub) if votes_path.exists() else None
    if votes is None:
        from persona_lora.output_folder import check_writable

        check_writable(votes_path, option="--votes")
    if args.backend == "openai":  # the engine serves the adapters already: they are checked, not loaded
        from persona_lora.demo.openai_backend import OpenAIBackend

        engine, to_load = OpenAIBackend(args.endpoint, args.base, args.adapter, api_key_env=args.api_key_env,
                                        timeout=args.timeout, max_new_tokens_cap=args.max_new_tokens), []
    else:
        from persona_lora.demo.engine import Engine

        Engine = engine_factory or Engine  # a Space on ZeroGPU brings its own
        engine = Engine(args.base, revision=args.revision, source=args.source, device=args.device,
                        dtype=args.dtype, chat_template=args.chat_template, max_new_tokens_cap=args.max_new_tokens,
                        max_prompt_tokens=args.max_prompt_tokens, hub=args.hub,
                        mixed_batch=not args.no_mixed_batch)
        to_load = args.adapter
    try:
        for spec in to_load:
            engine.add_adapter(spec)
        votes = votes or VoteStore(votes_path, hub=args.hub)
        demo = _app(engine, votes, args)
    except BaseException:
        engine.close()
        raise
    return engine, demo, auth


def _app(engine, votes, args: argparse.Namespace):
    from persona_lora.demo.app import build_demo  # Gradio is imported once the model side stands

    return build_demo(engine, votes=votes, max_message_chars=args.max_input_chars,
                      default_max_new_tokens=min(256, args.max_new_tokens), concurrency_limit=args.concurrency,
                      queue_size=args.queue_size, push_votes_to=args.push_votes_to,
                      arena=getattr(args, "arena", False))


def check_port_free(host: str, port: int) -> None:
    """Fail before the model is loaded (minutes for a big base) when the address cannot be served."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise UsageError(f"cannot serve on {host}:{port} ({e.strerror}); choose another --port or --host "
                             "(nothing was loaded)") from None


def choose_port(host: str, port: int | None) -> int:
    """The port to serve on: `--port` as given (refused when taken), or without it the first free one from
    DEFAULT_PORT on, so a second demo (or the test suite beside a running quickstart) starts anyway."""
    if port is not None:
        check_port_free(host, port)
        return port
    for candidate in range(DEFAULT_PORT, DEFAULT_PORT + PORT_TRIES):
        try:
            check_port_free(host, candidate)
            return candidate
        except UsageError:
            continue
    raise UsageError(f"ports {DEFAULT_PORT}-{DEFAULT_PORT + PORT_TRIES - 1} on {host} are all taken; choose one with "
                     "--port (nothing was loaded)")


def run_demo(args: argparse.Namespace) -> int:
    check_args(args)
    port = choose_port(args.host, args.port)
    engine, demo, auth = build_from_args(args)
    print(f"A/B votes are stored in {args.votes or default_votes_path()}", file=sys.stderr)
    if args.backend == "openai":
        print(f"answers come from the engine at {engine.where}: base {engine.base}, adapters "
              f"{', '.join(engine.adapter_names()) or 'none'}", file=sys.stderr)
    try:
        # quiet: Gradio's own start-up text names Python (`share=True` in `launch()`); ours names our flags
        demo.launch(server_name=args.host, server_port=port, share=args.share, auth=auth, quiet=True,
                    auth_message="persona-lora demo" if auth else None, prevent_thread_lock=True)
        print(startup_line(demo, args.host, port, share=args.share, auth=bool(auth)), flush=True)
        demo.block_thread()
    except OSError as e:  # port taken, address not available
        raise UsageError(f"cannot serve on {args.host}:{port} ({e}); choose another --port or --host") from e
    finally:
        engine.close()
    return 0


def startup_line(demo, host: str, port: int, *, share: bool, auth: bool) -> str:
    """Where the demo is, in our words: the local address, the public link with --share (or how to get one)."""
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    line = f"demo running on http://{shown}:{port} (Ctrl-C to stop)"
    if share:
        link = getattr(demo, "share_url", None)
        return line + (f"; public link: {link}" if link else "; no public link could be made (--share needs the "
                                                             "internet)")
    return line + ("; --share makes a public link" + ("" if auth else " (add --auth USER:PASSWORD with it)"))
