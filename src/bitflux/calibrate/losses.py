"""The calibration loss terms and learning-rate schedule, shared by joint and block-wise training."""

from __future__ import annotations

import math

import torch


def nmse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared error of `a` against the target `b`, over the target's energy (scale-free)."""
    err = (a.float() - b.float()).square()
    return err.mean() / b.float().square().mean().clamp_min(1e-8)


def block_loss(s_out: tuple[torch.Tensor, ...], t_out: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Mean normalised MSE over a block's outputs (text and image streams)."""
    return sum(nmse(s, t) for s, t in zip(s_out, t_out)) / len(t_out)


def cosine_lr(peak: float, step: int, steps: int) -> float:
    """Learning rate at `step` of a cosine decay from `peak` to 10 % of it over `steps`."""
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * step / max(1, steps))))
