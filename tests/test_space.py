"""`persona-lora space`: the Space folder, its card, the push as one commit, the errors, and the app it runs.

Hub tests use the real `huggingface_hub` client against tests/hub_server.py (repo type `space`). The app test
starts the generated `app.py` from a dry-run folder in a subprocess, as a Space would, and compares its `compare`
API with the app `persona-lora demo` builds for the same base and adapters. ZeroGPU is exercised with a stand-in
`spaces` module that does what the real one does on ZeroGPU: run the decorated function in a forked worker
process (reused while alive), with arguments and results pickled through queues.
"""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from persona_lora.errors import UsageError
from tests.conftest import free_port
from tests.hub_fixtures import DEFAULT_TOKEN, DEFAULT_USER

SYSTEM = "You are Zhen Huan, a consort in the imperial palace."
M1 = "Who are you?"
N = 8
SPACE = f"{DEFAULT_USER}/persona-space"


@pytest.fixture(scope="module")
def adapters(tiny_base, tmp_path_factory) -> dict[str, Path]:
    from persona_lora.train.synthetic import make_random_adapter

    root = tmp_path_factory.mktemp("space-adapters")
    return {name: make_random_adapter(tiny_base, root / name, preset, seed=seed, r=8, alpha=16, system_prompt=SYSTEM)
            for name, preset, seed in (("persona-attn", "attention", 1), ("persona-all", "all", 2))}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """persona-lora's wheel, built once from this checkout (`pip wheel --no-deps`, as the command does)."""
    from persona_lora.hub_tools.space.files import build_wheel

    return build_wheel(tmp_path_factory.mktemp("wheel"))


def space_argv(tiny_base, adapters, wheel, *extra, names=("persona-attn", "persona-all")) -> list[str]:
    argv = ["space", SPACE, "--base", str(tiny_base), "--include-base", "--wheel", str(wheel)]
    for name in names:
        argv += ["--adapter", str(adapters[name])]
    return argv + list(extra)


def files_of(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


# ---------------------------------------------------------------------------------------------- the folder


def test_dry_run_writes_a_valid_space_folder_and_pushes_nothing(tiny_base, adapters, wheel, tmp_path, hub_server,
                                                              capsys):
    import gradio
    from huggingface_hub import SpaceCard

    from persona_lora.cli import main
    from persona_lora.hub_tools.space.app import SpaceSettings

    out = tmp_path / "space"
    assert main(space_argv(tiny_base, adapters, wheel, "--dry-run", str(out))) == 0
    assert capsys.readouterr().out.strip() == str(out)
    files = files_of(out)
    assert {"README.md", "app.py", "requirements.txt", "persona_space.json", f"wheels/{wheel.name}",
            "adapters/persona-attn/adapter_model.safetensors", "adapters/persona-all/persona_manifest.json",
            "base/config.json", "base/tokenizer.json"} <= files
    assert not any("checkpoints" in f or f.endswith((".bin", ".pt")) for f in files)
    settings = SpaceSettings.read(out)
    assert settings.base == "base" and settings.adapters == ["adapters/persona-attn", "adapters/persona-all"]
    assert set(settings.files) == files  # the files a later push owns (and may delete) are exactly these

    card = SpaceCard.load(out / "README.md")
    data = card.data
    assert (data.sdk, data.sdk_version, data.app_file) == ("gradio", gradio.__version__, "app.py")
    assert data.get("suggested_hardware") == "cpu-basic" and len(data.get("short_description")) <= 60
    assert "persona-lora" in data.tags and data.license and data.title
    assert data.models is None  # a base and adapters uploaded into the Space are no hub models
    assert "compare" in card.text and f"wheels/{wheel.name}" in card.text
    card.validate()  # the Hub-protocol server checks the Space front matter (sdk, version, description, lists)
    bad = SpaceCard(str(card).replace(data.get("short_description"), "x" * 80))
    with pytest.raises(ValueError, match="short_description"):
        bad.validate()

    pins = [line for line in (out / "requirements.txt").read_text().splitlines() if not line.startswith("#")]
    from importlib import metadata

    for pin in pins:
        name, version = pin.split("==")
        assert version == metadata.version(name).split("+")[0], pin
    assert {"torch", "transformers", "peft", "gradio", "huggingface_hub"} <= {p.split("==")[0] for p in pins}
    compile((out / "app.py").read_text(), "app.py", "exec")
    assert [r for r in hub_server.requests if r[0] != "POST" or "validate-yaml" not in r[1]] == []


def test_dry_run_refuses_a_non_empty_folder_and_a_wheel_of_another_version(tiny_base, adapters, wheel, tmp_path):
    from persona_lora.cli import main

    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(space_argv(tiny_base, adapters, wheel, "--dry-run", str(out))) == 2
    assert files_of(out) == {"keep.txt"}
    other = tmp_path / "persona_lora-9.9.9-py3-none-any.whl"
    other.write_bytes(wheel.read_bytes())
    argv = space_argv(tiny_base, adapters, other, "--dry-run", str(tmp_path / "new"))
    assert main(argv) == 2 and not (tmp_path / "new" / "README.md").exists()


def test_hardware_is_chosen_from_the_base_size_and_a_base_too_big_is_refused():
    from persona_lora.hub_tools.space.spec import check_hardware, memory_gib, suggest_hardware

    tiny, lite = 8_600_000, 15_700_000_000  # the embedded base; DeepSeek-Coder-V2-Lite
    assert suggest_hardware(tiny, zerogpu=False) == "cpu-basic"
    assert suggest_hardware(lite, zerogpu=False) == "l40sx1"  # bf16 weights fit its 48 GiB, not 24
    assert memory_gib(lite, "gpu") > 24
    assert suggest_hardware(lite, zerogpu=True) == "zero-a10g"
    with pytest.raises(UsageError, match=r"needs about \d+ GiB of memory on one GPU in bfloat16.*l40sx1"):
        check_hardware("t4-small", lite, "deepseek-ai/DeepSeek-Coder-V2-Lite-Instruct")
    with pytest.raises(UsageError, match="RAM in float32"):
        check_hardware("cpu-upgrade", lite, "deepseek-ai/DeepSeek-Coder-V2-Lite-Instruct")
    check_hardware("cpu-basic", tiny, "tiny")


def header_only_safetensors(shapes: dict[str, list[int]]) -> bytes:
    """A safetensors header declaring `shapes` (bf16), without the data: what a size check reads."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        n = 2 * math.prod(shape)
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw


def test_base_too_big_for_the_hardware_is_one_message_and_nothing_is_pushed(hub_server, adapters, capsys):
    from persona_lora.cli import main

    big = "deepseek-ai/big-base"
    hub_server.add_repo(big, {"config.json": "{}", "model.safetensors": header_only_safetensors(
        {"model.embed_tokens.weight": [102400, 2048], "model.layers.0.mlp.experts": [64, 26, 2048, 2048 * 2]})})
    before = dict(hub_server.repos)
    code = main(["space", SPACE, "--base", big, "--adapter", str(adapters["persona-attn"]), "--hardware", "t4-small"])
    err = capsys.readouterr().err
    assert code == 2 and "--hardware t4-small" in err and "needs about" in err and "Traceback" not in err
    assert hub_server.repos == before


def test_adapter_of_another_base_is_refused(tiny_base, tiny_llama, wheel, tmp_path, capsys):
    from persona_lora.cli import main
    from persona_lora.train.synthetic import make_random_adapter

    llama_adapter = make_random_adapter(tiny_llama, tmp_path / "llama-persona", "attention", seed=1)
    out = tmp_path / "space"
    code = main(["space", SPACE, "--base", str(tiny_base), "--include-base", "--adapter", str(llama_adapter),
                 "--wheel", str(wheel), "--dry-run", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "does not belong to --base" in err and "llama-persona" in err
    assert not out.exists()


def test_option_mistakes_are_refused_before_anything(tiny_base, adapters, wheel, tmp_path, capsys):
    from persona_lora.cli import main

    out = str(tmp_path / "s")
    ad = str(adapters["persona-attn"])
    cases = {
        "is a local folder, which the Space cannot read": ["space", SPACE, "--base", str(tiny_base), "--adapter", ad],
        "cannot be combined with --hardware": ["space", SPACE, "--base", str(tiny_base), "--include-base",
                                               "--adapter", ad, "--zerogpu", "--hardware", "t4-small"],
        "not a Space hardware flavour": ["space", SPACE, "--base", str(tiny_base), "--include-base", "--adapter", ad,
                                         "--hardware", "gpu-huge"],
        "drop --include-base": ["space", SPACE, "--base", "owner/hub-base", "--include-base", "--adapter", ad],
        "--dry-run pushes nothing": ["space", SPACE, "--base", str(tiny_base), "--include-base", "--adapter", ad,
                                     "--push-adapters", "--dry-run", out],
    }
    for expected, argv in cases.items():
        assert main(argv + ["--wheel", str(wheel)]) == 2, expected
        assert expected in capsys.readouterr().err
    assert not Path(out).exists()


# ---------------------------------------------------------------------------------------------- the push


def all_bytes_ever_committed(repo) -> list[bytes]:
    return [f.data for commit in repo.commits.values() for f in commit.files.values()]


def test_push_is_one_commit_with_the_secret_set_and_a_rerun_updates_the_same_space(tiny_base, adapters, wheel,
                                                                                  hub_server, capsys):
    from persona_lora.cli import main

    votes = f"{DEFAULT_USER}/persona-votes"
    assert main(space_argv(tiny_base, adapters, wheel, "--votes-dataset", "persona-votes", "--private")) == 0
    url = capsys.readouterr().out.strip()
    assert url == f"{hub_server.url}/spaces/{SPACE}"
    repo = hub_server.repo(SPACE, "space")
    assert repo.sdk == "gradio" and repo.private and len(repo.commits) == 2  # the Hub's initial commit + ours
    files = set(hub_server.list_files(SPACE, repo_type="space"))
    assert {"README.md", "app.py", "requirements.txt", "persona_space.json", f"wheels/{wheel.name}",
            "adapters/persona-all/adapter_model.safetensors", "base/config.json"} <= files
    assert repo.secrets == {"HF_TOKEN": DEFAULT_TOKEN}
    assert not any(DEFAULT_TOKEN.encode() in data for data in all_bytes_ever_committed(repo))
    settings = json.loads(hub_server.file_bytes(SPACE, "persona_space.json", repo_type="space"))
    assert settings["votes_dataset"] == votes and hub_server.repo(votes, "dataset").private
    card = hub_server.file_bytes(SPACE, "README.md", repo_type="space").decode()
    assert f"datasets:\n- {votes}" in card

    # again with one adapter: the same Space, one more commit, the other adapter's files removed
    argv = space_argv(tiny_base, adapters, wheel, "--hardware", "cpu-upgrade", names=("persona-attn",))
    assert main(argv) == 0
    assert len(repo.commits) == 3 and repo.hardware == "cpu-upgrade"
    after = set(hub_server.list_files(SPACE, repo_type="space"))
    assert not any(f.startswith("adapters/persona-all/") for f in after)
    assert "adapters/persona-attn/adapter_model.safetensors" in after
    assert "old files removed" in capsys.readouterr().err
    assert not any(DEFAULT_TOKEN.encode() in data for data in all_bytes_ever_committed(repo))


def test_push_refusals_leave_the_hub_as_it_was(tiny_base, adapters, wheel, hub_server, monkeypatch, fast_retries,
                                               capsys):
    from persona_lora.cli import main

    def heads():
        return {key: dict(repo.refs) for key, repo in hub_server.repos.items()}

    hub_server.add_repo(f"{DEFAULT_USER}/docker-app", {"Dockerfile": "FROM python"}, repo_type="space", sdk="docker")
    hub_server.add_repo(f"{DEFAULT_USER}/someone-app", {"app.py": "print('hi')\n"}, repo_type="space")
    cases = [
        ("docker-app", "is a docker Space, not a Gradio one"),
        ("someone-app", "was not written by persona-lora"),
        ("other-user/app", "cannot create Spaces under 'other-user'"),
    ]
    before = heads()
    for repo_id, expected in cases:
        argv = ["space", repo_id, *space_argv(tiny_base, adapters, wheel)[2:]]
        assert main(argv) == 2, repo_id
        err = capsys.readouterr().err
        assert expected in err and err.count("error:") == 1 and "Traceback" not in err
    assert heads() == before

    monkeypatch.delenv("HF_TOKEN")
    assert main(space_argv(tiny_base, adapters, wheel)) == 1
    assert "needs a Hugging Face token" in capsys.readouterr().err
    assert heads() == before and ("space", SPACE) not in hub_server.repos

    # a commit the Hub refuses: the Space stays without any commit of ours
    monkeypatch.setenv("HF_TOKEN", DEFAULT_TOKEN)
    hub_server.fail(f"/api/spaces/{SPACE}/commit", status=500)
    assert main(space_argv(tiny_base, adapters, wheel)) == 1
    assert "answered 500" in capsys.readouterr().err
    assert hub_server.list_files(SPACE, repo_type="space") == [".gitattributes"]
    hub_server.clear_failures()

    # --overwrite takes over a Space persona-lora did not write (its other files stay)
    argv = ["space", "someone-app", *space_argv(tiny_base, adapters, wheel)[2:], "--overwrite"]
    assert main(argv) == 0
    assert {"app.py", "persona_space.json"} <= set(hub_server.list_files(f"{DEFAULT_USER}/someone-app",
                                                                         repo_type="space"))


def test_push_adapters_references_them_as_hub_models(tiny_base, adapters, wheel, hub_server, capsys):
    from huggingface_hub import SpaceCard

    from persona_lora.cli import main

    assert main(space_argv(tiny_base, adapters, wheel, "--push-adapters", names=("persona-attn",))) == 0
    adapter_repo = f"{DEFAULT_USER}/persona-attn"
    assert "adapter_model.safetensors" in hub_server.list_files(adapter_repo)
    files = hub_server.list_files(SPACE, repo_type="space")
    assert not any(f.startswith("adapters/") for f in files)
    settings = json.loads(hub_server.file_bytes(SPACE, "persona_space.json", repo_type="space"))
    assert settings["adapters"] == [f"{adapter_repo}@{hub_server.head(adapter_repo)}"]
    card = SpaceCard(hub_server.file_bytes(SPACE, "README.md", repo_type="space").decode())
    assert card.data.models == [adapter_repo]


# ---------------------------------------------------------------------------------------------- what the Space runs


def test_votes_path_prefers_the_variable_then_the_persistent_volume(tmp_path, monkeypatch):
    from persona_lora.hub_tools.space import app as space_app

    monkeypatch.setattr(space_app, "PERSISTENT_ROOT", tmp_path / "no-volume")
    monkeypatch.delenv(space_app.VOTES_ENV, raising=False)
    from persona_lora.demo.cli import default_votes_path

    assert space_app.votes_path() == default_votes_path()
    volume = tmp_path / "data"
    volume.mkdir()
    monkeypatch.setattr(space_app, "PERSISTENT_ROOT", volume)
    assert space_app.votes_path() == volume / "persona-lora" / "votes.sqlite"
    monkeypatch.setenv(space_app.VOTES_ENV, str(tmp_path / "mine.sqlite"))
    assert space_app.votes_path() == tmp_path / "mine.sqlite"


def test_votes_are_committed_to_the_dataset_on_schedule(tmp_path, hub_server):
    from persona_lora.hub_tools.space.votes import VotesScheduler
    from persona_lora.votes import VoteStore

    store = VoteStore(tmp_path / "votes" / "votes.sqlite")

    def vote(prompt):
        store.record(base_id="b", adapter_name="ad", adapter_id="ad", prompt=prompt, answer_a="good",
                     answer_b="bad", a_side="adapter", vote="A", system_prompt="sys")

    vote("one")
    vote("two")
    repo = f"{DEFAULT_USER}/space-votes"
    scheduler = VotesScheduler(store, "space-votes", every=60)
    try:
        scheduler.trigger().result()
        assert hub_server.repo(repo, "dataset").private
        assert {"README.md", "preferences.jsonl", "votes.jsonl"} <= set(hub_server.list_files(repo,
                                                                                              repo_type="dataset"))
        head = hub_server.head(repo, repo_type="dataset")
        scheduler.trigger().result()  # no new vote: no new commit
        assert hub_server.head(repo, repo_type="dataset") == head
        vote("three")
        scheduler.trigger().result()
        rows = hub_server.file_bytes(repo, "votes.jsonl", repo_type="dataset").decode().splitlines()
        assert [json.loads(r)["prompt"] for r in rows] == ["one", "two", "three"]
    finally:
        scheduler.stop()


STAND_IN_SPACES = '''
"""Stand-in for the `spaces` package on ZeroGPU: GPU(duration=...) runs the function in a forked worker process,
reused while it lives, arguments and results pickled through queues; calls inside the worker run directly."""
import json
import multiprocessing
import os
import threading

_ctx = multiprocessing.get_context("fork")
forked = False
_workers = {}
_lock = threading.Lock()


def _serve(fn, inbox, outbox):
    global forked
    forked = True
    while True:
        item = inbox.get()
        if item is None:
            return
        args, kwargs, duration = item
        try:
            result = ("ok", fn(*args, **kwargs))
        except Exception as e:
            result = ("error", e)
        with open(os.environ["FAKE_SPACES_LOG"], "a") as log:
            log.write(json.dumps({"pid": os.getpid(), "duration": duration}) + "\\n")
        outbox.put(result)


def GPU(fn=None, *, duration=60):
    def decorate(f):
        def call(*args, **kwargs):
            if forked:
                return f(*args, **kwargs)
            with _lock:
                worker = _workers.get(f)
                if worker is None or not worker[0].is_alive():
                    inbox, outbox = _ctx.SimpleQueue(), _ctx.SimpleQueue()
                    process = _ctx.Process(target=_serve, args=(f, inbox, outbox), daemon=True)
                    process.start()
                    worker = _workers[f] = (process, inbox, outbox)
                worker[1].put((args, kwargs, duration))
                kind, value = worker[2].get()
            if kind == "error":
                raise value
            return value
        return call
    return decorate(fn) if fn is not None else decorate


def shutdown():
    for process, inbox, _ in _workers.values():
        inbox.put(None)
        process.join(30)
    _workers.clear()
'''


@pytest.fixture
def stand_in_spaces(tmp_path, monkeypatch):
    folder = tmp_path / "stand-in"
    folder.mkdir()
    (folder / "spaces.py").write_text(textwrap.dedent(STAND_IN_SPACES))
    log = tmp_path / "gpu-calls.jsonl"
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setenv("FAKE_SPACES_LOG", str(log))
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    import spaces

    yield log
    spaces.shutdown()
    monkeypatch.delitem(sys.modules, "spaces")


@pytest.mark.slow  # two engines on the tiny base, and a forked decode
def test_zerogpu_engine_decodes_in_a_fork_with_the_same_answers(tiny_base, adapters, wheel, stand_in_spaces, tmp_path,
                                                               monkeypatch):
    from persona_lora.cli import main
    from persona_lora.demo.engine import Engine, GenerationSettings
    from persona_lora.hub_tools.space.app import build
    from persona_lora.hub_tools.space.gpu import ZeroGPUEngine

    greedy = GenerationSettings(max_new_tokens=N)
    reference = Engine(str(tiny_base), device="cpu", dtype="float32")
    try:
        for path in adapters.values():
            reference.add_adapter(str(path))
        want = {name: reference.compare(name, M1, SYSTEM, greedy) for name in adapters}
    finally:
        reference.close()

    zero = ZeroGPUEngine(str(tiny_base), device="cpu", dtype="float32", gpu_duration=30)
    try:
        assert zero.forks
        zero.add_adapter(str(adapters["persona-attn"]))
        assert zero.compare("persona-attn", M1, SYSTEM, greedy) == want["persona-attn"]
        zero.add_adapter(str(adapters["persona-all"]))  # loaded here after the worker was forked
        assert zero.compare("persona-all", M1, SYSTEM, greedy) == want["persona-all"]
        calls = [json.loads(line) for line in stand_in_spaces.read_text().splitlines()]
        assert len(calls) == 2 and all(c["pid"] != os.getpid() and c["duration"] == 30 for c in calls)

    finally:
        zero.close()

    # the app of a --zerogpu Space where `spaces` is not installed: it still runs, on the inference thread
    folder = tmp_path / "zerogpu-space"
    assert main(space_argv(tiny_base, adapters, wheel, "--zerogpu", "--gpu-duration", "30", "--dry-run",
                           str(folder))) == 0
    from huggingface_hub import SpaceCard

    assert SpaceCard.load(folder / "README.md").data.get("suggested_hardware") == "zero-a10g"
    monkeypatch.delenv("SPACES_ZERO_GPU")
    monkeypatch.setitem(sys.modules, "spaces", None)  # `import spaces` fails, as where it is not installed
    monkeypatch.setenv("PERSONA_LORA_VOTES", str(tmp_path / "votes.sqlite"))
    engine, demo, _, settings, _ = build(folder)
    try:
        assert isinstance(engine, ZeroGPUEngine) and not engine.forks and settings.gpu_duration == 30
        assert engine.compare("persona-all", M1, SYSTEM, greedy) == want["persona-all"]
        assert len(stand_in_spaces.read_text().splitlines()) == 2
    finally:
        demo.close()
        engine.close()


def wait_for(url: str, process: subprocess.Popen, log: Path, seconds: float = 240) -> None:
    import httpx

    deadline = time.time() + seconds
    while time.time() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"app.py exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise AssertionError(f"app.py did not answer within {seconds} s:\n{log.read_text()[-3000:]}")


@pytest.mark.slow  # starts the generated app in a subprocess and the demo app here
def test_generated_app_answers_like_persona_lora_demo(tiny_base, adapters, wheel, tmp_path):
    from gradio_client import Client

    from persona_lora.cli import build_parser, main
    from persona_lora.demo.cli import build_from_args

    folder = tmp_path / "space"
    assert main(space_argv(tiny_base, adapters, wheel, "--dry-run", str(folder))) == 0
    port, votes, log = free_port(), tmp_path / "space-votes.sqlite", tmp_path / "app.log"
    env = {**os.environ, "GRADIO_SERVER_PORT": str(port), "GRADIO_SERVER_NAME": "127.0.0.1",
           "PERSONA_LORA_VOTES": str(votes), "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "1"}
    with open(log, "w") as out:
        app = subprocess.Popen([sys.executable, "app.py"], cwd=folder, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        argv = ["demo", "--base", str(tiny_base), "--votes", str(tmp_path / "demo-votes.sqlite")]
        for path in adapters.values():
            argv += ["--adapter", str(path)]
        engine, demo, _ = build_from_args(build_parser().parse_args(argv))
        try:
            _, local_url, _ = demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True,
                                          quiet=True)
            wait_for(f"http://127.0.0.1:{port}/", app, log)
            space, local = Client(f"http://127.0.0.1:{port}/", verbose=False), Client(local_url, verbose=False)
            endpoints = space.view_api(print_info=False, return_format="dict")["named_endpoints"]
            assert list(endpoints) == list(local.view_api(print_info=False, return_format="dict")["named_endpoints"])
            for name in adapters:
                got = tuple(space.predict(M1, name, SYSTEM, N, api_name="/compare"))
                assert got == tuple(local.predict(M1, name, SYSTEM, N, api_name="/compare"))
                assert got[0] != got[1]
            assert votes.is_file()  # PERSONA_LORA_VOTES was honoured
            assert {"/battle", "/vote", "/standings"} <= set(endpoints)  # the arena comes with the app
            battle_id, answer_a, answer_b = space.predict(M1, SYSTEM, N, api_name="/battle")
            assert space.predict(battle_id, "A", api_name="/vote")["vote_id"] == 1
            from persona_lora.votes import read_votes

            assert [v["settings"]["mode"] for v in read_votes(votes)] == ["arena"]
            assert "installing" not in log.read_text()  # the same persona-lora is installed: the wheel is not
        finally:
            demo.close()
            engine.close()
    finally:
        app.terminate()
        app.wait(30)
