"""What `bitflux quantize SRC` accepts, resolved to one diffusers `from_pretrained` call.

SRC may be a bundled name, a pipeline directory, a transformer directory, a single
`.safetensors` file in Black Forest Labs' layout, or a hub id. Every kind is quantised while
loading by the bitflux backend (`backend.py`), shard by shard; nothing else loads weights.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from .config import QUANT_METHOD, QuantConfig
from .errors import ModelError


@dataclass(frozen=True)
class Source:
    """A resolved SRC: how to hand it to diffusers, and what to record as the checkpoint's source."""

    kind: str  # "dir" | "file" | "hub"
    location: str  # directory, file or hub id given to diffusers
    subfolder: str | None  # "transformer" for pipelines and hub ids
    record: str  # absolute path or hub id, recorded in quantization_config.source


def _hub_reachable(timeout: float = 3.0) -> str | None:
    """None if the hub's host answers on its port within `timeout`, else why not (one phrase)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout).close()
    except OSError as e:
        return f"cannot reach {url.hostname} ({e.strerror or type(e).__name__})"
    return None


def _cached(repo_id: str) -> bool:
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(repo_id, allow_patterns=["transformer/config.json"], local_files_only=True)
        return True
    except Exception:  # noqa: BLE001 - any failure means "not usable offline"
        return False


def resolve_source(src: str) -> Source:
    """Classify SRC; one-line ModelError for anything that is not a usable source."""
    from .pipeline import bundled, is_hub_id

    path = bundled(src) or Path(src)
    if path.is_dir():
        if (path / "model_index.json").is_file():
            if not (path / "transformer" / "config.json").is_file():
                raise ModelError(f"{src}: pipeline directory without transformer/config.json")
            return Source("dir", str(path), "transformer", str(path.resolve()))
        if (path / "config.json").is_file():
            return Source("dir", str(path), None, str(path.resolve()))
        raise ModelError(f"{src}: not a diffusers pipeline or model directory (no model_index.json or config.json)")
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ModelError(f"{src}: a single-file source must be .safetensors (bitflux loads only safetensors)")
        return Source("file", str(path), None, str(path.resolve()))
    if path.exists():
        raise ModelError(f"{src}: not a regular file or directory")
    if is_hub_id(src):
        why = _hub_reachable()
        if why and not _cached(src):
            raise ModelError(
                f"{src}: hub id, but {why} and it is not in the local cache; download it where the hub is "
                f"reachable (huggingface-cli download {src}) and pass the local directory"
            )
        return Source("hub", src, "transformer", src)
    raise ModelError(f"no such model: {src} (not a bundled name, directory, .safetensors file or hub id)")


def _check_dense(source: Source) -> type | None:
    """A directory source must be an unquantised diffusers model of a class bitflux has a policy
    for; returns that class (None for files and hub ids, whose class is FLUX's)."""
    if source.kind != "dir":
        return None
    from .safeio import read_json_object
    from .validate import check_model_config

    cfg_path = Path(source.location) / (source.subfolder or "") / "config.json"
    config = read_json_object(cfg_path)
    qc = config.get("quantization_config")
    if qc is not None:
        method = qc.get("quant_method") if isinstance(qc, dict) else qc
        if method == QUANT_METHOD:
            raise ModelError(f"{source.location}: already a bitflux checkpoint (load it with bitflux.load)")
        raise ModelError(f"{source.location}: already quantised by another backend ({method!r}); bitflux needs the full-precision model")
    cls = check_model_config(config, cfg_path)
    from .archs import build_meta_model
    from .policies import policy_for

    meta = build_meta_model(config)
    policy = policy_for(meta)  # one line before any weight is read if no policy fits the class
    if not policy.select(meta)[0]:
        raise ModelError(f"{cfg_path}: policy {policy.name!r} selects no Linear layers in {type(meta).__name__}")
    return cls


def _stored_dtype(source: Source) -> torch.dtype:
    """The source's stored float dtype (so bf16 stays bf16; diffusers would upcast); hub ids: bf16."""
    from .checkpoint import stored_float_dtype

    if source.kind == "hub":
        return torch.bfloat16
    return stored_float_dtype(Path(source.location) / (source.subfolder or ""))


def _quantize_single_file(path: Path, cls: type, src: str, kwargs: dict[str, Any]) -> nn.Module:
    """A BFL single file, rewritten shard by shard as a temporary diffusers directory (in TMPDIR),
    then quantised like any directory: peak RAM is the directory path's, not the whole file."""
    import tempfile

    from tqdm.auto import tqdm

    from .bfl import free_space_for, to_diffusers_dir
    from .checkpoint import from_pretrained

    tmp_root = Path(tempfile.gettempdir())
    free_space_for(path, tmp_root)
    with tempfile.TemporaryDirectory(prefix="bitflux-bfl-", dir=tmp_root) as tmp:
        with tqdm(total=path.stat().st_size, unit="B", unit_scale=True, desc="convert BFL layout", leave=False) as bar:
            d = to_diffusers_dir(path, Path(tmp) / "transformer", progress=bar.update)
        return from_pretrained(cls, str(d), where=src, **kwargs)


def quantize_from(
    src: str,
    config: QuantConfig,
    *,
    torch_dtype: torch.dtype | None = None,
    device: str | None = None,
    single_file_config: str | None = None,
) -> nn.Module:
    """Quantise SRC while loading it; returns the model with TernaryLinear blocks (nothing saved).

    `torch_dtype` is the dtype of the kept layers (default: as stored). On `device` (e.g. "cuda")
    the ternarisation runs there, tensor by tensor as they stream in.
    """
    from dataclasses import replace

    from diffusers import FluxTransformer2DModel

    from .checkpoint import from_pretrained

    source = resolve_source(src)
    cls = _check_dense(source) or FluxTransformer2DModel
    config = replace(config, source=source.record)
    kwargs: dict[str, Any] = {"quantization_config": config, "torch_dtype": torch_dtype or _stored_dtype(source)}
    if device not in (None, "cpu"):
        kwargs["device_map"] = str(device)
    if source.kind == "file" and single_file_config is None:  # streamed: rewrite, then the directory path
        return _quantize_single_file(Path(source.location), cls, src, kwargs)
    if source.kind == "file":
        from .checkpoint import load_single_file

        return load_single_file(cls, source.location, config=single_file_config, **kwargs)
    if source.subfolder:
        kwargs["subfolder"] = source.subfolder
    return from_pretrained(cls, source.location, where=src, **kwargs)
