"""The ternary linear as one `torch.library` op: schema, fake impl, reference default, device kernels, autograd.

    bitflux::ternary_linear(x, qweight, scale, bias, fmt, in_features, act, backend) -> y (..., N)
    bitflux::ternary_linear_grad_input(grad_y, qweight, scale, fmt, in_features) -> grad_x (..., K)

* CompositeExplicitAutograd (any device without its own kernel): the torch reference.
* CPU and CUDA: `bitflux.kernels.run`, which picks the backend (AVX2 / oneDNN int8, Triton, or the
  reference) by device, availability and the requested `backend`; `act="auto"` resolves per
  device there too (see `kernels.resolve_act`), at forward time.
* Fake (meta) impl: shapes only, so `torch.compile` sees one opaque node and never traces a kernel.
* Autograd: the weights are frozen buffers, so only x (and the bias, if a user trains it) get
  gradients. Quantised activations (int8 / fp8) pass the gradient straight through (STE), so
  grad_x = (grad_y * scale) @ T in every mode, computed in bounded row chunks of T.
"""

from __future__ import annotations

import torch

from ..config import ActPrecision, Backend, PackFormat
from ..packing import unpack
from . import reference

_GRAD_CHUNK_ELEMS = 1 << 22  # decoded weight elements alive at once in the backward (8 MiB bf16)

torch.library.define(
    "bitflux::ternary_linear",
    "(Tensor x, Tensor qweight, Tensor scale, Tensor? bias, str fmt, int in_features, str act, str backend) -> Tensor",
)
torch.library.define(
    "bitflux::ternary_linear_grad_input",
    "(Tensor grad_y, Tensor qweight, Tensor scale, str fmt, int in_features) -> Tensor",
)


# --------------------------------------------------------------------------------------- forward
@torch.library.impl("bitflux::ternary_linear", "CompositeExplicitAutograd")
def _reference_impl(x, qweight, scale, bias, fmt, in_features, act, backend):  # noqa: ANN001, ANN202 - typed by the schema
    """Devices without a kernel of their own (MPS, XPU, ...): the reference, after resolving `auto`."""
    from . import resolve_act

    act = resolve_act(x, PackFormat(fmt), ActPrecision(act))
    return reference.ternary_linear(x, qweight, scale, bias, fmt=PackFormat(fmt), in_features=in_features, act=act)


def _device_impl(x, qweight, scale, bias, fmt, in_features, act, backend):  # noqa: ANN001, ANN202
    from . import run

    return run(x, qweight, scale, bias, fmt=PackFormat(fmt), in_features=in_features, act=ActPrecision(act),
               backend=Backend(backend))


torch.library.impl("bitflux::ternary_linear", "CPU")(_device_impl)
torch.library.impl("bitflux::ternary_linear", "CUDA")(_device_impl)


@torch.library.register_fake("bitflux::ternary_linear")
def _fake(x, qweight, scale, bias, fmt, in_features, act, backend):  # noqa: ANN001, ANN202
    torch._check(x.shape[-1] == in_features, lambda: f"x has {x.shape[-1]} features, the layer takes {in_features}")
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


# -------------------------------------------------------------------------------------- backward
@torch.library.impl("bitflux::ternary_linear_grad_input", "CompositeExplicitAutograd")
def _grad_input(grad_y, qweight, scale, fmt, in_features):  # noqa: ANN001, ANN202
    """grad_x (..., K) = (grad_y * scale) @ T, T decoded a bounded row chunk at a time (fp32 sums)."""
    lead, n = grad_y.shape[:-1], qweight.shape[0]
    g = grad_y.reshape(-1, n).float() * scale.float()[None, :]  # (M, N)
    out = torch.zeros((g.shape[0], in_features), dtype=torch.float32, device=grad_y.device)
    rows = max(1, _GRAD_CHUNK_ELEMS // max(1, in_features))
    for r0 in range(0, n, rows):
        t = unpack(qweight[r0 : r0 + rows], PackFormat(fmt), in_features).float()  # (R, K)
        out.addmm_(g[:, r0 : r0 + rows], t)
    return out.to(grad_y.dtype).reshape(*lead, in_features)


@torch.library.register_fake("bitflux::ternary_linear_grad_input")
def _grad_input_fake(grad_y, qweight, scale, fmt, in_features):  # noqa: ANN001, ANN202
    return grad_y.new_empty((*grad_y.shape[:-1], in_features))


def _setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
    x, qweight, scale, bias, fmt, in_features, _act, _backend = inputs
    ctx.save_for_backward(qweight, scale)
    ctx.fmt, ctx.in_features, ctx.x_dtype = fmt, in_features, x.dtype
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _backward(ctx, grad_y):  # noqa: ANN001, ANN202
    qweight, scale = ctx.saved_tensors
    grad_x = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_x = torch.ops.bitflux.ternary_linear_grad_input(grad_y, qweight, scale, ctx.fmt, ctx.in_features)
        grad_x = grad_x.to(ctx.x_dtype)
    if ctx.needs_input_grad[3]:
        grad_b = grad_y.reshape(-1, grad_y.shape[-1]).sum(0).to(ctx.bias_dtype)
    return grad_x, None, None, grad_b, None, None, None, None


torch.library.register_autograd("bitflux::ternary_linear", _backward, setup_context=_setup_context)
