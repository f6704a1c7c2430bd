"""W1.58A16 in Triton: fp16/bf16 activations x packed 2-bit ternary weights, on tensor cores.

Contract: y (M, N) = (x (M, K) @ T^T) * scale[None, :] + bias[None, :], T in {-1, 0, +1} read
straight from the stored `2bit` layout (`packing.pack_2bit_u8`: uint8 (N, ceil(K/4)), code k of
row n at byte k // 4, bits 2 * (k % 4)). No layout is prepared at load time: what the checkpoint
holds is what the kernel reads, so a loaded model needs no repacking pass and no second copy.

Unpacking (gemlite's trick): the weight tile is loaded as (BLOCK_K, BLOCK_N) with byte index
k // 4, so each byte is fetched 4 times (same address, served by L1), and row k of the tile is
shifted right by 2 * (k % 4). The field f decodes to (f & 1) - (f >> 1) in registers and the
tile, cast to the activation dtype (exact for -1, 0, 1), feeds one `tl.dot` of depth BLOCK_K,
accumulated in fp32. Scale and bias are applied in the epilogue in fp32, in the reference's
order: (acc * scale) + bias.

Alternative unpacking, `TileConfig.split_dots`: load the packed tile once as (BLOCK_K/4, BLOCK_N)
and, for each bit position i in 0..3, decode field i and dot it with the activation columns
k = 4j + i (a stride-4 load of x), i.e. 4 dots of depth BLOCK_K/4 per K step. One load per weight
byte instead of four, at the price of strided x loads; which wins is for the GPU sweep to say.

Tiny M (AdaLN modulation linears see one row per image): a 16-row tile (the smallest tensor-core
shape) with wide K steps; when N alone gives too few tiles to fill the GPU, split-K spreads the
reduction over programs that `atomic_add` scaled partial sums into an fp32 buffer (bias added
once, by split 0), cast to the output dtype afterwards. FLUX's M = 1 shapes have N >= 9216, so
the default rarely splits; the path exists for smaller models and is tested.

Configs are data: `DEFAULT_CONFIGS` (safe per M bucket) and `AUTOTUNE_SPACE` (what
`bitflux.bench.gpu --tune` sweeps on a real GPU); callers may pass a `TileConfig` explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .triton_common import decode_2bit, grouped_tile

TARGET_PROGRAMS = 132  # H100 SXM streaming multiprocessors: split-K aims to give each one a tile


@dataclass(frozen=True)
class TileConfig:
    """One launch configuration of a tiled ternary GEMM."""

    block_m: int  # rows of x per program (>= 16 for tl.dot)
    block_n: int  # output channels per program
    block_k: int  # reduction depth per step; a multiple of 4 (one packed byte = 4 codes)
    group_m: int = 8  # M-tiles grouped per N sweep for L2 reuse of the weight tiles
    split_k: int = 1  # programs sharing one output tile's reduction (atomic fp32 sum when > 1)
    num_warps: int = 4
    num_stages: int = 3
    split_dots: bool = False  # unpack by bit position: 4 dots of depth BLOCK_K/4 (see module doc)


# Safe defaults by M bucket: (largest M the entry serves, config); the last entry serves the rest.
DEFAULT_CONFIGS: tuple[tuple[int, TileConfig], ...] = (
    (16, TileConfig(16, 64, 256, group_m=1, num_warps=4, num_stages=4)),
    (128, TileConfig(64, 128, 128, num_warps=4, num_stages=3)),
    (1 << 62, TileConfig(128, 128, 64, num_warps=8, num_stages=3)),
)

# What a GPU tuning run sweeps (bench/gpu.py --tune); winners go into DEFAULT_CONFIGS by hand.
AUTOTUNE_SPACE: tuple[TileConfig, ...] = tuple(
    TileConfig(bm, bn, bk, split_k=sk, num_warps=w, num_stages=s)
    for bm, bn, bk, sk, w, s in (
        (16, 64, 256, 1, 4, 4),
        (16, 128, 128, 1, 4, 4),
        (16, 32, 512, 1, 4, 3),
        (16, 64, 256, 2, 4, 4),
        (16, 64, 256, 4, 4, 4),
        (64, 128, 128, 1, 4, 3),
        (64, 256, 64, 1, 8, 3),
        (128, 128, 64, 1, 8, 3),
        (128, 128, 128, 1, 8, 3),
        (128, 256, 64, 1, 8, 3),
        (256, 128, 64, 1, 8, 3),
    )
) + tuple(
    TileConfig(bm, bn, bk, num_warps=w, num_stages=s, split_dots=True)
    for bm, bn, bk, w, s in ((16, 64, 256, 4, 4), (16, 128, 256, 4, 4), (128, 128, 128, 8, 3), (128, 256, 128, 8, 3))
)


def pick_config(m: int, n: int, k: int) -> TileConfig:
    """The default config for an (M, N, K) problem, with split-K added when tiles are scarce."""
    cfg = next(c for bound, c in DEFAULT_CONFIGS if m <= bound)
    tiles = triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
    if cfg.split_k == 1 and tiles < TARGET_PROGRAMS // 2:
        split = min(8, TARGET_PROGRAMS // tiles, triton.cdiv(k, cfg.block_k))
        if split > 1:
            cfg = TileConfig(**{**cfg.__dict__, "split_k": split})
    return cfg


@triton.jit
def _step_dup_bytes(acc, x_rows, w_cols, kk, shift, k_hi, stride_xk, m_ok, n_ok, DOT_PRECISION: tl.constexpr):
    """One K step: x (BM, BK) contiguous; weight bytes k // 4 loaded per code row, shifted."""
    k_ok = kk < k_hi  # (BK,)
    x = tl.load(x_rows + kk[None, :] * stride_xk, mask=m_ok & k_ok[None, :], other=0.0)  # (BM, BK)
    packed = tl.load(w_cols + (kk // 4)[:, None], mask=k_ok[:, None] & n_ok, other=0)  # (BK, BN) u8
    t = decode_2bit(packed, shift)  # (BK, BN) in {-1, 0, 1}
    return tl.dot(x, t.to(x.dtype), acc, input_precision=DOT_PRECISION)


@triton.jit
def _step_split_dots(acc, x_rows, w_cols, jj, k_hi, stride_xk, m_ok, n_ok, DOT_PRECISION: tl.constexpr):
    """One K step: weight bytes jj (BK/4,) loaded once; 4 dots, bit position i with columns 4j+i."""
    packed = tl.load(w_cols + jj[:, None], mask=((4 * jj)[:, None] < k_hi) & n_ok, other=0)  # (BK/4, BN)
    for i in tl.static_range(4):
        kk = 4 * jj + i  # (BK/4,) activation columns holding bit position i
        x = tl.load(x_rows + kk[None, :] * stride_xk, mask=m_ok & (kk[None, :] < k_hi), other=0.0)  # (BM, BK/4)
        t = decode_2bit(packed, 2 * i)  # (BK/4, BN)
        acc = tl.dot(x, t.to(x.dtype), acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _w158a16_kernel(
    x_ptr,  # (M, K) fp16 / bf16 / fp32
    w_ptr,  # (N, KP) uint8, 2bit codes
    scale_ptr,  # (N,) per-channel scale
    bias_ptr,  # (N,) or a dummy when HAS_BIAS is False
    y_ptr,  # (M, N) in x's dtype, or fp32 accumulation buffer when SPLIT_K > 1
    M,
    N,
    K,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_ym,
    HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    SPLIT_K: tl.constexpr,
    SPLIT_DOTS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m, pid_n = grouped_tile(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    offs_k = tl.arange(0, BLOCK_K)  # (BK,)
    shift = ((offs_k % 4) * 2).to(tl.uint8)[:, None]  # (BK, 1): bit offset of code k in its byte
    offs_j = tl.arange(0, BLOCK_K // 4)  # (BK/4,) byte columns of one K step (SPLIT_DOTS)
    m_ok = offs_m[:, None] < M
    n_ok = offs_n[None, :] < N

    k_span = tl.cdiv(K, BLOCK_K * SPLIT_K) * BLOCK_K  # K range of one split, whole steps
    k_lo = pid_k * k_span
    k_hi = tl.minimum(k_lo + k_span, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    x_rows = x_ptr + offs_m[:, None] * stride_xm  # (BM, 1)
    w_cols = w_ptr + offs_n[None, :] * stride_wn  # (1, BN)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        if SPLIT_DOTS:
            acc = _step_split_dots(acc, x_rows, w_cols, k0 // 4 + offs_j, k_hi, stride_xk, m_ok, n_ok, DOT_PRECISION)
        else:
            acc = _step_dup_bytes(acc, x_rows, w_cols, k0 + offs_k, shift, k_hi, stride_xk, m_ok, n_ok, DOT_PRECISION)

    scale = tl.load(scale_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)  # (BN,)
    y = acc * scale[None, :]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            y = y + tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=m_ok & n_ok)
    else:
        if HAS_BIAS:
            if pid_k == 0:
                y = y + tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        tl.atomic_add(y_ptrs, y, mask=m_ok & n_ok)


def w158a16_forward(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    in_features: int,
    config: TileConfig | None = None,
) -> torch.Tensor:
    """y (M, N) = (x (M, K) @ T^T) * scale + bias for 2bit-packed T (N, ceil(K/4)); y in x.dtype."""
    m, k = x.shape
    n = qweight.shape[0]
    assert k == in_features and qweight.dtype == torch.uint8 and qweight.shape[1] == triton.cdiv(k, 4)
    assert qweight.stride(1) == 1
    cfg = config or pick_config(m, n, k)
    assert cfg.block_k % 4 == 0 and (not cfg.split_dots or cfg.block_k >= 64)
    if cfg.split_k == 1:
        y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    else:
        y = torch.zeros((m, n), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), cfg.split_k)
    _w158a16_kernel[grid](
        x,
        qweight,
        scale,
        bias if bias is not None else scale,
        y,
        m,
        n,
        k,
        x.stride(0),
        x.stride(1),
        qweight.stride(0),
        y.stride(0),
        HAS_BIAS=bias is not None,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        SPLIT_K=cfg.split_k,
        SPLIT_DOTS=cfg.split_dots,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return y if cfg.split_k == 1 else y.to(x.dtype)
