"""Size accounting: parameter counts, ternary fraction and bytes of the tensors `save` writes."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from torch import nn

from .checkpoint import (
    build_meta,
    is_bitflux_dir,
    quant_config_from,
    read_json,
    state_to_save,
    stored_float_dtype,
    stored_tensor_bytes,
    tensor_bytes,
    weight_files,
)
from .config import QuantConfig
from .linear import TernaryLinear

# FLUX.1-dev's transformer config (diffusers' black-forest-labs/FLUX.1-dev/transformer/config.json).
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
ARCHS: dict[str, dict[str, Any]] = {
    "flux-dev": FLUX_DEV_CONFIG,
    "flux-schnell": {**FLUX_DEV_CONFIG, "guidance_embeds": False},
}


def size_report(model: nn.Module) -> dict[str, Any]:
    """Counts and bytes of a quantised (possibly meta-device) model; bf16 baseline = 2 bytes/param."""
    state = state_to_save(model)
    ternary = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, TernaryLinear))
    packed_keys = {k for k in state if k.endswith((".qweight", ".scale"))}
    other = sum(math.prod(state[k].shape) for k in state if k not in packed_keys)
    params = ternary + other
    nbytes = tensor_bytes(state)
    cfg = model.bitflux_config
    return {
        "format": cfg.format.value,
        "params": params,
        "ternary_params": ternary,
        "ternary_fraction": ternary / params,
        "ternary_layers": sum(isinstance(m, TernaryLinear) for m in model.modules()),
        "kept_layers": len(cfg.modules_not_converted),
        "bytes": nbytes,
        "scale_bytes": tensor_bytes({k: state[k] for k in state if k.endswith(".scale")}),
        "bf16_bytes": 2 * params,
        "ratio": 2 * params / nbytes,
    }


def inspect_arch(arch: str, qconfig: QuantConfig) -> dict[str, Any]:
    """Size report of a named architecture, built on the meta device (no weights, no download)."""
    report = size_report(build_meta(ARCHS[arch], qconfig))
    return {"model": arch, **report}


def inspect_path(path: str | Path, qconfig: QuantConfig) -> dict[str, Any]:
    """Size report of a model directory: as stored if quantised, else as `qconfig` would store it."""
    path = Path(path)
    if (path / "model_index.json").is_file():
        path = path / "transformer"
    config = read_json(path / "config.json")
    quantised = is_bitflux_dir(path)
    if quantised:
        qconfig = quant_config_from(config, path)
    dtype = stored_float_dtype(path)  # kept layers stay in the stored dtype, as `quantize` does
    report = {"model": str(path), "quantized": quantised, **size_report(build_meta(config, qconfig, dtype))}
    if quantised:  # what is really on disk: tensors by their headers, and whole files
        files = weight_files(path)
        report["stored_bytes"] = stored_tensor_bytes(files)
        report["disk_bytes"] = sum(f.stat().st_size for f in files)
    return report
