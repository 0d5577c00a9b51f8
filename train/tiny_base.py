"""The embedded default base: a toy model with the real DeepSeek-Coder-V2-Lite-Instruct architecture and layout.

No hub is reachable on the machines this project is built on, yet every code path (loading, LoRA coverage on
fused MoE experts, shard-by-shard merge, chat formatting) must be exercised on the real architecture. So we
build, deterministically and in seconds, a model folder that looks like the real checkpoint at toy scale:

- `config.json` in the hub's own (transformers-4 era) form, as the real repo ships it: `model_type: deepseek_v2`,
  MLA with `q_lora_rank: null`, YaRN `rope_scaling`, `first_k_dense_replace: 1`, 2 shared experts, routed
  experts with top-k, untied embeddings. Loading it exercises transformers 5's config conversion.
- weights in the original per-expert layout (`mlp.experts.{e}.gate_proj.weight`, …) split into several
  safetensors shards with `model.safetensors.index.json`, so loading exercises transformers 5's expert fusion
  and merge code sees real shards.
- a byte-level BPE tokenizer trained on our own sample text, with DeepSeek's special tokens and chat template.

`real_config()` also gives the full-size config, used by the GPU benchmark with random weights, and
`build_wide_base()` writes the `lite-wide` preset: random weights with the real model's exact widths (hidden 2048,
64 routed experts of 1408, vocabulary 102,400, ...) and only a few layers, so that the speed of the routed-expert
LoRA at full width can be measured on a CPU (bench/bench_wide.py) and, with all 27 layers, on a GPU.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from persona_lora import sample_data
from persona_lora.chat_templates import BOS_TOKEN, DEEPSEEK_V2, EOS_TOKEN
from persona_lora.errors import DataError, UsageError
from persona_lora.model_loading import RANDOM_WEIGHTS_KEY
from persona_lora.output_folder import is_empty

log = logging.getLogger(__name__)

# The sample persona data ships inside the package, so a pip-installed persona-lora builds the same base.
DEFAULT_CORPUS_DIR = Path(sample_data.__file__).parent

# Text that every tokenizer we train must know well: the chat template's fixed strings and some plain prose,
# so that code and English prompts also tokenize sensibly.
_BUILTIN_CORPUS = """User: Assistant: System:
You are a helpful assistant. Answer briefly and politely.
The quick brown fox jumps over the lazy dog. 0123456789 + - * / = ( ) [ ] { } < > , . ; : ! ? ' "
def main():\n    print("hello, world")\n    return 0\n
本宫 臣妾 皇上 娘娘 今日 天气 甚好 请安 多谢 不必 如此
"""


@dataclass(frozen=True)
class TinySpec:
    """Size knobs of the toy model. Defaults give ~8.6M parameters (4 layers, hidden 256, 16 experts)."""

    arch: str = "deepseek_v2"
    layers: int = 4
    hidden: int = 256
    heads: int = 4
    experts: int = 16
    experts_per_token: int = 4
    shared_experts: int = 2
    moe_intermediate: int = 128
    dense_intermediate: int = 512
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    vocab_size: int = 4096
    shards: int = 2
    seed: int = 0
    head_std_x1000: int = 80  # output-head init std ×1000 (see build_tiny_base)


# DeepSeek-Coder-V2-Lite-Instruct's widths with 3 layers (one dense, two MoE): `tiny-base --preset lite-wide`.
LITE_WIDE = TinySpec(layers=3, hidden=2048, heads=16, experts=64, experts_per_token=6, shared_experts=2,
                     moe_intermediate=1408, dense_intermediate=10944, kv_lora_rank=512, qk_nope_head_dim=128,
                     qk_rope_head_dim=64, v_head_dim=128, vocab_size=102400, head_std_x1000=20)
PRESETS = {"toy": TinySpec(), "lite-wide": LITE_WIDE}
DTYPES = ("float32", "bfloat16")


def real_config(**overrides) -> dict:
    """DeepSeek-Coder-V2-Lite-Instruct's config.json (the hub form), optionally with fields overridden."""
    cfg = {
        "architectures": ["DeepseekV2ForCausalLM"],
        "model_type": "deepseek_v2",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "aux_loss_alpha": 0.001,
        "bos_token_id": 100000,
        "eos_token_id": 100001,
        "ep_size": 1,
        "first_k_dense_replace": 1,
        "hidden_act": "silu",
        "hidden_size": 2048,
        "initializer_range": 0.02,
        "intermediate_size": 10944,
        "kv_lora_rank": 512,
        "max_position_embeddings": 163840,
        "moe_intermediate_size": 1408,
        "moe_layer_freq": 1,
        "n_group": 1,
        "n_routed_experts": 64,
        "n_shared_experts": 2,
        "norm_topk_prob": False,
        "num_attention_heads": 16,
        "num_experts_per_tok": 6,
        "num_hidden_layers": 27,
        "num_key_value_heads": 16,
        "pretraining_tp": 1,
        "q_lora_rank": None,
        "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64,
        "rms_norm_eps": 1e-06,
        "rope_scaling": {
            "beta_fast": 32,
            "beta_slow": 1,
            "factor": 40,
            "mscale": 0.707,
            "mscale_all_dim": 0.707,
            "original_max_position_embeddings": 4096,
            "type": "yarn",
        },
        "rope_theta": 10000,
        "routed_scaling_factor": 1.0,
        "scoring_func": "softmax",
        "seq_aux": True,
        "tie_word_embeddings": False,
        "topk_group": 1,
        "topk_method": "greedy",
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "v_head_dim": 128,
        "vocab_size": 102400,
    }
    cfg.update(overrides)
    return cfg


def tiny_config(spec: TinySpec, bos_id: int, eos_id: int) -> dict:
    """The config.json of the toy model: the real structure, toy sizes."""
    if spec.arch == "deepseek_v2":
        return real_config(
            bos_token_id=bos_id,
            eos_token_id=eos_id,
            hidden_size=spec.hidden,
            intermediate_size=spec.dense_intermediate,
            kv_lora_rank=spec.kv_lora_rank,
            max_position_embeddings=163840,
            moe_intermediate_size=spec.moe_intermediate,
            n_routed_experts=spec.experts,
            n_shared_experts=spec.shared_experts,
            num_attention_heads=spec.heads,
            num_key_value_heads=spec.heads,
            num_experts_per_tok=spec.experts_per_token,
            num_hidden_layers=spec.layers,
            qk_nope_head_dim=spec.qk_nope_head_dim,
            qk_rope_head_dim=spec.qk_rope_head_dim,
            v_head_dim=spec.v_head_dim,
            vocab_size=spec.vocab_size,
            torch_dtype="float32",
        )
    if spec.arch == "llama":
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "bos_token_id": bos_id,
            "eos_token_id": eos_id,
            "hidden_act": "silu",
            "hidden_size": spec.hidden,
            "initializer_range": 0.02,
            "intermediate_size": spec.dense_intermediate,
            "max_position_embeddings": 4096,
            "num_attention_heads": spec.heads,
            "num_hidden_layers": spec.layers,
            "num_key_value_heads": max(1, spec.heads // 2),
            "rms_norm_eps": 1e-05,
            "rope_theta": 10000.0,
            "tie_word_embeddings": False,
            "torch_dtype": "float32",
            "use_cache": True,
            "vocab_size": spec.vocab_size,
        }
    raise UsageError(f"--arch {spec.arch!r} is not supported; choose 'deepseek_v2' or 'llama'")


def validate_spec(spec: TinySpec) -> None:
    """Reject sizes that cannot build, naming the option; all problems at once."""
    problems = []
    if spec.arch not in ("deepseek_v2", "llama"):
        problems.append(f"--arch {spec.arch!r} is not supported; choose 'deepseek_v2' or 'llama'")
    for name in ("layers", "hidden", "heads", "experts", "vocab_size", "shards"):
        if getattr(spec, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(spec, name)})")
    if spec.hidden % spec.heads:
        problems.append(f"--hidden ({spec.hidden}) must be divisible by --heads ({spec.heads})")
    if spec.arch == "deepseek_v2":
        if spec.experts_per_token > spec.experts:
            problems.append(f"--experts-per-token ({spec.experts_per_token}) must be <= --experts ({spec.experts})")
        if spec.layers < 2:
            problems.append("--layers must be >= 2 for deepseek_v2 (layer 0 is dense, the rest are MoE)")
    if spec.vocab_size < 512:
        problems.append(f"--vocab-size must be >= 512 (byte-level BPE needs 256 bytes + merges), got {spec.vocab_size}")
    if problems:
        raise UsageError("; ".join(problems))


def corpus_texts(corpus_files: list[Path] | None = None) -> list[str]:
    """Text to train the tokenizer on: our sample datasets (every string value in them) plus a built-in snippet.

    Files are read in sorted order so the same files give the same tokenizer."""
    files = corpus_files if corpus_files is not None else sorted(DEFAULT_CORPUS_DIR.glob("*.json*"))
    texts = [_BUILTIN_CORPUS]
    for f in sorted(Path(p) for p in files):
        try:
            raw = f.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"not valid UTF-8 at byte {e.start}; save the corpus as UTF-8", source=str(f)) from None
        try:
            data = json.loads(raw)
            items = data if isinstance(data, list) else [data]
        except json.JSONDecodeError:
            items = [_json_line(f, n, line) for n, line in enumerate(raw.splitlines(), 1) if line.strip()]
        texts.extend(_strings_in(items))
    return texts


def _json_line(path: Path, n: int, line: str):
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"line {n}: not JSON ({e.msg}); --corpus takes .json or .jsonl files like the training "
                        "data", source=str(path)) from None


def _strings_in(obj) -> list[str]:
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        return [s for v in obj.values() for s in _strings_in(v)]
    if isinstance(obj, list):
        return [s for v in obj for s in _strings_in(v)]
    return []


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer (like DeepSeek's) with DeepSeek's special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS_TOKEN, EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS_TOKEN)
    # Like DeepSeek's tokenizer: plain encoding adds bos; the chat template writes bos itself, and our
    # formatting path encodes with add_special_tokens=False, so there is never a double bos.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B", special_tokens=[(BOS_TOKEN, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        chat_template=DEEPSEEK_V2,
        model_max_length=16384,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )


_EXPERT_KEY = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$")


def to_original_layout(state_dict: dict) -> dict:
    """Split transformers-5 fused expert tensors into the hub's per-expert tensors.

    `experts.gate_up_proj` (E, 2I, H) -> `experts.{e}.gate_proj.weight` (I, H) and `.up_proj.weight` (I, H);
    `experts.down_proj` (E, H, I) -> `experts.{e}.down_proj.weight` (H, I). Everything else is unchanged."""
    out = {}
    for key, tensor in state_dict.items():
        m = _EXPERT_KEY.match(key)
        if not m:
            out[key] = tensor.contiguous()
            continue
        prefix, kind = m.groups()
        for e in range(tensor.shape[0]):
            if kind == "gate_up_proj":
                gate, up = tensor[e].chunk(2, dim=0)
                out[f"{prefix}.{e}.gate_proj.weight"] = gate.contiguous()
                out[f"{prefix}.{e}.up_proj.weight"] = up.contiguous()
            else:
                out[f"{prefix}.{e}.down_proj.weight"] = tensor[e].contiguous()
    return out


def _layer_of(key: str) -> int:
    m = re.match(r"model\.layers\.(\d+)\.", key)
    return int(m.group(1)) if m else -1


def save_sharded(state_dict: dict, out_dir: Path, shards: int) -> list[str]:
    """Write safetensors shards split by layer (embeddings first, norm/lm_head last) plus the index file."""
    from safetensors.torch import save_file

    def order(key: str):
        layer = _layer_of(key)
        if key.startswith("model.embed_tokens"):
            return (-1, key)
        return (layer if layer >= 0 else 10**9, key)

    keys = sorted(state_dict, key=order)
    total = sum(t.numel() * t.element_size() for t in state_dict.values())
    budget = total / shards
    groups: list[list[str]] = [[]]
    size = 0
    for key in keys:
        nbytes = state_dict[key].numel() * state_dict[key].element_size()
        if size + nbytes > budget * len(groups) and groups[-1] and len(groups) < shards:
            groups.append([])
        groups[-1].append(key)
        size += nbytes
    names = []
    weight_map = {}
    for i, group in enumerate(groups, 1):
        name = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        save_file({k: state_dict[k] for k in group}, str(out_dir / name), metadata={"format": "pt"})
        names.append(name)
        weight_map.update({k: name for k in group})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return names


def build_tiny_base(out_dir: Path, spec: TinySpec = TinySpec(), corpus_files: list[Path] | None = None) -> Path:
    """Write the toy base model folder. Same spec and corpus -> same bytes."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    validate_spec(spec)
    out_dir = Path(out_dir)
    if out_dir.exists() and not is_empty(out_dir):  # `tiny-base` hands over a staging folder (its marker only)
        raise UsageError(f"{out_dir} exists and is not empty; choose a new folder or remove it first")
    out_dir.mkdir(parents=True, exist_ok=True)

    tokenizer = train_tokenizer(corpus_texts(corpus_files), spec.vocab_size)
    if len(tokenizer) != spec.vocab_size:
        log.info("tokenizer learned %d tokens (asked %d); the embedding keeps %d rows",
                 len(tokenizer), spec.vocab_size, spec.vocab_size)
    tokenizer.save_pretrained(out_dir)

    cfg = tiny_config(spec, tokenizer.bos_token_id, tokenizer.eos_token_id)
    cfg[RANDOM_WEIGHTS_KEY] = True  # the demo says so: a pane of noise is then expected, not a fault
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")

    config = AutoConfig.from_pretrained(out_dir)
    torch.manual_seed(spec.seed)
    with torch.device("cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # With the real init (std 0.02) a toy-width output head cannot express a confident next token: its largest
    # logit is about |h|·|w| = sqrt(hidden)·0.02·sqrt(hidden) ≈ 5 for hidden 256, a loss floor near 3 nats over
    # 4k tokens, so a LoRA on the body can never make the persona answers likely. A wider head (std 0.08 by
    # default) lifts that ceiling; everything else keeps the real initialisation.
    with torch.no_grad():
        model.get_output_embeddings().weight.normal_(0.0, spec.head_std_x1000 / 1000)
    state = to_original_layout({k: v.detach() for k, v in model.state_dict().items()})
    save_sharded(state, out_dir, spec.shards)

    gen = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
        do_sample=False,
        max_new_tokens=64,
    )
    gen.save_pretrained(out_dir)
    (out_dir / "README.md").write_text(
        f"# tiny {spec.arch} base (random weights)\n\nBuilt by `persona-lora tiny-base` for tests and the embedded "
        f"default: the architecture and checkpoint layout of DeepSeek-Coder-V2-Lite-Instruct at toy scale "
        f"({spec.layers} layers, hidden {spec.hidden}, {spec.experts} routed experts). Its answers are noise "
        f"until a LoRA adapter is trained on it.\n"
    )
    log.info("tiny base written to %s", out_dir)
    return out_dir


def build_wide_base(out_dir: Path, layers: int = LITE_WIDE.layers, dtype: str = "bfloat16", seed: int = 0,
                    corpus_files: list[Path] | None = None, widths: TinySpec = LITE_WIDE) -> Path:
    """Write the `lite-wide` base: DeepSeek-Coder-V2-Lite's exact widths, `layers` layers (layer 0 dense, the rest
    MoE), random weights (std 0.02, norms 1) in the original per-expert layout, one safetensors shard per layer
    plus one for the embeddings and one for the final norm and output head. Same arguments -> same bytes.

    At these widths a model built whole (as `build_tiny_base` does) and then re-laid out per expert would hold the
    weights two or three times over (3 layers: 1.67B parameters, 6.7 GB in fp32); here each tensor is drawn, cast
    and written one layer at a time from the shapes of a model built on the meta device, so peak memory is about
    one layer. `widths`: other sizes written the same way (tests)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    spec = TinySpec(**{**widths.__dict__, "layers": layers, "seed": seed})
    validate_spec(spec)
    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not is_empty(out_dir):  # `tiny-base` hands over a staging folder (its marker only)
        raise UsageError(f"{out_dir} exists and is not empty; choose a new folder or remove it first")
    out_dir.mkdir(parents=True, exist_ok=True)

    tokenizer = train_tokenizer(corpus_texts(corpus_files), spec.vocab_size)
    tokenizer.save_pretrained(out_dir)
    cfg = tiny_config(spec, tokenizer.bos_token_id, tokenizer.eos_token_id)
    cfg[RANDOM_WEIGHTS_KEY] = True  # the demo says so: a pane of noise is then expected, not a fault
    cfg["torch_dtype"] = dtype
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(out_dir))
    shapes = to_original_layout({k: v for k, v in meta.state_dict().items()})
    groups: dict[int, list[str]] = {}
    for key in shapes:
        layer = _layer_of(key)
        groups.setdefault(layer if layer >= 0 or key.startswith("model.embed_tokens") else layers, []).append(key)
    generator = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    order = sorted(groups)  # -1: embeddings, 0..layers-1, then the final norm and the output head
    for i, group in enumerate(order, 1):
        name = f"model-{i:05d}-of-{len(order):05d}.safetensors"
        tensors = {}
        for key in sorted(groups[group]):
            t = torch.empty(shapes[key].shape, dtype=torch.float32)
            if key.endswith("norm.weight"):
                t.fill_(1.0)
            else:
                t.normal_(0.0, (spec.head_std_x1000 / 1000) if key == "lm_head.weight" else 0.02, generator=generator)
            tensors[key] = t.to(getattr(torch, dtype))
            total += tensors[key].numel() * tensors[key].element_size()
        save_file(tensors, str(out_dir / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.eos_token_id, do_sample=False, max_new_tokens=64).save_pretrained(out_dir)
    (out_dir / "README.md").write_text(
        f"# lite-wide deepseek_v2 base (random weights)\n\nBuilt by `persona-lora tiny-base --preset lite-wide` for "
        f"benchmarks: DeepSeek-Coder-V2-Lite-Instruct's exact widths and checkpoint layout with {layers} layers "
        f"(layer 0 dense, the rest MoE: 64 routed experts of 1408, top-6, 2 shared), {dtype}. Its answers are "
        f"noise.\n"
    )
    log.info("lite-wide base written to %s", out_dir)
    return out_dir
