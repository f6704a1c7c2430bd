"""Reference ternary linear: unpack codes in bounded row chunks, then a float matmul.

Always available, on any device; every other kernel is tested against it. It never holds a
full-precision copy of the weight: at most `_CHUNK_ELEMS` dequantised elements live at a time.

Numerics (shared by all backends, so results agree):
* `bf16` activations: y = (x @ T^T) * scale + bias, the matmul in x's dtype.
* `int8` / `fp8` activations: x is quantised per token (row) with a dynamic symmetric scale,
  y = (xq @ T^T) * (xscale * scale) + bias, the integer sums exact (fp32 accumulate is exact
  while |sum| < 2^24, i.e. K * 127 < 16.7M).
"""

from __future__ import annotations

import torch

from ..config import ActPrecision, PackFormat
from ..packing import unpack

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # activation dtypes every backend accepts
_CHUNK_ELEMS = 1 << 22  # dequantised elements alive at once (8 MiB in bf16)
INT8_MAX = 127.0
FP8_MAX = 448.0  # largest finite float8_e4m3fn


def quantize_act_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8: x (M, K) -> (xq int8 (M, K), xscale f32 (M,)), x ~ xq * xscale."""
    xf = x.float()
    xscale = xf.abs().amax(dim=1).clamp_min(1e-8) / INT8_MAX  # (M,)
    xq = torch.round(xf / xscale[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return xq, xscale


def quantize_act_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row fp8 e4m3: x (M, K) -> (xq float8_e4m3fn (M, K), xscale f32 (M,))."""
    xf = x.float()
    xscale = xf.abs().amax(dim=1).clamp_min(1e-8) / FP8_MAX
    xq = (xf / xscale[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return xq, xscale


def supports(x: torch.Tensor, fmt: PackFormat, act: ActPrecision) -> bool:
    """The reference handles every device, format and activation precision."""
    return True


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
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features)  # (M, K)
    n = qweight.shape[0]
    if act is ActPrecision.BF16:
        xin, xscale, cdtype = x2, None, x.dtype
    else:
        xq, xscale = quantize_act_int8(x2) if act is ActPrecision.INT8 else quantize_act_fp8(x2)
        xin, cdtype = xq.float(), torch.float32
    out = torch.empty((x2.shape[0], n), dtype=torch.float32, device=x.device)
    rows = max(1, _CHUNK_ELEMS // max(1, in_features))
    for r0 in range(0, n, rows):
        t = unpack(qweight[r0 : r0 + rows], fmt, in_features).to(cdtype)  # (R, K)
        out[:, r0 : r0 + rows] = (xin @ t.T).float()
    colscale = scale.float()[None, :]  # (1, N)
    out = out * (colscale if xscale is None else xscale[:, None] * colscale)
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype).reshape(*lead, n)
