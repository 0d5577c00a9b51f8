"""`training.compile`: the decoder layers under torch.compile compute what they compute uncompiled, keep their
state-dict names, and a run without a C++ compiler is refused before anything loads.

The graphs are captured with dynamo's `eager` backend here: it traces the same layers (LoRA, the routed-expert
routine, MLA attention) without inductor's C++ build, which takes minutes per graph on a CPU; inductor itself is
measured by bench/bench_train.py and bench/bench_wide.py."""

from __future__ import annotations

import pytest
import torch

from persona_lora.errors import UsageError
from persona_lora.train.compiled_layers import check_compiler, compile_decoder_layers, compile_summary, decoder_layers
from persona_lora.train.config import config_from_dict
from tests.test_expert_lora import adapted_model, rel, run


@pytest.mark.slow
def test_compiled_layers_train_like_uncompiled(tiny_base):
    torch._dynamo.reset()
    want_logits, want_emb, want_grads = run(adapted_model(tiny_base))
    model = adapted_model(tiny_base)
    keys = list(model.state_dict())
    assert compile_decoder_layers(model, "cpu", backend="eager") == len(decoder_layers(model)) > 1
    assert list(model.state_dict()) == keys  # checkpoints and the saved adapter keep their names
    assert all(layer._compiled_call_impl is not None for layer in decoder_layers(model))
    got_logits, got_emb, got_grads = run(model)
    assert rel(got_logits, want_logits) < 1e-5 and rel(got_emb, want_emb) < 1e-5
    assert got_grads.keys() == want_grads.keys() and any("experts" in n for n in got_grads)
    assert max(rel(got_grads[n], want_grads[n]) for n in want_grads) < 1e-5
    # a new sequence length runs on the dynamic graph, not a failure
    ids = torch.randint(3, 4000, (2, 17), generator=torch.Generator().manual_seed(3))
    assert torch.isfinite(run(model, ids)[0]).all()
    torch._dynamo.reset()


def test_no_cpp_compiler_is_refused_naming_the_fix(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler")
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(UsageError, match=r"needs a C\+\+ compiler.*training.compile: false"):
        check_compiler("cpu")
    check_compiler("cuda")  # GPU graphs are built by triton, not a host C++ compiler


def test_the_compile_line_shows_what_compiling_cost():
    assert compile_summary([40.0, 1.0, 1.2, 0.9]) == (
        "torch.compile: first step 40.0 s (compiling included), later steps 1.00 s median: about 39 s spent "
        "compiling (shapes not seen before compile again)")
    assert compile_summary([5.0]) == "torch.compile: the only step took 5.0 s, compiling included"


def test_compile_is_off_by_default_and_a_config_key():
    base = {"base": {"model": "x"}, "data": {"path": "d.json"}, "training": {"output_dir": "o"}}
    assert config_from_dict(base).training.compile is False
    assert config_from_dict({**base, "training": {"output_dir": "o", "compile": True}}).training.compile is True
