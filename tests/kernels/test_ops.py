"""The `bitflux::ternary_linear` torch.library op: registration, fake impl, autograd and compile.

Checked on single layers of awkward shapes (K not a multiple of 4/5/16, N odd, M = 1) against the
dense dequantised weight: the forward to a stated float tolerance, the input gradient
grad_x = grad_y @ (diag(scale) T) (straight through the activation quantiser in int8/fp8 modes).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bitflux import TernaryLinear
from bitflux.config import ActPrecision, Backend, PackFormat
from bitflux.kernels import cpu_int8, ops, resolve_act, select_backend, triton_dispatch

SHAPES = [(1, 7, 5), (3, 33, 17), (9, 100, 61), (2, 161, 70)]  # (M, K, N)
ACTS = [a.value for a in ActPrecision]
# (backend, act, dtype) combinations that backend runs on this machine (Triton: the interpreter).
BACKEND_CASES = [("reference", a, torch.float32) for a in ACTS] + [("reference", "bf16", torch.bfloat16)]
if cpu_int8.supports(torch.zeros(1, 4), PackFormat.TWO_BIT, ActPrecision.INT8):
    BACKEND_CASES += [("cpu", "int8", torch.float32), ("cpu", "int8", torch.bfloat16), ("cpu", "auto", torch.float32)]
if triton_dispatch.supports(torch.zeros(1, 4), PackFormat.TWO_BIT, ActPrecision.BF16):
    BACKEND_CASES += [("triton", "bf16", torch.float32), ("triton", "int8", torch.float32)]


def _layer(k: int, n: int, fmt: str = "2bit", act: str = "bf16", seed: int = 0) -> TernaryLinear:
    torch.manual_seed(seed)
    return TernaryLinear.from_linear(nn.Linear(k, n), fmt=fmt, act=act, init="twn")


def _args(layer: TernaryLinear, x: torch.Tensor, act: str, backend: str = "reference") -> tuple:
    return (x, layer.qweight, layer.scale, layer.bias, layer.fmt.value, layer.in_features, act, backend)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("fmt", ["2bit", "base3"])
def test_opcheck(fmt: str, act: str) -> None:
    """torch's own checks: schema, fake impl vs real, autograd registration, AOT dispatch."""
    layer = _layer(33, 17, fmt)
    x = torch.randn(2, 3, 33, requires_grad=True)
    torch.library.opcheck(torch.ops.bitflux.ternary_linear.default, _args(layer, x, act))
    g = torch.randn(2, 3, 17)
    torch.library.opcheck(torch.ops.bitflux.ternary_linear_grad_input.default, (g, layer.qweight, layer.scale, fmt, 33))


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("fmt", ["2bit", "base3"])
@pytest.mark.parametrize("mkn", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_input_gradient_is_the_dense_transpose(mkn: tuple[int, int, int], fmt: str, act: str) -> None:
    m, k, n = mkn
    layer = _layer(k, n, fmt, act)
    layer.bias.requires_grad_(True)
    x = torch.randn(2, m, k, requires_grad=True)
    y = layer(x)
    assert y.requires_grad and y.shape == (2, m, n)
    g = torch.randn_like(y)
    y.backward(g)
    w = layer.dequantized_weight(torch.float64)  # (N, K)
    want = g.double() @ w
    assert (x.grad.double() - want).abs().max() <= 1e-5 * want.abs().max()
    assert torch.allclose(layer.bias.grad, g.sum((0, 1)), rtol=1e-5, atol=1e-5)
    assert layer.qweight.grad is None and not layer.scale.requires_grad


def test_gradient_chunks_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    layer = _layer(40, 37, "base3")
    g = torch.randn(5, 37)
    whole = torch.ops.bitflux.ternary_linear_grad_input(g, layer.qweight, layer.scale, "base3", 40)
    monkeypatch.setattr(ops, "_GRAD_CHUNK_ELEMS", 40 * 6)  # 6 rows a chunk, the last ragged
    chunked = torch.ops.bitflux.ternary_linear_grad_input(g, layer.qweight, layer.scale, "base3", 40)
    assert torch.allclose(chunked, whole, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend,act,dtype", BACKEND_CASES, ids=lambda c: str(c).replace("torch.", ""))
def test_compiles_fullgraph_equal_to_eager(backend: str, act: str, dtype: torch.dtype) -> None:
    layer = _layer(161, 70, act=act).to(dtype)
    layer.backend = Backend(backend)
    x = torch.randn(2, 5, 161, dtype=dtype)

    def f(inp: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.gelu(layer(inp)) * 2

    torch._dynamo.reset()
    explain = torch._dynamo.explain(f)(x)
    assert explain.graph_break_count == 0 and explain.graph_count == 1
    torch._dynamo.reset()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x), f(x))
    # training through the compiled graph: the op's autograd formula is traced by AOT autograd
    xg = x.clone().requires_grad_(True)
    compiled(xg).sum().backward()
    xe = x.clone().requires_grad_(True)
    f(xe).sum().backward()
    assert torch.equal(xg.grad, xe.grad)


def test_inductor_single_layer() -> None:
    """The default compile backend (inductor) keeps the op opaque and matches eager."""
    layer = _layer(33, 17, act="auto")
    x = torch.randn(4, 33)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True)
    assert torch.equal(compiled(x), layer(x))


def test_auto_resolves_per_device() -> None:
    x = torch.zeros(2, 16)
    want = ActPrecision.INT8 if cpu_int8.supports(x, PackFormat.TWO_BIT, ActPrecision.INT8) else ActPrecision.BF16
    assert resolve_act(x, PackFormat.TWO_BIT, ActPrecision.AUTO) is want
    assert resolve_act(x, PackFormat.TWO_BIT, ActPrecision.FP8) is ActPrecision.FP8  # explicit modes stay
    if want is ActPrecision.INT8:  # the default then takes the int8 CPU kernel, not the reference
        assert select_backend(x, PackFormat.TWO_BIT, ActPrecision.AUTO) is Backend.CPU
    # auto on a device without a fast kernel (meta stands in for one) falls back to bf16
    assert resolve_act(x.to("meta"), PackFormat.TWO_BIT, ActPrecision.AUTO) is ActPrecision.BF16
