import pytest
import torch
from torch import nn

import bitflux.kernels.reference as reference
from bitflux import Backend, BitfluxError, TernaryLinear
from bitflux.kernels import select_backend


def _linear(k, n, bias=True, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Linear(k, n, bias=bias).to(dtype)


@pytest.mark.parametrize("fmt", ["2bit", "base3"])
@pytest.mark.parametrize("k,n,m", [(32, 48, 1), (33, 7, 5), (96, 64, 17), (250, 3, 2)])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_linear_holding_dequantised_weight(fmt, k, n, m, bias):
    lin = _linear(k, n, bias)
    tl = TernaryLinear.from_linear(lin, fmt=fmt, init="twn", act="bf16")
    dense = nn.Linear(k, n, bias=bias)
    dense.weight.data = tl.dequantized_weight()
    if bias:
        dense.bias.data = lin.bias.data.clone()
    x = torch.randn(2, m, k)
    # fp32: the reference applies the scale after the matmul instead of to the weight, so the
    # two differ only by float rounding: stated tolerance 1e-5 relative to the output scale.
    y, y_dense = tl(x), dense(x)
    assert y.shape == (2, m, n)
    assert (y - y_dense).abs().max() <= 1e-5 * y_dense.abs().max().clamp_min(1)


def test_bf16_tolerance():
    lin = _linear(128, 64, dtype=torch.bfloat16)
    tl = TernaryLinear.from_linear(lin, act="bf16")
    x = torch.randn(9, 128, dtype=torch.bfloat16)
    y = tl(x)
    y_ref = x.float() @ tl.dequantized_weight().T + lin.bias.float()
    assert y.dtype == torch.bfloat16
    assert ((y.float() - y_ref).abs().max() / y_ref.abs().max()) < 2e-2  # bf16 rounding of x@T


def test_chunked_reference_equals_single_chunk(monkeypatch):
    lin = _linear(40, 37)
    tl = TernaryLinear.from_linear(lin, fmt="base3", act="bf16")
    x = torch.randn(6, 40)
    whole = tl(x)
    monkeypatch.setattr(reference, "_CHUNK_ELEMS", 40 * 5)  # 5 rows at a time, last chunk ragged
    # BLAS may block a 5-row matmul differently from a 37-row one: equal up to fp32 rounding.
    assert torch.allclose(tl(x), whole, rtol=1e-6, atol=1e-6)


def test_int8_activations_exact_integer_sums():
    lin = _linear(64, 24)
    tl = TernaryLinear.from_linear(lin, act="int8")
    x = torch.randn(5, 64)
    xq, xs = reference.quantize_act_int8(x)
    acc = xq.double() @ tl.codes().double().T  # exact integers
    want = (acc * xs.double()[:, None] * tl.scale.double()[None, :] + lin.bias.double()).float()
    assert torch.allclose(tl(x), want, rtol=1e-6, atol=1e-6)
    # and it is an approximation of the bf16-activation result
    tl.act = tl.act.__class__("bf16")
    assert (tl(x) - want).abs().max() < 0.05 * want.abs().max()


def test_fp8_activations_close():
    lin = _linear(64, 24)
    tl = TernaryLinear.from_linear(lin, act="fp8")
    x = torch.randn(5, 64)
    y8 = tl(x)
    tl.act = tl.act.__class__("bf16")
    y = tl(x)
    assert (y8 - y).abs().max() < 0.1 * y.abs().max()


def test_forced_reference_and_unknown_backend():
    tl = TernaryLinear.from_linear(_linear(16, 8), act="bf16")
    x = torch.randn(2, 16)
    assert select_backend(x, tl.fmt, tl.act, Backend.REFERENCE) is Backend.REFERENCE
    tl.backend = Backend.REFERENCE
    assert tl(x).shape == (2, 8)
    # A16 on CPU has no fast backend: AUTO falls back to the reference.
    assert select_backend(x, tl.fmt, tl.act) is Backend.REFERENCE
    with pytest.raises(BitfluxError, match="cannot run"):
        select_backend(x.to(torch.bfloat16), tl.fmt, tl.act, Backend.CPU)


def test_meta_linear_gives_empty_module_of_right_shapes():
    with torch.device("meta"):
        lin = nn.Linear(30, 10)
    tl = TernaryLinear.from_linear(lin, fmt="base3")
    assert tl.qweight.is_meta and tl.qweight.shape == (10, 6) and tl.scale.shape == (10,)
