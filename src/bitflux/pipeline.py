"""Resolve what a user names as MODEL (bundled name, pipeline dir, quantised dir, hub id) to a pipeline.

Shared by `generate`, `eval` and the demo so every command accepts the same kinds of MODEL.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .checkpoint import is_bitflux_dir, load, read_json, stored_float_dtype
from .errors import ModelError


@dataclass(frozen=True)
class ModelRef:
    """Where the pieces of a MODEL argument live."""

    pipeline: str  # directory or hub id of the full pipeline (text encoders, VAE, scheduler)
    transformer: str | None  # directory of a bitflux transformer to use instead, or None


def bundled(name: str) -> Path | None:
    """Path of a bundled model by name, or None if `name` is not one."""
    try:
        from .toy import bundled_path
    except ImportError:
        return None
    try:
        return bundled_path(name)
    except ModelError:
        return None


def is_hub_id(name: str) -> bool:
    """Looks like "owner/repo" (not a path): only such names are sent to the model hub."""
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~")) and " " not in name


def resolve(model: str, base: str | None = None) -> ModelRef:
    """Classify MODEL; `base` names the pipeline to pair with a bare quantised transformer."""
    path = bundled(model) or Path(model)
    if path.is_dir():
        if (path / "model_index.json").is_file():
            sub = path / "transformer"
            return ModelRef(str(path), str(sub) if is_bitflux_dir(sub) else None)
        if is_bitflux_dir(path):
            qc = read_json(path / "config.json").get("quantization_config", {})
            src = base or qc.get("source") or ""
            src_path = bundled(src) or Path(src)
            if (src_path / "model_index.json").is_file():
                return ModelRef(str(src_path), str(path))
            if is_hub_id(src) and not src_path.exists():  # recorded or given hub id (needs network)
                return ModelRef(src, str(path))
            raise ModelError(f"{model}: a bare quantised transformer needs --base PIPELINE (text encoders, VAE)")
        if (path / "config.json").is_file():
            if base is None:
                raise ModelError(f"{model}: a transformer directory needs --base PIPELINE (text encoders, VAE)")
            return ModelRef(base, str(path))
        raise ModelError(f"{model}: not a diffusers pipeline or model directory (no model_index.json or config.json)")
    if path.exists():
        raise ModelError(f"{model}: not a directory")
    if is_hub_id(model):
        return ModelRef(model, None)  # only works with network access
    raise ModelError(f"no such model: {model} (not a bundled name, directory or hub id)")


def load_transformer(ref: ModelRef, **load_kwargs) -> nn.Module | None:
    """The bitflux transformer named by `ref`, if any (plain transformers load with the pipeline)."""
    if ref.transformer is None:
        return None
    if is_bitflux_dir(ref.transformer):
        return load(ref.transformer, **load_kwargs)
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel.from_pretrained(ref.transformer)


def load_pipeline(ref: ModelRef, transformer: nn.Module | None = None, dtype: torch.dtype | None = None):
    """A `FluxPipeline` from `ref.pipeline`, with `transformer` swapped in when given."""
    from diffusers import FluxPipeline

    kwargs = {"transformer": transformer} if transformer is not None else {}
    if dtype is not None:
        kwargs["torch_dtype"] = dtype
    try:
        return FluxPipeline.from_pretrained(ref.pipeline, **kwargs)
    except (OSError, ValueError, EnvironmentError) as e:
        raise ModelError(f"cannot load pipeline {ref.pipeline}: {str(e).splitlines()[0]}") from None


def load_full_transformer(src: str, dtype: torch.dtype | None = None) -> nn.Module:
    """The full-precision FLUX transformer of SRC (bundled name, pipeline dir, transformer dir, hub id)."""
    from diffusers import FluxTransformer2DModel

    path = bundled(src) or Path(src)
    subfolder = None
    if path.is_dir():
        if (path / "model_index.json").is_file():
            path = path / "transformer"
        cfg = read_json(path / "config.json")
        if "quantization_config" in cfg:
            raise ModelError(f"{src}: already quantised")
        if cfg.get("_class_name") != "FluxTransformer2DModel":
            raise ModelError(f"{src}: not a FLUX transformer (config says {cfg.get('_class_name')!r})")
        name = str(path)
        if dtype is None:  # keep the stored dtype (diffusers would upcast to fp32)
            dtype = stored_float_dtype(path)
    elif path.exists():
        raise ModelError(f"{src}: not a directory")
    elif is_hub_id(src):
        name, subfolder = src, "transformer"  # needs network
    else:
        raise ModelError(f"no such model: {src} (not a bundled name, directory or hub id)")
    kwargs = {"torch_dtype": dtype} if dtype is not None else {}
    try:
        return FluxTransformer2DModel.from_pretrained(name, subfolder=subfolder, **kwargs)
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelError(f"cannot load FLUX transformer from {src}: {str(e).splitlines()[0]}") from None
