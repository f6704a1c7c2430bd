"""CPU backend: per-token int8 activations x ternary weights on oneDNN's u8 x s8 integer GEMM.

Why this shape. A ternary model must not keep an int8 copy of its weights (1 byte per weight is
4x the packed size and breaks the <= 1/7-of-bf16 memory budget), and prepacking a weight for a
library GEMM on every call is slower than the GEMM itself (fbgemm: ~10 ns per weight). So the
roles are swapped: the *weight* is the GEMM's streamed u8 operand, decoded per call in bounded
row blocks, and the *activation* is the prepacked s8 operand (M x K, cheap, once per call):

    U = 1 -/+ T in {0, 1, 2}  (u8, zero point 1)     xs = -/+ xq in [-127, 127]  (s8)
    acc[n, m] = sum_k (U[n, k] - 1) * xs[m, k]        exact int32 = sum_k T[n, k] * xq[m, k];
                                                      no u8*s8 pair saturates (2*2*127 < 2^15)
    y = acc^T * (xscale[:, None] * scale[None, :]) + bias    (the reference's epilogue, verbatim)

(-/+: 2bit decodes to 1 - T, base3 to 1 + T; the sign is moved onto the activations.) The
integer sums are exact and the epilogue is the reference's expression, so results match
`reference.ternary_linear(..., act=INT8)` (bit-identical in the tests).

Decoding, division-free, in whole machine words, with no weight-derived cache (memory stays at
the packed size plus one transient block per call; see `_BLOCK_BYTES`):
* `2bit`: a carry-free re-encode of whole int32 words (16 codes) maps each field 00/01/10 to
  01/00/10 = 1 - T, then each field is spread into its own byte by `(w >> 2i) & 0x03030303`.
  That emits K in a fixed permuted order, and the activation columns are permuted to match,
  which costs nothing (the dot product does not care about order along K).
* `base3`: multiply-shift per trit, t_i = (((s * 3^i) mod 256) * 3) >> 8 (`unpack_base3_u8`),
  which yields the trit t = code + 1 = U directly.

For `2bit` weights `ternary_linear` hands the whole call to the compiled kernel of `cpu_avx2`
(same exact sums, bit-identical result) when it builds, except for large M on VNNI/AMX CPUs
(`_ONEDNN_MIN_ROWS`); the engines below serve those, `base3`, `int_matmul` and the fallback.

Engines (`Engine`): oneDNN `qlinear_pointwise` (u8 x s8 -> f32: AVX2 `vpmaddubsw`, VNNI
`vpdpbusd`, or AMX, as the CPU has) when this torch has it; `torch._int_mm` otherwise, which is
only fast where oneDNN's VNNI/AMX kernels back it (elsewhere it is a naive loop: 0.3 GOP/s), so
`supports` accepts it only there; and an f32 sgemm on the decoded block for M <= 2 rows, where
the int GEMMs are dominated by per-call overhead.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from enum import Enum

import torch
import torch.nn.functional as F

from ..config import ActPrecision, PackFormat
from ..packing import CODES_PER_BYTE
from . import cpu_avx2
from .reference import FLOAT_DTYPES as _FLOAT_DTYPES
from .reference import quantize_act_int8

# Unpacked u8 bytes per weight block (rows x K), i.e. the transient memory a call adds. Measured
# on a 2-core Zen AVX2 VM: a oneDNN qlinear call costs ~100 us of fixed overhead (primitive setup
# per call), so GEMM blocks are large (2 MiB, L3-resident: M >= 64 runs 10-25% faster than with
# 256 KiB L2 blocks); the f32 GEMV path converts each block to 4 bytes per weight and likes it
# smaller (512 KiB, i.e. a 2 MiB f32 block).
_BLOCK_BYTES = {"gemm": 2 << 20, "gemv": 512 << 10}


class Engine(str, Enum):
    """Which GEMM computes the block products (all exact on integers)."""

    ONEDNN = "onednn"
    """`torch.ops.onednn.qlinear_pointwise`: u8 weight block x prepacked s8 activations."""
    INT_MM = "int_mm"
    """`torch._int_mm`: s8 x s8 -> s32 (oneDNN on VNNI/AMX CPUs, a naive loop elsewhere)."""
    FLOAT = "float"
    """Block to f32, then sgemm: for a few rows (GEMV), where the int GEMMs are latency-bound."""


# On VNNI/AMX CPUs, from this many activation rows on oneDNN beats the AVX2 kernel (its ~0.5 ms
# per-call setup amortised). Measured on a 2-core AVX-512 VNNI VM (1 thread, ms AVX2 vs oneDNN):
# M=9 K=128 N=384 0.03 vs 0.52; M=1 3072x3072 0.40 vs 6.3; M=64 3072x3072 13.8 vs 21.2;
# M=256 3072x12288 388 vs 226; M=1024 3072x3072 253 vs 252.
_ONEDNN_MIN_ROWS = 256

# Up to this many activation rows, FLOAT beats the int8 GEMMs (measured: GEMV at M=1 is ~2x
# faster through the f32 block than through oneDNN's u8s8 kernel; at M=4 they are even).
_FLOAT_MAX_ROWS = 2


# ------------------------------------------------------------------------------------- engines
@functools.cache
def _onednn_ok() -> bool:
    """True if this torch build runs oneDNN's quantized linear with f32 output (probed once)."""
    try:
        xq = torch.tensor([[1, -2, 3, 4]], dtype=torch.int8)  # (1, 4)
        u = torch.tensor([[2, 0, 1, 2]], dtype=torch.uint8)  # U - 1 = [1, -1, 0, 1]
        out = _onednn_block(u, _onednn_prepack(xq, 1), torch.ones(1), torch.zeros(1, dtype=torch.long))
        return out.shape == (1, 1) and float(out[0, 0]) == 1.0 + 2.0 + 4.0
    except Exception:  # noqa: BLE001 - an internal op missing or changed in this torch: not usable
        return False


@functools.cache
def _vnni_or_amx() -> bool:
    cpu = torch.cpu
    checks = ("_is_vnni_supported", "_is_amx_tile_supported")
    return any(getattr(cpu, name, lambda: False)() for name in checks)


def default_engine(rows: int = 64) -> Engine | None:
    """The engine for `rows` activation rows on this machine, or None if no int GEMM is fast here."""
    if _onednn_ok():
        return Engine.FLOAT if rows <= _FLOAT_MAX_ROWS else Engine.ONEDNN
    if _vnni_or_amx():
        return Engine.FLOAT if rows <= _FLOAT_MAX_ROWS else Engine.INT_MM
    return None


def _onednn_prepack(xq: torch.Tensor, rows: int) -> torch.Tensor:
    """Prepack activations xq (M, K) s8 as oneDNN's "weight" operand for `rows`-row blocks."""
    return torch.ops.onednn.qlinear_prepack(xq, [rows, xq.shape[1]])


def _onednn_block(u: torch.Tensor, packed_x: torch.Tensor, ones: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """acc (R, M) f32 = (u - 1) @ xq^T for a u8 block u (R, K); exact integers."""
    return torch.ops.onednn.qlinear_pointwise(
        u, 1.0, 1, packed_x, ones, zeros, None, 1.0, 0, torch.float32, "none", [], ""
    )


# -------------------------------------------------------------------------------------- decode
# Constant operands as 0-d / small int32 tensors: a Python int operand costs a conversion per op.
_M5 = torch.tensor(0x55555555, dtype=torch.int32)  # the low bit of every 2-bit field of a word
_ONE = torch.tensor(1, dtype=torch.int32)
_BYTE_FIELD = torch.tensor(0x03030303, dtype=torch.int32)  # the low 2 bits of every byte
_SHIFTS_2BIT = torch.tensor([0, 2, 4, 6], dtype=torch.int32)[:, None]  # (4, 1): field i at bits 2i


def _decode_2bit(packed: torch.Tensor) -> torch.Tensor:
    """Packed 2bit rows (R, C), C % 4 == 0 -> U = 1 - T in {0, 1, 2}, u8 (R, 4C), `_perm_2bit` order.

    Per field (h, l): U = (h, l ^ h ^ 1), i.e. 00 -> 01, 01 -> 00, 10 -> 10: one carry-free
    re-encode of whole int32 words (16 codes each), then each field is spread into its own byte
    by `(w >> 2i) & 0x03030303`, shift i outermost so every op runs over long contiguous rows.
    """
    w = packed.view(torch.int32)  # (R, C/4), little-endian: byte j of a word at bits 8j
    u = torch.bitwise_right_shift(w, _ONE).bitwise_and_(_M5).bitwise_xor_(w).bitwise_xor_(_M5)
    out = torch.bitwise_right_shift(u[:, None, :], _SHIFTS_2BIT).bitwise_and_(_BYTE_FIELD)  # (R, 4, C/4)
    return out.view(torch.uint8).view(packed.shape[0], -1)  # (R, 4C)


def _perm_2bit(x: torch.Tensor) -> torch.Tensor:
    """Columns (M, 16G) into `_decode_2bit`'s order (shift i, word g, byte j) <- k = 16g + 4j + i."""
    m, k = x.shape
    return x.view(m, k // 16, 4, 4).permute(0, 3, 1, 2).reshape(m, k)


_POW3 = torch.tensor([1, 3, 9, 27, 81], dtype=torch.int16)[:, None]  # (5, 1), trit i's multiplier
_LOW_BYTE, _THREE, _EIGHT = (torch.tensor(v, dtype=torch.int16) for v in (0xFF, 3, 8))


def _decode_base3(packed: torch.Tensor) -> torch.Tensor:
    """Packed base3 rows (R, C) -> U = T + 1 (the trits), u8 (R, 5C), `_perm_base3` order.

    Multiply-shift, no division: t_i = (((s * 3^i) mod 256) * 3) >> 8 (see `unpack_base3_u8`),
    in int16 (s * 81 < 2^15), trit i outermost so the ops run over long contiguous rows.
    """
    s = packed.to(torch.int16)[:, None, :]  # (R, 1, C)
    t = (s * _POW3).bitwise_and_(_LOW_BYTE).mul_(_THREE).bitwise_right_shift_(_EIGHT)  # (R, 5, C): {0, 1, 2}
    return t.to(torch.uint8).view(packed.shape[0], -1)  # (R, 5C)


def _perm_base3(x: torch.Tensor) -> torch.Tensor:
    """Columns (M, 5C) into `_decode_base3`'s order (trit i, byte c) <- k = 5c + i."""
    m, k = x.shape
    return x.view(m, k // 5, 5).transpose(1, 2).reshape(m, k)


# ---------------------------------------------------------------------------------------- core
def _padded_k(fmt: PackFormat, in_features: int) -> int:
    """K after padding to whole decode units: 16 codes (one int32 word) for 2bit, 5 for base3."""
    unit = 16 if fmt is PackFormat.TWO_BIT else CODES_PER_BYTE[fmt]
    return -(-in_features // unit) * unit


def _acc_blocks(
    xq: torch.Tensor,
    qweight: torch.Tensor,
    fmt: PackFormat,
    in_features: int,
    engine: Engine | None,
    block_rows: int | None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (r0, acc^T block (R, M) f32) with acc = xq @ T^T exact, for row blocks of T.

    float32 holds it exactly: |acc| <= K * 127 < 2^24 for K < 132k. Each block computes
    sum_k (U - 1) * xs with xs = sign * x, sign = -1 for 2bit (U = 1 - T), +1 for base3 (U = 1 + T).
    """
    engine = Engine(engine) if engine is not None else default_engine(xq.shape[0])
    if engine is None:
        raise RuntimeError("no CPU int8 GEMM engine available")
    m, n = xq.shape[0], qweight.shape[0]
    kp = _padded_k(fmt, in_features)
    cols = kp // CODES_PER_BYTE[fmt]  # packed bytes per row after padding
    x = F.pad(xq, (0, kp - in_features)) if kp != in_features else xq  # (M, Kp); pads meet code 0
    if fmt is PackFormat.TWO_BIT:
        xs, decode = _perm_2bit(-x), _decode_2bit  # -x: exact, xq is in [-127, 127]
    else:
        xs, decode = _perm_base3(x).contiguous(), _decode_base3
    budget = _BLOCK_BYTES["gemv" if engine is Engine.FLOAT else "gemm"]
    rows = block_rows or max(16, min(n, budget // kp))
    if engine is Engine.ONEDNN:
        packed_x = _onednn_prepack(xs, rows)
        ones, zeros = torch.ones(m), torch.zeros(m, dtype=torch.long)
    else:
        xsum = xs.sum(dim=1, dtype=torch.int32)  # (M,): removes the +1 of U - 1
        xg = xs.float() if engine is Engine.FLOAT else xs  # the GEMM's activation operand
    for r0 in range(0, n, rows):
        blk = qweight[r0 : r0 + rows]  # (R, C)
        if blk.shape[1] != cols:
            blk = F.pad(blk, (0, cols - blk.shape[1]))  # zero bytes decode to code 0
        elif blk.storage_offset() % 4:
            blk = blk.clone()  # the 2bit decode views rows as int32 words
        u = decode(blk.contiguous())  # (R, Kp) u8
        if engine is Engine.ONEDNN:
            yield r0, _onednn_block(u, packed_x, ones, zeros)
        elif engine is Engine.FLOAT:
            yield r0, (F.linear(xg, u.float()) - xsum[:, None]).T
        else:
            acc = torch._int_mm(xg, u.view(torch.int8).T)  # (M, R) s32
            yield r0, (acc - xsum[:, None]).T.float()


def int_matmul(
    xq: torch.Tensor,
    qweight: torch.Tensor,
    *,
    fmt: PackFormat,
    in_features: int,
    engine: Engine | None = None,
    block_rows: int | None = None,
) -> torch.Tensor:
    """Exact integer product xq (M, K) s8 @ T^T -> (M, N) f32 holding integers (for tests and tools)."""
    m, n = xq.shape[0], qweight.shape[0]
    out = torch.zeros((n, m), dtype=torch.float32)  # acc^T
    if m and n:
        for r0, acc in _acc_blocks(xq, qweight, PackFormat(fmt), in_features, engine, block_rows):
            out[r0 : r0 + acc.shape[0]] = acc
    return out.T  # (M, N), a transposed view


def supports(x: torch.Tensor, fmt: PackFormat, act: ActPrecision) -> bool:
    """CPU float input, int8 activations, either packing format, and a fast integer GEMM here."""
    return (
        x.device.type == "cpu"
        and ActPrecision(act) is ActPrecision.INT8
        and PackFormat(fmt) in (PackFormat.TWO_BIT, PackFormat.BASE3)
        and x.dtype in _FLOAT_DTYPES
        and (default_engine() is not None or cpu_avx2.supports(x, fmt, act))
    )


def ternary_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    fmt: PackFormat,
    in_features: int,
    act: ActPrecision,
) -> torch.Tensor:
    """y = x @ (diag(scale) T)^T + bias for x (..., K), packed T (N, ceil(K/per)) -> (..., N)."""
    if ActPrecision(act) is not ActPrecision.INT8:
        raise ValueError(f"cpu_int8 runs int8 activations only, got {ActPrecision(act).value}")
    rows = x.numel() // max(1, x.shape[-1])
    if cpu_avx2.supports(x, fmt, act) and (rows < _ONEDNN_MIN_ROWS or not _vnni_or_amx()):
        # The compiled kernel (same exact sums, no per-call oneDNN setup, cpu_avx2.py); on VNNI/AMX
        # CPUs oneDNN's vpdpbusd/AMX kernels below take over once M is large enough to pay for it
        return cpu_avx2.ternary_linear(x, qweight, scale, bias, fmt=fmt, in_features=in_features, act=act)
    lead = x.shape[:-1]
    n = qweight.shape[0]
    x2 = x.reshape(-1, in_features)  # (M, K)
    m = x2.shape[0]
    y = torch.empty((m, n), dtype=x.dtype)  # written block by block
    if m:
        xq, xscale = quantize_act_int8(x2)  # (M, K) s8, (M,) f32: the reference's quantiser
        colscale = scale.float()  # (N,)
        bias_f = bias.float() if bias is not None else None
        for r0, acc in _acc_blocks(xq, qweight, PackFormat(fmt), in_features, None, None):
            r1 = r0 + acc.shape[0]
            # The reference's epilogue, out * (xscale * colscale) + bias, on the cache-hot block:
            acc = acc * (colscale[r0:r1, None] * xscale[None, :])  # (R, M)
            if bias_f is not None:
                acc += bias_f[r0:r1, None]
            y[:, r0:r1].copy_(acc.to(x.dtype).T)  # cast, then transpose while the block is cache-hot
    return y.reshape(*lead, n)
