"""Resolve what a user names as MODEL (bundled name, pipeline dir, quantised dir, hub id) to a pipeline.

Shared by `generate`, `eval` and the demo so every command accepts the same kinds of MODEL.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .checkpoint import is_bitflux_dir, load
from .safeio import read_json_object as read_json
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


def resolve(model: str, base: str | None = None, fallback: str | None = None) -> ModelRef:
    """Classify MODEL; a bare quantised transformer pairs with `base`, else its recorded source
    pipeline, else `fallback`."""
    path = bundled(model) or Path(model)
    if path.is_dir():
        if (path / "model_index.json").is_file():
            sub = path / "transformer"
            return ModelRef(str(path), str(sub) if is_bitflux_dir(sub) else None)
        if is_bitflux_dir(path):
            qc = read_json(path / "config.json").get("quantization_config", {})
            for src in [base] if base else [qc.get("source"), fallback]:
                src = src or ""
                src_path = bundled(src) or Path(src)
                if src and (src_path / "model_index.json").is_file():
                    return ModelRef(str(src_path), str(path))
                if src and is_hub_id(src) and not src_path.exists():  # recorded or given hub id (needs network)
                    return ModelRef(src, str(path))
            raise ModelError(f"{model}: a bare quantised transformer needs --base PIPELINE (text encoders, VAE)")
        if (path / "config.json").is_file():
            if (base or fallback) is None:
                raise ModelError(f"{model}: a transformer directory needs --base PIPELINE (text encoders, VAE)")
            src = base or fallback
            return ModelRef(str(bundled(src) or src), str(path))
        raise ModelError(f"{model}: not a diffusers pipeline or model directory (no model_index.json or config.json)")
    if path.exists():
        raise ModelError(f"{model}: not a directory")
    if is_hub_id(model):
        return ModelRef(model, None)  # only works with network access
    raise ModelError(f"no such model: {model} (not a bundled name, directory or hub id)")


def load_transformer(ref: ModelRef, **load_kwargs) -> nn.Module | None:
    """The bitflux transformer named by `ref`, if any (plain transformers load with the pipeline).

    Its kept layers load in fp32 unless `torch_dtype` says otherwise: the dtype `load_pipeline`
    loads the rest of the pipeline in, so a bf16-stored model takes the pipeline's inputs."""
    if ref.transformer is None:
        return None
    if is_bitflux_dir(ref.transformer):
        load_kwargs.setdefault("torch_dtype", torch.float32)
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
