"""Triton backend: routes a ternary linear to the W1.58A16 or W1.58A8 kernel by activation precision.

Exports `supports(x, fmt, act)` and `ternary_linear(...)` with the reference's signature, as every
backend does (see `bitflux.kernels`). Under `torch.compile` it runs inside the op
`bitflux::ternary_linear` (`kernels/ops.py`), whose fake impl keeps Triton launches out of the graph.

Where it runs:
* CUDA tensors, compiled Triton: `2bit` weights with every activation precision (fp8 needs
  compute capability >= 8.9). `base3` weights are not served: its 5-trits-per-byte decode does
  not map onto power-of-two tiles cheaply, and repacking per call would cost more than the GEMM;
  AUTO then falls back to the reference (convert base3 checkpoints to 2bit at load time instead).
* CPU tensors under the Triton interpreter, for tests (`TRITON_INTERPRET=1` set before anything
  imports triton, see `interpreter_usable`): fp16 / fp32 activations with bf16 or int8
  precision. Not bf16 inputs (the interpreter loads bf16 as garbage) and not fp8 activations (its
  fp32 -> e4m3 cast does not round to nearest-even like torch's, so xq would differ). The bf16
  per-channel scales are widened to fp32 before an interpreted launch (exact).
"""

import torch
import triton.language.standard as _tl_standard

from ..config import ActPrecision, PackFormat
from . import triton_w158a8, triton_w158a16
from .reference import FLOAT_DTYPES as _FLOAT_DTYPES


def _is_interpreted(fn: object) -> bool:
    return type(fn).__name__ == "InterpretedFunction"


def interpreted() -> bool:
    """True if this process's kernels were built for the Triton interpreter (CPU), not the GPU."""
    return _is_interpreted(triton_w158a16._w158a16_kernel)


def interpreter_usable() -> bool:
    """The interpreter also needs triton.language's own jit helpers (tl.cdiv, tl.max) built for it,
    i.e. TRITON_INTERPRET=1 set before anything imported triton (diffusers does, for one)."""
    return interpreted() and _is_interpreted(_tl_standard.cdiv)


def supports(x: torch.Tensor, fmt: PackFormat, act: ActPrecision) -> bool:
    """Whether these kernels can compute this input (see the module docstring)."""
    if PackFormat(fmt) is not PackFormat.TWO_BIT or x.dtype not in _FLOAT_DTYPES:
        return False
    act = ActPrecision(act)
    if interpreted():
        if not interpreter_usable():
            return False
        return x.device.type == "cpu" and x.dtype != torch.bfloat16 and act is not ActPrecision.FP8
    if x.device.type != "cuda":
        return False
    if act is ActPrecision.FP8:
        return _capability(x.device.index or 0) >= (8, 9)
    return True


_CAPABILITY: dict[int, tuple[int, int]] = {}  # device index -> compute capability (a cache, not a switch)


def _capability(index: int) -> tuple[int, int]:
    if index not in _CAPABILITY:
        _CAPABILITY[index] = torch.cuda.get_device_capability(index)
    return _CAPABILITY[index]


def _launch(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    act: str,
    in_features: int,
) -> torch.Tensor:
    """x (M, K) -> y (M, N) on the kernel for `act`."""
    if x.shape[0] == 0:  # a zero-size grid is not launchable
        return x.new_empty((0, qweight.shape[0]))
    if interpreted():  # bf16 loads are garbage in the interpreter; widening is exact
        scale = scale.float()
        bias = bias.float() if bias is not None and bias.dtype == torch.bfloat16 else bias
    precision = ActPrecision(act)
    if precision is ActPrecision.BF16:
        return triton_w158a16.w158a16_forward(x, qweight, scale, bias, in_features)
    return triton_w158a8.w158a8_forward(x, qweight, scale, bias, in_features, fp8=precision is ActPrecision.FP8)


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
    """y = x @ (diag(scale) T)^T + bias for x (..., K), 2bit-packed T (N, ceil(K/4)) -> (..., N)."""
    if PackFormat(fmt) is not PackFormat.TWO_BIT:
        raise ValueError(f"the triton backend reads 2bit codes only, got {PackFormat(fmt).value}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features)  # (M, K); strides are passed, so a view is fine
    act_name = ActPrecision(act).value
    y = _launch(x2, qweight, scale, bias, act_name, in_features)
    return y.reshape(*lead, qweight.shape[0])
