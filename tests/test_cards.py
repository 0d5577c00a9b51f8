"""Model cards: Hub-parseable metadata, only true statements, nothing private, stable regeneration.

Fixture folders live in tests/fixtures/cards/ and are copied to a temporary folder before a card is written,
so the repository's fixtures are never modified.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from persona_lora.artifact import MANIFEST_NAME
from persona_lora.cli import main
from persona_lora.errors import ManifestError, VerificationError
from persona_lora.model_cards import privacy, sections
from persona_lora.model_cards.cards import USER_END, USER_START, write_card
from persona_lora.model_cards.plots import write_loss_curve
from persona_lora.peft_compat import is_legacy_spelling

FIXTURES = Path(__file__).parent / "fixtures" / "cards"
FILLERS = ["More Information Needed", "TODO", "N/A", "TBD", "| None |", "| null |", "| nan |", "| unknown |"]


def folder_from(name: str, tmp_path: Path, edit=None) -> Path:
    """A copy of fixture folder `name` under tmp_path, with weights consistent with its config (the fixtures keep
    only the text files a card reads); `edit(manifest)` may change its manifest first."""
    dst = tmp_path / name
    shutil.copytree(FIXTURES / name, dst)
    add_weights(dst)
    if edit is not None:
        path = dst / MANIFEST_NAME
        manifest = json.loads(path.read_text(encoding="utf-8"))
        edit(manifest)
        path.write_text(json.dumps(manifest, ensure_ascii=False, indent=2), encoding="utf-8")
    return dst


def add_weights(folder: Path) -> None:
    """A one-module LoRA of the config's rank (adapter folders) or a one-tensor checkpoint (merged folders): the
    card writer checks that the folder is complete and consistent before it describes it."""
    import torch
    from safetensors.torch import save_file

    config = folder / "adapter_config.json"
    try:
        manifest = json.loads((folder / MANIFEST_NAME).read_text())
    except (OSError, ValueError):  # the fixtures of a missing or corrupt manifest
        manifest = {}
    if not config.is_file() and manifest.get("kind") == "adapter":  # a manifest-only fixture: PEFT's config too
        lora = manifest.get("lora") or {}
        config.write_text(json.dumps({"peft_type": "LORA", "r": lora.get("r", 8), "lora_alpha": lora.get("alpha", 16),
                                      "target_modules": lora.get("target_modules") or ["q_proj"]}))
    if config.is_file():
        try:
            r = json.loads(config.read_text())["r"]
        except (ValueError, KeyError):
            return
        prefix = "base_model.model.model.layers.0.self_attn.q_proj"
        save_file({f"{prefix}.lora_A.weight": torch.zeros(r, 8), f"{prefix}.lora_B.weight": torch.zeros(8, r)},
                  str(folder / "adapter_model.safetensors"))
    elif manifest:
        (folder / "config.json").write_text(json.dumps({"model_type": "deepseek_v2"}))
        save_file({"lm_head.weight": torch.zeros(4, 4)}, str(folder / "model.safetensors"))


def card_text(folder: Path) -> str:
    return write_card(folder).read_text(encoding="utf-8")


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^(`{3,})python\n(.*?)\n\1$", text, flags=re.S | re.M)


def snippet(text: str) -> str:
    blocks = [body for _, body in python_blocks(text)]
    assert len(blocks) == 1, "the card must have exactly one python block"
    return blocks[0]


def cells(row: str) -> list[str]:
    """Cells of a markdown table row, splitting on unescaped pipes."""
    return re.split(r"(?<!\\)\|", row.strip())[1:-1]


def tables_are_well_formed(text: str) -> None:
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if re.fullmatch(r"\|(---\|)+", line):
            width = len(cells(lines[i - 1]))
            j = i + 1
            while j < len(lines) and lines[j].startswith("|"):
                assert len(cells(lines[j])) == width, f"table row {lines[j]!r} has the wrong number of cells"
                j += 1
            assert j == len(lines) or lines[j] == "", f"no blank line after the table ending at {lines[j - 1]!r}"


# ------------------------------------------------------------------------------------------------ metadata


def test_adapter_card_metadata_is_the_hubs(tmp_path):
    folder = folder_from("attention_hub", tmp_path)
    readme = write_card(folder)
    data = ModelCard.load(readme).data.to_dict()
    assert data["base_model"] == "deepseek-ai/DeepSeek-Coder-V2-Lite-Instruct"
    assert data["base_model_relation"] == "adapter"
    assert data["library_name"] == "peft"
    assert data["pipeline_tag"] == "text-generation"
    assert {"lora", "persona", "persona-lora", "deepseek_v2", "peft"} <= set(data["tags"])
    assert data["datasets"] == ["example-org/zhenhuan-persona"]
    assert data["language"] == ["zh"]
    assert data["license"] == "other"  # base_model.license; no run-level license in this manifest


def test_local_data_has_no_datasets_and_no_unknown_license(tmp_path):
    data = ModelCard.load(write_card(folder_from("local_data", tmp_path))).data.to_dict()
    assert "datasets" not in data  # a local file is not a Hub dataset
    assert "license" not in data  # neither the run nor the base says
    assert data["language"] == ["zh", "en"]
    assert data["base_model"] == "deepseek-ai/DeepSeek-Coder-V2-Lite-Instruct"


def test_license_prefers_the_runs_own_and_maps_unknown_names_to_other(tmp_path):
    def run_license(m):
        m["license"] = "MIT"

    assert ModelCard.load(write_card(folder_from("attention_hub", tmp_path, run_license))).data.license == "mit"

    def custom(m):
        m["base_model"]["license"] = "DeepSeek License"

    data = ModelCard.load(write_card(folder_from("local_data", tmp_path, custom))).data.to_dict()
    assert data["license"] == "other" and data["license_name"] == "deepseek-license"


def test_merged_card_metadata_and_usage(tmp_path):
    text = card_text(folder_from("merged", tmp_path))
    data = ModelCard.load(tmp_path / "merged" / "README.md").data.to_dict()
    assert data["library_name"] == "transformers"
    assert data["base_model_relation"] == "merge"
    assert data["base_model"] == "deepseek-ai/DeepSeek-Coder-V2-Lite-Instruct"
    assert "merge" in data["tags"] and "peft" not in data["tags"]
    assert "## Merge" in text and "original per-expert" in text
    assert ("persona-lora merge example-org/zhenhuan-attn --base deepseek-ai/DeepSeek-Coder-V2-Lite-Instruct "
            "--out zhenhuan-attn-merged") in text
    code = snippet(text)
    assert "PeftModel" not in code and 'model_id = "zhenhuan-attn-merged"' in code
    compile(code, "snippet", "exec")


# ------------------------------------------------------------------------------------------------ body


@pytest.mark.parametrize("name", ["attention_hub", "local_data", "merged", "abs_base"])
def test_no_fillers_and_well_formed_tables(tmp_path, name):
    text = card_text(folder_from(name, tmp_path))
    for filler in FILLERS:
        assert filler not in text, f"{filler!r} in the {name} card"
    assert "{{" not in text.split("```jinja")[0], "unrendered template variable"
    tables_are_well_formed(text)
    assert text.count(USER_START) == 1 and text.count(USER_END) == 1


def test_every_figure_comes_from_the_manifest(tmp_path):
    text = card_text(folder_from("local_data", tmp_path))
    for expected in [
        "| Records | 160 |", "| Kept | 158 |", "| Dropped | 2 |", "| Truncated to max length | 3 |",
        "| Training examples | 150 |", "| Evaluation examples | 8 |", "| Tokens (all examples) | 12,000 |",
        "| Tokens with loss (trained on) | 5,000 |", "| too long for max\\_length | 2 |",
        "| Learning rate | 0.002 |", "| LoRA rank r | 8 |", "| LoRA alpha | 16 |", "| LoRA dropout | 0 |",
        "| Dropout note | no dropout on fused experts (PEFT refuses it) |", "| Max steps | 600 |",
        "| dense mlp | yes | yes | 3 | 24,576 |", "| routed experts | yes | no | 0 | 0 |",
        "184,896 trainable parameters of 8,784,896 in total (2.1%)", "**Asked for but not applied:** routed experts",
        "| Final train loss | 1.4000 |", "| Optimizer steps | 30 |",
        "| Base config sha256 | `aa11bb22cc33dd44ee55ff66aa77bb88cc99dd00ee11ff22aa33bb44cc55dd66` |",
        "| Dataset | `persona_zh.json` |", "| Hardware | CPU (2 cores) |", "| Training wall time | 1 min 11 s |",
        "| Trained tokens | 40,000 |", "| Throughput | 561.0 tokens/s |", "| peft | `0.21.2` |",
        "| persona-lora version | `0.1.0` |",
    ]:
        assert expected in text, expected


def test_sections_without_data_are_left_out(tmp_path):
    text = card_text(folder_from("local_data", tmp_path))
    assert "## Sample answers" not in text  # samples: []
    assert "Final eval loss" not in text and "Best eval loss" not in text  # null in the manifest
    assert "Base revision" not in text  # revision null

    def strip(m):
        for key in ("samples", "dataset", "lora", "training", "metrics", "environment", "run", "files", "chat"):
            m.pop(key)

    bare = card_text(folder_from("attention_hub", tmp_path / "bare", strip))
    for heading in ("## System prompt", "## Prompt format", "## Training data", "## Training hyperparameters",
                    "## LoRA coverage", "## Results", "## Sample answers"):
        assert heading not in bare
    assert "## How to use" in bare and "## Provenance" in bare
    assert "loss.png" not in bare and not (tmp_path / "bare" / "attention_hub" / "loss.png").exists()
    for filler in FILLERS:
        assert filler not in bare
    tables_are_well_formed(bare)


def test_loss_curve_is_written_and_embedded(tmp_path):
    folder = folder_from("attention_hub", tmp_path)
    text = card_text(folder)
    png = folder / "loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size < 100_000
    assert "![loss curve](loss.png)" in text


def test_no_history_means_no_loss_curve(tmp_path):
    def no_history(m):
        m["metrics"]["history"] = []
        m["files"] = {}

    folder = folder_from("attention_hub", tmp_path, no_history)
    text = card_text(folder)
    assert not (folder / "loss.png").exists()
    assert "loss.png" not in text and "![loss curve]" not in text
    assert "| Final train loss | 1.6200 |" in text  # the final figures are still true


def test_sample_answers_are_escaped(tmp_path):
    text = card_text(folder_from("attention_hub", tmp_path))
    assert "<script>" not in text
    assert "&lt;script&gt;alert('x')&lt;/script&gt;" in text
    assert "Show me \\| a pipe<br>and a newline" in text
    assert "\\[link\\](http://example.com)" in text
    assert not re.search(r"(?<!\\)\]\(http://example", text)  # no live links or images from model output
    row = next(line for line in text.split("\n") if line.startswith("| Show me"))
    assert len(cells(row)) == 3


# ------------------------------------------------------------------------------------------------ usage snippet


def test_snippet_formats_prompts_like_training(tmp_path):
    text = card_text(folder_from("attention_hub", tmp_path))
    code = snippet(text)
    compile(code, "snippet", "exec")
    assert code.splitlines()[0] == "# persona-lora usage snippet"
    assert len(re.findall(r'^base_id = "[^"]*"$', code, flags=re.M)) == 1
    assert len(re.findall(r'^adapter_id = "[^"]*"$', code, flags=re.M)) == 1
    # the locations appear only in those two assignments, so a test can substitute them
    assert code.count('"deepseek-ai/DeepSeek-Coder-V2-Lite-Instruct"') == 1
    assert code.count('"zhenhuan-attn"') == 1
    for piece in [
        "AutoModelForCausalLM.from_pretrained(base_id", "AutoTokenizer.from_pretrained(base_id)",
        "PeftModel.from_pretrained(model, adapter_id)",
        '{"role": "system", "content": "假设你是皇帝身边的女人--甄嬛。"}',
        '{"role": "user", "content": "你是谁？"}',
        'add_generation_prompt=True, return_tensors="pt", return_dict=True',
        "do_sample=False, max_new_tokens=", "skip_special_tokens=True", 'inputs["input_ids"].shape[-1]:',
    ]:
        assert piece in code, piece
    assert "_conv" not in code  # attention-only adapter: PEFT's rewrite has nothing to touch
    assert "persona-lora demo --base deepseek-ai/DeepSeek-Coder-V2-Lite-Instruct --adapter zhenhuan-attn" in text


def test_legacy_adapter_card_says_how_to_upgrade_and_snippet_stays_plain(tmp_path):
    """local_data's adapter_config names MLP layers in target_modules (the legacy spelling): the card must not
    teach readers to patch PEFT; it tells them to upgrade the adapter."""
    text = card_text(folder_from("local_data", tmp_path))
    code = snippet(text)
    assert "peft.utils" not in code and "_conv" not in code
    assert "legacy spelling" in text and "persona-lora upgrade-adapter tiny-persona" in text
    # template from a file: the tokenizer saved with the adapter carries it
    assert "tokenizer = AutoTokenizer.from_pretrained(adapter_id)" in code
    assert "legacy spelling" not in card_text(folder_from("attention_hub", tmp_path / "portable"))


def test_serving_section_names_the_engines_that_serve_the_adapter_as_trained(tmp_path):
    rows = [line for line in card_text(folder_from("local_data", tmp_path)).splitlines()
            if line.startswith(("| vLLM", "| SGLang", "| transformers + PEFT"))]
    assert len(rows) == 3
    assert "no: its MLA attention skips LoRA on `kv_b_proj`" in rows[1]  # this adapter adapts kv_b_proj
    assert "persona-lora export tiny-persona --for sglang" in rows[2]

    def no_kv_b(m):
        m["lora"]["target_modules"] = [t for t in m["lora"]["target_modules"] if t != "kv_b_proj"]

    text = card_text(folder_from("local_data", tmp_path / "no_kv_b", no_kv_b))
    assert "| vLLM 0.33 | yes | `persona-lora export tiny-persona --for vllm --out DIR` |" in text


@pytest.mark.parametrize(
    ("model_type", "targets", "expected"),
    [
        ("deepseek_v2", ["q_proj", "o_proj"], False),
        ("deepseek_v2", ["q_proj", "shared_experts.down_proj"], True),
        ("deepseek_v2", ["gate_proj", "up_proj", "down_proj"], True),
        ("deepseek_v2", r"^(?:model\.layers\.(0)\.mlp\.gate_proj)$", True),  # a regex naming an MLP layer
        ("deepseek_v2", "all-linear", True),
        ("llama", ["q_proj", "gate_proj", "up_proj", "down_proj"], False),  # dense: no rewrite
        ("qwen3_moe", ["mlp.up_proj"], True),
        (None, ["gate_proj"], False),
    ],
)
def test_legacy_spelling_rule(model_type, targets, expected):
    assert is_legacy_spelling({"target_modules": targets}, model_type) is expected


# ------------------------------------------------------------------------------------------------ privacy


def test_absolute_local_paths_and_home_never_leak(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home" / "zoe-private"))
    folder = folder_from("abs_base", tmp_path)
    text = card_text(folder)
    for secret in ("/home/", "alice", "/Users/", "C:\\", "zoe-private", str(tmp_path), "hf_abcdef"):
        assert secret not in text, secret
    code = snippet(text)
    assert 'base_id = "tiny"' in code  # /home/alice/models/tiny -> tiny
    assert "| Dataset | `persona_zh.json` |" in text
    assert "~/notes/persona.txt" in text  # home inside free text becomes ~
    assert "[redacted token]" in text.replace("\\[", "[").replace("\\]", "]")
    data = ModelCard.load(folder / "README.md").data.to_dict()
    assert "base_model" not in data and "base_model_relation" not in data  # a local folder is no Hub repo
    assert data["license"] == "apache-2.0"


@pytest.mark.parametrize(
    ("value", "expected"),
    [("/home/x/models/tiny", "tiny"), ("/home/x/models/tiny/", "tiny"), ("~/m/base", "base"),
     ("C:\\Users\\x\\base", "base"), ("file:///srv/models/b", "b"), ("/", "local")],
)
def test_path_tail(value, expected):
    assert privacy.looks_like_local_path(value)
    assert privacy.path_tail(value) == expected


def test_layer_indices_are_folded():
    names = [f"model.layers.{i}.self_attn.q_proj" for i in range(27)] + ["model.layers.0.mlp.gate_proj"]
    names += [f"model.layers.{i}.mlp.shared_experts.up_proj" for i in (1, 2, 3, 5)]
    assert sections.compress_layer_names(names) == [
        "model.layers.0.mlp.gate_proj", "model.layers.{0-26}.self_attn.q_proj",
        "model.layers.{1-3,5}.mlp.shared_experts.up_proj",
    ]
    assert sections.compress_layer_names(["q_proj", "o_proj"]) == ["q_proj", "o_proj"]


def test_hub_ids_are_not_paths():
    for value in ("deepseek-ai/DeepSeek-Coder-V2-Lite-Instruct", "persona_zh.json", "org/ds"):
        assert not privacy.looks_like_local_path(value)
    assert privacy.scrub({"base_model": {"id": "org/name"}}) == {"base_model": {"id": "org/name"}}


# ------------------------------------------------------------------------------------------------ regeneration


def test_regeneration_is_byte_identical_and_keeps_the_user_section(tmp_path):
    folder = folder_from("attention_hub", tmp_path)
    readme = write_card(folder)
    first, first_png = readme.read_bytes(), (folder / "loss.png").read_bytes()
    write_card(folder)
    assert readme.read_bytes() == first
    assert (folder / "loss.png").read_bytes() == first_png

    note = ("\n## Notes from the author\n\n"
            "This persona speaks in court language. | pipes | and <b>html</b> stay as written.\n")
    text = first.decode("utf-8")
    edited = text.replace(f"{USER_START}\n{USER_END}", f"{USER_START}{note}{USER_END}")
    assert edited != text
    readme.write_text(edited, encoding="utf-8")
    write_card(folder)
    again = readme.read_text(encoding="utf-8")
    assert note in again and again == edited
    write_card(folder)
    assert readme.read_text(encoding="utf-8") == edited


def test_pefts_stub_readme_is_replaced_quietly(tmp_path, caplog):
    folder = folder_from("attention_hub", tmp_path)
    (folder / "README.md").write_text("---\nlibrary_name: peft\n---\n# Model Card for Model ID\n\n"
                                      "<!-- Provide a quick summary of what the model is/does. -->\n\n"
                                      "More Information Needed\n")
    with caplog.at_level("WARNING", logger="persona_lora.model_cards.cards"):
        text = card_text(folder)
    assert "More Information Needed" not in text and USER_START in text
    assert not caplog.records
    assert not list(folder.glob("README.before-persona-lora*"))


def test_a_hand_written_readme_without_markers_is_kept_beside_the_card(tmp_path, caplog):
    folder = folder_from("attention_hub", tmp_path)
    (folder / "README.md").write_text("# My notes\n")
    with caplog.at_level("WARNING", logger="persona_lora.model_cards.cards"):
        text = card_text(folder)
    assert "# My notes" not in text
    assert (folder / "README.before-persona-lora.md").read_text() == "# My notes\n"
    assert any("user section" in r.getMessage() and "README.before-persona-lora.md" in r.getMessage()
               for r in caplog.records)
    (folder / "README.md").write_text("# Other notes\n")  # a second time: the first backup is not overwritten
    card_text(folder)
    assert (folder / "README.before-persona-lora.md").read_text() == "# My notes\n"
    assert (folder / "README.before-persona-lora.1.md").read_text() == "# Other notes\n"


def test_loss_curve_is_deterministic_and_none_without_points(tmp_path):
    history = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}, {"step": 2, "eval_loss": 1.7}]
    a = write_loss_curve(history, tmp_path / "a.png")
    b = write_loss_curve(history, tmp_path / "b.png")
    assert a.read_bytes() == b.read_bytes()
    assert write_loss_curve([], tmp_path / "none.png") is None
    assert write_loss_curve([{"step": 1, "learning_rate": 1e-4}], tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


# ------------------------------------------------------------------------------------------------ errors / CLI


def test_cli_writes_the_card_and_prints_its_path(tmp_path, capsys):
    folder = folder_from("merged", tmp_path)
    assert main(["card", str(folder)]) == 0
    assert capsys.readouterr().out.strip() == str(folder / "README.md")


@pytest.mark.parametrize("name", ["corrupt", "no_manifest"])
def test_cli_names_the_bad_manifest(tmp_path, capsys, name):
    folder = folder_from(name, tmp_path)
    assert main(["card", str(folder)]) != 0
    err = capsys.readouterr().err
    assert "persona_manifest.json" in err and str(folder) in err
    assert "Traceback" not in err
    assert not (folder / "README.md").exists()


def test_cli_rejects_a_manifest_with_the_wrong_shape(tmp_path, capsys):
    def wrong(m):
        m["kind"] = "checkpoint"
        m["samples"] = "none"

    folder = folder_from("attention_hub", tmp_path, wrong)
    with pytest.raises(ManifestError, match="persona_manifest.json"):
        write_card(folder)
    assert main(["card", str(folder)]) != 0
    err = capsys.readouterr().err
    assert '"kind"' in err and '"samples"' in err and "persona_manifest.json" in err


def test_cli_missing_folder(tmp_path, capsys):
    assert main(["card", str(tmp_path / "nowhere")]) != 0
    assert "nowhere" in capsys.readouterr().err


def test_corrupt_adapter_config_is_named(tmp_path):
    folder = folder_from("attention_hub", tmp_path)
    (folder / "adapter_config.json").write_text("{not json")
    with pytest.raises(VerificationError, match="adapter_config.json: corrupt"):
        write_card(folder)


def test_control_characters_from_model_answers_never_reach_the_card(tmp_path):
    """A sampled answer holding NUL or terminal escapes must not corrupt the card file."""

    def noisy(m):
        m["samples"] = [{"prompt": "hi\x00", "base": "\x1b[31mred\x1b[0m", "adapter": "tab\tand\nnewline\x07"}]

    text = card_text(folder_from("attention_hub", tmp_path, noisy))
    assert not any(ch in text for ch in "\x00\x1b\x07")
    assert "| hi\ufffd | \ufffd\\[31mred\ufffd\\[0m | tab\tand<br>newline\ufffd |" in text


def test_an_interrupted_run_says_so_in_the_cards_first_lines(tmp_path):
    """Ctrl-C leaves a usable adapter: its card must say in its first lines that it is unfinished, and how far it
    got, not only in the results section further down."""

    def interrupted(m):
        m["run"] = {**(m.get("run") or {}), "state": "interrupted", "interrupted": True, "planned_steps": 220}
        m.setdefault("metrics", {})["steps"] = 32

    text = card_text(folder_from("attention_hub", tmp_path, interrupted))
    body = text.split("---", 2)[2].lstrip().splitlines()
    assert body[0].startswith("# ")
    assert "**Unfinished: training was interrupted at step 32 of 220.**" in "\n".join(body[:4])
    finished = card_text(folder_from("attention_hub", tmp_path / "f"))
    assert "Unfinished" not in finished and "interrupted at step" not in finished
