"""CPU AVX2 backend: exact integer products and a float result bit-identical to the reference.

The integer sums are checked with `torch.equal` against a float64 matmul of the quantised
activations and the codes (exact: |sum| < 2^53). The float result quantises the activations in
C++ and applies the reference's epilogue step by step in fp32, so it must equal
`reference.ternary_linear(..., act=INT8)` bit for bit. Skipped where the kernel cannot be built.
"""

from __future__ import annotations

import pytest
import torch

from bitflux.config import ActPrecision, PackFormat
from bitflux.kernels import cpu_avx2, reference
from bitflux.packing import pack

pytestmark = pytest.mark.skipif(not cpu_avx2.available(), reason="AVX2 kernel not available here")

TWO_BIT = PackFormat.TWO_BIT
M_VALUES = (1, 2, 3, 5, 17, 64, 100)
K_VALUES = (4, 5, 31, 32, 33, 63, 64, 100, 257, 1000, 3072)
N_VALUES = (1, 3, 7, 16, 33, 100)


def _exact(xq: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    return (xq.double() @ codes.double().T).long()  # (M, N): exact in float64


def _codes(n: int, k: int, g: torch.Generator) -> torch.Tensor:
    codes = torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8)
    if n >= 4:  # special rows: all zero, all +1, all -1
        codes[0], codes[1], codes[2] = 0, 1, -1
    return codes


@pytest.mark.parametrize("m", M_VALUES)
def test_integer_product_is_exact(m: int) -> None:
    g = torch.Generator().manual_seed(m)
    for k in K_VALUES:
        xq = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
        xq[0, 0] = -127
        for n in N_VALUES:
            codes = _codes(n, k, g)
            got = cpu_avx2.int_matmul_2bit(xq, pack(codes, TWO_BIT), k)
            assert got.dtype == torch.int32 and got.shape == (m, n)
            assert torch.equal(got.long(), _exact(xq, codes)), (m, k, n)


@pytest.mark.parametrize("k", [3072, 12288, 4099])
def test_extreme_values_do_not_overflow(k: int) -> None:
    # All +-127 against all +-1 codes: the largest |pair sum| and |row sum| the int16 steps see.
    n = 14
    codes = torch.ones(n, k, dtype=torch.int8)
    codes[1::2] = -1
    codes[5, ::2] = -1
    codes[6] = 0
    xq = torch.full((5, k), 127, dtype=torch.int8)
    xq[1] = -127
    xq[2, ::2] = -127
    xq[3, 1::2] = -127
    xq[4] = torch.randint(-127, 128, (k,), dtype=torch.int8)
    got = cpu_avx2.int_matmul_2bit(xq, pack(codes, TWO_BIT), k)
    assert torch.equal(got.long(), _exact(xq, codes))


def test_unaligned_strided_and_padded_inputs() -> None:
    g = torch.Generator().manual_seed(4)
    m, k, n = 6, 301, 29
    codes = _codes(n, k, g)
    qw = pack(codes, TWO_BIT)
    buf = torch.cat([torch.zeros(1, dtype=torch.uint8), qw.flatten()])
    shifted = buf[1:].view(qw.shape)  # a view at an odd byte offset
    xq_wide = torch.randint(-127, 128, (m, k + 9), generator=g, dtype=torch.int8)
    xq = xq_wide[:, 3 : 3 + k]  # a row-strided view
    want = _exact(xq, codes)
    assert torch.equal(cpu_avx2.int_matmul_2bit(xq, shifted, k).long(), want)
    # a row slice of a wider packed buffer (row stride > bytes per row)
    wide = torch.cat([qw, torch.full((n, 5), 0x55, dtype=torch.uint8)], dim=1)
    assert torch.equal(cpu_avx2.int_matmul_2bit(xq, wide[:, : qw.shape[1]], k).long(), want)
    # more packed columns than K needs: the extra codes are ignored
    assert torch.equal(cpu_avx2.int_matmul_2bit(xq, wide, k).long(), want)
    # the invalid field 0b11 decodes as 0, like `packing.unpack`
    bad = qw.clone()
    bad[:, 0] |= 0x03
    codes_bad = codes.clone()
    codes_bad[:, 0] = 0
    assert torch.equal(cpu_avx2.int_matmul_2bit(xq, bad, k).long(), _exact(xq, codes_bad))


def test_many_row_blocks() -> None:
    # M beyond one activation block (256 rows) and N not a multiple of the 12-row panel.
    g = torch.Generator().manual_seed(5)
    m, k, n = 300, 1100, 50
    codes = _codes(n, k, g)
    xq = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
    assert torch.equal(cpu_avx2.int_matmul_2bit(xq, pack(codes, TWO_BIT), k).long(), _exact(xq, codes))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("mkn", [(10, 130, 75), (300, 257, 50), (3, 3072, 40), (1, 5, 1)], ids=str)
def test_matches_reference_bit_for_bit(mkn: tuple[int, int, int], dtype: torch.dtype, with_bias: bool) -> None:
    m, k, n = mkn
    g = torch.Generator().manual_seed(m + k + n)
    codes = _codes(n, k, g)
    qw = pack(codes, TWO_BIT)
    scale = (torch.rand(n, generator=g) * 0.1 + 0.01).to(torch.bfloat16)
    bias = torch.randn(n, generator=g).to(dtype) if with_bias else None
    x = (torch.randn(2, m, k, generator=g) * 3).to(dtype)  # leading batch dim
    x[0, 0, min(3, k - 1)] = 40.0  # an outlier, so per-token scales differ
    if m > 1:
        x[1, 1] = 0.0  # an all-zero token (scale clamps to 1e-8 / 127)
    kw = dict(fmt=TWO_BIT, in_features=k, act=ActPrecision.INT8)
    got = cpu_avx2.ternary_linear(x, qw, scale, bias, **kw)
    ref = reference.ternary_linear(x, qw, scale, bias, **kw)
    assert got.shape == (2, m, n) and got.dtype == dtype
    assert torch.equal(got, ref)


def test_empty_and_strided_float_inputs() -> None:
    g = torch.Generator().manual_seed(6)
    k, n = 48, 33
    qw = pack(_codes(n, k, g), TWO_BIT)
    scale = torch.rand(n, generator=g)
    kw = dict(fmt=TWO_BIT, in_features=k, act=ActPrecision.INT8)
    empty = cpu_avx2.ternary_linear(torch.zeros(0, 4, k), qw, scale, None, **kw)
    assert empty.shape == (0, 4, n)
    x = torch.randn(k, 7, generator=g).T  # (7, K) with column stride != 1
    assert torch.equal(cpu_avx2.ternary_linear(x, qw, scale, None, **kw),
                       reference.ternary_linear(x, qw, scale, None, **kw))


def test_supports_and_rejects() -> None:
    x = torch.randn(2, 8)
    assert cpu_avx2.supports(x, TWO_BIT, ActPrecision.INT8)
    assert not cpu_avx2.supports(x, PackFormat.BASE3, ActPrecision.INT8)
    assert not cpu_avx2.supports(x, TWO_BIT, ActPrecision.BF16)
    assert not cpu_avx2.supports(torch.randn(2, 8, device="meta"), TWO_BIT, ActPrecision.INT8)
    assert not cpu_avx2.supports(torch.zeros(2, 8, dtype=torch.int32), TWO_BIT, ActPrecision.INT8)
    qw = torch.zeros(3, 2, dtype=torch.uint8)
    with pytest.raises(ValueError):
        cpu_avx2.ternary_linear(x, qw, torch.ones(3), None, fmt=TWO_BIT, in_features=8, act=ActPrecision.BF16)
    with pytest.raises(ValueError):
        cpu_avx2.ternary_linear(x, qw, torch.ones(3), None, fmt=PackFormat.BASE3, in_features=8,
                                act=ActPrecision.INT8)
