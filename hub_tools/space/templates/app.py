"""A persona-lora Space: the A/B demo of `persona-lora demo`, started from this folder's persona_space.json.

Written by `persona-lora space`. There is no UI code here: `persona_lora.hub_tools.space.app.serve` builds the
same app `persona-lora demo` serves (chat side by side, blind A/B votes, the `compare` API) from the settings.
persona-lora is not on a package index a Space can reach, so its wheel is shipped in wheels/ and installed here
when the installed persona-lora is missing or another version.
"""

import importlib
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def ensure_persona_lora(settings: dict) -> None:
    try:
        import persona_lora

        if persona_lora.__version__ == settings.get("persona_lora_version"):
            return
    except ImportError:
        pass
    wheel = HERE / settings["wheel"]
    print(f"installing {wheel.name}", file=sys.stderr)
    subprocess.check_call([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--force-reinstall",
                           str(wheel)])
    for name in [m for m in sys.modules if m == "persona_lora" or m.startswith("persona_lora.")]:
        del sys.modules[name]
    importlib.invalidate_caches()


if __name__ == "__main__":
    settings = json.loads((HERE / "persona_space.json").read_text(encoding="utf-8"))
    if settings.get("zerogpu"):
        try:  # ZeroGPU: `spaces` must come before torch touches CUDA; absent off ZeroGPU, which is fine
            import spaces  # noqa: F401
        except ImportError:
            pass
    ensure_persona_lora(settings)
    from persona_lora.hub_tools.space.app import serve

    sys.exit(serve(HERE))
