"""Freed host memory kept for reuse during CPU training (`persona_lora.host_memory`).

What must hold: after `keep_freed_memory("cpu")` a loop of "steps" that allocate, write and free large tensors
faults their pages in during the first steps only, not in every step (counted as the process's minor page faults,
not timed); other devices and `PERSONA_LORA_HOST_MALLOC=stock` keep the C library's defaults; and training on the
CPU asks for it.
Each measurement runs in a fresh interpreter, since the thresholds are process-wide.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from persona_lora.host_memory import HOST_MALLOC_ENV, keep_freed_memory
from tests.conftest import REPO

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="the thresholds are glibc's; other C libraries keep their defaults")

STEP_MIB = (40, 10, 64, 20)  # one "step": activations of several sizes, allocated, written, freed
LOOP = """
import resource, sys, torch
from persona_lora.host_memory import keep_freed_memory
print(keep_freed_memory(sys.argv[1]))
for step in range(20):
    if step == 10:  # the first steps grow the heap; count the steady state
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    tensors = [torch.empty(int(mib) << 18).fill_(1.0) for mib in sys.argv[2:]]
    del tensors
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(device: str, **env) -> tuple[str, int]:
    run = subprocess.run([sys.executable, "-c", LOOP, device, *map(str, STEP_MIB)], capture_output=True, text=True,
                         cwd=REPO, env={**os.environ, **env}, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    said, count = run.stdout.strip().splitlines()[-2:]
    return said, int(count)


@pytest.mark.slow
def test_cpu_training_memory_is_faulted_in_once_not_every_step():
    env = {HOST_MALLOC_ENV: ""}
    said, kept = faults("cpu", **env)
    assert "freed memory kept for reuse" in said
    _, stock = faults("cuda", **env)  # another device: the C library's defaults
    step_pages = (sum(STEP_MIB) << 20) // os.sysconf("SC_PAGE_SIZE")
    assert stock >= 3 * step_pages  # 10 steps: most of every step's pages are new mappings, faulted in again
    assert kept <= step_pages // 10  # 10 steps on memory already faulted in
    said, opted_out = faults("cpu", **{HOST_MALLOC_ENV: "stock"})
    assert "stock" in said and opted_out >= 3 * step_pages


def test_only_the_cpu_asks_and_the_opt_out_is_named(monkeypatch):
    assert keep_freed_memory("cuda:0") == "not asked for: training on cuda:0"
    monkeypatch.setenv(HOST_MALLOC_ENV, "stock")
    assert HOST_MALLOC_ENV in keep_freed_memory("cpu")


def test_training_on_the_cpu_asks_for_it(monkeypatch, tiny_base, small_persona_data, tmp_path):
    import persona_lora.train.steps as steps
    from persona_lora.train.config import load_config

    asked = []
    monkeypatch.setattr(steps, "keep_freed_memory", lambda device: asked.append(device) or "")
    cfg = load_config(REPO / "configs" / "tiny.yaml", {"base": {"model": str(tiny_base), "device": "cpu"},
                                                        "data": {"path": str(small_persona_data)},
                                                        "training": {"output_dir": str(tmp_path / "out")}})
    assert steps.set_up(cfg).device == "cpu"
    assert asked == ["cpu"]
