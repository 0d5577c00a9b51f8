"""The generated files of a Space folder: the card, the requirements, and persona-lora's own wheel.

Why pinned requirements: the Space must run the code that was checked here, on the library versions it was
checked with; a Space built months later from unpinned names would get other transformers and PEFT releases
(whose MoE handling this project depends on). Why a wheel: persona-lora is not on a package index a Space can
reach, so the Space gets the exact package this machine runs, built from its source checkout.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

from persona_lora import __version__
from persona_lora.errors import UsageError
from persona_lora.hub_tools.space.spec import HARDWARE, SpacePlan

log = logging.getLogger(__name__)

TEMPLATES = Path(__file__).resolve().parent / "templates"
APP_FILE = "app.py"
CARD_NAME = "README.md"
REQUIREMENTS = "requirements.txt"
WHEELS_DIR = "wheels"
SPACE_TAGS = ["persona-lora", "lora", "peft", "ab-testing"]
COLORS = ("red", "yellow", "green", "blue", "indigo", "purple", "pink", "gray")


def template_path(name: str) -> Path:
    return TEMPLATES / name


def _version_pin(version: str) -> str:
    """`2.13.0+cpu` -> `2.13.0`: a local build label names a wheel no index has (the Space installs its own)."""
    return version.split("+", 1)[0]


def pinned_requirements() -> list[str]:
    """persona-lora's own dependencies (extras left out), each pinned to the version installed here."""
    lines = []
    for req in metadata.requires("persona-lora") or []:
        if "extra ==" in req:
            continue
        name = re.split(r"[\s<>=!~;\[(]", req, maxsplit=1)[0]
        try:
            lines.append(f"{name}=={_version_pin(metadata.version(name))}")
        except metadata.PackageNotFoundError:
            raise UsageError(f"{name}, which persona-lora needs, is not installed here, so the Space's pins cannot "
                             "be taken from this machine; install persona-lora's dependencies first") from None
    return lines


def requirements_text(wheel_name: str, zerogpu: bool) -> str:
    head = [
        f"# persona-lora {__version__} needs these, pinned to the versions it was checked with.",
        f"# persona-lora itself is shipped as {WHEELS_DIR}/{wheel_name} and installed by app.py when it starts: a",
        "# Space installs this file before the repository's other files are copied in, so the wheel cannot be",
        "# named here. Outside a Space: pip install -r requirements.txt "
        f"{WHEELS_DIR}/{wheel_name}",
    ]
    if zerogpu:
        head.append("# ZeroGPU: the `spaces` package comes with the Space's ZeroGPU runtime.")
    return "\n".join(head + pinned_requirements()) + "\n"


def render_card(plan: SpacePlan):
    """The Space card: front matter checked by `huggingface_hub.SpaceCardData`, body from the template."""
    import gradio
    from huggingface_hub import SpaceCard, SpaceCardData

    s = plan.settings
    extra = {
        "emoji": "🎭", "colorFrom": COLORS[sum(map(ord, plan.repo_id)) % len(COLORS)], "colorTo": "gray",
        "pinned": False, "short_description": plan.short_description, "suggested_hardware": plan.hardware,
    }
    if plan.base_params and plan.base_params > 3_000_000_000:
        extra["startup_duration_timeout"] = "1h"  # downloading and loading a large base takes a while
    data = SpaceCardData(
        title=plan.title, sdk="gradio", sdk_version=gradio.__version__,
        python_version=f"{sys.version_info.major}.{sys.version_info.minor}", app_file=APP_FILE,
        license=plan.license, models=plan.hub_models or None,
        datasets=[s.votes_dataset] if s.votes_dataset else None, tags=SPACE_TAGS, **extra,
    )
    adapters = [{"name": a.repo_id or a.folder.name, "where": a.in_space, "hub": bool(a.repo_id)}
                for a in plan.adapters]
    card = SpaceCard.from_template(
        data, template_path=str(template_path(CARD_NAME)), plan=plan, adapters=adapters,
        base_shown=plan.base if plan.base_folder is None else f"{plan.base_folder.name} (in base/)",
        params=f"{plan.base_params / 1e6:,.1f}M" if plan.base_params else "unknown",
        first_adapter=adapters[0]["name"], version=__version__, wheel=s.wheel,
    )
    check_card(card)
    return card


def check_card(card) -> None:
    """What the Hub would refuse, checked here: the card must parse back as a Space card with these values."""
    from huggingface_hub import SpaceCard


    data = SpaceCard(str(card)).data
    problems = []
    if data.sdk != "gradio" or not data.sdk_version or data.app_file != APP_FILE:
        problems.append("sdk, sdk_version and app_file must be gradio, the installed version and app.py")
    if data.get("suggested_hardware") not in HARDWARE:
        problems.append(f"suggested_hardware {data.get('suggested_hardware')!r} is not a Space hardware flavour")
    if len(data.get("short_description") or "") > 60:
        problems.append("short_description is longer than 60 characters")
    if problems:
        raise UsageError("the Space card would be refused: " + "; ".join(problems))


def source_checkout() -> Path | None:
    """The source folder of the running persona-lora (with pyproject.toml), when it runs from one."""
    import persona_lora

    root = Path(persona_lora.__file__).resolve().parents[1]
    project = root / "pyproject.toml"
    if project.is_file() and 'name = "persona-lora"' in project.read_text(encoding="utf-8"):
        return root
    return None


def _package_dirs(pyproject: Path) -> list[str]:
    """The folders setuptools packs (`[tool.setuptools.package-dir]`), so the copy holds nothing else."""
    text = pyproject.read_text(encoding="utf-8")
    section = text.split("[tool.setuptools.package-dir]", 1)[1].split("\n[", 1)[0]
    return sorted({m.split("/")[0] for m in re.findall(r'=\s*"([^"]+)"', section)})


def build_wheel(out: Path) -> Path:
    """Build persona-lora's wheel from its source checkout into `out` (`pip wheel --no-deps`), from a copy of the
    packaged folders so the checkout gets no build/ folder."""
    root = source_checkout()
    if root is None:
        raise UsageError("persona-lora does not run from a source checkout here, so its wheel cannot be built for "
                         "the Space; build it where the source is (`pip wheel --no-deps .`) and pass --wheel FILE")
    with tempfile.TemporaryDirectory(prefix="persona-lora-wheel-") as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        for name in ("pyproject.toml", "README.md"):
            shutil.copy(root / name, src / name)
        for folder in _package_dirs(root / "pyproject.toml"):
            shutil.copytree(root / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                               "-w", str(Path(tmp) / "dist"), str(src)], capture_output=True, text=True)
        wheels = sorted((Path(tmp) / "dist").glob("persona_lora-*.whl"))
        if done.returncode != 0 or not wheels:
            tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
            raise UsageError("building persona-lora's wheel failed (`pip wheel --no-deps`, which needs setuptools "
                             f"installed): {' / '.join(tail)}; or pass --wheel FILE")
        out.mkdir(parents=True, exist_ok=True)
        return Path(shutil.copy(wheels[0], out / wheels[0].name))
