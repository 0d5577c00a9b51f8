"""LoRA presets by architecture, and the coverage they really get.

Coverage is described in groups (attention, dense MLP, shared experts, routed experts, router, other linear).
A preset names the groups it asks for; `lora_config_for` turns them into a PEFT `LoraConfig` whose
`target_modules` is a regex over full module names and whose `target_parameters` name the fused expert
weights. `coverage_table` then walks the adapted model module by module, and `check_coverage` fails loudly
when what was applied differs from what was asked (PEFT silently re-targets `*_proj` names on MoE
models; persona_lora/peft_compat.py keeps it from doing so).
"""

from __future__ import annotations

from dataclasses import dataclass

from persona_lora.errors import ConfigError
from persona_lora.peft_compat import lora_module_label, module_regex

ATTENTION = "attention"
DENSE_MLP = "dense MLP"
SHARED_EXPERTS = "shared experts"
ROUTED_EXPERTS = "routed experts"
ROUTER = "router"
OTHER = "other linear"

MOE_TYPES = {"deepseek_v2", "deepseek_v3"}
ATTN_LEAVES = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "k_proj", "v_proj")
MLP_LEAVES = ("gate_proj", "up_proj", "down_proj")
# The leaf-name target list commonly given for DeepSeek-V2. It means "every linear layer", which on transformers 5
# includes the fused routed experts: as `lora.target_modules` it gets the same coverage as the preset `all`.
LEAF_TARGETS = ["q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

PRESETS = {
    "moe": {
        "attention": [ATTENTION],
        "attention+mlp": [ATTENTION, DENSE_MLP, SHARED_EXPERTS],
        "all": [ATTENTION, DENSE_MLP, SHARED_EXPERTS, ROUTED_EXPERTS],
    },
    "dense": {
        "attention": [ATTENTION],
        "attention+mlp": [ATTENTION, DENSE_MLP],
        "all": [ATTENTION, DENSE_MLP],
    },
}
EXPERT_PARAMS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
# A MoE preset with this suffix adapts the same groups but leaves out MLA's `kv_b_proj`: vLLM's MLA attention does
# not apply LoRA there, so only such an adapter is served by vLLM exactly as trained.
NO_KV_B = "-no-kv-b"
PRESETS["moe"].update({f"{name}{NO_KV_B}": list(groups) for name, groups in list(PRESETS["moe"].items())})


def family(model_type: str) -> str:
    return "moe" if model_type in MOE_TYPES else "dense"


def group_of(module_name: str) -> str:
    """Which coverage group a (base-model-relative) module name belongs to."""
    leaf = module_name.rsplit(".", 1)[-1]
    if ".self_attn." in module_name or ".attention." in module_name:
        return ATTENTION
    if module_name.endswith("mlp.gate") or ".mlp.gate." in module_name:
        return ROUTER
    if ".mlp.experts" in module_name:
        return ROUTED_EXPERTS
    if ".shared_experts." in module_name or ".shared_expert." in module_name:
        return SHARED_EXPERTS
    if ".mlp." in module_name and leaf in MLP_LEAVES:
        return DENSE_MLP
    return OTHER


def groups_for(preset: str | None, model_type: str, target_modules: list[str] | None = None) -> list[str]:
    """The groups a preset (or an explicit list of leaf names, such as `LEAF_TARGETS`) asks for."""
    fam = family(model_type)
    if target_modules:
        leaves = set(target_modules)
        unknown = leaves - set(ATTN_LEAVES) - set(MLP_LEAVES)
        if unknown:
            raise ConfigError(
                f"lora.target_modules: unknown module name(s) {sorted(unknown)}; use names among "
                f"{list(ATTN_LEAVES + MLP_LEAVES)} or a preset (lora.preset: {' | '.join(PRESETS[fam])})"
            )
        mlp = leaves & set(MLP_LEAVES)
        if mlp and mlp != set(MLP_LEAVES):
            raise ConfigError(
                f"lora.target_modules names {sorted(mlp)} but not {sorted(set(MLP_LEAVES) - mlp)}: gate/up/down "
                "projections are adapted together (the routed experts fuse gate and up); list all three"
            )
        groups = [ATTENTION] if leaves & set(ATTN_LEAVES) else []
        if mlp:  # what the names meant before experts were fused: every MLP projection, experts included
            groups += [DENSE_MLP, SHARED_EXPERTS, ROUTED_EXPERTS] if fam == "moe" else [DENSE_MLP]
        return groups
    if preset not in PRESETS[fam]:
        raise ConfigError(f"lora.preset {preset!r} is not known for {model_type}; "
                          f"choose one of {', '.join(PRESETS[fam])}")
    return list(PRESETS[fam][preset])


def candidate_modules(model, groups: list[str]) -> dict[str, list[str]]:
    """Module names (relative to the causal LM) of every linear layer in each asked group.

    Only Linear-like modules count (lm_head, embeddings, norms and the router are never candidates)."""
    import torch.nn as nn

    out: dict[str, list[str]] = {g: [] for g in groups if g != ROUTED_EXPERTS}
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) or name.endswith("lm_head"):
            continue
        g = group_of(name)
        if g in out:
            out[g].append(name)
    if ROUTED_EXPERTS in groups:
        out[ROUTED_EXPERTS] = [n for n, _ in model.named_parameters() if any(n.endswith(p) for p in EXPERT_PARAMS)]
    return out


@dataclass
class LoraSpec:
    """What the user asked for, resolved against a model."""

    groups: list[str]
    target_modules: list[str]  # full module names (documentation; the config uses a regex of them)
    target_parameters: list[str]


def resolve(model, preset: str | None, target_modules: list[str] | None = None) -> LoraSpec:
    groups = groups_for(preset, model.config.model_type, target_modules)
    cands = candidate_modules(model, groups)
    empty = [g for g in groups if not cands.get(g)]
    if empty:
        raise ConfigError(
            f"the model has no modules in group(s) {empty} asked by the LoRA preset; choose another preset"
        )
    modules = sorted(n for g in groups if g != ROUTED_EXPERTS for n in cands[g])
    if preset and preset.endswith(NO_KV_B):
        modules = [n for n in modules if not n.endswith(".kv_b_proj")]
    params = list(EXPERT_PARAMS) if ROUTED_EXPERTS in groups else []
    return LoraSpec(groups, modules, params)


def lora_config_for(spec: LoraSpec, *, r: int, alpha: int, dropout: float, bias: str = "none"):
    """The PEFT LoraConfig for a resolved spec. Dropout on the fused experts is refused by PEFT
    (`ParamWrapper`), so the config carries 0 there and `adapters.attach_new_adapter` puts dropout back on the
    linear LoRA layers only."""
    from peft import LoraConfig

    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=0.0 if spec.target_parameters else dropout,
        target_modules=module_regex(spec.target_modules) if spec.target_modules else None,
        target_parameters=spec.target_parameters or None,
        bias=bias,
        task_type="CAUSAL_LM",
    )


def coverage_table(peft_model, asked_groups: list[str]) -> list[dict]:
    """Per group: asked?, applied?, adapted modules (or expert tensors) and LoRA parameter count."""
    rows: dict[str, dict] = {}
    base = peft_model.get_base_model()
    for name, mod in base.named_modules():
        if not hasattr(mod, "lora_A") or not len(getattr(mod, "lora_A")):
            continue
        experts, label = lora_module_label(name, mod)
        g = ROUTED_EXPERTS if experts else group_of(name)
        row = rows.setdefault(g, {"group": g, "modules": 0, "params": 0, "names": []})
        row["modules"] += 1
        row["names"].append(label)
        row["params"] += sum(
            p.numel() for k in ("lora_A", "lora_B") for m in getattr(mod, k).values() for p in m.parameters()
        )
    table = []
    for g in dict.fromkeys([*asked_groups, *rows]):
        row = rows.get(g, {"group": g, "modules": 0, "params": 0, "names": []})
        table.append({"group": g, "asked": g in asked_groups, "applied": row["modules"] > 0, "modules": row["modules"],
                      "params": row["params"], "names": sorted(row["names"])})
    return table


def check_coverage(peft_model, spec: LoraSpec) -> list[dict]:
    """Coverage applied must equal coverage asked, module by module; returns the table."""
    table = coverage_table(peft_model, spec.groups)
    applied = {n for row in table for n in row["names"] if row["group"] != ROUTED_EXPERTS}
    experts = {n for row in table if row["group"] == ROUTED_EXPERTS for n in row["names"]}
    wanted_experts = set()
    if spec.target_parameters:
        names = (n.replace(".base_layer", "") for n, _ in peft_model.get_base_model().named_parameters())
        wanted_experts = {n for n in names if any(n.endswith(p) for p in EXPERT_PARAMS)}
    problems = []
    if applied != set(spec.target_modules):
        missing = sorted(set(spec.target_modules) - applied)[:5]
        extra = sorted(applied - set(spec.target_modules))[:5]
        problems.append(f"linear LoRA differs from what was asked (missing {missing}, unexpected {extra})")
    if experts != wanted_experts:
        problems.append(f"LoRA on routed experts differs from what was asked "
                        f"({len(experts)} applied, {len(wanted_experts)} asked)")
    if problems:
        raise ConfigError([
            f"LoRA coverage check failed: {p}; this is a bug or a PEFT behaviour change, please report it"
            for p in problems
        ])
    return table


def format_coverage(table: list[dict], trainable: int, total: int) -> str:
    lines = [f"{'group':<16}{'asked':>7}{'applied':>9}{'modules':>9}{'LoRA params':>14}"]
    for row in table:
        lines.append(f"{row['group']:<16}{'yes' if row['asked'] else 'no':>7}{'yes' if row['applied'] else 'no':>9}"
                     f"{row['modules']:>9}{row['params']:>14,}")
    lines.append(f"trainable {trainable:,} of {total:,} parameters ({100 * trainable / max(total, 1):.2f}%)")
    return "\n".join(lines)
