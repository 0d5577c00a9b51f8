"""Checks on a downloaded (or merged) folder: the bytes are the hub's, the files are what they claim, the
adapter fits the base it will be loaded on.

Why: a pulled adapter is loaded into memory next to a multi-GB base; a truncated/corrupted file, a pickle, or an
adapter trained for another base should fail here with a sentence, not later as a CUDA shape error or as
arbitrary code execution. Nothing here loads weights: safetensors headers are read directly.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from persona_lora.artifact import (
    MANIFEST_NAME,
    BaseModelInfo,
    read_adapter_config,
    read_manifest,
)
from persona_lora.consistency import LORA_KEY
from persona_lora.errors import ModelLoadError, VerificationError
from persona_lora.hashing import git_blob_sha1, sha256_file
from persona_lora.hub_ids import is_repo_id
from persona_lora.hubs.interface import RemoteFile
from persona_lora.safetensors_io import read_safetensors_header

log = logging.getLogger(__name__)

MAX_LISTED = 6


# ------------------------------------------------------------------------------------------ hashes
def hash_problems(folder: Path, remote: dict[str, RemoteFile]) -> list[str]:
    """Every downloaded file must have the hub's size and hash."""
    problems = []
    for rel, meta in sorted(remote.items()):
        local = folder / rel
        if not local.is_file():
            problems.append(f"{rel}: missing after download")
            continue
        size = local.stat().st_size
        if meta.size is not None and size != meta.size:
            problems.append(f"{rel}: {size} bytes, the hub says {meta.size}")
            continue
        if meta.sha256:
            got = sha256_file(local)
            if got != meta.sha256.lower():
                problems.append(f"{rel}: sha256 {got[:16]}… but the hub says {meta.sha256[:16]}…")
        elif meta.git_oid:
            got = git_blob_sha1(local)
            if got != meta.git_oid.lower():
                problems.append(f"{rel}: git blob id {got[:16]}… but the hub says {meta.git_oid[:16]}…")
    return problems


def discard_files(folder: Path, rels: list[str]) -> None:
    """Remove bad downloads (cache pointer *and* blob) so the next pull fetches them again."""
    for rel in rels:
        p = folder / rel
        try:
            if p.is_symlink():
                blob = p.resolve()
                p.unlink()
                if blob.is_file():
                    blob.unlink()
            elif p.exists():
                p.unlink()
                meta = folder / ".cache" / "huggingface" / "download" / f"{rel}.metadata"
                if meta.is_file():
                    meta.unlink()
        except OSError as e:  # pragma: no cover - best effort
            log.warning("could not remove corrupted %s: %s", p, e)


# ------------------------------------------------------------------------------------------ base compatibility
def local_base_shapes(base: Path) -> dict[str, list[int]]:
    shards = sorted(base.glob("*.safetensors"))
    if not shards:
        raise VerificationError(
            f"base folder {base} has no *.safetensors weights, so the adapter's shapes cannot be checked")
    shapes = {}
    for shard in shards:
        for name, info in read_safetensors_header(shard).items():
            shapes[name] = info["shape"]
    return shapes


def hub_base_shapes(base_id: str, *, hub: str = "hf", token: str | None = None) -> dict[str, list[int]] | None:
    """Tensor shapes of a hub model from its safetensors headers (no weights downloaded); None where the hub
    cannot say (no safetensors, or a hub without a header API)."""
    from persona_lora.hubs.backends import backend

    be = backend(hub)
    token = be.token(token)
    with be.errors("read base", base_id, token=token):
        shapes = be.safetensors_shapes(base_id, token)
    if shapes is None:
        log.warning("base %s: no safetensors headers readable on %s; tensor shapes not checked", base_id, be.label)
    return shapes


def _expert_shapes(module: str, base: dict[str, list[int]]) -> list[tuple[int, int, int]]:
    """Fused expert parameter shapes (E, out, in) of `module` (…mlp.experts), from either layout."""
    out = []
    for suffix in ("gate_up_proj", "down_proj"):
        s = base.get(f"{module}.{suffix}")
        if s and len(s) == 3:
            out.append(tuple(s))
    if out:
        return out
    per = {}
    pat = re.compile(re.escape(module) + r"\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
    for name, shape in base.items():
        m = pat.match(name)
        if m:
            per.setdefault(m.group(2), {})[int(m.group(1))] = shape
    if "gate_proj" in per and "up_proj" in per:
        e = len(per["gate_proj"])
        i, h = per["gate_proj"][0]
        out.append((e, 2 * i, h))
    if "down_proj" in per:
        e = len(per["down_proj"])
        h, i = per["down_proj"][0]
        out.append((e, h, i))
    return out


def shape_problems(adapter: dict[str, list[int]], base: dict[str, list[int]]) -> list[str]:
    """Compare every LoRA A/B tensor with the base weight it adapts."""
    pairs: dict[str, dict[str, list[int]]] = {}
    for name, shape in adapter.items():
        m = LORA_KEY.match(name)
        if m:
            pairs.setdefault(m.group(1), {})[m.group(2)] = shape
    problems = []
    for module, parts in sorted(pairs.items()):
        a = parts.get("lora_A") or parts.get("lora_embedding_A")
        b = parts.get("lora_B") or parts.get("lora_embedding_B")
        if a is None or b is None or len(a) != 2 or len(b) != 2:
            problems.append(f"{module}: incomplete LoRA pair in the adapter")
            continue
        plain = re.sub(r"(\.base_layer)+$", "", module)
        weight = base.get(f"{plain}.weight")
        if "lora_embedding_A" in parts:
            if weight is None:
                problems.append(f"{plain}: the base has no embedding {plain}.weight")
            elif a[1] != weight[0] or b[0] != weight[1]:
                problems.append(f"{plain}: adapter embedding is {a[1]}x{b[0]}, the base's is {weight[0]}x{weight[1]}")
            continue
        if weight is not None and len(weight) == 2:
            out_f, in_f = weight
            if a[1] != in_f or b[0] != out_f:
                problems.append(
                    f"{plain}: adapter expects in={a[1]}, out={b[0]}; the base weight {plain}.weight is "
                    f"{out_f}x{in_f} (out x in)")
            elif a[0] != b[1]:
                problems.append(f"{plain}: lora_A rank {a[0]} != lora_B rank {b[1]}")
            continue
        experts = _expert_shapes(plain, base)
        if experts:  # PEFT ParamWrapper on fused experts: A (r*E, in), B (out, r*E)
            if not any(a[1] == i and b[0] == o and a[0] % e == 0 for e, o, i in experts):
                shown = ", ".join(f"{e}x{o}x{i}" for e, o, i in experts)
                problems.append(
                    f"{plain}: adapter expects in={a[1]}, out={b[0]}; the base's experts are {shown} (E x out x in)")
            continue
        problems.append(f"{plain}: the base has no weight for this adapted module (is it the same architecture/size?)")
    return problems


def _listed(problems: list[str]) -> str:
    shown = problems[:MAX_LISTED]
    more = f"\n  - … and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
    return "".join(f"\n  - {p}" for p in shown) + more


def check_base(folder: Path, base: str, *, token: str | None = None, hub: str = "hf") -> None:
    """Raise VerificationError unless the adapter in `folder` was trained for `base` (folder or hub id).

    Local base folder: the manifest's `base_model.config_sha256` must equal sha256(base/config.json), and the
    LoRA shapes must fit the base's safetensors headers. Hub id: the recorded base id (manifest
    `base_model.id`, else adapter_config `base_model_name_or_path`) must equal it, and on the Hugging Face Hub the
    shapes are checked against the remote safetensors headers (ModelScope: ids only).
    """
    folder = Path(folder)
    recorded = read_manifest(folder).base_model if (folder / MANIFEST_NAME).is_file() else BaseModelInfo(id="")
    cfg = read_adapter_config(folder) or {}
    recorded_id = recorded.id or cfg.get("base_model_name_or_path")
    problems: list[str] = []
    base_shapes = None
    local = Path(base).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelLoadError(f"base folder {base} has no config.json; give the base model's folder")
        want = recorded.config_sha256
        have = sha256_file(local / "config.json")
        if want and want != have:
            problems.append(
                f"config.json differs: {base}/config.json has sha256 {have[:12]}…, the adapter was trained on a base "
                f"whose config.json has {want[:12]}… (recorded base: {recorded_id or 'unknown'})")
        elif not want:
            log.warning("%s records no base config_sha256; checking tensor shapes only", MANIFEST_NAME)
        base_shapes = local_base_shapes(local)
    elif is_repo_id(base):
        if recorded_id and recorded_id != base:
            problems.append(f"the adapter was trained on {recorded_id}, not {base}")
        elif not recorded_id:
            log.warning("the adapter records no base model id; checking tensor shapes only")
        if not problems:  # a different base id is decisive; its weights are not worth reading
            base_shapes = hub_base_shapes(base, hub=hub, token=token)
    else:
        raise ModelLoadError(f"--base {base}: no such folder, and it is not a hub id (owner/name)")
    if base_shapes is not None:
        weights = folder / "adapter_model.safetensors"
        if weights.is_file():
            adapter = {n: i["shape"] for n, i in read_safetensors_header(weights).items()}
            problems += shape_problems(adapter, base_shapes)
    if problems:
        raise VerificationError(f"adapter {folder.name} does not match base {base}:{_listed(problems)}")
