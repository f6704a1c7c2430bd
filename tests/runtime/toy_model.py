"""Helpers for the runtime tests: the bundled toy checkpoint and its inputs."""

from __future__ import annotations

from pathlib import Path

import torch

import bitflux
from conftest import flux_inputs

TOY = Path(bitflux.__file__).parent / "assets" / "toy-1.58bit"


def load_toy(activations: str | None = None) -> torch.nn.Module:
    """The bundled `toy-1.58bit` transformer through `bitflux.load` (fp32 kept layers)."""
    return bitflux.load(TOY, activations=activations)


def toy_inputs(model: torch.nn.Module) -> dict:
    """Small deterministic forward() kwargs for the toy (16 image tokens, 8 text tokens)."""
    return flux_inputs(model, tokens=16, text=8)
