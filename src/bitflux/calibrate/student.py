"""The calibration student: a float copy of the teacher whose ternarised Linears train through a
straight-through estimator, and `finalize`, which re-ternarises it into the trunk's format.

`FakeTernaryLinear` holds a latent full-precision matrix U and per-row scales s and computes with
s * clip(round(U), -1, 1); the saved result is pure ternary codes + scales (`TernaryLinear`).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import InitMethod, QuantConfig
from ..linear import TernaryLinear
from ..policies import get_policy
from ..quantize import _set_submodule, quantize
from ..ternary import ternarize
from .config import CalibConfig, TrainWhat


class FakeTernaryLinear(nn.Module):
    """Training-time ternary Linear: y = x @ (s * clip(round(U), -1, 1))^T + b, straight-through on U.

    U is the weight divided by twice the row's ternarisation threshold, so round(U) reproduces
    the initial codes exactly and |U| = 0.5 is the decision boundary for every row.
    """

    levels = 1  # codes in [-levels, levels]; 1 is ternary (research/capacity.py subclasses wider alphabets)

    def __init__(self, linear: nn.Linear, init: InitMethod) -> None:
        super().__init__()
        w = linear.weight.detach().float()  # (N, K)
        codes, scale = ternarize(w, init)
        mag = w.abs()
        kept_min = torch.where(codes != 0, mag, torch.full_like(mag, math.inf)).amin(1)
        dropped_max = torch.where(codes == 0, mag, torch.zeros_like(mag)).amax(1)
        thresh = torch.where(torch.isinf(kept_min), dropped_max * 2 + 1e-8, (kept_min + dropped_max) / 2)
        self.latent = nn.Parameter(w / (2 * thresh.clamp_min(1e-12))[:, None])  # (N, K)
        self.scale = nn.Parameter(scale.clone())  # (N,)
        b = linear.bias
        self.bias = nn.Parameter(b.detach().float().clone()) if b is not None else None
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def codes(self) -> torch.Tensor:
        return torch.round(self.latent.detach()).clamp_(-self.levels, self.levels).to(torch.int8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.latent
        q = u + (torch.round(u).clamp(-self.levels, self.levels) - u).detach()  # STE: forward ternary, backward identity
        w = q * self.scale[:, None]
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


def _make_student(module: nn.Module, convert: list[str], config: CalibConfig) -> nn.Module:
    """Turn the Linears named `convert` of an fp32 `module` into fake-ternary ones; set what trains."""
    for name in convert:
        _set_submodule(module, name, FakeTernaryLinear(module.get_submodule(name), config.init))
    for p in module.parameters():
        p.requires_grad_(config.train is TrainWhat.FULL)  # the kept layers train only in `full`
    for m in module.modules():
        if isinstance(m, FakeTernaryLinear):
            m.scale.requires_grad_(True)
            m.latent.requires_grad_(config.train is not TrainWhat.SCALES)
            if m.bias is not None:
                m.bias.requires_grad_(config.train in (TrainWhat.ALL, TrainWhat.FULL))
    return module


def build_student(teacher: nn.Module, config: CalibConfig) -> nn.Module:
    """A float copy of `teacher` whose policy-selected Linears are `FakeTernaryLinear`s."""
    student = copy.deepcopy(teacher).float()
    convert, _ = get_policy("flux").select(student)
    return _make_student(student, list(convert), config)


def converted_in(model: nn.Module, prefix: str) -> list[str]:
    """The policy-selected Linears of `model` under `prefix.`, named relative to it (works on meta models)."""
    convert, _ = get_policy("flux").select(model)
    return [n[len(prefix) + 1:] for n in convert if n.startswith(prefix + ".")]


def build_student_block(teacher_block: nn.Module, convert: list[str], config: CalibConfig) -> nn.Module:
    """The student of one teacher block (an fp32 copy of that block only; see `build_student`)."""
    return _make_student(copy.deepcopy(teacher_block).float(), convert, config)


def _ternary_like(m: FakeTernaryLinear, fmt, dtype: torch.dtype, device) -> TernaryLinear:
    """The trunk-format TernaryLinear of a trained fake-ternary layer (bias in `dtype`)."""
    tl = TernaryLinear(m.in_features, m.out_features, m.bias is not None, fmt=fmt, dtype=dtype, device=device)
    sign = torch.where(m.scale.detach() < 0, -1, 1).to(torch.int8)  # keep s * T when s < 0
    tl.set_codes(m.codes() * sign[:, None], m.scale.detach().abs())
    if tl.bias is not None:
        tl.bias.data.copy_(m.bias.detach())
    return tl


def finalize_block(teacher_block: nn.Module, student_block: nn.Module, config: CalibConfig) -> nn.Module:
    """A trunk-format copy of one teacher block: ternary layers from the student, the rest the teacher's.

    The kept tensors stay in the teacher's stored dtype, so the result takes that dtype's inputs.
    """
    block = copy.deepcopy(teacher_block)
    for name, m in list(student_block.named_modules()):
        if isinstance(m, FakeTernaryLinear):
            old = block.get_submodule(name)
            _set_submodule(block, name, _ternary_like(m, config.format, old.weight.dtype, old.weight.device))
    return block


def finalize(teacher: nn.Module, student: nn.Module, config: CalibConfig, source: str = "") -> nn.Module:
    """Re-ternarise the student into a trunk-format quantised copy of `teacher` (codes + scales)."""
    model = copy.deepcopy(teacher)
    quantize(model, QuantConfig(format=config.format, init=config.init, source=source))
    for name, m in student.named_modules():
        if isinstance(m, FakeTernaryLinear):
            tl: TernaryLinear = model.get_submodule(name)
            sign = torch.where(m.scale.detach() < 0, -1, 1).to(torch.int8)  # keep s * T when s < 0
            tl.set_codes(m.codes() * sign[:, None], m.scale.detach().abs())
            if tl.bias is not None:
                tl.bias.data.copy_(m.bias.detach())
    if config.train is TrainWhat.FULL:  # the trained full-precision layers, in the model's dtype
        ternary = {n for n, m in student.named_modules() if isinstance(m, FakeTernaryLinear)}
        for name, p in student.named_parameters():
            if name.rpartition(".")[0] not in ternary:
                target = model.get_parameter(name)
                target.data.copy_(p.detach().to(target.dtype))
    return model


def trainable(student: nn.Module) -> dict[str, nn.Parameter]:
    """The student tensors calibration updates, by name."""
    return {n: p for n, p in student.named_parameters() if p.requires_grad}
