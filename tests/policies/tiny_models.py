"""Tiny diffusers transformers (a few hundred KB, built in code) and deterministic forward inputs.

One builder per named policy: each returns (model in fp32 eval mode, forward kwargs). Every
config keeps both block kinds of its architecture, so the policy's globs are all exercised.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch
from torch import nn

from bitflux import TernaryLinear


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def flux() -> tuple[nn.Module, dict[str, Any]]:
    from diffusers import FluxTransformer2DModel

    m = FluxTransformer2DModel(
        in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=24, axes_dims_rope=(4, 6, 6), guidance_embeds=True,
    )
    g = _g(1)
    kw = dict(
        hidden_states=torch.randn(1, 16, 16, generator=g), encoder_hidden_states=torch.randn(1, 8, 32, generator=g),
        pooled_projections=torch.randn(1, 24, generator=g), timestep=torch.tensor([0.5]),
        img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3), guidance=torch.tensor([3.5]),
    )
    return m, kw


def flux2() -> tuple[nn.Module, dict[str, Any]]:
    from diffusers import Flux2Transformer2DModel

    m = Flux2Transformer2DModel(
        in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4), guidance_embeds=True,
    )
    g = _g(1)
    kw = dict(
        hidden_states=torch.randn(1, 16, 16, generator=g), encoder_hidden_states=torch.randn(1, 8, 32, generator=g),
        timestep=torch.tensor([0.5]), img_ids=torch.zeros(1, 16, 4), txt_ids=torch.zeros(1, 8, 4),
        guidance=torch.tensor([3.5]),
    )
    return m, kw


def sd3() -> tuple[nn.Module, dict[str, Any]]:
    from diffusers import SD3Transformer2DModel

    m = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=4,
        joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=24, out_channels=4,
        pos_embed_max_size=16, qk_norm="rms_norm",
    )
    g = _g(1)
    kw = dict(
        hidden_states=torch.randn(1, 4, 8, 8, generator=g), encoder_hidden_states=torch.randn(1, 8, 32, generator=g),
        pooled_projections=torch.randn(1, 24, generator=g), timestep=torch.tensor([500.0]),
    )
    return m, kw


def qwenimage() -> tuple[nn.Module, dict[str, Any]]:
    from diffusers import QwenImageTransformer2DModel

    m = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, axes_dims_rope=(4, 6, 6),
    )
    g = _g(1)
    kw = dict(
        hidden_states=torch.randn(1, 16, 16, generator=g), encoder_hidden_states=torch.randn(1, 8, 32, generator=g),
        encoder_hidden_states_mask=torch.ones(1, 8), timestep=torch.tensor([0.5]), img_shapes=[(1, 4, 4)],
    )
    return m, kw


def wan() -> tuple[nn.Module, dict[str, Any]]:
    from diffusers import WanTransformer3DModel

    m = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=32,
    )
    g = _g(1)
    kw = dict(
        hidden_states=torch.randn(1, 4, 2, 8, 8, generator=g), timestep=torch.tensor([500]),
        encoder_hidden_states=torch.randn(1, 8, 32, generator=g),
    )
    return m, kw


def chroma() -> tuple[nn.Module, dict[str, Any]]:
    from diffusers import ChromaTransformer2DModel

    m = ChromaTransformer2DModel(
        in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, axes_dims_rope=(4, 6, 6), approximator_num_channels=16, approximator_hidden_dim=32,
        approximator_layers=1,
    )
    g = _g(1)
    kw = dict(
        hidden_states=torch.randn(1, 16, 16, generator=g), encoder_hidden_states=torch.randn(1, 8, 32, generator=g),
        timestep=torch.tensor([0.5]), img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3),
    )
    return m, kw


BUILDERS: dict[str, Callable[[], tuple[nn.Module, dict[str, Any]]]] = {
    "flux": flux, "flux2": flux2, "sd3": sd3, "qwenimage": qwenimage, "wan": wan, "chroma": chroma,
}


def dequantized_reference(float_model: nn.Module, quantised: nn.Module) -> nn.Module:
    """`float_model` with each Linear that `quantised` ternarised given its dequantised weight."""
    ref = copy.deepcopy(float_model)
    for name, mod in quantised.named_modules():
        if isinstance(mod, TernaryLinear):
            ref.get_submodule(name).weight.data = mod.dequantized_weight(torch.float32)
    return ref


def forward(model: nn.Module, kw: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**kw, return_dict=False)[0]


def build(policy: str, seed: int = 0) -> tuple[nn.Module, dict[str, Any]]:
    """The tiny model for `policy` with random weights from `seed`, fp32, eval mode, and its inputs."""
    torch.manual_seed(seed)
    model, kw = BUILDERS[policy]()
    return model.float().eval(), kw
