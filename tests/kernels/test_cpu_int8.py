"""CPU int8 backend: exact integer products, the reference's float result, dispatch and decoding.

The integer path is exact, so it is checked with `torch.equal` against an int64 matmul of the
quantised activations and the codes. The float result is the reference's epilogue applied to the
same integers, so it must match `reference.ternary_linear(..., act=INT8)` to within 1e-6 relative
(observed: bit-identical).
"""

from __future__ import annotations

import pytest
import torch

from bitflux.config import ActPrecision, Backend, PackFormat
from bitflux.kernels import cpu_int8, reference, select_backend
from bitflux.kernels.cpu_int8 import Engine
from bitflux.packing import pack

FORMATS = (PackFormat.TWO_BIT, PackFormat.BASE3)
ENGINE = cpu_int8.default_engine(64)
needs_engine = pytest.mark.skipif(ENGINE is None, reason="no int8 GEMM engine on this CPU")
# Engines that run on any CPU (INT_MM falls back to a slow exact loop without VNNI/AMX).
ENGINES = [e for e in Engine if e is not Engine.ONEDNN or cpu_int8._onednn_ok()]

# (M, K, N): M = 1 / 7 / 65 rows; K not a multiple of 4, 5 or 16; N not a multiple of the block.
SHAPES = [(1, 7, 5), (7, 33, 17), (65, 100, 300), (3, 16, 16), (2, 161, 70), (17, 1, 3), (64, 515, 129)]


def _case(m: int, k: int, n: int, fmt: PackFormat, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8)  # (N, K)
    xq = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)  # (M, K), full int8 range
    return codes, pack(codes, fmt), xq


def _exact(xq: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    return xq.long() @ codes.long().T  # (M, N) int64: the ground truth


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.value)
@pytest.mark.parametrize("engine", ENGINES, ids=lambda e: e.value)
@pytest.mark.parametrize("mkn", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_integer_product_is_exact(mkn: tuple[int, int, int], engine: Engine, fmt: PackFormat) -> None:
    m, k, n = mkn
    codes, qw, xq = _case(m, k, n, fmt)
    # block_rows=16 forces several blocks and a ragged last one even on small N
    got = cpu_int8.int_matmul(xq, qw, fmt=fmt, in_features=k, engine=engine, block_rows=16)
    assert got.shape == (m, n) and got.dtype == torch.float32
    assert torch.equal(got.long(), _exact(xq, codes))


@needs_engine
@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.value)
def test_extreme_values_do_not_saturate(fmt: PackFormat) -> None:
    # All +-127 against all +-1 codes: the largest |sum| per u8*s8 pair and per row.
    k, n = 4099, 40
    codes = torch.ones(n, k, dtype=torch.int8)
    codes[1::2] = -1
    xq = torch.full((3, k), 127, dtype=torch.int8)
    xq[1] = -127
    xq[2, ::2] = -127
    got = cpu_int8.int_matmul(xq, pack(codes, fmt), fmt=fmt, in_features=k)
    assert torch.equal(got.long(), _exact(xq, codes))


@needs_engine
@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.value)
def test_default_blocking_on_a_wide_layer(fmt: PackFormat) -> None:
    # Default block size, several blocks, and the GEMV engine (M = 1) vs the GEMM one (M = 9).
    n, k = 700, 1030
    for m in (1, 9):
        codes, qw, xq = _case(m, k, n, fmt, seed=m)
        got = cpu_int8.int_matmul(xq, qw, fmt=fmt, in_features=k)
        assert torch.equal(got.long(), _exact(xq, codes))


@needs_engine
@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.value)
def test_unaligned_and_empty_inputs(fmt: PackFormat) -> None:
    # qweight as a view at an odd byte offset (as a slice of a larger buffer would be), and M = 0.
    codes, qw, xq = _case(5, 48, 33, fmt, seed=4)
    buf = torch.cat([torch.zeros(1, dtype=torch.uint8), qw.flatten()])
    shifted = buf[1:].view(qw.shape)
    assert shifted.storage_offset() == 1
    got = cpu_int8.int_matmul(xq, shifted, fmt=fmt, in_features=48)
    assert torch.equal(got.long(), _exact(xq, codes))
    empty = cpu_int8.ternary_linear(torch.zeros(0, 48), qw, torch.ones(33), None, fmt=fmt, in_features=48,
                                    act=ActPrecision.INT8)
    assert empty.shape == (0, 33)


@needs_engine
@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.value)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_matches_reference_int8(fmt: PackFormat, dtype: torch.dtype, with_bias: bool) -> None:
    g = torch.Generator().manual_seed(1)
    n, k = 75, 130
    codes = torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8)
    qw = pack(codes, fmt)
    scale = (torch.rand(n, generator=g) * 0.1 + 0.01).to(torch.bfloat16)
    bias = torch.randn(n, generator=g).to(dtype) if with_bias else None
    x = (torch.randn(2, 5, k, generator=g) * 3).to(dtype)  # (..., K) with leading dims
    x[0, 0, 3] = 40.0  # one outlier, so per-token scales differ
    kw = dict(fmt=fmt, in_features=k, act=ActPrecision.INT8)
    got = cpu_int8.ternary_linear(x, qw, scale, bias, **kw)
    ref = reference.ternary_linear(x, qw, scale, bias, **kw)
    assert got.shape == (2, 5, n) and got.dtype == dtype
    # Stated bound: 1e-6 relative to the output's scale (same integers, same epilogue).
    assert (got.float() - ref.float()).abs().max() <= 1e-6 * ref.float().abs().max()


@needs_engine
def test_float_result_tracks_dense_matmul() -> None:
    # Sanity against plain float math: int8 activation rounding is the only error (< 1%).
    g = torch.Generator().manual_seed(2)
    n, k = 64, 512
    codes = torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8)
    scale = torch.rand(n, generator=g).to(torch.bfloat16)
    x = torch.randn(8, k, generator=g)
    got = cpu_int8.ternary_linear(x, pack(codes, PackFormat.TWO_BIT), scale, None, fmt=PackFormat.TWO_BIT,
                                  in_features=k, act=ActPrecision.INT8)
    dense = x @ (codes.float() * scale.float()[:, None]).T
    assert (got - dense).norm() / dense.norm() < 1e-2


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.value)
def test_decoders_match_packing_unpack(fmt: PackFormat) -> None:
    # Decoded U is U = 1 - T (2bit) / 1 + T (base3) in the permuted K order the GEMM uses.
    g = torch.Generator().manual_seed(3)
    k = 80  # a multiple of 16 and of 5
    codes = torch.randint(-1, 2, (6, k), generator=g, dtype=torch.int8)
    qw = pack(codes, fmt)
    if fmt is PackFormat.TWO_BIT:
        u, want = cpu_int8._decode_2bit(qw), cpu_int8._perm_2bit(1 - codes)
    else:
        u, want = cpu_int8._decode_base3(qw), cpu_int8._perm_base3(1 + codes)
    assert u.dtype == torch.uint8 and torch.equal(u.to(torch.int8), want)


def test_engine_available_on_x86_with_onednn() -> None:
    # Guards the skips above: on x86 with oneDNN the engine must come up (its probe is exact).
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64") or not torch.backends.mkldnn.is_available():
        pytest.skip("not an x86 oneDNN build")
    assert cpu_int8._onednn_ok() and cpu_int8.default_engine(64) is Engine.ONEDNN
    assert cpu_int8.default_engine(1) is Engine.FLOAT


def test_supports_only_cpu_int8() -> None:
    x = torch.randn(2, 8)
    ok = ENGINE is not None
    assert cpu_int8.supports(x, PackFormat.TWO_BIT, ActPrecision.INT8) is ok
    assert cpu_int8.supports(x, PackFormat.BASE3, ActPrecision.INT8) is ok
    assert not cpu_int8.supports(x, PackFormat.TWO_BIT, ActPrecision.BF16)
    assert not cpu_int8.supports(x, PackFormat.TWO_BIT, ActPrecision.FP8)
    assert not cpu_int8.supports(torch.randn(2, 8, device="meta"), PackFormat.TWO_BIT, ActPrecision.INT8)
    assert not cpu_int8.supports(torch.zeros(2, 8, dtype=torch.int32), PackFormat.TWO_BIT, ActPrecision.INT8)
    with pytest.raises(ValueError):
        cpu_int8.ternary_linear(x, torch.zeros(3, 2, dtype=torch.uint8), torch.ones(3), None,
                                fmt=PackFormat.TWO_BIT, in_features=8, act=ActPrecision.BF16)


@needs_engine
def test_auto_dispatch_picks_cpu_for_int8() -> None:
    x = torch.randn(3, 8)
    assert select_backend(x, PackFormat.TWO_BIT, ActPrecision.INT8) is Backend.CPU
    assert select_backend(x, PackFormat.BASE3, ActPrecision.INT8) is Backend.CPU
    assert select_backend(x, PackFormat.TWO_BIT, ActPrecision.BF16) is Backend.REFERENCE


@needs_engine
def test_ternary_linear_module_runs_on_cpu_backend() -> None:
    from bitflux.linear import TernaryLinear

    lin = torch.nn.Linear(48, 20).to(torch.bfloat16)
    tl = TernaryLinear.from_linear(lin, fmt=PackFormat.BASE3, act=ActPrecision.INT8)
    x = torch.randn(4, 48).to(torch.bfloat16)
    tl.backend = Backend.CPU
    y = tl(x)
    tl.backend = Backend.REFERENCE
    assert torch.allclose(y.float(), tl(x).float(), rtol=0, atol=1e-6 * tl(x).float().abs().max().item())
