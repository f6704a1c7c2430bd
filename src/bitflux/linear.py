"""`TernaryLinear`: a drop-in `nn.Linear` whose weight is packed ternary codes and per-row scales.

State (what a checkpoint stores): `qweight` uint8 (N, ceil(K/per)) packed codes, `scale` bf16 (N,)
per-output-channel scales, and `bias` (N,) in the model dtype. The forward pass goes through the
one dispatch point, `bitflux.kernels.ternary_linear`; no full-precision weight is ever kept.
"""

from __future__ import annotations

import torch
from torch import nn

from . import kernels
from .config import ActPrecision, Backend, InitMethod, PackFormat
from .packing import pack, packed_cols, unpack
from .ternary import ternarize

SCALE_DTYPE = torch.bfloat16  # 2 bytes per output channel; see README for the size arithmetic


class TernaryLinear(nn.Module):
    """y = x @ (diag(scale) T)^T + bias with T in {-1, 0, +1}, stored packed."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        fmt: PackFormat | str = PackFormat.TWO_BIT,
        act: ActPrecision | str = ActPrecision.AUTO,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.fmt = PackFormat(fmt)
        self.act = ActPrecision(act)
        self.backend = Backend.AUTO  # per-module override; see bitflux.set_backend
        cols = packed_cols(in_features, self.fmt)
        self.register_buffer("qweight", torch.zeros((out_features, cols), dtype=torch.uint8, device=device))
        self.register_buffer("scale", torch.ones((out_features,), dtype=SCALE_DTYPE, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        fmt: PackFormat | str = PackFormat.TWO_BIT,
        init: InitMethod | str = InitMethod.ABSMEAN,
        act: ActPrecision | str = ActPrecision.AUTO,
    ) -> "TernaryLinear":
        """Ternarise an `nn.Linear`'s weight (meta tensors give an empty module of the right shapes)."""
        w = linear.weight
        mod = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            fmt=fmt,
            act=act,
            dtype=w.dtype,
            device=w.device,
        )
        if w.device.type != "meta":
            codes, scale = ternarize(w.detach(), init)
            mod.set_codes(codes, scale)
            if linear.bias is not None:
                mod.bias.data.copy_(linear.bias.detach())
        return mod

    def set_codes(self, codes: torch.Tensor, scale: torch.Tensor) -> None:
        """Store ternary codes (N, K) int8 and scales (N,) (used by init and by calibration)."""
        if codes.shape != (self.out_features, self.in_features):
            raise ValueError(f"codes shape {tuple(codes.shape)} != {(self.out_features, self.in_features)}")
        self.qweight = pack(codes.to(self.qweight.device), self.fmt)
        self.scale = scale.detach().to(device=self.scale.device, dtype=SCALE_DTYPE).clone()

    def codes(self) -> torch.Tensor:
        """The ternary codes (N, K) as int8 (materialises an int8 copy; for tests and tools)."""
        return unpack(self.qweight, self.fmt, self.in_features)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """diag(scale) T as a dense (N, K) tensor (for tests and tools; the forward never builds it)."""
        return (self.codes().float() * self.scale.float()[:, None]).to(dtype)

    def _apply(self, fn, recurse: bool = True):
        """Device moves apply to everything; dtype casts (.half(), .to(dtype)) never touch the packed scales."""
        scale = self.scale
        super()._apply(fn, recurse)
        if self.scale.dtype != scale.dtype:
            self.scale = scale.to(self.scale.device)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., K) -> (..., N)
        return kernels.ternary_linear(
            x,
            self.qweight,
            self.scale,
            self.bias,
            fmt=self.fmt,
            in_features=self.in_features,
            act=self.act,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, fmt={self.fmt.value}, act={self.act.value}"
        )
