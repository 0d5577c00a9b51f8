"""The README is executed: every `persona-lora …` line of its code blocks either runs as written on the embedded
default (tiny base, sample data, the local test hub) or is a usage line whose options all exist.

What "as written" allows, and nothing else:
- optional parts in `[…]` are left out (a usage line's own options are checked by the fast test);
- `you/…` (the README's hub user) becomes the test hub's user, `~` the test's home folder;
- commands that train get `--max-steps 2` appended (a short run of the same command);
- `demo` starts the server, prints its start-up line and is closed instead of serving forever.
A line that still holds a placeholder (UPPER_CASE words, `a|b`, `…`) is a usage line. The lines that cannot run
here say why in `CANNOT_RUN_HERE`. A line whose comment says it "refuses" must exit 2 with that refusal.
"""

from __future__ import annotations

import re
import shlex
import shutil

import pytest

from tests.conftest import REPO
from tests.hub_server import DEFAULT_USER

CANNOT_RUN_HERE = {
    "configs/deepseek-coder-v2-lite-huanhuan": "the 16B reference base from the Hub on a GPU",
    "--backend openai": "a serving engine answering at that URL",
}
PLACEHOLDER = re.compile(r"\b[A-Z][A-Z0-9_]*[A-Z0-9]\b|\||…")


def readme_lines() -> list[tuple[str, str]]:
    """(command, comment) of every `persona-lora` line in the README's plain code blocks, continuations joined."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    lines = []
    for lang, body in re.findall(r"```(\w*)\n(.*?)```", text, re.S):
        if lang:
            continue
        for line in re.sub(r"\\\n\s*", " ", body).splitlines():
            line = line.strip()
            if line.startswith("persona-lora "):
                command, _, comment = line.partition(" # ")
                lines.append((command.strip(), comment.strip()))
    return lines


def without_optional_parts(command: str) -> str:
    while True:
        stripped = re.sub(r"\s*\[[^\[\]]*\]", "", command)
        if stripped == command:
            return stripped
        command = stripped


def runnable(command: str) -> list[str] | None:
    """The argv (after `persona-lora`) of a line that runs as written; None for a usage line."""
    command = without_optional_parts(command)
    if PLACEHOLDER.search(command):
        return None
    return shlex.split(command)[1:]


def test_the_readme_has_commands_of_both_kinds():
    lines = readme_lines()
    assert len(lines) > 30
    assert sum(runnable(c) is not None for c, _ in lines) > 20


def test_usage_lines_name_only_options_their_command_has():
    """Every `--option` a README line shows (optional parts included) exists for that command."""
    from persona_lora.cli import build_parser

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # noqa: SLF001 - argparse has no public accessor
    for command, _ in readme_lines():
        words = command.split()[1:]
        sub = commands[words[0]]
        if words[0] == "data":
            sub = sub._subparsers._group_actions[0].choices[words[1]]  # noqa: SLF001
        known = {opt for action in sub._actions for opt in action.option_strings}  # noqa: SLF001
        named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", command))
        assert named <= known, f"{command}: {sorted(named - known)} not options of persona-lora {words[0]}"


@pytest.mark.slow  # builds the tiny base, trains (2 steps each), evaluates, merges, exports, serves the demo
def test_every_runnable_readme_command_runs_as_written(tmp_path, monkeypatch, hub_server, capsys):
    import gradio as gr

    from persona_lora.cli import main

    work = tmp_path / "clone"
    work.mkdir()
    for folder in ("configs", "examples"):
        shutil.copytree(REPO / folder, work / folder)
    home = tmp_path / "home"
    (home / ".local" / "state" / "persona-lora").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    monkeypatch.chdir(work)
    # `demo` launches (port, page, start-up line), then is closed instead of serving until Ctrl-C
    monkeypatch.setattr(gr.Blocks, "block_thread", lambda self: self.close())
    from persona_lora.votes import VoteStore

    VoteStore(home / ".local" / "state" / "persona-lora" / "votes.sqlite")  # what a demo leaves: an empty store

    ran, skipped = [], []
    for command, comment in readme_lines():
        argv = runnable(command)
        if argv is None:
            continue
        reason = next((why for key, why in CANNOT_RUN_HERE.items() if key in command), None)
        if reason:
            skipped.append((command, reason))
            continue
        argv = [str(home) + a[1:] if a.startswith("~") else a.replace("you/", f"{DEFAULT_USER}/", 1)
                for a in argv]
        if argv[0] in ("train",) and not {"--dry-run", "--help-config"} & set(argv):
            argv += ["--max-steps", "2"]
        code = main(argv)
        out, err = capsys.readouterr()
        refusal = "refuses" in comment  # the README says this one is refused: a usage error naming the cause
        shown = f"persona-lora {' '.join(argv)} exited {code}:\n{out[-2000:]}\n{err[-2000:]}"
        assert code == (2 if refusal else 0), shown
        if refusal:
            assert "kv_b_proj" in err, err
        if argv[0] == "demo":  # it served: our own start-up line, which names --share (Gradio's hint names Python)
            assert "demo running on http://127.0.0.1:" in out and "--share" in out and "share=True" not in out + err
        ran.append(command)
    assert len(ran) >= 20 and len(skipped) <= 4, (ran, skipped)
