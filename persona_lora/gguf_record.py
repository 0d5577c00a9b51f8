"""The record of a GGUF export (`persona_gguf.json`): what `export --for llama.cpp|ollama` wrote, and where `push`
sent it.

Why a record of its own: three commands meet at a GGUF export. `export` writes it (the file, its quant, the
persona's system prompt, and the sha256 of the adapter weights it was merged from); `push` sends exactly the files
it lists and, once the commit is made, adds where they went; the adapter's card (`card ADAPTER --gguf DIR`) reads
it to write its "Run it locally" section, and uses the adapter sha256 to refuse an export of another adapter. The
record is the one evidence these use: a card advertises a GGUF file only when the record, the file (with the GGUF
magic) and the adapter agree, or a push of it succeeded.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from persona_lora.errors import UsageError, VerificationError

EXPORT_RECORD = "persona_gguf.json"
MODELFILE = "Modelfile"
README = "README.md"
# Where a push puts an export in a repo that already holds the adapter: the adapter's own README (its card) and
# files stay as they are.
ADAPTER_REPO_FOLDER = "gguf"
# The one explanation of why a persona is offered to llama.cpp/Ollama as merged weights only (the adapter card's
# serving table and the export's README both say it with these words).
WHY_MERGED = ("llama.cpp's DeepSeek-V2 graph applies no LoRA to the MLA attention projections (`q_proj`, "
              "`kv_a_proj_with_mqa`, `kv_b_proj`), so a LoRA GGUF (or Ollama's `ADAPTER`) would load without a "
              "warning and not answer as the persona; the merged weights do.")


@dataclass(frozen=True)
class PushedTo:
    """One successful push of the export."""

    hub: str  # hf | modelscope
    repo_id: str  # owner/name, as the hub named it
    folder: str  # "" (the repo root) or "gguf" (beside an adapter)
    revision: str | None
    commit: str | None
    url: str


@dataclass(frozen=True)
class GgufRecord:
    """A GGUF export folder's record, read and checked."""

    folder: Path
    name: str  # the file stem, and the Ollama model name its README uses
    adapter: str  # the adapter's manifest name
    base: str | None
    gguf: str  # the GGUF file name
    quant: str
    target: str  # llama.cpp | ollama
    system_prompt: str | None
    adapter_sha256: str | None  # of the adapter_model.safetensors merged in
    llama_cpp: str = ""  # which llama.cpp converted it
    notes: list[str] = field(default_factory=list)  # what the converter-readable copy rewrote
    files: list[str] = field(default_factory=list)
    pushed: list[PushedTo] = field(default_factory=list)

    @property
    def has_modelfile(self) -> bool:
        return MODELFILE in self.files


def write_record(folder: Path, data: dict) -> None:
    """Write the record atomically (a reader never sees half of it)."""
    tmp = folder / f".{EXPORT_RECORD}.tmp"
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, folder / EXPORT_RECORD)


def _raw(folder: Path) -> dict:
    path = folder / EXPORT_RECORD
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{folder} is not a GGUF export (no {EXPORT_RECORD}); give the --out folder of "
                         "`persona-lora export --for llama.cpp|ollama`") from None
    except (OSError, ValueError) as e:
        raise UsageError(f"{path} cannot be read ({e}); export again") from None
    if not isinstance(data, dict) or not isinstance(data.get("files"), list) or not data.get("gguf"):
        raise UsageError(f"{path} is not a GGUF export record persona-lora wrote (no files or gguf); export again")
    return data


def read_record(folder: str | Path) -> GgufRecord:
    """The record of the export in `folder`; UsageError naming the file and the fix when it is not one."""
    folder = Path(folder).expanduser().resolve()
    data = _raw(folder)
    pushed = [PushedTo(p["hub"], p["repo_id"], p.get("folder", ""), p.get("revision"), p.get("commit"), p["url"])
              for p in data.get("pushed", []) if isinstance(p, dict) and p.get("repo_id") and p.get("url")]
    gguf = str(data["gguf"])
    return GgufRecord(folder=folder, name=str(data.get("name") or gguf.split(".")[0]), adapter=str(data.get("adapter")),
                      base=data.get("base"), gguf=gguf, quant=str(data.get("quant")), target=str(data.get("for")),
                      system_prompt=data.get("system_prompt"), adapter_sha256=data.get("adapter_sha256"),
                      llama_cpp=str(data.get("llama_cpp") or ""),
                      notes=[str(n) for n in data.get("converter_copy", [])],
                      files=sorted(str(f) for f in data["files"]), pushed=pushed)


def add_push(folder: Path, pushed: PushedTo) -> None:
    """Record a successful push in the export's record (a later push to the same place replaces its entry)."""
    data = _raw(folder)
    entries = [p for p in data.get("pushed", []) if not (isinstance(p, dict) and p.get("hub") == pushed.hub
                                                         and p.get("repo_id") == pushed.repo_id
                                                         and p.get("folder", "") == pushed.folder
                                                         and p.get("revision") == pushed.revision)]
    entries.append({"hub": pushed.hub, "repo_id": pushed.repo_id, "folder": pushed.folder,
                    "revision": pushed.revision, "commit": pushed.commit, "url": pushed.url})
    data["pushed"] = entries
    write_record(folder, data)


def is_gguf_export(folder: Path) -> bool:
    """A folder a GGUF export wrote: its record, and no files other than those it lists."""
    try:
        files = set(_raw(folder)["files"])
    except UsageError:
        return False
    return all(p.is_file() and p.name in files for p in folder.iterdir())


def check_gguf_export(folder: Path) -> list[str]:
    """The files of a GGUF export (those its record lists), after checking each is there and each GGUF starts
    with the GGUF magic; VerificationError otherwise."""
    files = sorted(_raw(folder)["files"])
    for name in files:
        path = folder / name
        if not path.is_file():
            raise VerificationError(f"{folder} is an incomplete GGUF export: {name} is missing; export again")
        if name.endswith(".gguf"):
            with path.open("rb") as fh:
                if fh.read(4) != b"GGUF":
                    raise VerificationError(f"{path} is not a GGUF file (no GGUF magic); export again")
    return files
