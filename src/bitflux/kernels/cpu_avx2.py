"""CPU backend: an AVX2 ternary x int8 GEMM for `2bit` weights, compiled at first use.

The kernel (`cpu_avx2.cpp`, built with `torch.utils.cpp_extension.load_inline`, cached in torch's
extension folder) computes the exact integer sums of `cpu_int8` without oneDNN's per-call setup
and without an int8 weight copy:

    acc[m, n] = sum_k U[n, k] * xq[m, k] - rowsum(xq)[m]    with U = T + 1 in {0, 1, 2}

* `vpmaddubsw(U (u8), xq (s8))`: each 16-bit pair sum is at most 2 * 2 * 127 = 508, so 64
  k-steps of 32 bytes (KC = 2048 codes max; 1024 used) accumulate in int16 with no overflow, then
  `vpmaddwd` by ones widens to int32.
* Weights are decoded per call, per thread, in panels of 12 rows x 1024 codes (12 KiB, L1)
  straight from the packed bytes: one 32-byte load (128 codes) -> 4 vectors by shift, mask and a
  `vpshufb` lookup (field 00/01/10/11 -> U 1/2/0/1). That emits K in a permuted order (field i of
  byte j lands at byte j of vector i), so the activations are permuted once per call to match.
  Resident weight memory stays the packed size; the transient cost is one 12 KiB panel and an
  (MC x 12) int32 tile per thread plus the permuted activations (M x K bytes).
* Microkernel: 4 activation rows x 2 weight rows, 8 int16 accumulators in registers (4 x 3
  spilled under gcc and ran ~20% slower on the Zen AVX2 VM, 1 thread: ~71 vs ~58 GOP/s); threads
  (`at::parallel_for`, i.e. torch's thread count) split the weight panels.
* Activations are quantised in C++ exactly as `reference.quantize_act_int8` (f32 amax, scale =
  max(amax, 1e-8) / 127, IEEE division, round-half-to-even, clamp to +-127), fused with the
  permutation and the row sums; torch's elementwise ops cost more than the GEMM at M = 1.
* Epilogue in C++: y = float(acc) * (xscale[m] * scale[n]) + bias[n], each step rounded in fp32
  (built with -ffp-contract=off, so no FMA contraction), then cast to x's dtype with c10's
  round-to-nearest-even conversions: bit-identical to `reference.ternary_linear(..., act=INT8)`.

`available()` is False (never raises) without AVX2/FMA or when the build fails (one warning);
callers then keep `cpu_int8`'s oneDNN path. Only `2bit` is handled here; `base3` stays on `cpu_int8`.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import logging
import warnings
from pathlib import Path
from types import ModuleType

import torch

from ..config import ActPrecision, PackFormat
from .reference import FLOAT_DTYPES as _FLOAT_DTYPES

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("cpu_avx2.cpp")
_DTYPE_CODE = {torch.int8: 0, torch.float32: 1, torch.bfloat16: 2, torch.float16: 3}  # `run`'s code
# -fopenmp: at::parallel_for is inline and runs serially without it; the extension then shares
# torch's already-loaded libgomp.so.1 (same soname), so torch.set_num_threads governs it.
_CFLAGS = ["-O3", "-mavx2", "-mfma", "-ffp-contract=off", "-fno-fast-math", "-std=c++17", "-fopenmp"]
_LDFLAGS = ["-fopenmp"]


def _cpu_has_avx2() -> bool:
    probe = getattr(torch.cpu, "_is_avx2_supported", None)
    if probe is not None:
        try:
            return bool(probe())
        except Exception:  # noqa: BLE001
            pass
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx2" in flags and "fma" in flags


@functools.cache
def _extension() -> ModuleType | None:
    """Build (or load from torch's extension cache) the kernel; None if this machine can't."""
    if not _cpu_has_avx2():
        return None
    try:
        from torch.utils.cpp_extension import load_inline

        src = _SOURCE.read_text()
        name = "bitflux_cpu_avx2_" + hashlib.sha1(src.encode()).hexdigest()[:12]
        kwargs = {}
        if "no_implicit_headers" in inspect.signature(load_inline).parameters:
            kwargs["no_implicit_headers"] = True  # light headers: ~4x faster to build
        return load_inline(name=name, cpp_sources=[src], extra_cflags=_CFLAGS, extra_ldflags=_LDFLAGS,
                           with_cuda=False, **kwargs)
    except Exception as exc:  # noqa: BLE001 - no compiler, no ninja, a build error: fall back
        warnings.warn(f"bitflux: AVX2 CPU kernel unavailable ({type(exc).__name__}: {exc}); "
                      "using the oneDNN int8 path", RuntimeWarning, stacklevel=2)
        log.debug("cpu_avx2 build failed", exc_info=True)
        return None


def available() -> bool:
    """True if the AVX2 kernel runs here (compiles it on first call); never raises."""
    return _extension() is not None


def supports(x: torch.Tensor, fmt: PackFormat, act: ActPrecision) -> bool:
    """CPU float input, int8 activations, `2bit` weights, and the kernel built."""
    return (
        x.device.type == "cpu"
        and ActPrecision(act) is ActPrecision.INT8
        and PackFormat(fmt) is PackFormat.TWO_BIT
        and x.dtype in _FLOAT_DTYPES
        and available()
    )


def _run(x2: torch.Tensor, qweight: torch.Tensor, in_features: int, scale: torch.Tensor | None,
         bias: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    """Check operands, make them kernel-ready and call the kernel, which writes `out` (M, N)."""
    ext = _extension()
    if ext is None:
        raise RuntimeError("the AVX2 CPU kernel is not available on this machine")
    m, n = out.shape
    if x2.dim() != 2 or x2.shape[1] != in_features or x2.device.type != "cpu":
        raise ValueError(f"x: expected a CPU (M, {in_features}) tensor, got {tuple(x2.shape)} on {x2.device}")
    if qweight.dtype != torch.uint8 or qweight.dim() != 2 or qweight.shape[0] != n or qweight.device.type != "cpu":
        raise ValueError(f"qweight: expected CPU uint8 (N, C), got {qweight.dtype} {tuple(qweight.shape)}")
    if m == 0 or n == 0:
        return out
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    if qweight.stride(1) != 1:
        qweight = qweight.contiguous()
    sf = bf = None
    if scale is not None:
        sf = scale.detach().to("cpu", torch.float32).contiguous().reshape(-1)
        if sf.numel() != n:
            raise ValueError(f"scale: expected {n} values, got {sf.numel()}")
    if bias is not None:
        bf = bias.detach().to("cpu", torch.float32).contiguous().reshape(-1)
        if bf.numel() != n:
            raise ValueError(f"bias: expected {n} values, got {bf.numel()}")
    ext.run(
        _DTYPE_CODE[x2.dtype], x2.data_ptr(), x2.stride(0), m, in_features,
        qweight.data_ptr(), qweight.stride(0), qweight.shape[1], n,
        sf.data_ptr() if sf is not None else 0, bf.data_ptr() if bf is not None else 0, out.data_ptr(),
    )
    return out


def int_matmul_2bit(xq: torch.Tensor, qweight: torch.Tensor, in_features: int) -> torch.Tensor:
    """Exact xq (M, K) int8 @ T^T for `2bit`-packed T (N, ceil(K/4)) -> int32 (M, N)."""
    if xq.dtype != torch.int8:
        raise ValueError(f"xq: expected int8, got {xq.dtype}")
    out = torch.empty((xq.shape[0], qweight.shape[0]), dtype=torch.int32)
    return _run(xq, qweight, in_features, None, None, out)


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
    """y = x @ (diag(scale) T)^T + bias for x (..., K), packed T (N, ceil(K/4)) -> (..., N)."""
    if ActPrecision(act) is not ActPrecision.INT8:
        raise ValueError(f"cpu_avx2 runs int8 activations only, got {ActPrecision(act).value}")
    if PackFormat(fmt) is not PackFormat.TWO_BIT:
        raise ValueError(f"cpu_avx2 runs 2bit weights only, got {PackFormat(fmt).value}")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"x: expected float32, bfloat16 or float16, got {x.dtype}")
    lead = x.shape[:-1]
    n = qweight.shape[0]
    x2 = x.reshape(-1, in_features)  # (M, K)
    # Quantised in C++ exactly as `reference.quantize_act_int8` (same integers, same scales),
    # fused with the permutation the kernel needs; the epilogue writes x's dtype.
    out = torch.empty((x2.shape[0], n), dtype=x.dtype)
    return _run(x2, qweight, in_features, scale, bias, out).reshape(*lead, n)
