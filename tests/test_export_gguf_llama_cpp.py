"""Optional, not in CI (`make test-llama-cpp`): a GGUF export runs in llama.cpp exactly as transformers + PEFT runs
the adapter, on the tiny base with a trained `all` adapter (attention, dense MLP, shared and routed experts).

The make target builds llama.cpp 11434 once into the cache `export` uses (PERSONA_LORA_LLAMA_CPP_CACHE names it
here, so the export goes through the default path: cached sources, the converter's own environment). The test
compiles tests/llama_cpp_probe.c against that build: llama.cpp formats each chat with its own template
application (the GGUF's chat template), tokenizes it, and decodes greedily with an f32 KV cache and flash
attention off. Compared, per prompt: the prompt text with our Ollama TEMPLATE's rendering, the prompt ids with
`chat_format.encode_prompt`, the greedy tokens and the first-step logits with transformers + PEFT (f32: within
1e-4; q8_0: greedy tokens equal). The figures (differences, export time, peak memory against the largest shard)
are printed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = os.environ.get("PERSONA_LORA_LLAMA_CPP_CACHE")
BUILD = Path(ROOT or "/nonexistent") / "src" / "build" / "bin"
pytestmark = [pytest.mark.slow, pytest.mark.llama_cpp,
              pytest.mark.skipif(not (BUILD / "libllama.so").is_file(),
                                 reason="set PERSONA_LORA_LLAMA_CPP_CACHE to a built cache (make test-llama-cpp)")]
SYSTEM = "You are Zhen Huan, a consort in the imperial palace."
CHATS = [
    [{"role": "user", "content": "你是谁？"}],
    [{"role": "user", "content": "Who are you?"}],
    [{"role": "user", "content": "What did you do today?"}, {"role": "assistant", "content": "I served tea."},
     {"role": "user", "content": "Tell me about the palace."}],
]
N = 24
F32_LOGIT_TOL = 1e-4


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> Path:
    src = BUILD.parents[1]
    exe = tmp_path_factory.mktemp("probe") / "llama_cpp_probe"
    subprocess.run(["cc", "-O2", "-o", str(exe), str(Path(__file__).with_name("llama_cpp_probe.c")),
                    f"-I{src / 'include'}", f"-I{src / 'ggml' / 'include'}", f"-L{BUILD}", "-lllama", "-lggml",
                    "-lggml-base", f"-Wl,-rpath,{BUILD}"], check=True)
    return exe


def run_probe(exe: Path, gguf: Path, messages: list[dict]) -> dict:
    lines = "".join(f"{m['role']}\t{m['content'].replace(chr(92), chr(92) * 2).replace(chr(10), chr(92) + 'n')}\n"
                    for m in messages)
    out = subprocess.run([str(exe), str(gguf), str(N)], input=lines, capture_output=True, text=True, check=True)
    got = {}
    for line in out.stdout.splitlines():
        key, _, rest = line.partition(" ")
        got[key] = rest
    prompt = got["PROMPT"].replace("\\\\", "\0").replace("\\n", "\n").replace("\0", "\\")
    return {"prompt": prompt, "ids": [int(x) for x in got["IDS"].split()],
            "logits": [float(x) for x in got["LOGITS"].split()], "greedy": [int(x) for x in got["GREEDY"].split()]}


_MEASURE = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")


def export(adapter: Path, base: Path, out: Path, quant: str, target: str = "llama.cpp") -> dict:
    """The export as a user runs it, in a process of its own: its time, and the peak RSS of the largest process
    (the export or llama.cpp's converter, which run one after the other), measured by a parent that runs nothing
    else."""
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", _MEASURE, sys.executable, "-m", "persona_lora", "export",
                           str(adapter), "--for", target, "--out", str(out), "--base", str(base), "--quant", quant],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"seconds": time.monotonic() - start, "peak_kib": int(proc.stdout.split()[-1]),
            "gguf": next(out.glob("*.gguf"))}


def reference(base: Path, adapter: Path | None, tokenizer, chats) -> list[dict]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from persona_lora.chat_format import conversation_for, encode_prompt

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    out = []
    with torch.no_grad():
        for chat in chats:
            ids = encode_prompt(tokenizer, conversation_for(chat, SYSTEM))
            x = torch.tensor([ids])
            logits = model(input_ids=x).logits[0, -1]
            gen = model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=N,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
            path = model(input_ids=gen).logits[0, len(ids) - 1:-1]  # the logits of each greedy step
            top2 = path.topk(2, dim=-1).values
            out.append({"ids": ids, "logits": logits, "greedy": gen[0, len(ids):].tolist(),
                        "margins": (top2[:, 0] - top2[:, 1]).tolist(),
                        "text": tokenizer.apply_chat_template(conversation_for(chat, SYSTEM), tokenize=False,
                                                              add_generation_prompt=True)})
    return out


def top2_margin(margins: list[float], step: int | None) -> float | None:
    return None if step is None else margins[step]


def test_merged_gguf_is_exact_in_llama_cpp(trained_adapter, tiny_base, tmp_path, probe, capsys):
    import gguf
    import torch
    from transformers import AutoTokenizer

    from persona_lora.hub_tools.export.ollama import DEEPSEEK_V2_TEMPLATE
    from tests.go_template import ollama_values, render

    manifest = json.loads((trained_adapter / "persona_manifest.json").read_text())
    assert manifest["lora"]["preset"] == "all"
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    want = reference(tiny_base, trained_adapter, tokenizer, CHATS)
    on_base = reference(tiny_base, None, tokenizer, CHATS)
    assert any(b["greedy"] != a["greedy"] for b, a in zip(on_base, want)), "the adapter must change the answers"

    f32 = export(trained_adapter, tiny_base, tmp_path / "f32", "f32", target="ollama")
    q8 = export(trained_adapter, tiny_base, tmp_path / "q8", "q8_0")

    reader = gguf.GGUFReader(f32["gguf"])
    assert reader.fields["general.architecture"].contents() == "deepseek2"
    assert reader.fields["deepseek2.attention.q_lora_rank"].contents() == 0
    assert reader.fields["deepseek2.block_count"].contents() == 4
    assert reader.fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    assert reader.fields["tokenizer.chat_template"].contents() == tokenizer.chat_template

    rows = []
    for chat, ref in zip(CHATS, want):
        got = run_probe(probe, f32["gguf"], [{"role": "system", "content": SYSTEM}, *chat])
        assert tokenizer.bos_token + got["prompt"] == ref["text"], "llama.cpp's template application"
        assert got["prompt"] == render(DEEPSEEK_V2_TEMPLATE, ollama_values(chat, SYSTEM)), "the Ollama TEMPLATE"
        assert got["ids"] == ref["ids"]
        diff = (torch.tensor(got["logits"]) - ref["logits"]).abs().max().item()
        q = run_probe(probe, q8["gguf"], [{"role": "system", "content": SYSTEM}, *chat])
        assert q["ids"] == ref["ids"]
        q_diff = (torch.tensor(q["logits"]) - ref["logits"]).abs().max().item()
        same = next((i for i, (a, b) in enumerate(zip(q["greedy"], ref["greedy"])) if a != b), None)
        margin = top2_margin(ref["margins"], same)
        rows.append((chat[-1]["content"], len(ref["greedy"]), got["greedy"] == ref["greedy"], diff,
                     q["greedy"] == ref["greedy"], q_diff, same, margin))
        assert got["greedy"] == ref["greedy"]
        assert diff < F32_LOGIT_TOL
        # q8_0 changes every logit by up to ~q_diff: it must keep each greedy choice the reference makes by more
        # than twice that (a closer call is a tie at q8_0's precision, and is reported, not asserted)
        assert same is None or margin < 2 * q_diff, (same, margin, q_diff)

    imports = "import torch, transformers, peft"
    baseline = subprocess.run([sys.executable, "-c", _MEASURE, sys.executable, "-c", imports],
                              capture_output=True, text=True, check=True)
    shards = sorted(tiny_base.glob("*.safetensors"))
    largest = max(p.stat().st_size for p in shards)
    with capsys.disabled():
        print("\nprompt | greedy tokens | f32 greedy equal | f32 max |logit diff| | q8_0 greedy equal | q8_0 max diff")
        for r in rows:
            split = "" if r[6] is None else f" (first differs at token {r[6]}; reference top-2 margin there {r[7]:.3g})"
            print(f"{r[0]!r} | {r[1]} | {r[2]} | {r[3]:.3g} | {r[4]}{split} | {r[5]:.3g}")
        print(f"a Python that only imports torch, transformers and peft: peak RSS "
              f"{int(baseline.stdout.split()[-1]) / 1024:.0f} MiB")
        for name, e in (("f32 (ollama)", f32), ("q8_0 (llama.cpp)", q8)):
            print(f"export {name}: {e['seconds']:.1f} s, peak RSS {e['peak_kib'] / 1024:.0f} MiB, largest base shard "
                  f"{largest / 2**20:.1f} MiB, GGUF {e['gguf'].stat().st_size / 2**20:.1f} MiB")


@pytest.mark.skipif(not (BUILD / "llama-quantize").is_file(), reason="llama-quantize is not built in the cache")
def test_q4_k_m_goes_through_llama_quantize(trained_adapter, tiny_base, tmp_path, probe, capsys):
    """A k-quant: converted to f16, then llama-quantize; the file says Q4_K_M and llama.cpp runs the chat with our
    prompt ids (answers are not compared: 4 bits change the tiny model's logits by more than its margins)."""
    import gguf
    from transformers import AutoTokenizer

    from persona_lora.chat_format import conversation_for, encode_prompt

    q4 = export(trained_adapter, tiny_base, tmp_path / "q4", "q4_k_m")
    assert q4["gguf"].name.endswith(".q4_k_m.gguf") and sorted(p.name for p in q4["gguf"].parent.iterdir()) == \
        sorted([q4["gguf"].name, "README.md", "persona_gguf.json"])
    reader = gguf.GGUFReader(q4["gguf"])
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q4_K_M
    assert any(t.tensor_type == gguf.GGMLQuantizationType.Q4_K for t in reader.tensors)
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    got = run_probe(probe, q4["gguf"], [{"role": "system", "content": SYSTEM}, *CHATS[0]])
    assert got["ids"] == encode_prompt(tokenizer, conversation_for(CHATS[0], SYSTEM))
    assert got["greedy"]
    with capsys.disabled():
        print(f"\nexport q4_k_m: {q4['seconds']:.1f} s, peak RSS {q4['peak_kib'] / 1024:.0f} MiB, "
              f"GGUF {q4['gguf'].stat().st_size / 2**20:.1f} MiB")


def test_the_run_commands_use_only_options_the_tools_have(tmp_path):
    """The llama-cli and llama-server lines of the export's README and the card name only options those tools of
    this build document (their README option tables, generated from the argument parser): an option of another
    tool is refused by llama.cpp's parser ("invalid argument")."""
    import re
    import shlex

    from persona_lora.gguf_record import GgufRecord
    from persona_lora.model_cards.run_locally import run_commands

    src = BUILD.parents[1]
    record = GgufRecord(folder=tmp_path, name="p", adapter="p", base=None, gguf="p.q8_0.gguf", quant="q8_0",
                        target="ollama", system_prompt=SYSTEM, adapter_sha256=None, files=["Modelfile"])
    lines = run_commands(record)
    assert lines[:2] == ["ollama create p -f Modelfile", "ollama run p"]
    for line in lines[2:]:
        argv = shlex.split(line)
        table = (src / "tools" / argv[0].removeprefix("llama-") / "README.md").read_text()
        documented = {o for cell in re.findall(r"^\| `([^`]+)`", table, re.M)
                      for o in re.findall(r"(?:^|, )(-{1,2}[\w-]+)", cell)}
        used = [a for a in argv[1:] if a.startswith("-")]
        assert used and not [o for o in used if o not in documented], (argv[0], used)
