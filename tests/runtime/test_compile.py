"""torch.compile of the bundled toy: 0 graph breaks, outputs equal eager, training flows through.

Every activation mode on the auto-selected backend, and the reference backend, are compiled with
`fullgraph=True` on the "aot_eager" backend (inductor's C++ codegen takes minutes on the toy on
2 cores; the op-level inductor test is in tests/kernels/test_ops.py). aot_eager runs the same
kernels as eager, so outputs are compared with `torch.equal`.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters
from toy_model import load_toy, toy_inputs

import bitflux

MODES = ["auto", "bf16", "int8", "fp8"]


def _eager(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


@pytest.mark.parametrize("mode", ["auto", "bf16"])  # every mode compiles per block below (cheaper)
def test_fullgraph_compile_equals_eager(mode: str) -> None:
    """fullgraph=True raises on any graph break, so passing means 0 breaks."""
    model = load_toy(mode)
    inputs = toy_inputs(model)
    want = _eager(model, inputs)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        got = compiled(**inputs, return_dict=False)[0]
    assert torch.isfinite(got).all() and torch.equal(got, want)


def test_compile_without_fullgraph_is_not_nan() -> None:
    """The reported bug: int8 + torch.compile (no fullgraph, eager backend) gave NaN silently."""
    model = load_toy("int8")
    inputs = toy_inputs(model)
    want = _eager(model, inputs)
    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(model, backend="eager")(**inputs, return_dict=False)[0]
    assert torch.equal(got, want)


@pytest.mark.parametrize("mode,backend", [(m, "auto") for m in MODES] + [("int8", "reference")])
def test_compile_repeated_blocks(mode: str, backend: str) -> None:
    model = load_toy(mode)
    bitflux.set_backend(model, backend)
    inputs = toy_inputs(model)
    want = _eager(model, inputs)
    torch._dynamo.reset()
    counters.clear()
    model.compile_repeated_blocks(fullgraph=True, backend="aot_eager")
    got = _eager(model, inputs)
    assert torch.equal(got, want)
    assert not counters["graph_break"]  # fullgraph would raise; a break anywhere is counted here
    assert counters["stats"]["unique_graphs"] >= 2  # both block classes compiled


@pytest.mark.parametrize("mode", MODES)
def test_training_upstream_of_ternary_layers(mode: str) -> None:
    """A trainable layer before the ternary blocks (context_embedder) gets the true gradient."""
    model = load_toy(mode)
    model.requires_grad_(False)
    model.context_embedder.weight.requires_grad_(True)
    inputs = toy_inputs(model)
    out = model(**inputs, return_dict=False)[0]
    assert out.requires_grad
    out.square().mean().backward()
    g = model.context_embedder.weight.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
    if mode != "auto":
        return
    # the same gradient through the compiled blocks (once: each compile costs seconds here)
    grad_eager = g.clone()
    model.context_embedder.weight.grad = None
    torch._dynamo.reset()
    model.compile_repeated_blocks(fullgraph=True, backend="aot_eager")
    model(**inputs, return_dict=False)[0].square().mean().backward()
    assert torch.allclose(model.context_embedder.weight.grad, grad_eager, rtol=1e-5, atol=1e-7)
