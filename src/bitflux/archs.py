"""Full-size transformer configs of known models, as data, and a meta-device builder for any of them.

The configs are the `transformer/config.json` of each public release (source beside each), so
`bitflux inspect --arch NAME` can count parameters and bytes with no weights and no download.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .errors import ModelError

# black-forest-labs/FLUX.1-dev transformer/config.json.
FLUX_DEV_CONFIG: dict[str, Any] = {
    "_class_name": "FluxTransformer2DModel",
    "attention_head_dim": 128,
    "axes_dims_rope": [16, 56, 56],
    "guidance_embeds": True,
    "in_channels": 64,
    "joint_attention_dim": 4096,
    "num_attention_heads": 24,
    "num_layers": 19,
    "num_single_layers": 38,
    "patch_size": 1,
    "pooled_projection_dim": 768,
}
# black-forest-labs/FLUX.2-dev transformer/config.json; the values are also diffusers'
# Flux2Transformer2DModel defaults (docs: huggingface.co/docs/diffusers/api/models/flux2_transformer).
FLUX2_DEV_CONFIG: dict[str, Any] = {
    "_class_name": "Flux2Transformer2DModel",
    "attention_head_dim": 128,
    "axes_dims_rope": [32, 32, 32, 32],
    "eps": 1e-06,
    "guidance_embeds": True,
    "in_channels": 128,
    "joint_attention_dim": 15360,
    "mlp_ratio": 3.0,
    "num_attention_heads": 48,
    "num_layers": 8,
    "num_single_layers": 48,
    "patch_size": 1,
    "rope_theta": 2000,
    "timestep_guidance_channels": 256,
}
# FLUX.2-klein-4B transformer/config.json, as diffusers converted it
# (huggingface.co/YuCollection/FLUX.2-klein-base-4B-Diffusers/blob/main/transformer/config.json).
FLUX2_KLEIN_4B_CONFIG: dict[str, Any] = {
    **FLUX2_DEV_CONFIG,
    "guidance_embeds": False,
    "joint_attention_dim": 7680,
    "num_attention_heads": 24,
    "num_layers": 5,
    "num_single_layers": 20,
}
# stabilityai/stable-diffusion-3.5-large transformer/config.json (public release mirror:
# huggingface.co/frankjoshua/stable-diffusion-3.5-large/blob/main/transformer/config.json).
SD35_LARGE_CONFIG: dict[str, Any] = {
    "_class_name": "SD3Transformer2DModel",
    "attention_head_dim": 64,
    "caption_projection_dim": 2432,
    "in_channels": 16,
    "joint_attention_dim": 4096,
    "num_attention_heads": 38,
    "num_layers": 38,
    "out_channels": 16,
    "patch_size": 2,
    "pooled_projection_dim": 2048,
    "pos_embed_max_size": 192,
    "qk_norm": "rms_norm",
    "sample_size": 128,
}
# Qwen/Qwen-Image transformer/config.json (also diffusers' QwenImageTransformer2DModel defaults,
# docs: huggingface.co/docs/diffusers/api/models/qwenimage_transformer2d).
QWEN_IMAGE_CONFIG: dict[str, Any] = {
    "_class_name": "QwenImageTransformer2DModel",
    "attention_head_dim": 128,
    "axes_dims_rope": [16, 56, 56],
    "guidance_embeds": False,
    "in_channels": 64,
    "joint_attention_dim": 3584,
    "num_attention_heads": 24,
    "num_layers": 60,
    "out_channels": 16,
    "patch_size": 2,
}
# Wan-AI/Wan2.1-T2V-14B-Diffusers transformer/config.json (diffusers' WanTransformer3DModel
# defaults, docs: huggingface.co/docs/diffusers/api/models/wan_transformer_3d).
WAN21_T2V_14B_CONFIG: dict[str, Any] = {
    "_class_name": "WanTransformer3DModel",
    "added_kv_proj_dim": None,
    "attention_head_dim": 128,
    "cross_attn_norm": True,
    "eps": 1e-06,
    "ffn_dim": 13824,
    "freq_dim": 256,
    "image_dim": None,
    "in_channels": 16,
    "num_attention_heads": 40,
    "num_layers": 40,
    "out_channels": 16,
    "patch_size": [1, 2, 2],
    "qk_norm": "rms_norm_across_heads",
    "rope_max_seq_len": 1024,
    "text_dim": 4096,
}
# lodestones/Chroma1-HD transformer/config.json (mirror:
# huggingface.co/TensorStack/Chroma1-HD-ts/blob/main/transformer/config.json).
CHROMA1_HD_CONFIG: dict[str, Any] = {
    "_class_name": "ChromaTransformer2DModel",
    "approximator_hidden_dim": 5120,
    "approximator_layers": 5,
    "approximator_num_channels": 64,
    "attention_head_dim": 128,
    "axes_dims_rope": [16, 56, 56],
    "in_channels": 64,
    "joint_attention_dim": 4096,
    "num_attention_heads": 24,
    "num_layers": 19,
    "num_single_layers": 38,
    "out_channels": None,
    "patch_size": 1,
}

ARCHS: dict[str, dict[str, Any]] = {
    "flux-dev": FLUX_DEV_CONFIG,
    "flux-schnell": {**FLUX_DEV_CONFIG, "guidance_embeds": False},
    "flux2-dev": FLUX2_DEV_CONFIG,
    "flux2-klein-4b": FLUX2_KLEIN_4B_CONFIG,
    "sd3.5-large": SD35_LARGE_CONFIG,
    "qwen-image": QWEN_IMAGE_CONFIG,
    "wan2.1-t2v-14b": WAN21_T2V_14B_CONFIG,
    "chroma1-hd": CHROMA1_HD_CONFIG,
}


def build_meta_model(config: dict[str, Any], dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """The diffusers model `config` describes, on the meta device in `dtype` (no memory, no weights)."""
    from diffusers.models.modeling_utils import no_init_weights
    from diffusers.utils import logging as diffusers_logging

    from .validate import model_class

    cls = model_class(config, "config.json")
    kwargs = {k: v for k, v in config.items() if not k.startswith("_") and k != "quantization_config"}
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # silence the "cast with .to()" advice: meta tensors only
    try:
        with torch.device("meta"), no_init_weights():  # meta tensors hold nothing to initialise
            return cls.from_config(kwargs).to(dtype)
    except (TypeError, ValueError) as e:
        raise ModelError(f"config.json does not describe a valid {cls.__name__}: {e}") from None
    finally:
        diffusers_logging.set_verbosity(level)
