"""Fault injection: every command meets broken, mismatched, occupied and offline inputs.

Each case builds its broken input in a folder of its own, runs the real CLI (`persona_lora.cli.main`) and checks
four things: the exit code, the words of the one-line message (which name the file, option or cause and the
fix), that no traceback reached the user, and that no file that existed before the command changed (every file
under the case's folder and the base is hashed before and after).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from persona_lora.artifact import ADAPTER_CONFIG, ADAPTER_WEIGHTS, MANIFEST_NAME
from persona_lora.cli import main

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "examples" / "data" / "persona_zh.json"


@dataclass
class Env:
    """What a case may use: its own folder, the shared bases and a pristine adapter to copy."""

    root: Path
    base: Path
    llama: Path
    adapter_source: Path
    hub: object = None

    def adapter(self, name: str = "adapter") -> Path:
        return shutil.copytree(self.adapter_source, self.root / name)

    def data(self, text: str | bytes | None = None, name: str = "data.json") -> Path:
        path = self.root / name
        if text is None:
            path.write_text(json.dumps(json.loads(SAMPLE.read_text(encoding="utf-8"))[:8], ensure_ascii=False),
                            encoding="utf-8")
        elif isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(text, encoding="utf-8")
        return path

    def train(self, *extra: str, data: Path | None = None, out: str = "out") -> list[str]:
        return ["train", "--base", str(self.base), "--data", str(data or self.data()), "--output-dir",
                str(self.root / out), "--set", "lora.preset=attention", "--max-steps", "1",
                "--set", "training.samples=0", "--set", "training.report_to=[none]", *extra]


def truncate(path: Path, keep: int = -16) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    for key, value in changes.items():
        target = data
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target[parent]
        target[leaf] = value
    path.write_text(json.dumps(data))


def occupied_port() -> tuple[socket.socket, int]:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s, s.getsockname()[1]


@dataclass
class Case:
    id: str
    argv: Callable[[Env], list[str]]  # builds the broken input under env.root, returns the command line
    code: int
    words: tuple[str, ...]
    hub: bool = False


def _pushed(env: Env, repo: str = "tester/persona", folder: Path | None = None, **kw) -> str:
    from persona_lora.hub_tools.push import push_folder

    push_folder(folder or env.adapter("to-push"), repo, **kw)
    shutil.rmtree(env.root / "to-push", ignore_errors=True)
    return repo


def _pickled(env: Env) -> list[str]:
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo("tester/pickled")
    api.upload_file(path_or_fileobj=b"\x80\x04pickle", path_in_repo="adapter_model.bin", repo_id="tester/pickled")
    return ["pull", "tester/pickled"]


def _local_dir_taken(env: Env) -> list[str]:
    _pushed(env)
    (env.root / "dl").mkdir()
    (env.root / "dl" / ADAPTER_CONFIG).write_text("{\"mine\": true}")
    return ["pull", "tester/persona", "--local-dir", str(env.root / "dl")]


def _offline(env: Env) -> list[str]:
    import huggingface_hub.constants as c

    env.hub.monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    env.hub.monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    return ["pull", "tester/never-pulled"]


def _in_use(env: Env) -> list[str]:
    sock, port = occupied_port()
    env.keep = sock
    return ["demo", "--base", str(env.base), "--port", str(port)]


def _no_token(env: Env) -> list[str]:
    env.hub.monkeypatch.delenv("HF_TOKEN")
    return ["push", str(env.adapter()), "tester/persona"]


def _manifest_kind(env: Env, kind: str) -> Path:
    folder = env.adapter()
    edit_json(folder / MANIFEST_NAME, kind=kind)
    return folder


def _rank_mismatch(env: Env) -> Path:
    folder = env.adapter()
    edit_json(folder / ADAPTER_CONFIG, r=4)
    return folder


def _manifest_rank(env: Env) -> Path:
    folder = env.adapter()
    edit_json(folder / MANIFEST_NAME, **{"lora.r": 32})
    return folder


def _truncated_weights(env: Env) -> Path:
    folder = env.adapter()
    truncate(folder / ADAPTER_WEIGHTS)
    return folder


def _no_weights(env: Env) -> Path:
    folder = env.adapter()
    (folder / ADAPTER_WEIGHTS).unlink()
    return folder


def _corrupt(env: Env, name: str) -> Path:
    folder = env.adapter()
    truncate(folder / name, keep=40)
    return folder


def _interrupted(env: Env) -> Path:
    folder = env.adapter()
    edit_json(folder / MANIFEST_NAME, run={"interrupted": True})
    return folder


def _legacy(env: Env) -> Path:
    from tests.test_interop import legacy_copy

    return legacy_copy(env.adapter_source, env.root / "legacy")


def _pickle_only(env: Env) -> Path:
    folder = env.root / "pickles"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    return folder


def _no_manifest(env: Env) -> Path:
    folder = env.adapter()
    (folder / MANIFEST_NAME).unlink()
    return folder


def _file_at(env: Env, name: str) -> Path:
    path = env.root / name
    path.write_text("a file, not a folder")
    return path


def _occupied(env: Env, name: str = "occupied") -> Path:
    path = env.root / name
    path.mkdir()
    (path / "notes.txt").write_text("mine")
    return path


def _config(env: Env, text: str | bytes) -> Path:
    path = env.root / "c.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


DATA_CASES = [
    Case("data-missing", lambda e: ["data", "check", str(e.root / "nope.json")], 1, ("file not found", "nope.json")),
    Case("data-directory", lambda e: ["data", "check", str(e.root)], 1, ("is a directory",)),
    Case("data-bad-json", lambda e: ["data", "check", str(e.data('[{"instruction": "a",}]'))], 1,
         ("data.json, line 1", "invalid JSON")),
    Case("data-empty", lambda e: ["data", "check", str(e.data(""))], 1, ("the file is empty",)),
    Case("data-not-utf8", lambda e: ["data", "check", str(e.data('[{"instruction": "本宫", "output": "x"}]'
                                                                  .encode("gb18030")))], 1, ("not valid UTF-8",)),
    Case("data-lone-surrogate",
         lambda e: ["data", "check", str(e.data('[{"instruction": "a\\ud800", "output": "x"}]'))], 1,
         ("record 1", "lone surrogate")),
    Case("data-misspelled-role", lambda e: ["data", "check", str(e.data(
        '[{"messages": [{"role": "sysrem", "content": "x"}, {"role": "user", "content": "a"}, '
        '{"role": "assistant", "content": "b"}]}]'))], 1, ("unknown role 'sysrem'", "did you mean 'system'")),
    Case("data-max-length-without-base", lambda e: ["data", "check", str(e.data()), "--max-length", "8"], 2,
         ("--max-length needs --base",)),
    Case("data-wrong-types", lambda e: ["data", "check", str(e.data('[{"instruction": 3, "output": ["x"]}]'))], 1,
         ("field 'instruction': expected a string", "field 'output': expected a string")),
]

TRAIN_CASES = [
    Case("train-config-missing", lambda e: ["train", str(e.root / "none.yaml")], 2, ("none.yaml does not exist",)),
    Case("train-config-list", lambda e: ["train", str(_config(e, "- base\n- data\n"))], 2,
         ("the top level must be a mapping",)),
    Case("train-config-duplicate", lambda e: ["train", str(_config(e, "training:\n  epochs: 1\n  epochs: 2\n"))], 2,
         ("duplicate key 'epochs'",)),
    Case("train-config-not-utf8", lambda e: ["train", str(_config(e, "name: 本宫\n".encode("gb18030")))], 2,
         ("not UTF-8",)),
    Case("train-config-bad-yaml", lambda e: ["train", str(_config(e, "training: [open\n"))], 2,
         ("is not valid YAML",)),
    Case("train-unparsable-set", lambda e: e.train("--set", "data.system_prompt=: x"), 2,
         ("--set 'data.system_prompt=: x'",)),
    Case("train-unknown-key", lambda e: e.train("--set", "training.learning_rat=1e-4"), 2,
         ("training.learning_rat: unknown key; did you mean training.learning_rate?",)),
    Case("train-zero-steps", lambda e: e.train("--max-steps", "0"), 2, ("training.max_steps: must be >= 1, got 0",)),
    Case("train-negative-steps", lambda e: e.train("--max-steps", "-3"), 2, ("training.max_steps: must be >= 1",)),
    Case("train-unknown-scheduler", lambda e: e.train("--set", "training.lr_scheduler=cosin"), 2,
         ("'cosin' is not a transformers schedule", "did you mean 'cosine'")),
    Case("train-unknown-dtype", lambda e: e.train("--set", "base.dtype=int8"), 2, ("base.dtype: 'int8'",)),
    Case("train-unknown-preset", lambda e: e.train("--set", "lora.preset=everything"), 2,
         ("lora.preset 'everything' is not known",)),
    Case("train-no-base", lambda e: ["train", "--data", str(e.data()), "--output-dir", str(e.root / "o")], 2,
         ("base.model is required", "--base")),
    Case("train-missing-base", lambda e: e.train("--base", str(e.root / "no-base")), 1, ("does not exist",)),
    Case("train-missing-data", lambda e: e.train(data=e.root / "none.json"), 1, ("file not found",)),
    Case("train-bad-data", lambda e: e.train(data=e.data('[{"instruction": "a"}]')), 1,
         ("field 'output': required field is missing",)),
    Case("train-output-is-a-file", lambda e: e.train(out=_file_at(e, "o.txt").name), 2, ("o.txt", "not a folder")),
    Case("train-output-unwritable", lambda e: e.train(out="/proc/persona-lora-out"), 2,
         ("/proc/persona-lora-out cannot be written",)),
    Case("train-output-under-a-file", lambda e: e.train(out=str(_file_at(e, "f.txt") / "sub")), 2,
         ("f.txt is a file",)),
    Case("train-output-occupied", lambda e: e.train(out=_occupied(e).name), 2,
         ("exists and is not empty", "--overwrite")),
    Case("train-overwrite-not-ours", lambda e: e.train("--overwrite", out=_occupied(e).name), 2,
         ("--overwrite refused", "does not look like a persona-lora run")),
    Case("train-resume-nothing", lambda e: e.train("--resume"), 2, ("no checkpoint found",)),
    Case("train-overwrite-and-resume", lambda e: e.train("--overwrite", "--resume"), 2,
         ("training.overwrite and training.resume are both set",)),
    Case("train-packing-on-cpu", lambda e: e.train("--set", "training.packing=true"), 2,
         ("packing needs flash-attention 2",)),
]

MERGE_CASES = [
    Case("merge-no-weights", lambda e: ["merge", str(_no_weights(e)), "--base", str(e.base), "--out",
                                        str(e.root / "m")], 1, ("adapter_model.safetensors is missing",)),
    Case("merge-truncated-weights", lambda e: ["merge", str(_truncated_weights(e)), "--base", str(e.base),
                                               "--out", str(e.root / "m")], 1, ("adapter_model.safetensors",)),
    Case("merge-rank-mismatch", lambda e: ["merge", str(_rank_mismatch(e)), "--base", str(e.base), "--out",
                                           str(e.root / "m")], 1, ("adapter_config.json says r=4",)),
    Case("merge-corrupt-config", lambda e: ["merge", str(_corrupt(e, ADAPTER_CONFIG)), "--base", str(e.base),
                                            "--out", str(e.root / "m")], 1, ("adapter_config.json",)),
    Case("merge-out-occupied", lambda e: ["merge", str(e.adapter()), "--base", str(e.base), "--out",
                                          str(_occupied(e))], 2, ("exists and is not empty",)),
    Case("merge-out-is-base", lambda e: ["merge", str(e.adapter()), "--base", str(e.base), "--out", str(e.base)], 2,
         ("would overwrite the base",)),
    Case("merge-other-base", lambda e: ["merge", str(e.adapter()), "--base", str(e.llama), "--out",
                                        str(e.root / "m")], 1, ("does not match the adapter",)),
    Case("merge-bad-shard-size", lambda e: ["merge", str(e.adapter()), "--base", str(e.base), "--out",
                                            str(e.root / "m"), "--max-shard-size", "huge"], 2, ("is not a size",)),
    Case("merge-no-adapter", lambda e: ["merge", str(e.root / "none"), "--base", str(e.base), "--out",
                                        str(e.root / "m")], 1, ("no such folder, and it is not a hub id",)),
    Case("merge-manifest-says-merged", lambda e: ["merge", str(_manifest_kind(e, "merged")), "--base", str(e.base),
                                                  "--out", str(e.root / "m")], 1, ("says kind 'merged'",)),
]

CARD_CASES = [
    Case("card-missing-folder", lambda e: ["card", str(e.root / "none")], 1, ("none", "no such folder")),
    Case("card-no-manifest", lambda e: ["card", str(_no_manifest(e))], 1, ("persona_manifest.json is missing",)),
    Case("card-corrupt-manifest", lambda e: ["card", str(_corrupt(e, MANIFEST_NAME))], 1, ("corrupt JSON",)),
    Case("card-rank-mismatch", lambda e: ["card", str(_manifest_rank(e))], 1,
         ("persona_manifest.json says r=32", "adapter_config.json says r=8")),
    Case("card-truncated-weights", lambda e: ["card", str(_truncated_weights(e))], 1, ("adapter_model.safetensors",)),
    Case("card-wrong-kind", lambda e: ["card", str(_manifest_kind(e, "checkpoint"))], 1, ('"kind"',)),
]

EXPORT_CASES = [
    Case("export-kv-b-for-vllm", lambda e: ["export", str(e.adapter()), "--for", "vllm", "--out", str(e.root / "x"),
                                            "--base", str(e.base)], 2, ("kv_b_proj", "vllm-project/vllm#48974")),
    Case("export-out-occupied", lambda e: ["export", str(e.adapter()), "--for", "sglang", "--out",
                                           str(_occupied(e)), "--base", str(e.base)], 2, ("occupied",)),
    Case("export-truncated", lambda e: ["export", str(_truncated_weights(e)), "--for", "sglang", "--out",
                                        str(e.root / "x"), "--base", str(e.base)], 1, ("adapter_model.safetensors",)),
    Case("export-no-adapter", lambda e: ["export", str(e.root / "none"), "--for", "sglang", "--out",
                                         str(e.root / "x")], 1, ("no such folder",)),
    Case("export-bad-engine", lambda e: ["export", str(e.adapter()), "--for", "tgi", "--out", str(e.root / "x")], 2,
         ("invalid choice: 'tgi'",)),
]

HUB_CASES = [
    Case("push-truncated-weights", lambda e: ["push", str(_truncated_weights(e)), "tester/x"], 1,
         ("adapter_model.safetensors",), hub=True),
    Case("push-rank-mismatch", lambda e: ["push", str(_rank_mismatch(e)), "tester/x"], 1,
         ("adapter_config.json says r=4",), hub=True),
    Case("push-corrupt-manifest", lambda e: ["push", str(_corrupt(e, MANIFEST_NAME)), "tester/x"], 1,
         ("corrupt JSON",), hub=True),
    Case("push-interrupted", lambda e: ["push", str(_interrupted(e)), "tester/x"], 2,
         ("was interrupted", "--allow-interrupted"), hub=True),
    Case("push-legacy", lambda e: ["push", str(_legacy(e)), "tester/x"], 2,
         ("legacy spelling", "upgrade-adapter"), hub=True),
    Case("push-bad-repo-id", lambda e: ["push", str(e.adapter()), "a/b/c"], 2, ("must look like owner/name",),
         hub=True),
    Case("push-no-token", _no_token, 1, ("needs a Hugging Face token",), hub=True),
    Case("push-not-a-folder", lambda e: ["push", str(e.root / "none"), "tester/x"], 1, ("is not a folder",),
         hub=True),
    Case("push-pickle-only", lambda e: ["push", str(_pickle_only(e)), "tester/x"], 1, ("pickled weights",),
         hub=True),
    Case("push-merge-flag-alone", lambda e: ["push", str(e.adapter()), "tester/x", "--dtype", "float16"], 2,
         ("only apply with --merged",), hub=True),
    Case("pull-bad-id", lambda e: ["pull", "not an id"], 2, ("must look like owner/name",), hub=True),
    Case("pull-missing-repo", lambda e: ["pull", "tester/missing"], 1, ("tester/missing was not found",), hub=True),
    Case("pull-missing-revision", lambda e: ["pull", _pushed(e), "--revision", "nope"], 1,
         ("revision 'nope' does not exist in tester/persona",), hub=True),
    Case("pull-local-dir-taken", _local_dir_taken, 2, ("already holds adapter_config.json", "--force"), hub=True),
    Case("pull-offline-uncached", _offline, 1, ("HF_HUB_OFFLINE is set",), hub=True),
    Case("pull-pickles", _pickled, 1, ("adapter_model.bin", "--allow-pickle"), hub=True),
    Case("pull-other-base", lambda e: ["pull", _pushed(e), "--base", str(e.llama)], 1,
         ("does not match base",), hub=True),
    Case("list-modelscope", lambda e: ["list", "--base", "x/y", "--hub", "modelscope"], 1,
         ("Hugging Face Hub only",), hub=True),
]

DEMO_CASES = [
    Case("demo-port-in-use", _in_use, 2, ("cannot serve on", "nothing was loaded")),
    Case("demo-port-out-of-range", lambda e: ["demo", "--base", str(e.base), "--port", "70000"], 2,
         ("--port must be between 1 and 65535",)),
    Case("demo-bad-auth", lambda e: ["demo", "--base", str(e.base), "--auth", "nopassword"], 2,
         ("--auth must look like USER:PASSWORD",)),
    Case("demo-missing-base", lambda e: ["demo", "--base", str(e.root / "none"), "--port", "1"], 1,
         ("does not exist",)),
    Case("upgrade-missing", lambda e: ["upgrade-adapter", str(e.root / "none")], 1, ("none",)),
    Case("upgrade-no-manifest", lambda e: ["upgrade-adapter", str(_legacy_without_manifest(e))], 1,
         ("pass --base",)),
]


def _legacy_without_manifest(env: Env) -> Path:
    folder = _legacy(env)
    edit_json(folder / ADAPTER_CONFIG, base_model_name_or_path=None)
    (folder / MANIFEST_NAME).unlink()
    return folder


CASES = DATA_CASES + TRAIN_CASES + MERGE_CASES + CARD_CASES + EXPORT_CASES + HUB_CASES + DEMO_CASES


def tree_hashes(*roots: Path) -> dict[str, str]:
    out = {}
    for root in roots:
        for path in sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
            out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def pristine_adapter(tiny_base, tmp_path_factory):
    from persona_lora.train.synthetic import make_random_adapter

    return make_random_adapter(tiny_base, tmp_path_factory.mktemp("faults") / "adapter", "all", r=8, alpha=16)


def test_there_are_at_least_sixty_cases():
    assert len(CASES) >= 60 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_fault(case, request, tmp_path, tiny_base, tiny_llama, pristine_adapter, capsys, monkeypatch):
    env = Env(tmp_path / "case", tiny_base, tiny_llama, pristine_adapter)
    env.root.mkdir()
    if case.hub:
        env.hub = request.getfixturevalue("hub_server")
        env.hub.monkeypatch = monkeypatch
    argv = case.argv(env)
    capsys.readouterr()
    before = tree_hashes(env.root, tiny_base)
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own usage errors
        code = e.code
    err = capsys.readouterr().err
    assert code == case.code, f"exit {code}, expected {case.code}: {err}"
    assert "Traceback" not in err, err
    message = err[err.index("persona-lora "):] if "persona-lora " in err else err  # after any progress bars
    assert "error: " in message, err
    for word in case.words:
        assert word in message, f"{word!r} not in: {err}"
    after = tree_hashes(env.root, tiny_base)
    changed = sorted(p for p in before if before[p] != after.get(p))
    assert not changed, f"pre-existing files changed: {changed}"


# ---------------------------------------------------------------------------------------------- nothing left behind
# A refused or failed command leaves no trace: no output folder (empty or half-written), no staging folder, no
# hub-client bookkeeping, no empty votes database, and no file of a pair rewritten when the other is refused.
# The disk is "full" through `shutil.disk_usage` (what every preflight check reads) or through the write itself
# failing with ENOSPC part way (what a disk that fills during the copy does).


def _disk_nearly_full(env: Env) -> None:
    env.monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 << 30, 10 << 30, 1 << 20))


def _copy_fills_the_disk(env: Env) -> None:
    """shutil.copyfile writes half of the file, then fails as a full disk does: OSError(ENOSPC) naming the
    source file (as shutil's sendfile path reports it)."""
    import errno
    import os

    def copyfile(src, dst, *, follow_symlinks=True):
        data = Path(src).read_bytes()
        Path(dst).write_bytes(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(src), str(dst))

    env.monkeypatch.setattr(shutil, "copyfile", copyfile)


def _space_dry_run(env: Env, out: str = "space") -> list[str]:
    return ["space", "tester/space", "--base", str(env.base), "--include-base", "--adapter", str(env.adapter()),
            "--dry-run", str(env.root / out)]


def _export_disk_fills(env: Env) -> list[str]:
    """safetensors' writer meets a full disk half way: it raises its own SafetensorError around the OS error."""
    from safetensors import SafetensorError

    def failing_save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    env.monkeypatch.setattr("safetensors.torch.save_file", failing_save_file)
    return ["export", str(env.adapter()), "--for", "sglang", "--out", str(env.root / "x"), "--base", str(env.base)]


def _card_with_loss_curve(env: Env) -> Path:
    """An adapter whose card has a loss curve, and a README.md the card cannot replace (a folder of that name)."""
    folder = env.adapter()
    edit_json(folder / MANIFEST_NAME, metrics={"history": [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}],
                                               "final_train_loss": 1.5, "steps": 2})
    (folder / "loss.png").write_bytes(b"the previous loss curve")
    (folder / "README.md").unlink(missing_ok=True)
    (folder / "README.md").mkdir()
    return folder


def _unreachable_endpoint(env: Env) -> list[str]:
    """An OpenAI-compatible endpoint that refuses connections (a bound socket that does not listen) and a free
    port for the demo."""
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    env.keep = closed
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return ["demo", "--backend", "openai", "--endpoint", f"http://127.0.0.1:{closed.getsockname()[1]}/v1",
            "--base", "tiny", "--port", str(port), "--votes", str(env.root / "votes" / "votes.sqlite")]


def _then(fault: Callable[[Env], None], make: Callable[[Env], list[str]]) -> Callable[[Env], list[str]]:
    """The command line of `make`, with `fault` set up after its inputs were made."""
    def argv(env: Env) -> list[str]:
        result = make(env)
        fault(env)
        return result
    return argv


def _disk_full(make: Callable[[Env], list[str]]) -> Callable[[Env], list[str]]:
    return _then(_disk_nearly_full, make)


def _copy_full(make: Callable[[Env], list[str]]) -> Callable[[Env], list[str]]:
    return _then(_copy_fills_the_disk, make)


LEFTOVER_CASES = [
    Case("train-disk-full-leaves-no-folder", _disk_full(lambda e: e.train("--max-steps", "2", out="new/out")), 2,
         ("not enough disk space for --output-dir", "free some space")),
    Case("merge-disk-full-leaves-no-folder", _disk_full(lambda e: ["merge", str(e.adapter()), "--base", str(e.base),
                                                                   "--out", str(e.root / "m")]), 2,
         ("not enough disk space for --out", "the merged model")),
    Case("export-disk-full-preflight", _disk_full(lambda e: ["export", str(e.adapter()), "--for", "sglang", "--out",
                                                             str(e.root / "x"), "--base", str(e.base)]), 2,
         ("not enough disk space for --out", "the export needs")),
    Case("export-disk-fills-while-writing", _export_disk_fills, 2,
         ("the disk is full: --out", "nothing was left behind")),
    Case("space-dry-run-disk-full-preflight", _disk_full(_space_dry_run), 2,
         ("not enough disk space for --dry-run", "the Space folder needs")),
    Case("space-dry-run-disk-fills-while-copying", _copy_full(_space_dry_run), 2,
         ("the disk is full: --dry-run", "nothing was left behind")),
    Case("card-readme-refused-keeps-loss-png", lambda e: ["card", str(_card_with_loss_curve(e))], 1,
         ("README.md",)),
    Case("pull-refused-leaves-no-local-dir", lambda e: ["pull", _pushed(e), "--base", str(e.llama), "--local-dir",
                                                        str(e.root / "dl" / "adapter")], 1,
         ("does not match base", "files removed again"), hub=True),
    Case("pull-pickles-leave-no-local-dir", lambda e: [*_pickled(e), "--local-dir", str(e.root / "dl")], 1,
         ("adapter_model.bin", "--allow-pickle"), hub=True),
    Case("eval-failed-start-leaves-no-out", lambda e: ["eval", str(e.adapter()), "--base", str(e.base), "--data",
                                                       str(e.data()), "--out", str(e.root / "ev"), "--device",
                                                       "cuda"], 2, ("--device cuda: no CUDA device",)),
    Case("tiny-base-missing-corpus-leaves-no-folder", lambda e: ["tiny-base", str(e.root / "new" / "base"),
                                                                 "--corpus", str(e.root / "nope.json")], 1,
         ("nope.json", "No such file")),
    Case("tiny-base-bad-corpus-leaves-no-folder", lambda e: ["tiny-base", str(e.root / "base"), "--corpus",
                                                             str(e.data("not json\n", name="c.jsonl"))], 1,
         ("c.jsonl", "line 1: not JSON")),
    Case("demo-openai-failed-start-leaves-no-votes", _unreachable_endpoint, 2, ("cannot reach the engine",)),
]


def tree_entries(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if "__pycache__" not in p.parts}


@pytest.mark.parametrize("case", LEFTOVER_CASES, ids=lambda c: c.id)
def test_a_refused_command_leaves_nothing_behind(case, request, tmp_path, tiny_base, tiny_llama, pristine_adapter,
                                                 capsys, monkeypatch):
    env = Env(tmp_path / "case", tiny_base, tiny_llama, pristine_adapter)
    env.root.mkdir()
    env.monkeypatch = monkeypatch
    if case.hub:
        env.hub = request.getfixturevalue("hub_server")
        env.hub.monkeypatch = monkeypatch
    argv = case.argv(env)
    capsys.readouterr()
    before = tree_hashes(env.root, tiny_base)
    entries_before = tree_entries(env.root)
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    monkeypatch.undo()  # the real disk_usage / copyfile again for the checks below
    err = capsys.readouterr().err
    assert code == case.code, f"exit {code}, expected {case.code}: {err}"
    assert "Traceback" not in err, err
    message = err[err.index("persona-lora "):] if "persona-lora " in err else err
    assert "error: " in message, err
    for word in case.words:
        assert word in message, f"{word!r} not in: {err}"
    after = tree_hashes(env.root, tiny_base)
    assert not [p for p in before if before[p] != after.get(p)], "pre-existing files changed"
    left = sorted(tree_entries(env.root) - entries_before)
    assert not left, f"left behind: {left}"


# ---------------------------------------------------------------------------------------------- probe cases
# What an adversarial probe found after the cases above: each stays fixed here.

SECRET = "sk-probe-0123456789abcdef"  # what a user pastes where the name of its variable belongs


def _other_adapter_votes(env: Env) -> list[str]:
    from persona_lora.votes import VoteStore

    store = VoteStore(env.root / "votes.sqlite")
    store.record(base_id="tiny-base", adapter_name="someone-else", adapter_id="someone-else", system_prompt="s",
                 prompt="q", answer_a="persona", answer_b="plain", a_side="adapter", vote="A")
    return ["train", str(REPO / "configs" / "tiny-dpo.yaml"), "--base", str(env.base), "--data",
            str(env.root / "votes.sqlite"), "--init-adapter", str(env.adapter()), "--output-dir",
            str(env.root / "o"), "--dry-run", "--set", "base.device=cpu"]


PROBE_CASES = [
    Case("demo-api-key-given-as-its-variable", lambda e: ["demo", "--backend", "openai", "--endpoint",
                                                          "http://127.0.0.1:9/v1", "--base", "tiny", "--api-key-env",
                                                          SECRET], 2,
         ("--api-key-env takes the name of an environment variable", "it is not shown")),
    Case("eval-judge-key-given-as-its-variable", lambda e: ["eval", str(e.adapter()), "--base", str(e.base),
                                                            "--data", str(e.data()), "--out", str(e.root / "ev"),
                                                            "--judge-endpoint", "http://127.0.0.1:9/v1",
                                                            "--judge-model", "j", "--judge-key-env", SECRET], 2,
         ("--judge-key-env takes the name of an environment variable",)),
    Case("train-dpo-truncated-init-adapter", lambda e: ["train", str(REPO / "configs" / "tiny-dpo.yaml"), "--base",
                                                        str(e.base), "--init-adapter", str(_truncated_weights(e)),
                                                        "--output-dir", str(e.root / "o")], 1,
         ("not a consistent adapter folder", ADAPTER_WEIGHTS)),
    Case("train-dpo-votes-for-another-adapter", _other_adapter_votes, 2,
         ("judged another adapter's answers than --init-adapter", "someone-else: 1", "--allow-other-adapter")),
    Case("train-all-steps-in-warm-up", lambda e: e.train(), 2,
         ("no step of this run would change the adapter", "--allow-no-update")),
    Case("train-dry-run-fsdp-in-one-process", lambda e: e.train("--dry-run", "--max-steps", "4", "--set",
                                                                "training.fsdp=true"), 2,
         ("training.fsdp: true needs more than one process",)),
    Case("upgrade-truncated-adapter", lambda e: ["upgrade-adapter", str(_truncated_weights(e))], 1,
         ("not a consistent adapter folder",)),
    Case("merge-force-onto-another-base", lambda e: ["merge", str(e.adapter()), "--base", str(e.llama), "--out",
                                                     str(e.root / "m"), "--force"], 1,
         ("--base is most likely not the model the adapter was trained on",)),
    Case("push-include-matching-nothing", lambda e: ["push", str(e.adapter()), "tester/x", "--include",
                                                     "checkpoint/*"], 2,
         ("--include 'checkpoint/*' matches no file",), hub=True),
]


@pytest.mark.parametrize("case", PROBE_CASES, ids=lambda c: c.id)
def test_probe(case, request, tmp_path, tiny_base, tiny_llama, pristine_adapter, capsys, monkeypatch):
    test_fault(case, request, tmp_path, tiny_base, tiny_llama, pristine_adapter, capsys, monkeypatch)
    assert not (tmp_path / "case" / "o").exists() and not (tmp_path / "case" / "m").exists()


def test_a_key_given_where_its_variable_belongs_is_never_printed(capsys):
    for argv in (["demo", "--backend", "openai", "--endpoint", "http://127.0.0.1:9/v1", "--base", "tiny",
                  "--api-key-env", SECRET],):
        assert main(argv) == 2
        captured = capsys.readouterr()
        assert SECRET not in captured.err + captured.out


def test_ctrl_c_while_the_command_modules_load_exits_130_with_one_line():
    """The console entry point (`persona_lora.cli:run`, also behind `python -m persona_lora`) as a Ctrl-C in the
    first second of a command meets it: SIGINT arrives while a stage's CLI module is being imported."""
    import subprocess
    import sys

    child = (
        "import builtins, os, signal, sys\n"
        "real = builtins.__import__\n"
        "def interrupting(name, *a, **k):\n"
        "    if name == 'persona_lora.evaluation':\n"
        "        os.kill(os.getpid(), signal.SIGINT)\n"
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = interrupting\n"
        "sys.argv = ['persona-lora', '--version']\n"
        "from persona_lora.cli import run\n"
        "run()\n"
    )
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr == "persona-lora: interrupted\n" and proc.stdout == ""


def test_a_changed_long_setting_says_what_changed():
    from persona_lora.artifact import parse_manifest
    from persona_lora.train.provenance import run_changes

    prompt = "你是沈知微，宫中的微嫔。说话端庄温婉，自称本宫或臣妾。" * 3
    old = {"schema": "persona-lora/manifest@1", "kind": "adapter", "name": "x", "base_model": {"id": "b"},
           "dataset": {"name": "d.json", "sha256": "a" * 64}, "chat": {"system_prompt": prompt}}
    new = json.loads(json.dumps(old))
    new["dataset"]["sha256"] = "b" * 64
    new["chat"]["system_prompt"] = prompt.replace("微嫔", "贵妃", 1)
    lines = run_changes(parse_manifest(old, Path("old.json")), parse_manifest(new, Path("new.json")))
    assert lines[0] == f"dataset.sha256: sha256 {'a' * 12}… -> sha256 {'b' * 12}…"
    assert lines[1].startswith("chat.system_prompt: (81 chars; from char 10: ") and "微嫔" in lines[1]
    assert "贵妃" in lines[1] and "a different text" not in " ".join(lines)
