"""`training.compile: true`: the decoder layers run under torch.compile, and the time compiling costs is shown.

Why per layer and in place (`nn.Module.compile`): the state dict keeps its names (no `_orig_mod.` prefix), so
checkpoints, resume and the saved adapter are the same files as without compilation; the LoRA layers and the
routed-expert routine are installed first, so what is compiled is what trains. Shapes are compiled as dynamic:
length-grouped batches change the sequence length from step to step, and a static graph would recompile for each.

Compilation is paid on the first steps of every run (there is no cache across runs that we rely on), and on a CPU
inductor writes and builds C++ for each graph, which takes minutes; `CompileTimer` prints the first step's time
beside the median of the later ones, so the user sees what compiling cost and whether the steps got faster.
It is off by default: it does not win the whole command on small runs (see bench/bench_train.py and
bench/bench_wide.py, which measure it with the compile time apart).
"""

from __future__ import annotations

import os
import shutil
import statistics
import time

from persona_lora.errors import UsageError


def decoder_layers(peft_model) -> list:
    """The base model's decoder layers under PEFT's wrappers (`model.model.layers` for the causal LMs we train)."""
    inner = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    layers = getattr(getattr(inner, "model", None), "layers", None)
    if layers is None:
        raise UsageError(f"training.compile: this model ({type(inner).__name__}) has no model.layers to compile; "
                         "set training.compile: false")
    return list(layers)


def check_compiler(device: str) -> None:
    """torch.compile's CPU backend builds C++: refuse before loading anything heavy when there is no compiler."""
    if device.startswith("cuda"):
        return
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None and shutil.which("c++") is None:
        raise UsageError(f"training.compile: true needs a C++ compiler on the CPU (torch.compile builds C++); none "
                         f"found ({cxx!r} or 'c++' on PATH): install one (e.g. g++) or set training.compile: false")


def compile_decoder_layers(peft_model, device: str, backend: str = "inductor") -> int:
    """Compile every decoder layer in place (dynamic shapes); returns how many were compiled. Training uses
    inductor; `backend="eager"` captures the same graphs without generating code (how the tests check, in
    seconds, that our layers trace whole and compute what they compute uncompiled)."""
    if backend == "inductor":
        check_compiler(device)
    layers = decoder_layers(peft_model)
    for layer in layers:
        layer.compile(dynamic=True, backend=backend)
    return len(layers)


def compile_timer_callback(print_fn=print):
    """A TrainerCallback that times each optimizer step and, at the end, prints the first step (which compiles)
    against the median of the later steps."""
    from transformers import TrainerCallback

    class CompileTimer(TrainerCallback):
        def __init__(self):
            self.steps: list[float] = []
            self.started: float | None = None

        def on_step_begin(self, args, state, control, **kw):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if self.started is not None:
                self.steps.append(time.perf_counter() - self.started)

        def on_train_end(self, args, state, control, **kw):
            if state.is_world_process_zero and self.steps:
                print_fn(compile_summary(self.steps))

    return CompileTimer()


def compile_summary(step_seconds: list[float]) -> str:
    """One line: what the first (compiling) step took against the later steps' median."""
    first = step_seconds[0]
    if len(step_seconds) == 1:
        return f"torch.compile: the only step took {first:.1f} s, compiling included"
    rest = statistics.median(step_seconds[1:])
    return (f"torch.compile: first step {first:.1f} s (compiling included), later steps {rest:.2f} s median: about "
            f"{max(first - rest, 0.0):.0f} s spent compiling (shapes not seen before compile again)")
