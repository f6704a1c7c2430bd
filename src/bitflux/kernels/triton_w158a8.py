"""W1.58A8 in Triton: per-token dynamic 8-bit activations x packed 2-bit ternary weights.

Contract (the reference's numerics, `reference.quantize_act_int8` / `quantize_act_fp8`):
    xscale[m] = max(max_k |x[m, k]|, 1e-8) / QMAX          (QMAX = 127 int8, 448 fp8 e4m3)
    xq[m, k]  = int8: clamp(round_half_even(x / xscale), +-127);  fp8: e4m3(clamp(x / xscale, +-448))
    y (M, N)  = (xq @ T^T) * (xscale[:, None] * scale[None, :]) + bias[None, :]
int8 dots accumulate in int32 (exact); fp8 dots accumulate in fp32. Divisions use `div_rn` (IEEE
round-to-nearest; Triton's plain `/` may be approximate on GPU) so xq equals torch's bit for bit.

Weights are read from the stored `2bit` layout exactly as in `triton_w158a16` (byte k // 4
loaded per code row, shifted by 2 * (k % 4)), decoded to int8 or fp8 (both exact for -1, 0, 1).

Two ways to get xq, chosen by `A8Config.fuse_quant` (measure on the GPU which wins per shape):
* separate (default): `_quant_rows_kernel`, one program per token, reads x twice (row absmax,
  then quantise) and writes xq (M, K) 8-bit + xscale (M,) fp32; the GEMM then reads 1 byte per
  activation instead of 2. Costs one extra launch and an M*K byte round trip through memory.
* fused: the GEMM program computes the absmax of its BLOCK_M rows in a prologue pass over K and
  quantises each x tile in registers before the dot. No launch, no xq buffer, but every N-tile
  re-reads its rows of x in 16 bits twice; it pays off when N spans few tiles (small N, or M
  so small that the launch dominates).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .triton_common import decode_2bit, grouped_tile

INT8_MAX = 127.0
FP8_MAX = 448.0  # largest finite float8_e4m3fn


@dataclass(frozen=True)
class A8Config:
    """One launch configuration of the W1.58A8 GEMM (8-bit dots need BLOCK_K >= 32)."""

    block_m: int
    block_n: int
    block_k: int  # multiple of 4 and >= 32
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3
    fuse_quant: bool = False  # quantise activations inside the GEMM instead of a separate pass
    quant_block: int = 1024  # K elements per step of the separate row-quantisation kernel


# Safe defaults by M bucket: (largest M the entry serves, config); the last entry serves the rest.
DEFAULT_CONFIGS: tuple[tuple[int, A8Config], ...] = (
    (16, A8Config(16, 64, 256, group_m=1, num_warps=4, num_stages=4)),
    (128, A8Config(64, 128, 128, num_warps=4, num_stages=3)),
    (1 << 62, A8Config(128, 128, 128, num_warps=8, num_stages=3)),
)

# What a GPU tuning run sweeps (bench/gpu.py --tune); winners go into DEFAULT_CONFIGS by hand.
AUTOTUNE_SPACE: tuple[A8Config, ...] = tuple(
    A8Config(bm, bn, bk, num_warps=w, num_stages=s, fuse_quant=fq)
    for fq in (False, True)
    for bm, bn, bk, w, s in (
        (16, 64, 256, 4, 4),
        (16, 128, 128, 4, 4),
        (64, 128, 128, 4, 3),
        (128, 128, 128, 8, 3),
        (128, 256, 128, 8, 3),
        (256, 128, 128, 8, 3),
    )
)


def pick_config(m: int, n: int, k: int) -> A8Config:
    """The default config for an (M, N, K) problem."""
    return next(c for bound, c in DEFAULT_CONFIGS if m <= bound)


@triton.jit
def _round_half_even(v):
    """torch.round semantics (ties to even), exact for |v| < 2^22, with no libdevice call."""
    f = tl.floor(v)
    d = v - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    return tl.where(d > 0.5, f + 1.0, tl.where(d < 0.5, f, tl.where(odd, f + 1.0, f)))


@triton.jit
def _quantize(v, xs, IS_FP8: tl.constexpr):
    """x tile (fp32) / per-row scale -> 8-bit codes, exactly as the torch reference."""
    q = tl.math.div_rn(v, xs)
    if IS_FP8:
        return tl.clamp(q, -448.0, 448.0).to(tl.float8e4nv)
    return tl.clamp(_round_half_even(q), -127.0, 127.0).to(tl.int8)


@triton.jit
def _quant_rows_kernel(
    x_ptr,  # (M, K) float
    xq_ptr,  # (M, K) int8 or float8_e4m3fn, contiguous
    xs_ptr,  # (M,) fp32
    K,
    stride_xm,
    stride_xk,
    QMAX: tl.constexpr,
    IS_FP8: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    amax = tl.zeros((BLOCK,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        v = tl.load(x_ptr + row * stride_xm + (k0 + offs) * stride_xk, mask=k0 + offs < K, other=0.0)
        amax = tl.maximum(amax, tl.abs(v.to(tl.float32)))
    xs = tl.math.div_rn(tl.maximum(tl.max(amax, axis=0), 1e-8), QMAX)
    tl.store(xs_ptr + row, xs)
    for k0 in range(0, K, BLOCK):
        v = tl.load(x_ptr + row * stride_xm + (k0 + offs) * stride_xk, mask=k0 + offs < K, other=0.0)
        tl.store(xq_ptr + row * K + k0 + offs, _quantize(v.to(tl.float32), xs, IS_FP8), mask=k0 + offs < K)


@triton.jit
def _w158a8_kernel(
    x_ptr,  # FUSE_QUANT: (M, K) float activations; else (M, K) 8-bit codes
    xs_ptr,  # (M,) fp32 activation scales (unused when FUSE_QUANT)
    w_ptr,  # (N, KP) uint8, 2bit codes
    scale_ptr,  # (N,) per-channel scale
    bias_ptr,  # (N,) or a dummy when HAS_BIAS is False
    y_ptr,  # (M, N) output
    M,
    N,
    K,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_ym,
    HAS_BIAS: tl.constexpr,
    IS_FP8: tl.constexpr,
    FUSE_QUANT: tl.constexpr,
    QMAX: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_m, pid_n = grouped_tile(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    offs_k = tl.arange(0, BLOCK_K)  # (BK,)
    shift = ((offs_k % 4) * 2).to(tl.uint8)[:, None]  # (BK, 1)
    m_ok = offs_m[:, None] < M
    n_ok = offs_n[None, :] < N
    x_rows = x_ptr + offs_m[:, None] * stride_xm  # (BM, 1)

    if FUSE_QUANT:  # prologue: per-row absmax of this program's rows
        amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + offs_k
            v = tl.load(x_rows + kk[None, :] * stride_xk, mask=m_ok & (kk[None, :] < K), other=0.0)
            amax = tl.maximum(amax, tl.max(tl.abs(v.to(tl.float32)), axis=1))
        xs = tl.math.div_rn(tl.maximum(amax, 1e-8), QMAX)  # (BM,)
    else:
        xs = tl.load(xs_ptr + offs_m, mask=offs_m < M, other=0.0)  # (BM,)

    if IS_FP8:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k  # (BK,)
        k_ok = kk < K
        a = tl.load(x_rows + kk[None, :] * stride_xk, mask=m_ok & k_ok[None, :], other=0.0)  # (BM, BK)
        if FUSE_QUANT:
            a = _quantize(a.to(tl.float32), xs[:, None], IS_FP8)
        packed = tl.load(
            w_ptr + offs_n[None, :] * stride_wn + (kk // 4)[:, None],
            mask=k_ok[:, None] & n_ok,
            other=0,
        )  # (BK, BN) uint8
        t = decode_2bit(packed, shift)  # (BK, BN) in {-1, 0, 1}
        if IS_FP8:
            acc = tl.dot(a, t.to(tl.float16).to(tl.float8e4nv), acc, out_dtype=tl.float32)
        else:
            acc = tl.dot(a, t, acc, out_dtype=tl.int32)

    scale = tl.load(scale_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)  # (BN,)
    y = acc.to(tl.float32) * (xs[:, None] * scale[None, :])
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], y.to(y_ptr.dtype.element_ty), mask=m_ok & n_ok)


def quantize_rows(x: torch.Tensor, fp8: bool, block: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric 8-bit: x (M, K) -> (xq (M, K) int8 / float8_e4m3fn, xscale (M,) fp32)."""
    m, k = x.shape
    xq = torch.empty((m, k), dtype=torch.float8_e4m3fn if fp8 else torch.int8, device=x.device)
    xs = torch.empty((m,), dtype=torch.float32, device=x.device)
    if m:
        _quant_rows_kernel[(m,)](
            x, xq, xs, k, x.stride(0), x.stride(1),
            QMAX=FP8_MAX if fp8 else INT8_MAX, IS_FP8=fp8, BLOCK=min(block, triton.next_power_of_2(k)),
        )
    return xq, xs


def w158a8_gemm(
    a: torch.Tensor,
    xscale: torch.Tensor | None,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    *,
    fp8: bool,
    config: A8Config,
) -> torch.Tensor:
    """The GEMM launch. With `config.fuse_quant`, `a` is the float x (M, K) and `xscale` is None;
    otherwise `a` is the pre-quantised xq (M, K) (int8 / float8_e4m3fn) with its xscale (M,)."""
    m, k = a.shape
    n = qweight.shape[0]
    assert qweight.dtype == torch.uint8 and qweight.shape[1] == triton.cdiv(k, 4) and qweight.stride(1) == 1
    assert config.block_k % 4 == 0 and config.block_k >= 32
    assert config.fuse_quant == (xscale is None)
    y = torch.empty((m, n), dtype=out_dtype, device=a.device)
    grid = (triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n),)
    _w158a8_kernel[grid](
        a,
        xscale if xscale is not None else scale,
        qweight,
        scale,
        bias if bias is not None else scale,
        y,
        m,
        n,
        k,
        a.stride(0),
        a.stride(1),
        qweight.stride(0),
        y.stride(0),
        HAS_BIAS=bias is not None,
        IS_FP8=fp8,
        FUSE_QUANT=config.fuse_quant,
        QMAX=FP8_MAX if fp8 else INT8_MAX,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        GROUP_M=config.group_m,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return y


def w158a8_forward(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    in_features: int,
    fp8: bool,
    config: A8Config | None = None,
) -> torch.Tensor:
    """y (M, N) = quantised-x (M, K) @ T^T, scaled and biased, in x.dtype (T 2bit-packed)."""
    m, k = x.shape
    assert k == in_features
    cfg = config or pick_config(m, qweight.shape[0], k)
    if cfg.fuse_quant:
        return w158a8_gemm(x, None, qweight, scale, bias, x.dtype, fp8=fp8, config=cfg)
    xq, xs = quantize_rows(x, fp8, cfg.quant_block)
    return w158a8_gemm(xq, xs, qweight, scale, bias, x.dtype, fp8=fp8, config=cfg)
