"""hub_tools against the real huggingface_hub client talking to the in-memory FakeHub (tests/hub_server.py).

The adapter is a real PEFT LoRA on a tiny Llama (2 layers, hidden 32) built once per session; each test copies
it. Nothing touches ~/.cache, the internet, or a real token.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
from pathlib import Path

import pytest

from persona_lora.cli import main
from persona_lora.errors import HubError, ModelLoadError, UsageError, VerificationError
from tests.hub_fixtures import DEFAULT_MS_TOKEN, DEFAULT_MS_USER, DEFAULT_TOKEN, DEFAULT_USER

# The fixtures hub_server, fast_retries, ms_server and ms_fast_retries come from tests/hub_fixtures.py via conftest.py.

BASE_ID = "test-org/tiny-llama"
REPO = f"{DEFAULT_USER}/tiny-persona"
PUSHED = {"adapter_config.json", "adapter_model.safetensors", "README.md", "persona_manifest.json", "loss.png",
          "tokenizer_config.json", "chat_template.jinja"}
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + bytes(range(256)) * 4  # binary => stored with LFS

README = f"""---
base_model: {BASE_ID}
library_name: peft
tags:
- persona-lora
- lora
license: apache-2.0
---
# tiny-persona

A test persona adapter.
"""


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _save_base(folder: Path, hidden: int) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    import torch

    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """(base hidden 32, base hidden 64, adapter folder trained on the hidden-32 base) — built once."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("tiny_models")
    base32 = _save_base(root / "base32", 32)
    base64 = _save_base(root / "base64", 64)
    model = AutoModelForCausalLM.from_pretrained(base32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    adapter = root / "adapter"
    peft_model.save_pretrained(adapter)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = BASE_ID
    (adapter / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    (adapter / "README.md").write_text(README)
    manifest = {
        "schema": "persona-lora/manifest@1", "kind": "adapter", "name": "tiny-persona",
        "created_at": "2026-11-28T08:00:00Z", "persona_lora_version": "0.1.0",
        "base_model": {"id": BASE_ID, "source": "hf", "revision": None, "config_sha256": sha256(base32 / "config.json"),
                       "model_type": "llama", "architectures": ["LlamaForCausalLM"]},
    }
    (adapter / "persona_manifest.json").write_text(json.dumps(manifest, indent=2))
    (adapter / "loss.png").write_bytes(PNG)
    (adapter / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    (adapter / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    return {"base32": base32, "base64": base64, "adapter": adapter}


@pytest.fixture
def run_dir(tiny_models, tmp_path):
    """A copy of the adapter folder plus what a training run leaves next to it (must never be pushed)."""
    folder = tmp_path / "tiny-persona"
    shutil.copytree(tiny_models["adapter"], folder)
    (folder / "checkpoints" / "checkpoint-10").mkdir(parents=True)
    (folder / "checkpoints" / "checkpoint-10" / "adapter_model.safetensors").write_bytes(b"x" * 100)
    (folder / "checkpoints" / "checkpoint-10" / "optimizer.pt").write_bytes(b"\x80\x04pickle")
    (folder / "optimizer.pt").write_bytes(b"\x80\x04pickle")
    (folder / "scheduler.pt").write_bytes(b"\x80\x04pickle")
    (folder / "runs").mkdir()
    (folder / "runs" / "events.out.tfevents.1.host").write_bytes(b"\x00events")
    (folder / "train.log").write_text("step 1 loss 2.0\n")
    return folder


def push(folder, repo=REPO, **kw):
    from persona_lora.hub_tools.push import push_folder

    return push_folder(folder, repo, **kw)


def pull(repo=REPO, **kw):
    from persona_lora.hubs.pull import pull as _pull

    return _pull(repo, **kw)


# ------------------------------------------------------------------------------------------------ round trip
def test_push_pull_round_trip_is_byte_identical(hub_server, run_dir):
    result = push(run_dir)
    assert result == f"{hub_server.url}/{REPO}"
    assert set(hub_server.list_files(REPO)) == PUSHED | {".gitattributes"}
    skipped = dict(result.skipped)
    for never in ("optimizer.pt", "scheduler.pt", "checkpoints/checkpoint-10/optimizer.pt",
                  "checkpoints/checkpoint-10/adapter_model.safetensors", "runs/events.out.tfevents.1.host",
                  "train.log"):
        assert never in skipped
    assert "checkpoint" in skipped["checkpoints/checkpoint-10/optimizer.pt"]
    # one commit on top of the repo's initial commit
    repo = hub_server.repo(REPO)
    assert len(repo.commits) == 2

    folder = pull()
    assert str(folder).startswith(hub_server.hf_home)  # the hub cache, not a custom folder
    assert folder.name == hub_server.head(REPO)  # snapshots/<commit>
    pulled = {p.name for p in folder.iterdir()}
    assert pulled == PUSHED
    for name in PUSHED:
        assert sha256(folder / name) == sha256(run_dir / name), name
        assert (hashlib.sha256(hub_server.file_bytes(REPO, name)).digest()
                == hashlib.sha256((run_dir / name).read_bytes()).digest())
    # LFS for the weights and the png, inline for text files
    repo_files = repo.resolve("main").files
    assert repo_files["adapter_model.safetensors"].lfs and repo_files["loss.png"].lfs
    assert not repo_files["adapter_config.json"].lfs


def test_pull_into_local_dir(hub_server, run_dir, tmp_path):
    push(run_dir)
    out = pull(local_dir=tmp_path / "out")
    assert out == (tmp_path / "out").resolve()
    for name in PUSHED:
        assert sha256(out / name) == sha256(run_dir / name)


def test_pushing_again_unchanged_and_with_repo_name_only(hub_server, run_dir):
    url = push(run_dir, "tiny-persona")  # no namespace: the token's user
    assert url.repo_id == REPO
    head = hub_server.head(REPO)
    push(run_dir)  # nothing changed: no error, no new files, and no (empty) commit
    assert set(hub_server.list_files(REPO)) == PUSHED | {".gitattributes"}
    assert hub_server.head(REPO) == head


def test_include_extra_pushes_named_files(hub_server, run_dir):
    (run_dir / "notes").mkdir()
    (run_dir / "notes" / "eval.md").write_text("evaluation notes")
    push(run_dir, include_extra=["notes/*.md"])
    assert "notes/eval.md" in hub_server.list_files(REPO)
    assert "optimizer.pt" not in hub_server.list_files(REPO)


# ------------------------------------------------------------------------------------------------ revisions
def test_branch_push_and_pull_leave_main_alone(hub_server, run_dir):
    push(run_dir)
    main_head = hub_server.head(REPO)
    main_readme = hub_server.file_bytes(REPO, "README.md")
    (run_dir / "README.md").write_text(README + "\nExperimental v2.\n")
    url = push(run_dir, revision="v2-experiment", message="try v2")
    assert url.endswith("/tree/v2-experiment")
    assert hub_server.head(REPO) == main_head
    assert hub_server.file_bytes(REPO, "README.md") == main_readme
    assert b"Experimental v2" in hub_server.file_bytes(REPO, "README.md", revision="v2-experiment")

    on_branch = pull(revision="v2-experiment")
    assert "Experimental v2" in (on_branch / "README.md").read_text()
    on_main = pull()
    assert "Experimental v2" not in (on_main / "README.md").read_text()
    # a second push to the existing branch works too
    (run_dir / "README.md").write_text(README + "\nExperimental v3.\n")
    push(run_dir, revision="v2-experiment")
    assert b"v3" in hub_server.file_bytes(REPO, "README.md", revision="v2-experiment")


def test_create_pr_opens_pull_request_without_touching_main(hub_server, run_dir):
    push(run_dir)
    main_head = hub_server.head(REPO)
    (run_dir / "README.md").write_text(README + "\nProposed change.\n")
    url = push(run_dir, create_pr=True)
    assert url == f"{hub_server.url}/{REPO}/discussions/1"
    assert url.pr_url == url
    assert hub_server.head(REPO) == main_head
    assert b"Proposed change" in hub_server.file_bytes(REPO, "README.md", revision="refs/pr/1")
    assert "Proposed change" in (pull(revision="refs/pr/1") / "README.md").read_text()
    with pytest.raises(UsageError, match="--create-pr"):
        push(run_dir, create_pr=True, revision="dev")


# ------------------------------------------------------------------------------------------------ auth / not found
def test_private_repo_needs_a_token(hub_server, run_dir, monkeypatch):
    push(run_dir, private=True)
    assert hub_server.repo(REPO).private
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(HubError) as e:
        pull()
    msg = str(e.value)
    assert REPO in msg and "private" in msg and "HF_TOKEN" in msg and "hf auth login" in msg
    # someone else's token cannot see it either
    hub_server.tokens["hf_othertoken_abcdefghijklmnopqrstuvwx"] = {"user": "mallory", "role": "write"}
    with pytest.raises(HubError, match="not found"):
        pull(token="hf_othertoken_abcdefghijklmnopqrstuvwx")


def test_push_without_token(hub_server, run_dir, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(HubError) as e:
        push(run_dir)
    assert "set HF_TOKEN or run `hf auth login`" in str(e.value)
    assert hub_server.repos == {}


def test_push_with_invalid_or_read_only_token(hub_server, run_dir, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_wrongtoken_zzzzzzzzzzzzzzzzzzzzzzzz")
    with pytest.raises(HubError) as e:
        push(run_dir)
    assert "rejected" in str(e.value) and "401" in str(e.value)
    assert "hf_wrongtoken" not in str(e.value)
    hub_server.tokens["hf_readonly_abcdefghijklmnopqrstuvwxyz"] = {"user": DEFAULT_USER, "role": "read"}
    monkeypatch.setenv("HF_TOKEN", "hf_readonly_abcdefghijklmnopqrstuvwxyz")
    with pytest.raises(HubError, match="403"):
        push(run_dir)


def test_missing_repo_and_missing_revision_have_distinct_messages(hub_server, run_dir):
    with pytest.raises(HubError) as e:
        pull("nobody/does-not-exist")
    assert "nobody/does-not-exist was not found" in str(e.value)
    push(run_dir)
    with pytest.raises(HubError) as e:
        pull(revision="no-such-branch")
    msg = str(e.value)
    assert "revision 'no-such-branch' does not exist in" in msg and REPO in msg


def test_gated_repo_says_where_to_request_access(hub_server, tiny_models):
    files = {
        name: (tiny_models["adapter"] / name).read_bytes()
        for name in ("adapter_config.json", "adapter_model.safetensors")
    }
    hub_server.add_repo("meta-test/gated-adapter", files, gated=True)
    with pytest.raises(HubError) as e:
        pull("meta-test/gated-adapter")
    msg = str(e.value)
    assert "gated" in msg and f"request access at {hub_server.url}/meta-test/gated-adapter" in msg
    hub_server.repo("meta-test/gated-adapter").granted.add(DEFAULT_USER)
    assert (pull("meta-test/gated-adapter") / "adapter_config.json").is_file()


def test_network_down(hub_server, run_dir, monkeypatch):
    import huggingface_hub.constants as c

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setenv("HF_ENDPOINT", dead)
    monkeypatch.setattr(c, "ENDPOINT", dead)
    with pytest.raises(HubError, match=f"cannot reach {dead}; check your network or HF_ENDPOINT"):
        push(run_dir)
    with pytest.raises(HubError, match=f"cannot reach {dead}; check your network or HF_ENDPOINT"):
        pull()


# ------------------------------------------------------------------------------------------------ failures
def test_connection_dropped_mid_upload_commits_nothing(hub_server, run_dir, fast_retries):
    push(run_dir)
    before_files = hub_server.list_files(REPO)
    before_head = hub_server.head(REPO)
    before_weights = hub_server.file_bytes(REPO, "adapter_model.safetensors")
    # new weights => an LFS upload is needed; every PUT attempt (incl. the client's retries) is cut mid-body
    data = bytearray((run_dir / "adapter_model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (run_dir / "adapter_model.safetensors").write_bytes(bytes(data))
    (run_dir / "README.md").write_text(README + "\nchanged\n")
    hub_server.drop_lfs_put(nth=1)
    with pytest.raises(HubError) as e:
        push(run_dir)
    msg = str(e.value)
    assert "adapter_model.safetensors" in msg and "connection dropped" in msg and "Nothing was committed" in msg
    assert hub_server.dropped_puts >= 2  # the client retried, and each retry was dropped too
    assert hub_server.list_files(REPO) == before_files
    assert hub_server.head(REPO) == before_head
    assert hub_server.file_bytes(REPO, "adapter_model.safetensors") == before_weights
    assert b"changed" not in hub_server.file_bytes(REPO, "README.md")
    # once the network is back, the same command succeeds
    hub_server.clear_failures()
    push(run_dir)
    assert hub_server.file_bytes(REPO, "adapter_model.safetensors") == bytes(data)


def test_a_single_dropped_put_is_retried_by_the_client(hub_server, run_dir, fast_retries):
    hub_server.drop_lfs_put(nth=1, times=1)
    push(run_dir)
    assert hub_server.dropped_puts == 1
    assert set(hub_server.list_files(REPO)) == PUSHED | {".gitattributes"}


def test_server_rejects_commit_of_never_uploaded_lfs_object(hub_server):
    import base64

    import httpx2

    hub_server.add_repo(REPO, {"README.md": "hello"})
    head = hub_server.head(REPO)
    lines = [
        {"key": "header", "value": {"summary": "sneaky", "description": ""}},
        {"key": "file", "value": {"path": "a.txt", "content": base64.b64encode(b"a").decode(), "encoding": "base64"}},
        {"key": "lfsFile", "value": {"path": "w.safetensors", "algo": "sha256", "oid": "0" * 64, "size": 10}},
    ]
    r = httpx2.post(f"{hub_server.url}/api/models/{REPO}/commit/main", content="\n".join(json.dumps(x) for x in lines),
                    headers={"Authorization": f"Bearer {DEFAULT_TOKEN}", "Content-Type": "application/x-ndjson"})
    assert r.status_code == 422
    assert hub_server.head(REPO) == head and hub_server.list_files(REPO) == [".gitattributes", "README.md"]


def test_corrupted_download_is_detected_and_discarded(hub_server, run_dir):
    push(run_dir)
    hub_server.corrupt("adapter_model.safetensors")
    with pytest.raises(VerificationError) as e:
        pull()
    msg = str(e.value)
    assert "corrupt" in msg and "adapter_model.safetensors: sha256" in msg and "run pull again" in msg
    hub_server.clear_failures()
    folder = pull()  # the bad blob was removed, so this downloads it again
    assert sha256(folder / "adapter_model.safetensors") == sha256(run_dir / "adapter_model.safetensors")


def test_corrupted_small_text_file_is_detected(hub_server, run_dir, tmp_path):
    push(run_dir)
    hub_server.corrupt("adapter_config.json")
    with pytest.raises(VerificationError, match="adapter_config.json: git blob id"):
        pull(local_dir=tmp_path / "out")
    assert not (tmp_path / "out" / "adapter_config.json").exists()


def test_server_errors_are_retried_then_reported(hub_server, run_dir, fast_retries):
    push(run_dir)
    hub_server.fail("adapter_model.safetensors", status=503, times=2)
    assert (pull() / "adapter_model.safetensors").is_file()  # transient: the client retried
    served = [f for f in hub_server.injected if f["status"] == 503]
    assert [f["path"] for f in served] == ["adapter_model.safetensors"] * 2  # both 503s were served
    hub_server.fail("/api/models/", status=500)
    with pytest.raises(HubError, match="500"):
        pull(revision="main")


def test_invalid_readme_metadata_is_reported(hub_server, run_dir):
    (run_dir / "README.md").write_text("---\nbase_model: [unclosed\n---\n# card\n")
    with pytest.raises(HubError, match="README.md has invalid metadata"):
        push(run_dir)


def test_push_and_pull_a_merged_model_folder(hub_server, tiny_models, tmp_path):
    folder = tmp_path / "merged"
    shutil.copytree(tiny_models["base32"], folder)
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04old pickle")  # left over: never pushed
    result = push(folder, f"{DEFAULT_USER}/merged")
    assert set(result.pushed) == {"config.json", "generation_config.json", "model.safetensors"}
    assert "pytorch_model.bin" in dict(result.skipped)
    out = pull(f"{DEFAULT_USER}/merged")
    assert sha256(out / "model.safetensors") == sha256(folder / "model.safetensors")


def test_truncated_safetensors_is_refused(tmp_path, tiny_models):
    from persona_lora.consistency import check_folder
    from persona_lora.safetensors_io import read_safetensors_header

    folder = tmp_path / "a"
    shutil.copytree(tiny_models["adapter"], folder)
    data = (folder / "adapter_model.safetensors").read_bytes()
    (folder / "adapter_model.safetensors").write_bytes(data[:-10])
    with pytest.raises(VerificationError, match="adapter_model.safetensors"):
        check_folder(folder)
    (folder / "adapter_model.safetensors").write_bytes(b"\xff" * 8 + b"{}")
    with pytest.raises(VerificationError, match="not a valid safetensors"):
        read_safetensors_header(folder / "adapter_model.safetensors")
    (folder / "adapter_model.safetensors").write_bytes(data)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    del cfg["peft_type"]
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(VerificationError, match="peft_type"):
        check_folder(folder)


def test_fake_hub_speaks_the_rest_of_the_protocol(hub_server):
    """Endpoints hub_tools does not call itself but other code may: datasets, paths-info, refs, file_exists."""
    from huggingface_hub import HfApi, hf_hub_download

    api = HfApi()
    api.create_repo("data-set", repo_type="dataset")
    api.upload_file(path_or_fileobj=b'{"messages": []}\n', path_in_repo="train.jsonl",
                    repo_id=f"{DEFAULT_USER}/data-set", repo_type="dataset")
    local = hf_hub_download(f"{DEFAULT_USER}/data-set", "train.jsonl", repo_type="dataset")
    assert Path(local).read_bytes() == b'{"messages": []}\n'
    assert (api.dataset_info(f"{DEFAULT_USER}/data-set").sha
            == hub_server.head(f"{DEFAULT_USER}/data-set", repo_type="dataset"))
    hub_server.add_repo(REPO, {"a/b.txt": "x", "w.safetensors": b"\0" * 16})
    infos = {i.path: i for i in api.get_paths_info(REPO, ["a", "w.safetensors", "missing"], expand=True)}
    assert set(infos) == {"a", "w.safetensors"} and infos["w.safetensors"].lfs.size == 16
    assert infos["w.safetensors"].last_commit is not None
    api.create_branch(REPO, branch="dev")
    assert {b.name for b in api.list_repo_refs(REPO).branches} == {"main", "dev"}
    assert api.file_exists(REPO, "a/b.txt") and not api.file_exists(REPO, "nope.txt")
    assert sorted(api.list_repo_files(REPO)) == [".gitattributes", "a/b.txt", "w.safetensors"]
    tree = list(api.list_repo_tree(REPO, expand=True))
    assert {t.path for t in tree} == {".gitattributes", "a", "w.safetensors"}


# ------------------------------------------------------------------------------------------------ pickles
def _pickle_repo(hub_server, tiny_models, repo="someone/pickled-adapter"):
    adapter = tiny_models["adapter"]
    files = {"adapter_config.json": (adapter / "adapter_config.json").read_bytes(),
             "adapter_model.bin": b"\x80\x04\x95pickled weights", "README.md": README}
    hub_server.add_repo(repo, files)
    return repo


def test_pickled_weights_are_refused_unless_allowed(hub_server, tiny_models):
    repo = _pickle_repo(hub_server, tiny_models)
    with pytest.raises(VerificationError) as e:
        pull(repo)
    assert "adapter_model.bin" in str(e.value) and "--allow-pickle" in str(e.value)
    assert not any("resolve" in p for p in hub_server.paths_requested())  # nothing was downloaded
    folder = pull(repo, allow_pickle=True)
    assert (folder / "adapter_model.bin").read_bytes().startswith(b"\x80\x04")


def test_push_refuses_pickle_only_folder_and_non_adapter_folder(hub_server, tmp_path, tiny_models):
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(tiny_models["adapter"] / "adapter_config.json", folder)
    (folder / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(VerificationError, match="pickled weights .*adapter_model.bin"):
        push(folder)
    empty = tmp_path / "random"
    empty.mkdir()
    (empty / "notes.txt").write_text("hi")
    with pytest.raises(ModelLoadError, match="neither an adapter folder"):
        push(empty)
    assert hub_server.repos == {}


# ------------------------------------------------------------------------------------------------ base checks
def test_base_mismatch_is_refused_with_the_reason(hub_server, run_dir, tiny_models):
    push(run_dir)
    assert pull(base=str(tiny_models["base32"])).is_dir()
    with pytest.raises(VerificationError) as e:
        pull(base=str(tiny_models["base64"]))
    msg = str(e.value)
    assert "does not match base" in msg
    assert "config.json differs" in msg
    assert "model.layers.0.self_attn.q_proj: adapter expects in=32, out=32; the base weight" in msg
    assert "64x64" in msg
    with pytest.raises(VerificationError, match=f"trained on {BASE_ID}, not other/base"):
        pull(base="other/base")


def test_base_given_as_hub_id_is_checked_against_remote_headers(hub_server, run_dir, tiny_models):
    base_files = {p.name: p.read_bytes() for p in tiny_models["base32"].iterdir()}
    hub_server.add_repo(BASE_ID, base_files)
    push(run_dir)
    assert pull(base=BASE_ID).is_dir()
    # same id, but the hub now serves a different (hidden 64) model under it
    hub_server.commit_files(BASE_ID, {p.name: p.read_bytes() for p in tiny_models["base64"].iterdir()})
    with pytest.raises(VerificationError, match="q_proj: adapter expects in=32"):
        pull(base=BASE_ID)


def test_shape_check_understands_fused_and_per_expert_moe_layouts():
    from persona_lora.hubs.verify import shape_problems

    adapter = {
        "base_model.model.model.layers.1.mlp.experts.base_layer.lora_A.weight": [8, 32],
        "base_model.model.model.layers.1.mlp.experts.base_layer.lora_B.weight": [32, 8],
        "base_model.model.model.layers.1.mlp.experts.lora_A.weight": [8, 16],
        "base_model.model.model.layers.1.mlp.experts.lora_B.weight": [32, 8],
    }
    fused = {"model.layers.1.mlp.experts.gate_up_proj": [4, 32, 32],
             "model.layers.1.mlp.experts.down_proj": [4, 32, 16]}
    per_expert = {}
    for e in range(4):
        per_expert[f"model.layers.1.mlp.experts.{e}.gate_proj.weight"] = [16, 32]
        per_expert[f"model.layers.1.mlp.experts.{e}.up_proj.weight"] = [16, 32]
        per_expert[f"model.layers.1.mlp.experts.{e}.down_proj.weight"] = [32, 16]
    assert shape_problems(adapter, fused) == []
    assert shape_problems(adapter, per_expert) == []
    bigger = {k: [v[0], v[1] * 2, v[2]] for k, v in fused.items()}
    assert shape_problems(adapter, bigger)


# ------------------------------------------------------------------------------------------------ listing
def test_list_adapters_by_base(hub_server, run_dir, tiny_models):
    from persona_lora.hubs.pull import list_adapters

    push(run_dir)
    other = run_dir.parent / "other"
    shutil.copytree(run_dir, other)
    (other / "README.md").write_text(README.replace(BASE_ID, "test-org/another-base"))
    push(other, f"{DEFAULT_USER}/other-persona")
    hub_server.add_repo(BASE_ID, {p.name: p.read_bytes() for p in tiny_models["base32"].iterdir()})
    assert list_adapters(BASE_ID) == [REPO]
    assert list_adapters("test-org/another-base") == [f"{DEFAULT_USER}/other-persona"]
    assert list_adapters("nobody/nothing") == []


def test_list_finds_the_adapters_of_a_local_base_by_its_config(hub_server, run_dir, tiny_models, capsys):
    """An adapter of a base that is a local folder has no `base_model` in its card; `list --base FOLDER` finds it
    by the base identity the manifest records (config.json's sha256, a tag of the card)."""
    from persona_lora.model_cards.cards import write_card

    manifest_file = run_dir / "persona_manifest.json"
    m = json.loads(manifest_file.read_text())
    m["base_model"].update(id="base32", source="local")
    manifest_file.write_text(json.dumps(m, indent=2))
    config_file = run_dir / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "base_model_name_or_path": "base32"}))
    (run_dir / "README.md").unlink()
    write_card(run_dir)
    push(run_dir, f"{DEFAULT_USER}/local-base-persona")
    assert main(["list", "--base", str(tiny_models["base32"])]) == 0
    assert capsys.readouterr().out.split() == [f"{DEFAULT_USER}/local-base-persona"]
    assert main(["list", "--base", str(tiny_models["base64"])]) == 0  # another base: not its adapter
    assert capsys.readouterr().out.split() == []


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_push_pull_list(hub_server, run_dir, tmp_path, capsys):
    assert main(["push", str(run_dir), REPO, "--message", "first"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == f"{hub_server.url}/{REPO}"
    assert "optimizer.pt" in err and "checkpoints/checkpoint-10/optimizer.pt" in err
    assert hub_server.repo(REPO).resolve("main").title == "first"

    assert main(["pull", REPO, "--local-dir", str(tmp_path / "dl")]) == 0
    out, _ = capsys.readouterr()
    assert Path(out.strip()) == (tmp_path / "dl").resolve()

    assert main(["list", "--base", BASE_ID]) == 0
    out, _ = capsys.readouterr()
    assert out.split() == [REPO]

    assert main(["push", str(run_dir), REPO, "--revision", "dev", "--include", "train.log"]) == 0
    assert "train.log" in hub_server.list_files(REPO, "dev")
    assert main(["pull", REPO, "--revision", "dev"]) == 0
    capsys.readouterr()


def test_cli_errors_are_one_line_with_exit_codes(hub_server, tiny_models, capsys):
    repo = _pickle_repo(hub_server, tiny_models)
    assert main(["pull", repo]) == 1
    _, err = capsys.readouterr()
    assert err.startswith("persona-lora pull: error:") and "--allow-pickle" in err and "Traceback" not in err
    assert main(["pull", repo, "--allow-pickle"]) == 0
    assert main(["pull", "nobody/missing"]) == 1
    _, err = capsys.readouterr()
    assert "nobody/missing was not found" in err
    assert main(["push", str(tiny_models["adapter"]), REPO, "--create-pr", "--revision", "x"]) == 2


def test_cli_base_mismatch(hub_server, run_dir, tiny_models, capsys):
    push(run_dir)
    assert main(["pull", REPO, "--base", str(tiny_models["base64"])]) == 1
    _, err = capsys.readouterr()
    assert "does not match base" in err and "q_proj" in err


def test_token_never_printed_logged_or_written(hub_server, run_dir, tmp_path, capsys, caplog, monkeypatch):
    import logging

    import huggingface_hub.constants as c

    caplog.set_level(logging.DEBUG)
    monkeypatch.setattr(c, "HF_DEBUG", True)  # the client logs every request as a curl command
    home = Path(hub_server.hf_home)
    assert main(["-vv", "push", str(run_dir), REPO]) == 0
    assert main(["-vv", "pull", REPO, "--local-dir", str(tmp_path / "dl")]) == 0
    assert main(["-vv", "pull", REPO]) == 0
    assert main(["-vv", "list", "--base", BASE_ID]) == 0
    monkeypatch.setenv("HF_TOKEN", "hf_badtoken_qqqqqqqqqqqqqqqqqqqqqqqqqq")
    assert main(["-vv", "push", str(run_dir), REPO]) == 1
    out, err = capsys.readouterr()
    text = out + err + caplog.text + "\n".join(str(r.args) for r in caplog.records)
    for secret in (DEFAULT_TOKEN, "hf_badtoken_qqqqqqqqqqqqqqqqqqqqqqqqqq"):
        assert secret not in text
        for root in (home, tmp_path):
            for p in root.rglob("*"):
                if p.is_file():
                    assert secret.encode() not in p.read_bytes(), p
    assert not (home / "token").exists()


# ------------------------------------------------------------------------------------------------ ModelScope
@pytest.fixture
def modelscope_env(tmp_path, monkeypatch, ms_fast_retries):
    """ModelScope client pointed at a closed local port, with its home/cache in tmp."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setenv("MODELSCOPE_DOMAIN", dead)
    monkeypatch.delenv("MODELSCOPE_ENDPOINT", raising=False)
    monkeypatch.setenv("MODELSCOPE_HOME", str(tmp_path / "ms_home"))
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "ms_cache"))
    monkeypatch.setenv("MODELSCOPE_CREDENTIALS_PATH", str(tmp_path / "ms_home" / "credentials"))
    monkeypatch.delenv("MODELSCOPE_API_TOKEN", raising=False)
    from modelscope_hub import config as ms_config

    monkeypatch.setattr(ms_config, "_default_config", None)
    return dead


def test_modelscope_push_needs_token_and_has_no_prs(modelscope_env, run_dir):
    with pytest.raises(HubError, match="MODELSCOPE_API_TOKEN"):
        push(run_dir, "someone/tiny", hub="modelscope")
    with pytest.raises(UsageError, match="ModelScope has no pull requests"):
        push(run_dir, "someone/tiny", hub="modelscope", create_pr=True)


def test_modelscope_list_is_refused(modelscope_env):
    from persona_lora.hubs.pull import list_adapters

    with pytest.raises(HubError, match="Hugging Face Hub only"):
        list_adapters(BASE_ID, hub="modelscope")
    assert main(["list", "--base", BASE_ID, "--hub", "modelscope"]) == 1


def test_modelscope_network_down_is_reported(modelscope_env, run_dir, monkeypatch):
    from persona_lora.hubs.ms_backend import ms_endpoint

    assert ms_endpoint() == modelscope_env
    monkeypatch.setenv("MODELSCOPE_API_TOKEN", "ms-test-token-abcdefgh")
    with pytest.raises(HubError) as e:
        push(run_dir, "someone/tiny", hub="modelscope")
    assert f"cannot reach {modelscope_env}" in str(e.value) and "ms-test-token" not in str(e.value)
    with pytest.raises(HubError, match=f"cannot reach {modelscope_env}"):
        pull("someone/tiny", hub="modelscope")


# --------------------------------------------------------------------------------------------- ModelScope (fake server)
MS_REPO = f"{DEFAULT_MS_USER}/tiny-persona"


def test_modelscope_push_pull_round_trip(ms_server, run_dir):
    url = push(run_dir, MS_REPO, hub="modelscope", message="persona v1")
    assert url == f"{ms_server.url}/models/{MS_REPO}"
    assert set(ms_server.list_files(MS_REPO)) == PUSHED
    assert "optimizer.pt" in dict(url.skipped)
    assert [m for _, m in ms_server.repos[MS_REPO].commits][0].startswith("persona v1")
    folder = pull(MS_REPO, hub="modelscope")
    assert str(folder).startswith(ms_server.home)
    for name in PUSHED:
        assert sha256(folder / name) == sha256(run_dir / name), name


def test_modelscope_push_of_an_unchanged_folder_makes_no_commit(ms_server, run_dir):
    push(run_dir, MS_REPO, hub="modelscope")
    push(run_dir, MS_REPO, hub="modelscope")
    assert len(ms_server.repos[MS_REPO].commits) == 1 and set(ms_server.list_files(MS_REPO)) == PUSHED


def test_modelscope_revisions_push_and_pull_a_branch_and_a_missing_one_is_named(ms_server, run_dir):
    push(run_dir, MS_REPO, hub="modelscope")
    main_card = (run_dir / "README.md").read_bytes()
    (run_dir / "README.md").write_bytes(main_card + b"\nOn the dev branch only.\n")
    push(run_dir, MS_REPO, hub="modelscope", revision="dev")
    assert ms_server.file_bytes(MS_REPO, "README.md", "dev").endswith(b"On the dev branch only.\n")
    assert ms_server.file_bytes(MS_REPO, "README.md") == main_card  # master untouched
    assert (pull(MS_REPO, hub="modelscope", revision="dev") / "README.md").read_bytes().endswith(
        b"On the dev branch only.\n")
    assert (pull(MS_REPO, hub="modelscope") / "README.md").read_bytes() == main_card
    with pytest.raises(HubError, match=f"revision 'nope' does not exist in {MS_REPO} on ModelScope"):
        pull(MS_REPO, hub="modelscope", revision="nope")


def test_modelscope_rejected_and_read_only_tokens_are_told_apart(ms_server, run_dir, monkeypatch):
    from modelscope_hub import config as ms_config

    bad = "ms-badtoken-qqqqqqqqqqqqqqqq"
    monkeypatch.setenv("MODELSCOPE_API_TOKEN", bad)
    monkeypatch.setattr(ms_config, "_default_config", None)  # the client caches the token process-wide
    with pytest.raises(HubError, match=r"ModelScope rejected the token \(401\)") as e:
        push(run_dir, MS_REPO, hub="modelscope")
    assert bad not in str(e.value)
    monkeypatch.setenv("MODELSCOPE_API_TOKEN", DEFAULT_MS_TOKEN)
    monkeypatch.setattr(ms_config, "_default_config", None)
    with pytest.raises(HubError, match=r"forbidden \(403\) on ModelScope") as e:  # a valid token, another owner
        push(run_dir, "someone-else/tiny", hub="modelscope")
    assert DEFAULT_MS_TOKEN not in str(e.value) and "someone-else/tiny" not in ms_server.repos


def test_modelscope_private_missing_and_pickles(ms_server, run_dir, tiny_models, monkeypatch):
    push(run_dir, MS_REPO, hub="modelscope", private=True)
    assert ms_server.repos[MS_REPO].private
    ms_server.add_repo("someone/pickled", {
        "adapter_config.json": (tiny_models["adapter"] / "adapter_config.json").read_bytes(),
        "adapter_model.bin": b"\x80\x04pickle",
    })
    with pytest.raises(VerificationError, match="--allow-pickle"):
        pull("someone/pickled", hub="modelscope")
    assert (pull("someone/pickled", hub="modelscope", allow_pickle=True) / "adapter_model.bin").is_file()
    with pytest.raises(HubError, match="someone/nothing was not found on ModelScope"):
        pull("someone/nothing", hub="modelscope")
    from modelscope_hub import config as ms_config

    monkeypatch.delenv("MODELSCOPE_API_TOKEN")
    monkeypatch.setattr(ms_config, "_default_config", None)  # the client caches the token process-wide
    with pytest.raises(HubError) as e:
        pull(MS_REPO, hub="modelscope")
    assert f"{MS_REPO} was not found on ModelScope" in str(e.value) and "MODELSCOPE_API_TOKEN" in str(e.value)


@pytest.mark.slow
def test_modelscope_corrupted_download_is_detected(ms_server, run_dir, ms_fast_retries):
    push(run_dir, MS_REPO, hub="modelscope")
    ms_server.corrupt_paths.add("adapter_config.json")
    with pytest.raises(VerificationError, match="(?s)corrupt.*adapter_config.json"):
        pull(MS_REPO, hub="modelscope")


def test_modelscope_cli_push_and_pull(ms_server, run_dir, capsys):
    assert main(["push", str(run_dir), MS_REPO, "--hub", "modelscope"]) == 0
    out, _ = capsys.readouterr()
    assert out.strip() == f"{ms_server.url}/models/{MS_REPO}"
    assert main(["pull", MS_REPO, "--hub", "modelscope"]) == 0
    out, _ = capsys.readouterr()
    assert (Path(out.strip()) / "adapter_model.safetensors").is_file()


def test_modelscope_failed_blob_upload_reports_partial_push(ms_server, run_dir, ms_fast_retries):
    ms_server.fail_blob_puts = True
    with pytest.raises(HubError) as e:
        push(run_dir, MS_REPO, hub="modelscope")
    msg = str(e.value)
    assert "incomplete" in msg and "partial adapter" in msg and "adapter_model.safetensors" in msg
    # the surprise this guards against: the client committed the small files without the weights
    assert "adapter_config.json" in ms_server.list_files(MS_REPO)
    assert "adapter_model.safetensors" not in ms_server.list_files(MS_REPO)
    ms_server.fail_blob_puts = False
    push(run_dir, MS_REPO, hub="modelscope")
    assert set(ms_server.list_files(MS_REPO)) == PUSHED


def test_modelscope_token_never_written(ms_server, run_dir, tmp_path, capsys):
    assert main(["-vv", "push", str(run_dir), MS_REPO, "--hub", "modelscope"]) == 0
    assert main(["-vv", "pull", MS_REPO, "--hub", "modelscope", "--local-dir", str(tmp_path / "dl")]) == 0
    out, err = capsys.readouterr()
    assert DEFAULT_MS_TOKEN not in out + err
    for root in (Path(ms_server.home), tmp_path):
        for p in root.rglob("*"):
            if p.is_file():
                assert DEFAULT_MS_TOKEN.encode() not in p.read_bytes(), p


def test_offline_mode_serves_cached_repos_and_names_itself(hub_server, run_dir, monkeypatch):
    """HF_HUB_OFFLINE=1: a repo already pulled is served (and its files checked against their blob ids); one that
    is not cached is reported as offline, not as a network failure."""
    import huggingface_hub.constants as c

    push(run_dir, REPO)
    first = pull(REPO)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    assert pull(REPO) == first
    with pytest.raises(HubError, match=f"HF_HUB_OFFLINE is set and {DEFAULT_USER}/never-pulled is not in the local "):
        pull(f"{DEFAULT_USER}/never-pulled")
    blob = (first / "adapter_config.json").resolve()
    blob.chmod(0o644)
    blob.write_text("{}")  # the cached copy went bad: offline, its blob id still tells
    with pytest.raises(VerificationError, match="adapter_config.json: git blob id"):
        pull(REPO)


def test_a_mistyped_local_folder_is_named_as_such_before_any_hub_lookup(tmp_path, monkeypatch):
    """`runs/tiny-adaptr` (its parent folder exists here) is a typo of a folder, not a hub id: the first words say
    there is no such folder, with the closest names; the hub is not asked (no network error hides the cause)."""
    from persona_lora.hubs import pull as pull_module

    (tmp_path / "runs" / "tiny-adapter").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(pull_module, "pull", lambda *a, **k: pytest.fail("the hub was asked"))
    with pytest.raises(ModelLoadError) as e:
        pull_module.local_or_pulled("runs/tiny-adaptr", what="adapter")
    assert str(e.value).startswith("adapter runs/tiny-adaptr: no such folder")
    assert "did you mean runs/tiny-adapter?" in str(e.value)
