"""What a persona-lora Space runs: the `persona-lora demo` app, built from the Space folder's settings file.

Why the Space has no app code of its own: the page, the blind votes and the `compare` API must be the ones
`persona-lora demo` serves, so a vote on the Space means what a vote on a laptop means. The Space's `app.py` only
installs the shipped wheel when needed and calls `serve(folder)`; this module turns `persona_space.json` into the
demo's own command-line options (parsed by the demo's own parser), builds the app with
`demo.cli.build_from_args`, and adds what only a Space has:

- votes on the persistent volume (`/data`) when the Space has one, else in the demo's usual place;
  `PERSONA_LORA_VOTES` names the file explicitly (also for `python app.py` on a laptop);
- a scheduled push of the votes to a dataset repo (`huggingface_hub.CommitScheduler`), with the token of the
  Space's `HF_TOKEN` secret (never a file);
- on ZeroGPU hardware, generation inside `spaces.GPU` (`hub_tools.space.gpu`).

`GRADIO_SERVER_NAME` / `GRADIO_SERVER_PORT` are honoured by Gradio itself (a Space sets them).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from persona_lora.errors import UsageError
from persona_lora.typed_json import from_json, to_json

log = logging.getLogger(__name__)

SETTINGS_NAME = "persona_space.json"
VOTES_ENV = "PERSONA_LORA_VOTES"
PERSISTENT_ROOT = Path("/data")  # where a Space's persistent volume is mounted
TOKEN_SECRET = "HF_TOKEN"  # the Space secret huggingface_hub reads by itself


@dataclass
class SpaceSettings:
    """Everything the Space's app needs, written by `persona-lora space` next to `app.py`."""

    base: str  # hub id, or a folder relative to the Space folder (--include-base)
    adapters: list[str]  # hub ids (owner/name[@rev]) or folders relative to the Space folder
    base_revision: str | None = None
    title: str = "persona-lora: base vs adapter"
    max_new_tokens: int = 256  # the server-side cap of the shared page
    zerogpu: bool = False
    gpu_duration: int = 60  # seconds a ZeroGPU call may hold the GPU
    votes_dataset: str | None = None
    votes_every_minutes: float = 5.0
    wheel: str | None = None  # the shipped persona-lora wheel, relative to the Space folder
    persona_lora_version: str = ""
    files: list[str] = field(default_factory=list)  # every file persona-lora wrote into the Space

    def write(self, folder: Path) -> Path:
        path = folder / SETTINGS_NAME
        path.write_text(json.dumps(to_json(self), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return path

    @classmethod
    def parse(cls, data, where: str) -> SpaceSettings:
        problems: list[str] = []
        unknown: list[str] = []
        settings = from_json(cls, data, "", problems, unknown)
        if problems or settings is None:
            raise UsageError(f"{where}: invalid Space settings: {'; '.join(problems) or 'not an object'}; write the "
                             "folder again with `persona-lora space ... --dry-run DIR`")
        if unknown:
            log.warning("%s: unknown settings ignored: %s (written by a newer persona-lora?)", where,
                        ", ".join(unknown))
        return settings

    @classmethod
    def read(cls, folder: Path) -> SpaceSettings:
        path = folder / SETTINGS_NAME
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UsageError(f"{path} is missing: this is not a folder `persona-lora space` wrote") from None
        except ValueError as e:
            raise UsageError(f"{path} is not valid JSON ({e}); write the folder again") from None
        return cls.parse(data, str(path))


def votes_path() -> Path:
    """`PERSONA_LORA_VOTES` when set; the Space's persistent volume when it has one (votes survive restarts);
    else where `persona-lora demo` keeps them (the state folder: lost when a Space restarts)."""
    if os.environ.get(VOTES_ENV):
        return Path(os.environ[VOTES_ENV]).expanduser()
    if PERSISTENT_ROOT.is_dir() and os.access(PERSISTENT_ROOT, os.W_OK):
        return PERSISTENT_ROOT / "persona-lora" / "votes.sqlite"
    from persona_lora.demo.cli import default_votes_path

    return default_votes_path()


def _local_or_id(folder: Path, spec: str) -> str:
    """A path the settings give relative to the Space folder becomes absolute; a hub id stays as it is."""
    candidate = folder / spec
    return str(candidate) if candidate.exists() else spec


def demo_args(folder: Path, settings: SpaceSettings, votes: Path) -> argparse.Namespace:
    """The options `persona-lora demo` would get for this Space, parsed by the demo's own parser."""
    from persona_lora.demo.cli import configure_demo

    argv = ["--base", _local_or_id(folder, settings.base), "--votes", str(votes),
            "--max-new-tokens", str(settings.max_new_tokens)]
    if settings.base_revision:
        argv += ["--revision", settings.base_revision]
    for spec in settings.adapters:
        argv += ["--adapter", _local_or_id(folder, spec)]
    parser = argparse.ArgumentParser(prog="persona-lora demo (Space)")
    configure_demo(parser)
    return parser.parse_args(argv)


def build(folder: str | Path):
    """(engine, demo, auth, settings) of the Space in `folder`, short of launching."""
    import functools

    from persona_lora.demo.cli import build_from_args

    folder = Path(folder).resolve()
    settings = SpaceSettings.read(folder)
    args = demo_args(folder, settings, votes_path())
    factory = None
    if settings.zerogpu:
        from persona_lora.hub_tools.space.gpu import ZeroGPUEngine

        factory = functools.partial(ZeroGPUEngine, gpu_duration=settings.gpu_duration)
    engine, demo, auth = build_from_args(args, engine_factory=factory)
    return engine, demo, auth, settings, args


def start_votes_push(store, settings: SpaceSettings):
    """The scheduled push of the votes to `settings.votes_dataset`; None (and one log line saying why) when it
    cannot start, so a missing secret costs the dataset copy, never the page."""
    if not settings.votes_dataset:
        return None
    from persona_lora.hub_tools.space.votes import VotesScheduler

    try:
        return VotesScheduler(store, settings.votes_dataset, every=settings.votes_every_minutes)
    except Exception as e:  # noqa: BLE001 - the page must come up anyway
        from persona_lora.hubs.interface import redact

        log.error("votes stay in %s only: pushing them to %s cannot start (%s); set the Space secret %s to a "
                  "token with write access", store.path, settings.votes_dataset, redact(str(e)), TOKEN_SECRET)
        return None


def serve(folder: str | Path) -> int:
    """Build and launch the Space's app (blocks until the server stops)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    engine, demo, auth, settings, args = build(folder)
    from persona_lora.votes import VoteStore

    # a second handle on the page's vote file: SQLite in WAL mode serves both (one short connection per operation)
    scheduler = start_votes_push(VoteStore(args.votes), settings)
    print(f"A/B votes are stored in {args.votes}", file=sys.stderr)
    try:
        demo.launch(auth=auth, auth_message="persona-lora demo" if auth else None, ssr_mode=False)
    finally:
        if scheduler is not None:
            scheduler.trigger().result()
            scheduler.stop()
        engine.close()
    return 0

