"""Kernel dispatch: the one place that decides which backend computes a ternary linear.

Every backend module exports `supports(x, fmt, act) -> bool` and `ternary_linear(...)` with the
signature of `reference.ternary_linear`. `Backend.AUTO` tries the fast backends for the input's
device in order and falls back to the reference; forcing a backend that cannot run raises.
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


_LOADED: dict[Backend, ModuleType | None] = {}  # import cache: keeps torch.compile free of import calls


def _module(backend: Backend) -> ModuleType | None:
    if backend not in _LOADED:
        try:
            _LOADED[backend] = importlib.import_module(_MODULES[backend])
        except ImportError:
            _LOADED[backend] = None
    return _LOADED[backend]


def select_backend(x: torch.Tensor, fmt: PackFormat, act: ActPrecision, backend: Backend = Backend.AUTO) -> Backend:
    """The backend that will run for this input; raises if a forced backend cannot."""
    backend = Backend(backend)
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
    """Compute x @ (diag(scale) T)^T + bias with the selected backend."""
    chosen = select_backend(x, fmt, act, backend)
    mod = _module(chosen)
    assert mod is not None
    return mod.ternary_linear(x, qweight, scale, bias, fmt=fmt, in_features=in_features, act=act)
