"""The adapter card's "Run it locally" section: how to chat with the persona in Ollama or llama.cpp, from a GGUF
export that exists (`card ADAPTER --gguf DIR`) or was pushed (`push DIR REPO`).

Why only from a record: a card must not advertise a file that is not there, so the section is written from the
export's record (`persona_lora.gguf_record`) after checking the files and the GGUF magic, and that the export was
merged from this very adapter (the sha256 of its weights). Where the file lives comes from the record too: a push
adds the repo and folder it went to; an export that was never pushed is named by its folder name only (a card is
published, a local path is private). The section sits between two markers, so that pushing an export into the
adapter's own repo can rewrite this section of the card already there without touching the rest of it.

Why a LoRA GGUF is not offered is said once, in the card's serving table (`gguf_record.WHY_MERGED`).
"""

from __future__ import annotations

import shlex
from pathlib import Path

from persona_lora.artifact import ADAPTER_WEIGHTS
from persona_lora.errors import UsageError
from persona_lora.gguf_record import (
    ADAPTER_REPO_FOLDER,
    MODELFILE,
    GgufRecord,
    PushedTo,
    check_gguf_export,
    read_record,
)
from persona_lora.model_cards.markdown import code, esc

START = "<!-- persona-lora:run-locally-start -->"
END = "<!-- persona-lora:run-locally-end -->"


def card_decoding() -> dict[str, float | int]:
    """The decoding the adapter's card shows (greedy, its snippet's length), as llama.cpp/Ollama parameters."""
    from persona_lora.model_cards.snippet import SNIPPET_MAX_NEW_TOKENS

    return {"temperature": 0, "num_predict": SNIPPET_MAX_NEW_TOKENS}


def run_commands(r: GgufRecord) -> list[str]:
    """Shell lines that chat with the export as the card does (greedy), run in the folder holding the GGUF: the
    Ollama lines first when the export has a Modelfile, then llama-cli and llama-server. llama-cli chats by
    itself (llama.cpp's `-cnv` belongs to llama-completion now, and llama-cli refuses it); both apply the GGUF's
    chat template, the one the persona was trained with."""
    decoding = card_decoding()
    system = ["-sys", r.system_prompt] if r.system_prompt else []
    cli = ["llama-cli", "-m", r.gguf, *system, "--temp", str(decoding["temperature"]),
           "-n", str(decoding["num_predict"])]
    server = ["llama-server", "-m", r.gguf, "--jinja", "--temp", str(decoding["temperature"])]
    lines = [shlex.join(cli), shlex.join(server)]
    if r.has_modelfile:
        lines = [f"ollama create {r.name} -f {MODELFILE}", f"ollama run {r.name}", *lines]
    return lines


def fetch_commands(r: GgufRecord, where: PushedTo | None) -> list[str]:
    """The lines that bring the export's files into a folder and enter it: a download from the hub it was pushed
    to, or (never pushed) the export folder itself."""
    if where is None:
        return [f"cd {shlex.quote(r.folder.name)}"]
    local = f"{r.name}-gguf"
    only = [f"{ADAPTER_REPO_FOLDER}/*"] if where.folder else []
    if where.hub == "modelscope":
        cmd = ["modelscope", "download", "--model", where.repo_id, *(["--include", *only] if only else []),
               "--local_dir", local]
    else:
        cmd = ["hf", "download", where.repo_id, *(["--include", *only] if only else []), "--local-dir", local]
        if where.revision:
            cmd[3:3] = ["--revision", where.revision]
    return [shlex.join(cmd), f"cd {shlex.quote(local + ('/' + where.folder if where.folder else ''))}"]


def adapter_exports(adapter: Path, dirs: list[Path]) -> list[GgufRecord]:
    """The GGUF exports in `dirs` (`card --gguf`), each checked: complete, GGUF magic, and merged from the weights
    in `adapter`. UsageError/VerificationError naming the folder otherwise."""
    from persona_lora.hashing import sha256_file

    weights = adapter / ADAPTER_WEIGHTS
    want = sha256_file(weights) if weights.is_file() else None
    records = []
    for d in dirs:
        record = read_record(d)
        check_gguf_export(record.folder)
        if want is None or record.adapter_sha256 != want:
            raise UsageError(f"--gguf {d}: that export was not made from {adapter}'s {ADAPTER_WEIGHTS} (its record "
                             f"says adapter {record.adapter!r}, weights sha256 {record.adapter_sha256}); give the "
                             "export of this adapter, or export it again")
        records.append(record)
    return records


def _where(r: GgufRecord, p: PushedTo | None) -> str:
    if p is None:
        return (f"in the export folder {code(r.folder.name)} that `persona-lora export` wrote (not uploaded: "
                "`persona-lora push` sends it to a hub)")
    place = f" (folder {code(p.folder + '/')})" if p.folder else ""
    hub = "ModelScope" if p.hub == "modelscope" else "the Hugging Face Hub"
    return f"on {hub}: [{esc(p.repo_id)}]({p.url}){place}"


def render_run_locally(records: list[GgufRecord]) -> str:
    """The section's markdown (no markers); "" when there is no export."""
    if not records:
        return ""
    parts = ["## Run it locally", "",
             "This adapter merged into its base and converted to GGUF by llama.cpp's own converter (`persona-lora "
             "export`), for llama.cpp, Ollama or LM Studio. It is the merged model, not a LoRA GGUF (the "
             "llama.cpp / Ollama row of the serving table says why). The file carries the chat template the persona "
             "was trained with; the commands below add its system prompt and decode greedily, like the snippet "
             "above.", ""]
    for r in records:
        where = r.pushed[-1] if r.pushed else None
        others = r.pushed[:-1]
        parts += [f"### {code(r.gguf)} ({esc(r.quant)})", "", f"The file is {_where(r, where)}."]
        if others:
            parts += ["Also " + "; ".join(_where(r, p) for p in others) + "."]
        parts += [""]
        fetch = fetch_commands(r, where)
        cmds = run_commands(r)
        if r.has_modelfile:
            parts += [f"Ollama (the `{MODELFILE}` renders the training prompt exactly and sets the system prompt):",
                      "", "```sh", *fetch, *cmds[:2], "```", ""]
            cmds = cmds[2:]
        parts += ["llama.cpp (`llama-cli` chats in the terminal; `llama-server` serves an OpenAI-compatible API, "
                  "send the system prompt as the first message):", "", "```sh", *fetch, *cmds, "```", ""]
    return "\n".join(parts)


def with_section(readme: str, section: str) -> str | None:
    """`readme` with the text between its run-it-locally markers replaced by `section`; None when it has no
    markers (a card from before the section existed, or one a person wrote): the caller leaves it alone."""
    start = readme.find(START)
    end = readme.find(END, start + len(START)) if start >= 0 else -1
    if start < 0 or end < 0:
        return None
    body = "\n" + section.strip() + "\n\n" if section.strip() else "\n"  # as the card template lays it out
    return readme[: start + len(START)] + body + readme[end:]
