"""The calibration loss terms: normalised MSE, time weights, and the CFG-pair terms (gain, extrapolated targets).

Batches of (cond, uncond) pairs are laid out as [cond half; uncond half] (see `calibrate.train`).
"""

from __future__ import annotations

import torch


def _nmse(a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Squared error over the target's energy; `weight` (B,) weights each sample's error."""
    err = (a.float() - b.float()).square()
    if weight is not None:
        err = err * weight.reshape(-1, *[1] * (err.dim() - 1))
    return err.mean() / b.float().square().mean().clamp_min(1e-8)


def _gain_penalty(d_s: torch.Tensor, d_t: torch.Tensor) -> torch.Tensor:
    """sum_i |d_t,i|^2 (1 - g_i)^2 / sum_i |d_t,i|^2 with g_i = <d_s,i, d_t,i> / |d_t,i|^2: 0 when the student keeps
    the teacher's CFG difference at full strength on every pair, whatever its error orthogonal to it."""
    d_s, d_t = d_s.float().flatten(1), d_t.float().flatten(1)
    energy = d_t.square().sum(1).clamp_min(1e-12)
    gain = (d_s * d_t).sum(1) / energy
    return (energy * (1 - gain).square()).sum() / energy.sum()


def _extrapolate(x: torch.Tensor, k: float) -> torch.Tensor:
    """A batch of [cond; uncond] halves with the cond half moved to u + k (c - u)."""
    half = x.shape[0] // 2
    return torch.cat([x[half:] + k * (x[:half] - x[half:]), x[half:]])


def _time_weights(timestep: torch.Tensor, power: float) -> torch.Tensor | None:
    """Per-sample loss weights t**power, normalised to mean 1 (None when power is 0)."""
    if power == 0:
        return None
    w = timestep.float().reshape(-1).clamp_min(1e-3) ** power
    return w / w.mean()
