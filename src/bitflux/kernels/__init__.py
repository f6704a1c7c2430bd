"""Kernel dispatch: the one place that decides which backend computes a ternary linear.

Every backend module exports `supports(x, fmt, act) -> bool` and `ternary_linear(...)` with the
signature of `reference.ternary_linear`. `Backend.AUTO` tries the fast backends for the input's
device in order and falls back to the reference; forcing a backend that cannot run raises.
`ActPrecision.AUTO` picks the activation precision per device (`resolve_act`), at forward time.

The op itself is `torch.ops.bitflux.ternary_linear` (`ops.py`: schema, fake impl, autograd);
`ternary_linear` below calls it whenever autograd or `torch.compile` needs it, and calls its
kernel (`run`) directly otherwise, skipping ~30 us of dispatcher overhead per layer.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

from ..config import ActPrecision, Backend, PackFormat
from ..errors import BitfluxError

# Backend -> module implementing it (imported lazily: triton is optional and slow to import).
_MODULES: dict[Backend, str] = {
    Backend.REFERENCE: "bitflux.kernels.reference",
    Backend.TRITON: "bitflux.kernels.triton_dispatch",
    Backend.CPU: "bitflux.kernels.cpu_int8",
}
# Fast backends AUTO tries, per device type, before the reference.
_AUTO_ORDER: dict[str, tuple[Backend, ...]] = {"cuda": (Backend.TRITON,), "cpu": (Backend.CPU,)}


# Activation precision `auto` tries, per device type, if a fast backend runs it; else bf16.
# CPU: the int8 kernels (AVX2 / oneDNN) are ~2x faster than the bf16 reference with the same
# quality (README table). CUDA: bf16 (W1.58A16) until int8 is measured faster on a GPU.
_AUTO_ACT: dict[str, tuple[ActPrecision, ...]] = {"cpu": (ActPrecision.INT8,), "cuda": ()}

_LOADED: dict[Backend, ModuleType | None] = {}  # import cache: keeps torch.compile free of import calls


def _module(backend: Backend) -> ModuleType | None:
    if backend not in _LOADED:
        try:
            _LOADED[backend] = importlib.import_module(_MODULES[backend])
        except ImportError:
            _LOADED[backend] = None
    return _LOADED[backend]


def resolve_act(x: torch.Tensor, fmt: PackFormat, act: ActPrecision) -> ActPrecision:
    """`act` itself, or for AUTO the fastest precision that keeps quality on x's device."""
    act = ActPrecision(act)
    if act is not ActPrecision.AUTO:
        return act
    for cand in _AUTO_ACT.get(x.device.type, ()):
        for backend in _AUTO_ORDER.get(x.device.type, ()):
            mod = _module(backend)
            if mod is not None and mod.supports(x, fmt, cand):
                return cand
    return ActPrecision.BF16


def select_backend(x: torch.Tensor, fmt: PackFormat, act: ActPrecision, backend: Backend = Backend.AUTO) -> Backend:
    """The backend that will run for this input; raises if a forced backend cannot."""
    backend = Backend(backend)
    act = resolve_act(x, fmt, act)
    if backend is not Backend.AUTO:
        mod = _module(backend)
        if mod is None or not mod.supports(x, fmt, act):
            raise BitfluxError(
                f"backend {backend.value!r} cannot run {fmt.value} weights with {act.value} "
                f"activations on {x.device.type} ({x.dtype})"
            )
        return backend
    for cand in _AUTO_ORDER.get(x.device.type, ()):
        mod = _module(cand)
        if mod is not None and mod.supports(x, fmt, act):
            return cand
    return Backend.REFERENCE


def run(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    fmt: PackFormat,
    in_features: int,
    act: ActPrecision,
    backend: Backend = Backend.AUTO,
) -> torch.Tensor:
    """The op's CPU/CUDA kernel: x @ (diag(scale) T)^T + bias on the selected backend (no autograd)."""
    act = resolve_act(x, fmt, act)
    mod = _module(select_backend(x, fmt, act, backend))
    assert mod is not None
    return mod.ternary_linear(x, qweight, scale, bias, fmt=fmt, in_features=in_features, act=act)


def ternary_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    fmt: PackFormat,
    in_features: int,
    act: ActPrecision,
    backend: Backend = Backend.AUTO,
) -> torch.Tensor:
    """Compute x @ (diag(scale) T)^T + bias with the selected backend (differentiable in x and bias)."""
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad))
    if needs_grad or torch.compiler.is_compiling():
        return torch.ops.bitflux.ternary_linear(
            x, qweight, scale, bias, PackFormat(fmt).value, in_features, ActPrecision(act).value, Backend(backend).value
        )
    return run(x, qweight, scale, bias, fmt=fmt, in_features=in_features, act=act, backend=backend)


from . import ops as _ops  # noqa: E402,F401 - defines torch.ops.bitflux.* (ops.py imports this module's run)
