"""Pushing a GGUF export (`persona-lora push EXPORT_DIR REPO`) and the adapter card's "Run it locally" section
(`persona-lora card ADAPTER --gguf EXPORT_DIR`), with the real huggingface_hub client against tests/hub_server.py.

The export is made once with the stand-in converter of tests/test_export_gguf.py (what llama.cpp's converter
writes is not the subject here: where the files go, what the cards say, and what is never overwritten is).
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path

import pytest

from persona_lora.cli import main
from tests.hub_fixtures import DEFAULT_USER
from tests.test_export_gguf import STANDIN_CONVERTER, SYSTEM, standin_checkout

pytestmark = pytest.mark.slow  # merges and runs the (stand-in) converter

START, END = "<!-- persona-lora:run-locally-start -->", "<!-- persona-lora:run-locally-end -->"


@pytest.fixture(scope="module")
def made(tiny_base, tmp_path_factory):
    """An adapter with its card, a second adapter, and an Ollama export of the first (f32)."""
    from persona_lora.model_cards.cards import write_card
    from persona_lora.train.synthetic import make_random_adapter

    root = tmp_path_factory.mktemp("push-gguf")
    adapter = make_random_adapter(tiny_base, root / "zhen-huan", "all", r=8, alpha=16, seed=3, system_prompt=SYSTEM)
    write_card(adapter)
    other = make_random_adapter(tiny_base, root / "other", "all", r=8, alpha=16, seed=5)
    write_card(other)
    checkout = standin_checkout(root / "llama.cpp", STANDIN_CONVERTER)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PERSONA_LORA_LLAMA_CPP_PYTHON", sys.executable)
        assert main(["export", str(adapter), "--for", "ollama", "--out", str(root / "zhen-huan-ollama"), "--base",
                     str(tiny_base), "--llama-cpp", str(checkout), "--quant", "f32"]) == 0
    return {"adapter": adapter, "other": other, "export": root / "zhen-huan-ollama"}


@pytest.fixture
def export(made, tmp_path):
    """A fresh copy of the export (a push records itself in the export's record)."""
    return Path(shutil.copytree(made["export"], tmp_path / "zhen-huan-ollama"))


def front_matter(text: str) -> dict:
    import yaml

    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n", 2)[1])


def outside_section(text: str) -> str:
    """The card without what lies between the run-it-locally markers."""
    return text[: text.index(START)] + text[text.index(END):]


def push(folder, repo, capsys):
    rc = main(["push", str(folder), repo])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_push_to_a_gguf_repo_beside_the_adapters_repo(made, export, hub_server, capsys):
    """OWNER/NAME-GGUF next to OWNER/NAME holding this adapter: the README's Hub metadata names the adapter's repo
    as base with relation quantized and the gguf/llama.cpp/ollama tags; the files are at the root, byte for byte;
    the export's record says where it went."""
    from huggingface_hub import ModelCard

    adapter_repo, gguf_repo = f"{DEFAULT_USER}/zhen-huan", f"{DEFAULT_USER}/zhen-huan-GGUF"
    assert push(made["adapter"], adapter_repo, capsys)[0] == 0
    rc, out, err = push(export, gguf_repo, capsys)
    assert rc == 0, err
    assert out.strip() == f"{hub_server.url}/{gguf_repo}"
    files = sorted(f for f in hub_server.list_files(gguf_repo) if f != ".gitattributes")
    assert files == sorted(["Modelfile", "README.md", "persona_gguf.json", "zhen-huan.f32.gguf"])
    assert hub_server.file_bytes(gguf_repo, "zhen-huan.f32.gguf") == (export / "zhen-huan.f32.gguf").read_bytes()
    assert hub_server.file_bytes(gguf_repo, "Modelfile") == (export / "Modelfile").read_bytes()
    readme = hub_server.file_bytes(gguf_repo, "README.md").decode()
    meta = front_matter(readme)
    assert meta["base_model"] == adapter_repo and meta["base_model_relation"] == "quantized"
    assert {"gguf", "llama.cpp", "ollama", "persona-lora"} <= set(meta["tags"])
    assert ModelCard(readme).data.base_model == adapter_repo  # the client reads it as the Hub would
    assert str(export.parent.parent) not in readme  # no local path (the checkout's is named by its folder only)
    assert "the llama.cpp checkout `llama.cpp` given with --llama-cpp" in readme
    assert f"The LoRA adapter it was merged from, with its model card (data, training, samples): `{adapter_repo}`" \
        in readme
    assert "ollama create zhen-huan -f Modelfile" in readme and "llama-cli -m zhen-huan.f32.gguf" in readme
    record = json.loads((export / "persona_gguf.json").read_text())
    assert [(p["hub"], p["repo_id"], p["folder"]) for p in record["pushed"]] == [("hf", gguf_repo, "")]
    assert record["pushed"][0]["commit"] == hub_server.head(gguf_repo)
    # the adapter's repo is untouched by it
    assert "gguf/zhen-huan.f32.gguf" not in hub_server.list_files(adapter_repo)


def test_a_gguf_repo_without_the_adapter_beside_it_names_no_adapter(made, export, hub_server, capsys):
    """No OWNER/NAME repo with these adapter weights: the GGUF is not declared a quantization of anything we
    cannot show (the tiny base is a local folder, so no base_model at all)."""
    assert push(made["other"], f"{DEFAULT_USER}/zhen-huan", capsys)[0] == 0  # another adapter under that name
    assert push(export, f"{DEFAULT_USER}/zhen-huan-GGUF", capsys)[0] == 0
    meta = front_matter(hub_server.file_bytes(f"{DEFAULT_USER}/zhen-huan-GGUF", "README.md").decode())
    assert "base_model" not in meta and "base_model_relation" not in meta
    assert "gguf" in meta["tags"]


def test_push_into_the_adapters_repo_keeps_its_card(made, export, hub_server, tmp_path, capsys):
    """Into the repo that holds the adapter: the files go under gguf/, the adapter's files and every line of its
    card outside the run-it-locally markers stay as they were, and that section now names the file, the repo and
    the folder, with the download and Ollama/llama.cpp commands."""
    repo = f"{DEFAULT_USER}/zhen-huan"
    assert push(made["adapter"], repo, capsys)[0] == 0
    card_before = hub_server.file_bytes(repo, "README.md").decode()
    weights_before = hub_server.file_bytes(repo, "adapter_model.safetensors")
    assert START in card_before and "## Run it locally" not in card_before
    rc, _, err = push(export, repo, capsys)
    assert rc == 0, err
    files = hub_server.list_files(repo)
    for name in ("zhen-huan.f32.gguf", "Modelfile", "persona_gguf.json", "README.md"):
        assert f"gguf/{name}" in files
    assert hub_server.file_bytes(repo, "gguf/zhen-huan.f32.gguf") == (export / "zhen-huan.f32.gguf").read_bytes()
    assert hub_server.file_bytes(repo, "adapter_model.safetensors") == weights_before
    card = hub_server.file_bytes(repo, "README.md").decode()
    assert outside_section(card) == outside_section(card_before)
    section = card[card.index(START):card.index(END)]
    assert "## Run it locally" in section and "`zhen-huan.f32.gguf` (f32)" in section
    assert f"[{repo}]({hub_server.url}/{repo}) (folder `gguf/`)" in section
    assert f"hf download {repo} --include 'gguf/*' --local-dir zhen-huan-gguf" in section
    assert "cd zhen-huan-gguf/gguf" in section
    assert "ollama create zhen-huan -f Modelfile" in section and "ollama run zhen-huan" in section
    assert "llama-cli -m zhen-huan.f32.gguf -sys" in section and "llama-server -m zhen-huan.f32.gguf" in section
    record = json.loads((export / "persona_gguf.json").read_text())
    assert [(p["repo_id"], p["folder"]) for p in record["pushed"]] == [(repo, "gguf")]

    # the card regenerated locally with this export is, byte for byte, the card now on the hub
    adapter = Path(shutil.copytree(made["adapter"], tmp_path / "zhen-huan"))
    assert main(["card", str(adapter), "--gguf", str(export)]) == 0
    capsys.readouterr()
    assert (adapter / "README.md").read_text() == card


def test_push_into_a_new_branch_of_the_adapters_repo(made, export, hub_server, capsys):
    """--revision BRANCH (not there yet): the branch starts from main's adapter and card; main is unchanged, and
    the section downloads that branch."""
    repo = f"{DEFAULT_USER}/zhen-huan"
    assert push(made["adapter"], repo, capsys)[0] == 0
    main_head = hub_server.head(repo)
    rc = main(["push", str(export), repo, "--revision", "gguf-dev"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert hub_server.head(repo) == main_head
    assert "gguf/zhen-huan.f32.gguf" in hub_server.list_files(repo, revision="gguf-dev")
    card = hub_server.file_bytes(repo, "README.md", revision="gguf-dev").decode()
    assert f"hf download {repo} --revision gguf-dev --include 'gguf/*'" in card
    assert f"({hub_server.url}/{repo}/tree/gguf-dev)" in card
    assert outside_section(card) == outside_section(hub_server.file_bytes(repo, "README.md").decode())


def test_a_card_without_the_section_markers_is_left_as_it_is(made, export, hub_server, capsys, caplog):
    """An adapter repo whose README someone wrote (no markers): the GGUF files go under gguf/, the README is
    not touched, and the warning says how to add the section."""
    repo = f"{DEFAULT_USER}/zhen-huan"
    assert push(made["adapter"], repo, capsys)[0] == 0
    hub_server.commit_files(repo, {"README.md": b"# My own card\n\nHand written.\n"})
    caplog.set_level(logging.WARNING)
    rc, _, err = push(export, repo, capsys)
    assert rc == 0, err
    assert hub_server.file_bytes(repo, "README.md") == b"# My own card\n\nHand written.\n"
    assert "gguf/zhen-huan.f32.gguf" in hub_server.list_files(repo)
    assert "left as it is" in caplog.text and "--gguf" in caplog.text


def test_another_adapters_repo_or_a_foreign_repo_is_refused(made, export, hub_server, capsys):
    """The export of one adapter is not pushed beside another adapter, nor over a repo of other files (its README
    would replace theirs); nothing is committed, the record is unchanged."""
    other, foreign = f"{DEFAULT_USER}/other", f"{DEFAULT_USER}/someones-model"
    assert push(made["other"], other, capsys)[0] == 0
    head = hub_server.head(other)
    rc, _, err = push(export, other, capsys)
    assert rc == 2 and "holds another adapter" in err and f"{other}-GGUF" in err
    assert hub_server.head(other) == head
    hub_server.add_repo(foreign)
    hub_server.commit_files(foreign, {"README.md": b"# theirs\n", "model.safetensors": b"\0" * 16})
    head = hub_server.head(foreign)
    rc, _, err = push(export, foreign, capsys)
    assert rc == 2 and "neither an adapter nor a GGUF export" in err and "README.md" in err
    assert hub_server.head(foreign) == head
    assert "pushed" not in json.loads((export / "persona_gguf.json").read_text())


def test_card_run_it_locally_from_a_local_export(made, export, tmp_path, capsys):
    """card --gguf with an export never pushed: the section names the export folder by name (a card is published,
    a local path is not) and the commands run in it; without --gguf the card has no section (only the empty
    markers) and the serving table's row keeps the one explanation of why no LoRA GGUF."""
    adapter = Path(shutil.copytree(made["adapter"], tmp_path / "zhen-huan"))
    assert main(["card", str(adapter), "--gguf", str(export)]) == 0
    capsys.readouterr()
    card = (adapter / "README.md").read_text()
    section = card[card.index(START):card.index(END)]
    assert "the export folder `zhen-huan-ollama`" in section and str(tmp_path) not in card
    assert "cd zhen-huan-ollama\nollama create zhen-huan -f Modelfile\nollama run zhen-huan" in section
    assert "not a LoRA GGUF (the llama.cpp / Ollama row of the serving table says why)" in section
    row = next(line for line in card.splitlines() if line.startswith("| llama.cpp / Ollama"))
    assert "not as a LoRA GGUF: llama.cpp's DeepSeek-V2 graph applies no LoRA" in row
    assert card.count("applies no LoRA to the MLA attention") == 1

    assert main(["card", str(adapter)]) == 0
    capsys.readouterr()
    plain = (adapter / "README.md").read_text()
    assert "## Run it locally" not in plain and START in plain and END in plain
    assert outside_section(plain) == outside_section(card)


def test_card_refuses_an_export_of_another_adapter_or_an_incomplete_one(made, export, tmp_path, capsys):
    other = Path(shutil.copytree(made["other"], tmp_path / "other"))
    before = (other / "README.md").read_text()
    rc = main(["card", str(other), "--gguf", str(export)])
    err = capsys.readouterr().err
    assert rc == 2 and "was not made from" in err and "adapter_model.safetensors" in err
    assert (other / "README.md").read_text() == before

    adapter = Path(shutil.copytree(made["adapter"], tmp_path / "zhen-huan"))
    (export / "zhen-huan.f32.gguf").unlink()
    rc = main(["card", str(adapter), "--gguf", str(export)])
    err = capsys.readouterr().err
    assert rc != 0 and "incomplete GGUF export" in err and "zhen-huan.f32.gguf is missing" in err
    rc = main(["card", str(adapter), "--gguf", str(tmp_path)])
    assert rc == 2 and "is not a GGUF export (no persona_gguf.json)" in capsys.readouterr().err


def test_on_modelscope_too(made, export, ms_server, capsys):
    """The same placement through the ModelScope client: into the adapter's repo under gguf/ with the card's
    section naming ModelScope and its download command; a repo of its own at the root."""
    from tests.hub_fixtures import DEFAULT_MS_USER

    repo = f"{DEFAULT_MS_USER}/zhen-huan"
    assert main(["push", str(made["adapter"]), repo, "--hub", "modelscope"]) == 0
    card_before = ms_server.file_bytes(repo, "README.md").decode()
    rc = main(["push", str(export), repo, "--hub", "modelscope"])
    err = capsys.readouterr().err
    assert rc == 0, err
    files = ms_server.list_files(repo)
    assert "gguf/zhen-huan.f32.gguf" in files and "gguf/Modelfile" in files and "adapter_model.safetensors" in files
    assert ms_server.file_bytes(repo, "gguf/zhen-huan.f32.gguf") == (export / "zhen-huan.f32.gguf").read_bytes()
    card = ms_server.file_bytes(repo, "README.md").decode()
    assert outside_section(card) == outside_section(card_before)
    assert f"modelscope download --model {repo} --include 'gguf/*' --local_dir zhen-huan-gguf" in card
    assert f"on ModelScope: [{repo}](" in card

    own = f"{DEFAULT_MS_USER}/zhen-huan-GGUF"
    assert main(["push", str(export), own, "--hub", "modelscope"]) == 0
    capsys.readouterr()
    assert sorted(f for f in ms_server.list_files(own) if not f.startswith(".")) == \
        sorted(["Modelfile", "README.md", "persona_gguf.json", "zhen-huan.f32.gguf"])
    meta = front_matter(ms_server.file_bytes(own, "README.md").decode())
    assert meta["base_model"] == repo and meta["base_model_relation"] == "quantized"
    pushed = json.loads((export / "persona_gguf.json").read_text())["pushed"]
    assert [(p["hub"], p["repo_id"], p["folder"]) for p in pushed] == [("modelscope", repo, "gguf"),
                                                                      ("modelscope", own, "")]
