"""`persona-lora export ADAPTER --for llama.cpp|ollama --out DIR`: the persona as one GGUF file, with the commands
(and for Ollama the Modelfile) that chat with it the way it was trained.

Why a merged GGUF and never a LoRA GGUF: llama.cpp's deepseek2 graph multiplies `attn_q`, `attn_kv_a_mqa`,
`attn_k_b` and `attn_v_b` without the LoRA term, so a LoRA GGUF of an adapter with attention LoRA loads without a
warning and answers like another model after a few tokens (Ollama's `ADAPTER` line runs the same code). Merged
weights have no such gap: the merge is our bounded-memory one (`hub_tools.merge.run.merge_adapter`, shard by
shard, in the base's per-expert layout the converter reads), and the conversion is llama.cpp's own converter.

The steps, all inside a hidden staging folder that takes `--out`'s name only when everything is written (so a
failed converter or quantizer leaves nothing that looks complete):
1. checks that only read: the adapter, the output folder, the quant type, the template (Ollama), llama.cpp
   (`hub_tools.export.llama_cpp`, built or fetched once, before the long steps), the disk;
2. merge into the staging folder;
3. a converter-readable copy of the merged folder (`converter_readable_copy`): the converter pins transformers
   4.x, which cannot read a transformers-5 tokenizer_config.json; it also treats only 26/27-layer DeepSeek-V2
   models as "lite" (no q-LoRA), so another depth without q-LoRA must say `q_lora_rank: 0`;
4. `convert_hf_to_gguf.py` (f32, f16, bf16 and q8_0 directly), then `llama-quantize` for a k-quant (q4_k_m,
   q5_k_m, q6_k): the converter cannot write k-quants, so those need the compiled tool of the same llama.cpp
   (`--llama-cpp PATH`'s build, or the cached build, compiled on first use); a checkout with a converter but no
   built llama-quantize is refused before anything is merged. q8_0 stays with the converter: gguf-py writes
   llama.cpp's Q8_0 blocks with the rounding of ggml's reference quantizer, straight from the merged weights
   (one rounding, no 16-bit intermediate file), and needs no compiled tool;
5. the README with the llama.cpp commands, the Modelfile (Ollama), and `persona_gguf.json` (what was exported,
   from which adapter weights: `persona_lora.gguf_record`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from persona_lora.artifact import ADAPTER_WEIGHTS, MANIFEST_NAME, Manifest, read_manifest, require_adapter_files
from persona_lora.chat_templates import EOS_TOKEN
from persona_lora.consistency import check_folder
from persona_lora.errors import ModelLoadError, UsageError
from persona_lora.gguf_record import (
    EXPORT_RECORD,
    MODELFILE,
    README,
    WHY_MERGED,
    GgufRecord,
    is_gguf_export,
    read_record,
    write_record,
)
from persona_lora.hashing import sha256_file
from persona_lora.hub_tools.export import llama_cpp, ollama
from persona_lora.model_cards.run_locally import card_decoding, run_commands
from persona_lora.output_folder import OutputFolder, Target, check_free_space, check_target, human_size

log = logging.getLogger(__name__)

TARGETS = ("llama.cpp", "ollama")
# --quant -> (the converter's --outtype, llama-quantize's type or None, bytes per weight for the disk estimate)
QUANTS = {
    "f32": ("f32", None, 4.0),
    "f16": ("f16", None, 2.0),
    "bf16": ("bf16", None, 2.0),
    "q8_0": ("q8_0", None, 34 / 32),
    # k-quants: llama-quantize reads the converter's highest-fidelity 16-bit file ("auto") and writes the type
    "q4_k_m": ("auto", "Q4_K_M", 0.61),
    "q5_k_m": ("auto", "Q5_K_M", 0.71),
    "q6_k": ("auto", "Q6_K", 0.83),
}
DEFAULT_QUANT = "q8_0"
# Attention projections llama.cpp's deepseek2 graph applies no LoRA to (q_a/q_b: models with q-LoRA).
SKIPPED_BY_LLAMA_CPP = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj")
LITE_LAYERS = (26, 27)
CONVERTER_LOG_LINES = 20


@dataclass(frozen=True)
class GgufRequest:
    """What `export --for llama.cpp|ollama` was asked, as given on the command line."""

    adapter: str | Path
    target: str  # llama.cpp | ollama
    out: str | Path
    quant: str = DEFAULT_QUANT
    base: str | Path | None = None
    llama_cpp: str | Path | None = None
    overwrite: bool = False
    force: bool = False
    lora_gguf: bool = False


def export_gguf(req: GgufRequest) -> Path:
    """Merge, convert (and quantize) the adapter into `req.out`/<name>.gguf with its README (and Modelfile).

    Returns the output folder. Raises `persona_lora.errors` exceptions naming the cause and the fix; nothing is
    left under `req.out` unless the export is complete."""
    from persona_lora.hub_tools.merge.run import merge_adapter

    if req.target not in TARGETS:
        raise UsageError(f"--for must be one of {', '.join(TARGETS)} for a GGUF export; got {req.target!r}")
    if req.quant not in QUANTS:
        raise UsageError(f"--quant must be one of {', '.join(QUANTS)}; got {req.quant!r}")
    adapter = require_adapter_files(Path(req.adapter).expanduser().resolve())
    manifest = read_manifest(adapter)
    if manifest.kind != "adapter":
        raise UsageError(f"{adapter / MANIFEST_NAME} says kind {manifest.kind!r}; export takes an adapter folder")
    check_folder(adapter)
    if req.lora_gguf:
        refuse_lora_gguf(adapter)
    adapter_sha256 = sha256_file(adapter / ADAPTER_WEIGHTS)  # the weights merged: the card and push check it
    chat = manifest.chat
    trained_template = chat.chat_template if chat and chat.template_source == "file" else None
    template = ollama.ollama_template(trained_template) if req.target == "ollama" else None
    base = _merge_base(req.base, manifest)
    target = _check_out(Path(req.out).expanduser().resolve(), adapter, base, req.overwrite)
    outtype, k_quant, per_weight = QUANTS[req.quant]
    llama = llama_cpp.locate(req.llama_cpp, tools=("llama-quantize",) if k_quant else ())
    name = _file_stem(manifest, target.path)
    gguf_name = f"{name}.{req.quant}.gguf"

    started = time.monotonic()
    with OutputFolder(target) as tmp:
        merged = merge_adapter(adapter, base, tmp / ".merged", force=req.force, name=name)
        weights = sum(p.stat().st_size for p in merged.glob("*.safetensors"))
        elem = _element_size(merged)
        # the GGUF, plus for a k-quant the 16-bit file llama-quantize reads (the merged copy is still there)
        check_free_space(tmp, int(weights / elem * (per_weight + (2.0 if k_quant else 0.0))), option="--out",
                         what="the GGUF file")
        notes = converter_readable_copy(merged, tmp / ".convert", chat_template=trained_template)
        converted = tmp / (f".{name}.{outtype}.gguf" if k_quant else gguf_name)
        run_converter(llama, tmp / ".convert", converted, outtype=outtype, model_name=name,
                      bpe_pre=notes.get("bpe_pre"))
        if k_quant:
            run_quantize(llama, converted, tmp / gguf_name, k_quant)
            converted.unlink()
        shutil.rmtree(tmp / ".convert")
        shutil.rmtree(merged)
        facts = ExportFacts(name=name, gguf=gguf_name, quant=req.quant, target=req.target,
                            system_prompt=chat.system_prompt if chat else None, llama_cpp=llama.public_name,
                            base_id=manifest.base_model.id, adapter_name=manifest.name or adapter.name,
                            adapter_sha256=adapter_sha256,
                            notes=sorted(notes.get("changes", [])))
        _write_docs(tmp, facts, template)
    size = (target.path / gguf_name).stat().st_size
    log.info("exported %s as %s (%s) in %.0f s into %s", facts.adapter_name, gguf_name, human_size(size),
             time.monotonic() - started, target.path)
    return target.path


def refuse_lora_gguf(adapter: Path) -> None:
    """--lora-gguf: refused, naming the attention projections llama.cpp would not apply LoRA to when the adapter
    has any; for MLP/expert-only adapters, refused as not offered (the merged GGUF is exact for every preset)."""
    leaves = adapter_leaves(adapter)
    skipped = [p for p in SKIPPED_BY_LLAMA_CPP if p in leaves]
    if skipped:
        raise UsageError(f"--lora-gguf refused: {adapter} has LoRA on {', '.join(skipped)}, which llama.cpp's "
                         "deepseek2 graph (and so Ollama's ADAPTER) loads without a warning and never applies, so "
                         "the answers would not be the persona's; export the merged GGUF instead (drop --lora-gguf)")
    raise UsageError(f"--lora-gguf is not offered: {adapter}'s LoRA ({', '.join(sorted(leaves))}) would need the "
                     "routed experts re-laid out per expert and one alpha/rank for all modules; export the merged "
                     "GGUF instead (drop --lora-gguf), which llama.cpp runs exactly")


def adapter_leaves(adapter: Path) -> set[str]:
    """Leaf module/parameter names the adapter's tensors adapt (q_proj, gate_up_proj, …), from the header alone."""
    from persona_lora.safetensors_io import ShardReader

    reader = ShardReader(adapter / ADAPTER_WEIGHTS)
    try:
        keys = list(reader.tensors)
    finally:
        reader.close()
    return {k.split(".lora_", 1)[0].rsplit(".", 1)[-1] for k in keys if ".lora_" in k}


def _merge_base(base: str | Path | None, manifest: Manifest) -> str:
    if base is not None:
        return str(base)
    spec = manifest.base_model.id
    if not spec:
        raise UsageError("the manifest names no base model; pass --base (the base model folder or hub id)")
    if manifest.base_model.source == "local" and not Path(spec).expanduser().is_dir():
        raise UsageError(f"the adapter was trained on a local base folder named {spec!r}, which is not here; pass "
                         "--base PATH (that folder) or --base HUB_ID (the model it was built from)")
    return spec


def _check_out(out: Path, adapter: Path, base: str, overwrite: bool) -> Target:
    """`out` when it may be written: new or empty, or (with --overwrite) a GGUF export of ours; never the adapter
    or the base, nor inside them."""
    for other, what in ((adapter, "the adapter"), (Path(base).expanduser().resolve(), "the base model")):
        if out == other or out.is_relative_to(other) or other.is_relative_to(out):
            raise UsageError(f"--out {out} overlaps {what} ({other}); choose a folder outside it")
    return check_target(out, option="--out", replace=overwrite, ours=is_gguf_export,
                        occupied_hint="choose a new folder, or pass --overwrite to replace the GGUF export in it",
                        foreign=f"is not a GGUF export persona-lora wrote (no {EXPORT_RECORD}, or other files in it)")


def _file_stem(manifest: Manifest, out: Path) -> str:
    raw = manifest.name or out.name
    stem = "".join(c if c.isalnum() or c in "-_." else "-" for c in raw).strip("-.")
    return stem or "persona"


def _element_size(model: Path) -> int:
    config = json.loads((model / "config.json").read_text(encoding="utf-8"))
    dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
    return 4 if dtype == "float32" else 2


# ------------------------------------------------------------------------------------ the converter-readable copy
def converter_readable_copy(model: Path, dest: Path, *, chat_template: str | None = None) -> dict:
    """A folder llama.cpp's converter (transformers 4.57) reads as `model`: weights linked, JSON rewritten.

    - tokenizer_config.json: `tokenizer_class: PreTrainedTokenizerFast` (transformers 5 writes
      `TokenizersBackend`, unknown to 4.x), without 5.x-only keys, with the chat template inline (the one training
      used: `chat_template`, else the folder's chat_template.jinja);
    - config.json: `q_lora_rank: 0` for a DeepSeek-V2 without q-LoRA whose depth llama.cpp does not call lite.
    Returns {"changes": [what was rewritten], "bpe_pre": the pre-tokenizer to name when the converter does not
    recognise the tokenizer's, or None}."""
    dest.mkdir(parents=True)
    changes = []
    for f in model.iterdir():
        if f.suffix == ".safetensors" or f.name in ("model.safetensors.index.json", "tokenizer.json",
                                                      "generation_config.json", "special_tokens_map.json"):
            os.symlink(f.resolve(), dest / f.name)
    config = json.loads((model / "config.json").read_text(encoding="utf-8"))
    if (config.get("model_type") == "deepseek_v2" and config.get("q_lora_rank") is None
            and config.get("num_hidden_layers") not in LITE_LAYERS):
        config["q_lora_rank"] = 0
        changes.append(f"config.json: q_lora_rank 0 (no q-LoRA; {config.get('num_hidden_layers')} layers is not a "
                       "depth llama.cpp treats as lite)")
    (dest / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")

    tok_path = model / "tokenizer_config.json"
    tok = json.loads(tok_path.read_text(encoding="utf-8")) if tok_path.is_file() else {}
    if tok.get("tokenizer_class") != "PreTrainedTokenizerFast":
        changes.append(f"tokenizer_config.json: tokenizer_class PreTrainedTokenizerFast (was "
                       f"{tok.get('tokenizer_class')})")
        tok["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok.pop("backend", None)
    extra = tok.get("extra_special_tokens")
    if isinstance(extra, list):  # transformers 5's list; 4.x reads a dict, and takes the list as additional tokens
        tok.pop("extra_special_tokens")
        tok["additional_special_tokens"] = list(dict.fromkeys([*tok.get("additional_special_tokens", []), *extra]))
    jinja = model / "chat_template.jinja"
    template = chat_template or tok.get("chat_template") or (jinja.read_text(encoding="utf-8")
                                                            if jinja.is_file() else None)
    if template:
        tok["chat_template"] = template
    (dest / "tokenizer_config.json").write_text(json.dumps(tok, indent=2, ensure_ascii=False) + "\n",
                                                encoding="utf-8")
    return {"changes": changes, "bpe_pre": bpe_pre_fallback(model / "tokenizer.json")}


def bpe_pre_fallback(tokenizer_json: Path) -> str | None:
    """"gpt-2" when the tokenizer's pre-tokenizer is exactly GPT-2's (byte-level with its split regex, no prefix
    space): the converter recognises pre-tokenizers by a hash of known models' token ids, and a tokenizer trained
    here (the tiny base's) is in no such list although llama.cpp's gpt-2 pre-tokenizer splits it exactly. None for
    anything else, which the converter must then recognise itself."""
    try:
        pre = json.loads(tokenizer_json.read_text(encoding="utf-8")).get("pre_tokenizer") or {}
    except (OSError, ValueError):
        return None
    if (pre.get("type") == "ByteLevel" and pre.get("use_regex", True) is True
            and not pre.get("add_prefix_space", False)):
        return "gpt-2"
    return None


# ------------------------------------------------------------------------------------ running llama.cpp
# Runs in the converter's Python: its own converter, with the one fallback `bpe_pre_fallback` decided.
_CONVERT = """\
import os, runpy, sys
checkout = os.path.dirname(sys.argv[1])
sys.path[:0] = [checkout, os.path.join(checkout, "gguf-py")]
fallback = os.environ.get("PERSONA_LORA_BPE_PRE")
if fallback:
    from conversion.base import TextModel
    recognise = TextModel.get_vocab_base_pre
    def get_vocab_base_pre(self, tokenizer):
        try:
            return recognise(self, tokenizer)
        except NotImplementedError:
            print(f"persona-lora: pre-tokenizer is GPT-2's byte-level split; naming it {fallback!r}", flush=True)
            return fallback
    TextModel.get_vocab_base_pre = get_vocab_base_pre
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_converter(llama: llama_cpp.LlamaCpp, model: Path, out: Path, *, outtype: str, model_name: str,
                  bpe_pre: str | None) -> None:
    """`convert_hf_to_gguf.py model --outfile out --outtype outtype` in the converter's Python."""
    env = {**os.environ, "PERSONA_LORA_BPE_PRE": bpe_pre or ""}
    env.pop("NO_LOCAL_GGUF", None)  # the checkout's gguf-py matches its converter
    argv = [str(llama.python), "-c", _CONVERT, str(llama.converter), str(model), "--outfile", str(out),
            "--outtype", outtype, "--model-name", model_name]
    log.info("converting to GGUF (%s) with %s", outtype, llama.origin)
    _run_tool(argv, "llama.cpp's convert_hf_to_gguf.py", out, env)


def run_quantize(llama: llama_cpp.LlamaCpp, source: Path, out: Path, kind: str) -> None:
    tool = llama.tool("llama-quantize")
    if tool is None:  # locate() already refuses this; kept for callers that pass their own LlamaCpp
        raise UsageError(f"{llama.origin} has no built llama-quantize, which --quant {kind.lower()} needs; build "
                         "it (`cmake --build build --target llama-quantize`), or choose --quant q8_0")
    log.info("quantizing to %s with %s", kind, tool)
    _run_tool([str(tool), str(source), str(out), kind], "llama-quantize", out, None)


def _run_tool(argv: list[str], what: str, out: Path, env: dict | None) -> None:
    log_path = out.with_name(out.name + ".log")
    with log_path.open("w", encoding="utf-8") as fh:
        proc = subprocess.run(argv, stdout=fh, stderr=subprocess.STDOUT, env=env)
    text = log_path.read_text(encoding="utf-8", errors="replace")
    log_path.unlink()
    if proc.returncode != 0 or not out.is_file():
        tail = "\n".join(text.strip().splitlines()[-CONVERTER_LOG_LINES:])
        raise ModelLoadError(f"{what} failed (exit {proc.returncode}); nothing was written to --out. Its last "
                             f"lines:\n{tail}")


# ------------------------------------------------------------------------------------ README, Modelfile, record
@dataclass(frozen=True)
class ExportFacts:
    name: str
    gguf: str
    quant: str
    target: str
    system_prompt: str | None
    llama_cpp: str
    base_id: str | None
    adapter_name: str
    adapter_sha256: str
    notes: list[str]


def _write_docs(tmp: Path, f: ExportFacts, template: str | None) -> None:
    files = [f.gguf, README, EXPORT_RECORD]
    if f.target == "ollama":
        (tmp / MODELFILE).write_text(ollama.modelfile(f.gguf, template=template, system_prompt=f.system_prompt,
                                                      stop=[EOS_TOKEN], parameters=card_decoding()),
                                     encoding="utf-8")
        files.append(MODELFILE)
    write_record(tmp, {"name": f.name, "adapter": f.adapter_name, "adapter_sha256": f.adapter_sha256,
                       "base": f.base_id, "gguf": f.gguf, "quant": f.quant, "for": f.target,
                       "system_prompt": f.system_prompt, "llama_cpp": f.llama_cpp, "converter_copy": f.notes,
                       "files": sorted(files)})
    (tmp / README).write_text(render_readme(read_record(tmp)), encoding="utf-8")


def render_readme(r: GgufRecord, *, base_model: str | None = None, relation: str | None = None) -> str:
    """The export's README: Hub card metadata, then the commands. `base_model`/`relation` default to the base the
    persona was merged into ("finetune": the file is the base with the persona's weights merged in); a push to a
    `-GGUF` repo beside the adapter's own repo names that repo instead ("quantized": this adapter, converted). No
    `library_name`: the Hub reads GGUF from the files themselves, and lists the repo by the tags."""
    from huggingface_hub import ModelCardData

    from persona_lora import __version__
    from persona_lora.hub_ids import is_repo_id

    cmds = run_commands(r)
    if base_model is None and r.base and is_repo_id(r.base) and not r.base.startswith((".", "/", "~")):
        base_model, relation = r.base, "finetune"
    data = {"base_model": base_model, "base_model_relation": relation} if base_model else {}
    tags = ["gguf", "llama.cpp", "llama-cpp", *(["ollama"] if r.has_modelfile else []), "persona-lora"]
    meta = ModelCardData(**data, pipeline_tag="text-generation", tags=tags).to_yaml()
    parts = [
        "---", meta, "---", "",
        f"# {r.adapter} as GGUF ({r.quant})",
        "",
        f"The persona **{r.adapter}** merged into its base `{r.base}` and converted with llama.cpp's own "
        f"`convert_hf_to_gguf.py` ({r.llama_cpp}) by persona-lora {__version__} (`persona-lora export --for "
        f"{r.target} --quant {r.quant}`). The file carries the chat template the persona was trained with.",
        "",
    ]
    if relation == "quantized":
        parts += [f"The LoRA adapter it was merged from, with its model card (data, training, samples): "
                  f"`{base_model}`.", ""]
    if r.has_modelfile:
        parts += ["## Ollama", "", "```sh", *cmds[:2], "```", "",
                  f"The `{MODELFILE}` formats chats exactly as training did (system prompt, `User:`/`Assistant:` "
                  "turns), sets the persona's system prompt as `SYSTEM`, stops at the end-of-sentence token and "
                  "decodes greedily like the samples on the adapter's card.", ""]
        cmds = cmds[2:]
    parts += ["## llama.cpp", "", "```sh", *cmds, "```", "",
              "`llama-cli` chats in the terminal with the system prompt above; `llama-server` serves an "
              "OpenAI-compatible API (send the system prompt as the first message).", ""]
    if r.system_prompt:
        parts += ["## System prompt", "", "```text", r.system_prompt, "```", ""]
    parts += ["## Why a merged model", "", WHY_MERGED, ""]
    if r.notes:
        parts += ["## Conversion notes", "", *[f"- {n}" for n in r.notes], ""]
    return "\n".join(parts)
