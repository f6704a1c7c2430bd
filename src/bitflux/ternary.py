"""Quantisation math: full-precision weight rows -> ternary codes {-1, 0, +1} and per-row scales.

A weight W (N, K) is approximated by diag(scale) @ T with T in {-1, 0, +1}^(N, K) and one scale
per output channel (row). Two initialisations:

* `absmean` (BitNet b1.58): scale = mean|w|, T = clip(round(w / scale), -1, 1).
* `twn`: for a threshold rule (keep the k largest |w| of a row, sign them), the least-squares
  scale is S_k / k with S_k the sum of those k magnitudes and error ||w||^2 - S_k^2 / k, so the
  best k maximises S_k^2 / k. We search all k exactly with a sort and prefix sums.
"""

from __future__ import annotations

import torch

from .config import InitMethod

_EPS = 1e-8


def absmean(w: torch.Tensor, slab: int = 1 << 22) -> tuple[torch.Tensor, torch.Tensor]:
    """BitNet b1.58 ternarisation of each row of `w` (N, K) -> (codes int8 (N, K), scale f32 (N,)).

    Rows go `slab` elements at a time, so the fp32 temporaries stay a few MB however large `w` is
    (FLUX.1-dev's linear1 is 21504 x 3072: a whole-matrix fp32 pass would cost ~1 GB).
    """
    n, k = w.shape
    codes = torch.empty((n, k), dtype=torch.int8, device=w.device)
    scale = torch.empty((n,), dtype=torch.float32, device=w.device)
    step = max(1, slab // max(1, k))
    for r0 in range(0, n, step):
        rows = w[r0 : r0 + step].float()  # (R, K)
        s = rows.abs().mean(dim=1).clamp_min(_EPS)  # (R,)
        codes[r0 : r0 + step] = torch.round(rows / s[:, None]).clamp_(-1, 1).to(torch.int8)
        scale[r0 : r0 + step] = s
    return codes, scale


def twn(w: torch.Tensor, row_chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row optimal threshold ternarisation of `w` (N, K) -> (codes int8, scale f32 (N,)).

    Rows are processed `row_chunk` at a time so the sort never holds more than a slab in fp32.
    """
    n, k = w.shape
    codes = torch.empty((n, k), dtype=torch.int8, device=w.device)
    scale = torch.empty((n,), dtype=torch.float32, device=w.device)
    counts = torch.arange(1, k + 1, device=w.device, dtype=torch.float32)  # (K,)
    for r0 in range(0, n, row_chunk):
        rows = w[r0 : r0 + row_chunk].float()  # (R, K)
        mag, order = rows.abs().sort(dim=1, descending=True)  # (R, K)
        prefix = mag.cumsum(dim=1)  # S_k, (R, K)
        best = (prefix.square() / counts).argmax(dim=1)  # index of best k-1, (R,)
        kbest = best + 1
        s = prefix.gather(1, best[:, None]).squeeze(1) / kbest  # (R,)
        keep = torch.zeros_like(rows, dtype=torch.bool)
        rank = torch.arange(k, device=w.device)[None, :] < kbest[:, None]  # (R, K) in sorted order
        keep.scatter_(1, order, rank)
        codes[r0 : r0 + row_chunk] = (torch.sign(rows) * keep).to(torch.int8)
        scale[r0 : r0 + row_chunk] = s.clamp_min(_EPS)
    return codes, scale


def ternarize(w: torch.Tensor, method: InitMethod | str = InitMethod.ABSMEAN) -> tuple[torch.Tensor, torch.Tensor]:
    """Ternarise `w` (N, K) with the named method -> (codes int8 (N, K), scale f32 (N,))."""
    method = InitMethod(method)
    if method is InitMethod.ABSMEAN:
        return absmean(w)
    return twn(w)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """codes (N, K) in {-1,0,1} and scale (N,) -> the weight they represent, (N, K) in `dtype`."""
    return (codes.to(torch.float32) * scale.float()[:, None]).to(dtype)


def relative_error(w: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> float:
    """Relative Frobenius error ||W - diag(scale) T||_F / ||W||_F."""
    w = w.float()
    return float((w - dequantize(codes, scale)).norm() / w.norm().clamp_min(_EPS))
