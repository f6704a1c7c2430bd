"""Shared fixtures: tiny FLUX transformers built in code (no download), and their inputs."""

from __future__ import annotations

import os

import torch

# Triton decides interpreter vs GPU at import (diffusers imports it): without CUDA, interpret.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from diffusers import FluxTransformer2DModel  # noqa: E402

TINY = dict(
    patch_size=1,
    in_channels=16,
    num_layers=1,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=24,
    axes_dims_rope=(4, 6, 6),
)


def tiny_flux(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> FluxTransformer2DModel:
    """A randomly initialised FLUX transformer with both block kinds, a few hundred KB."""
    torch.manual_seed(seed)
    return FluxTransformer2DModel(**{**TINY, **overrides}).to(dtype).eval()


def flux_inputs(model: FluxTransformer2DModel, seed: int = 1, tokens: int = 16, text: int = 8) -> dict:
    """Deterministic forward() kwargs for `model`."""
    from bitflux.bench.synth import flux_inputs as inputs

    return inputs(model.config, tokens, text, next(model.parameters()).dtype, seed)


@pytest.fixture
def tiny():
    return tiny_flux()
