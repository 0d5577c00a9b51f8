"""`persona-lora serve`: the engine command with flags that agree with every adapter, the refusals, and the start
through the engine's own Python followed by the matching demo line.

vLLM and SGLang cannot run here (other torch/transformers pins, GPUs), so the dry runs are checked flag by flag
against what the engines read (persona_lora/engines.py names the source files), and the start is checked
with a stand-in engine: an interpreter whose `vllm`/`sglang` modules start the OpenAI-protocol test server
(tests/openai_server.py) with the models the flags name, so the printed demo line is run against it.
"""

from __future__ import annotations

import json
import shlex
import shutil
import sys
import threading
import time
from pathlib import Path

import pytest

from persona_lora.cli import main
from persona_lora.engines import VLLM_MAX_LORA_RANKS, adapter_max_rank, serve_argv
from tests.conftest import REPO, free_port

SYSTEM = "You are Zhen Huan, a consort in the imperial palace."


@pytest.fixture(scope="module")
def adapters(tiny_base, tmp_path_factory) -> dict[str, Path]:
    """attention (LoRA on kv_b_proj), all-no-kv-b (routed experts too), and copies of the latter with a
    rank_pattern (rank 40 on one module; same manifest name) and with rank 600 (configs only: dry runs read
    configs, never tensors)."""
    from persona_lora.train.synthetic import make_random_adapter

    root = tmp_path_factory.mktemp("serve-adapters")
    out = {p: make_random_adapter(tiny_base, root / p, p, r=8, alpha=16, seed=1, system_prompt=SYSTEM)
           for p in ("attention", "all-no-kv-b")}
    for name, change in {"pattern": {"rank_pattern": {"model.layers.0.self_attn.q_proj": 40}},
                         "huge": {"r": 600}}.items():
        folder = shutil.copytree(out["all-no-kv-b"], root / name)
        config = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**config, **change}))
        out[name] = folder
    return out


def dry_run(capsys, *argv: str) -> tuple[list[str], list[str], list[str]]:
    """(engine argv, demo argv, comment lines) of `persona-lora serve --dry-run ARGV`."""
    assert main(["serve", *argv, "--dry-run"]) == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    comments = [line for line in text.splitlines() if line.startswith("#")]
    commands = "\n".join(line for line in text.splitlines() if not line.startswith("#")).replace(" \\\n", " ")
    engine_line, demo_line = commands.splitlines()
    return shlex.split(engine_line), shlex.split(demo_line), comments


def values(argv: list[str], flag: str) -> list[str]:
    """The words after `flag` up to the next option."""
    i = argv.index(flag) + 1
    out = []
    while i < len(argv) and not argv[i].startswith("--"):
        out.append(argv[i])
        i += 1
    return out


def test_vllm_dry_run_flags(tiny_base, adapters, tmp_path, capsys):
    """vLLM: the smallest allowed --max-lora-rank holding every rank (rank_pattern's 40 -> 64), one batch slot
    per adapter, --lora-modules as JSON with unique names, the served base name, and nothing written."""
    exports = tmp_path / "exports"
    argv, demo, comments = dry_run(capsys, "--base", str(tiny_base), "--adapter", str(adapters["all-no-kv-b"]),
                                   "--adapter", str(adapters["pattern"]), "--engine", "vllm", "--port", "8123",
                                   "--export-dir", str(exports))
    assert argv[:3] == ["vllm", "serve", str(tiny_base.resolve())]
    assert values(argv, "--port") == ["8123"] and values(argv, "--host") == ["127.0.0.1"]
    assert values(argv, "--served-model-name") == ["tiny-base"] and "--enable-lora" in argv
    assert values(argv, "--max-lora-rank") == ["64"] and values(argv, "--max-loras") == ["2"]
    modules = [json.loads(m) for m in values(argv, "--lora-modules")]
    assert [m["name"] for m in modules] == ["all-no-kv-b", "all-no-kv-b-2"]
    assert all(m["base_model_name"] == "tiny-base" and m["path"].startswith(str(exports / "vllm")) for m in modules)
    assert len({m["path"] for m in modules}) == 2
    assert "--enable-mixed-moe-lora-format" not in argv and "--lora-strict-loading" not in argv
    assert not exports.exists(), "a dry run writes nothing"
    assert demo[:4] == ["persona-lora", "demo", "--backend", "openai"]
    assert values(demo, "--endpoint") == ["http://127.0.0.1:8123/v1"] and values(demo, "--base") == ["tiny-base"]
    assert [a for i, a in enumerate(demo) if demo[i - 1] == "--adapter"] == [
        f"{m['name']}={m['path']}" for m in modules]
    assert any("rank 40" in line for line in comments)


def test_sglang_dry_run_flags(tiny_base, adapters, tmp_path, capsys):
    """SGLang: --lora-paths NAME=PATH, one batch slot per adapter, strict loading, kv_b_proj LoRA allowed, and
    requests select adapters as base:adapter."""
    argv, demo, _ = dry_run(capsys, "--base", str(tiny_base), "--adapter", str(adapters["attention"]), "--adapter",
                            str(adapters["all-no-kv-b"]), "--engine", "sglang", "--export-dir", str(tmp_path),
                            "--served-model-name", "base-x")
    assert argv[:5] == ["python", "-m", "sglang.launch_server", "--model-path", str(tiny_base.resolve())]
    assert values(argv, "--port") == ["30000"] and values(argv, "--served-model-name") == ["base-x"]
    paths = values(argv, "--lora-paths")
    assert [p.split("=")[0] for p in paths] == ["attention", "all-no-kv-b"]
    assert values(argv, "--max-loras-per-batch") == ["2"] and "--lora-strict-loading" in argv
    assert "--max-lora-rank" not in argv and "--lora-modules" not in argv
    assert values(demo, "--endpoint") == ["http://127.0.0.1:30000/v1"]
    assert [a for i, a in enumerate(demo) if demo[i - 1] == "--adapter"] == [f"base-x:{p}" for p in paths]


def test_refusals_name_the_cause_and_the_fix(tiny_base, adapters, tmp_path, capsys):
    base = ["--base", str(tiny_base), "--export-dir", str(tmp_path)]
    assert main(["serve", *base, "--adapter", str(adapters["attention"]), "--engine", "vllm", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "kv_b_proj" in err and "vllm-project/vllm#48974" in err and "--engine sglang" in err
    assert "--allow-dropped-kv-b" in err
    argv, _, comments = dry_run(capsys, *base, "--adapter", str(adapters["attention"]), "--engine", "vllm",
                                "--allow-dropped-kv-b")
    assert values(argv, "--max-lora-rank") == ["8"] and any("kv_b_proj LoRA left out" in c for c in comments)

    assert main(["serve", *base, "--adapter", str(adapters["huge"]), "--engine", "vllm", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "rank is 600, above 512" in err and "merge" in err
    assert main(["serve", *base, "--adapter", str(adapters["all-no-kv-b"]), "--engine", "vllm"]) == 2
    assert "--engine-python PATH is needed" in capsys.readouterr().err
    assert main(["serve", *base, "--adapter", str(adapters["all-no-kv-b"]), "--engine", "vllm",
                 "--engine-python", str(tmp_path / "missing-python"), "--dry-run"]) == 2
    assert "no such executable" in capsys.readouterr().err
    # our own environment is exactly the one the engines must not share: it cannot import them
    assert main(["serve", *base, "--adapter", str(adapters["all-no-kv-b"]), "--engine", "sglang",
                 "--engine-python", sys.executable, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "cannot import sglang" in err and "pip install sglang==0.5.23" in err and "--engine-python" in err
    assert main(["serve", *base, "--adapter", str(tmp_path / "nothing"), "--engine", "vllm", "--dry-run"]) == 1
    assert "no such folder" in capsys.readouterr().err


def test_chat_templates_and_rank_facts(tiny_base, adapters, tmp_path, capsys):
    """An adapter trained with its own template brings --chat-template (the export's copy); two different ones
    cannot share an engine. Rank facts: rank_pattern counts; vLLM's allowed ranks; the fused-expert flag."""
    def with_template(name: str, template: str) -> Path:
        folder = shutil.copytree(adapters["all-no-kv-b"], tmp_path / name)
        manifest = json.loads((folder / "persona_manifest.json").read_text())
        manifest["chat"].update(chat_template=template, template_source="file")
        (folder / "persona_manifest.json").write_text(json.dumps(manifest))
        return folder

    one, two = with_template("t1", "{{ messages }}"), with_template("t2", "{{ messages[-1] }}")
    argv, _, _ = dry_run(capsys, "--base", str(tiny_base), "--adapter", str(one), "--adapter",
                         str(adapters["all-no-kv-b"]), "--engine", "sglang", "--export-dir", str(tmp_path / "x"))
    (template,) = values(argv, "--chat-template")
    first_export = values(argv, "--lora-paths")[0].split("=", 1)[1]
    assert template == f"{first_export}/chat_template.jinja" and first_export.startswith(str(tmp_path / "x"))
    assert main(["serve", "--base", str(tiny_base), "--adapter", str(one), "--adapter", str(two), "--engine",
                 "sglang", "--dry-run"]) == 2
    assert "different chat templates" in capsys.readouterr().err

    assert adapter_max_rank({"r": 8, "rank_pattern": {"a": 40, "b": 4}}) == 40 and adapter_max_rank({}) == 8
    assert VLLM_MAX_LORA_RANKS == (1, 8, 16, 32, 64, 128, 256, 320, 512)
    from persona_lora.engines import ENGINES, needs_mixed_moe_format

    assert needs_mixed_moe_format({"target_parameters": ["mlp.experts.gate_up_proj"]})
    assert not needs_mixed_moe_format({"target_modules": ["q_proj"]})
    argv = serve_argv(ENGINES["vllm"], "b", "b", [("x", "/p")], max_rank=8, host="h", port=1, mixed_moe=True,
                      engine_python="/env/bin/python")
    assert argv[:5] == ["/env/bin/python", "-m", "vllm.entrypoints.openai.api_server", "--model", "b"]
    assert argv[-1] == "--enable-mixed-moe-lora-format"


# ---------------------------------------------------------------------------------------------- starting the engine

FAKE_ENGINE = '''
import argparse, json, os, sys, time
from pathlib import Path

sys.path.insert(0, os.environ["FAKE_ENGINE_REPO"])
from tests.openai_server import OpenAIServer


def main():
    p = argparse.ArgumentParser()
    for flag in ("--model", "--model-path", "--host", "--served-model-name"):
        p.add_argument(flag)
    p.add_argument("--port", type=int)
    p.add_argument("--lora-modules", nargs="+", default=[])
    p.add_argument("--lora-paths", nargs="+", default=[])
    args, _ = p.parse_known_args()
    names = [json.loads(m)["name"] for m in args.lora_modules] + [x.split("=")[0] for x in args.lora_paths]
    time.sleep(0.5)  # an engine takes a while before it answers
    server = OpenAIServer(models=[args.served_model_name, *names]).start(args.host, args.port)
    log = Path(os.environ["FAKE_ENGINE_LOG"])
    log.write_text(json.dumps(sys.argv[1:]))
    while not log.with_suffix(".stop").exists():
        time.sleep(0.05)
    server.close()
'''


def fake_engine_python(root: Path, engine: str) -> Path:
    """An interpreter whose `vllm` / `sglang` is the stand-in engine (and imports with the pinned version)."""
    lib = root / "lib"
    module = {"vllm": "vllm/entrypoints/openai/api_server.py", "sglang": "sglang/launch_server.py"}[engine]
    version = {"vllm": "0.33.0", "sglang": "0.5.23"}[engine]
    (lib / module).parent.mkdir(parents=True)
    for folder in (lib / module).relative_to(lib).parents:
        if str(folder) != ".":
            (lib / folder / "__init__.py").write_text("")
    (lib / engine / "__init__.py").write_text(f"__version__ = {version!r}\n")
    (lib / "fake_engine.py").write_text(FAKE_ENGINE)
    (lib / module).write_text("import fake_engine\n\nfake_engine.main()\n")
    python = root / "python"
    python.write_text(f'#!/bin/sh\nPYTHONPATH="{lib}" exec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    return python


@pytest.mark.slow  # writes real exports, starts an interpreter
@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_serve_starts_the_engine_and_prints_a_demo_line_that_works(engine, tiny_base, adapters, tmp_path, capsys,
                                                                   monkeypatch):
    from persona_lora.cli import build_parser
    from persona_lora.demo.openai_backend import OpenAIBackend
    from persona_lora.hub_tools.serve import run as serve

    python = fake_engine_python(tmp_path / "env", engine)
    log = tmp_path / "engine.json"
    monkeypatch.setenv("FAKE_ENGINE_REPO", str(REPO))
    monkeypatch.setenv("FAKE_ENGINE_LOG", str(log))
    port, exports = free_port(), tmp_path / "exports"
    argv = ["serve", "--base", str(tiny_base), "--adapter", str(adapters["all-no-kv-b"]), "--engine", engine,
            "--engine-python", str(python), "--port", str(port), "--export-dir", str(exports)]
    if engine == "sglang":
        argv += ["--adapter", str(adapters["attention"])]
    codes = []
    runner = threading.Thread(target=lambda: codes.append(main(argv)))
    runner.start()
    out, deadline = "", time.monotonic() + 120
    while "persona-lora demo" not in out and runner.is_alive() and time.monotonic() < deadline:
        time.sleep(0.1)
        out += capsys.readouterr().out
    try:
        demo_line = next(line for line in out.splitlines() if line.startswith("persona-lora demo"))
        args = build_parser().parse_args(shlex.split(demo_line)[1:])
        backend = OpenAIBackend(args.endpoint, args.base, args.adapter)
        name = backend.adapter_names()[0]
        assert backend.system_prompt(name) == SYSTEM  # from the export's manifest
        base_answer, adapter_answer = backend.compare(name, "hi")
        assert base_answer.startswith("tiny-base answers") and adapter_answer.startswith(f"{name} answers")
    finally:
        log.with_suffix(".stop").write_text("")
        runner.join(60)
    assert codes == [0]
    got = json.loads(log.read_text())
    assert values(got, "--port") == [str(port)] and values(got, "--served-model-name") == ["tiny-base"]
    paths = ([json.loads(m)["path"] for m in values(got, "--lora-modules")] if engine == "vllm"
             else [p.split("=", 1)[1] for p in values(got, "--lora-paths")])
    for path in paths:  # the exports the engine was given exist, complete, in the engine's layout
        config = json.loads((Path(path) / "adapter_config.json").read_text())
        assert config["r"] == 8 and not config["rank_pattern"] and not config.get("target_parameters")
        assert (Path(path) / "persona_manifest.json").is_file()
    if engine == "vllm":
        assert values(got, "--max-lora-rank") == ["8"]
    before = {p: (Path(p) / "adapter_model.safetensors").stat().st_mtime_ns for p in paths}
    plan = serve.plan_serve(str(tiny_base), [str(adapters["all-no-kv-b"])], engine, export_dir=exports)
    serve.write_exports(plan)  # the same adapter again: its export is reused, not rewritten
    assert (plan.adapters[0].export / "adapter_model.safetensors").stat().st_mtime_ns == before[paths[0]]
