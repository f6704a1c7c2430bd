"""Save and load quantised models as ordinary diffusers model directories.

A directory holds `config.json` (the model's own config plus `quantization_config`) and
safetensors shards (packed codes as uint8, bf16 scales, every untouched parameter), with a
diffusers-style index when sharded. `save` writes to a temporary sibling and renames it, so a
crash never leaves a half-written OUT. `load` builds the model on the meta device, then assigns
the stored tensors, so peak memory stays near the packed size and no dense weight ever exists.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn

from .atomic import atomic_dir  # noqa: F401 - re-exported: calibration and tools write through it
from .config import QUANT_METHOD, ActPrecision, Backend, QuantConfig
from .errors import BitfluxError, CheckpointError, ModelError
from .quantize import set_activations, set_backend

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = WEIGHTS_NAME + ".index.json"
DEFAULT_SHARD_BYTES = 5 * 1024**3


# ------------------------------------------------------------------------------------------- paths
def model_config_dict(model: nn.Module) -> dict[str, Any]:
    """The model's own diffusers config as plain JSON data (private keys dropped)."""
    import diffusers

    cfg = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
    cfg = json.loads(json.dumps(cfg, default=list))  # tuples -> lists
    return {"_class_name": type(model).__name__, "_diffusers_version": diffusers.__version__, **cfg}


# -------------------------------------------------------------------------------------------- save
def state_to_save(model: nn.Module) -> dict[str, torch.Tensor]:
    """Exactly the tensors `save` writes (also used by `inspect` to count bytes on meta models)."""
    if not hasattr(model, "bitflux_config"):
        raise ModelError("model is not quantised (call bitflux.quantize first)")
    return {k: v.detach() for k, v in model.state_dict().items()}


def save(
    model: nn.Module,
    out: str | os.PathLike,
    *,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    extra_json: dict[str, Any] | None = None,
) -> Path:
    """Write a quantised model to the new directory `out` through diffusers' `save_pretrained`.

    Atomic: written to a temporary sibling, then renamed. `extra_json` maps file names to objects
    written beside config.json (e.g. calibration stats).
    """
    from .backend import attach
    from .integrity import seal

    if not hasattr(model, "bitflux_config"):
        raise ModelError("model is not quantised (call bitflux.quantize first)")
    if not hasattr(model, "save_pretrained"):
        raise ModelError(f"{type(model).__name__} is not a diffusers model (no save_pretrained)")
    if getattr(model, "hf_quantizer", None) is None:
        attach(model, model.bitflux_config)
    out, tmp = atomic_dir(out)
    try:
        with _quiet_diffusers():
            model.save_pretrained(tmp, max_shard_size=max_shard_bytes, safe_serialization=True)
        for name, obj in (extra_json or {}).items():
            (tmp / name).write_text(json.dumps(obj, indent=2) + "\n")
        seal(tmp)  # content hashes of every file, checked on load
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# -------------------------------------------------------------------------------------------- load
def quant_config_from(config: dict[str, Any], where: Path) -> QuantConfig:
    """Validate a config.json's `quantization_config` (validate.py's schema) and turn it into a QuantConfig."""
    from .validate import check_quantization_config

    check_quantization_config(config.get("quantization_config"), where)
    return QuantConfig.from_dict(config["quantization_config"])


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a model directory (single file, or sharded with a checked index)."""
    from .safeio import check_regular_file, read_json_object
    from .validate import check_index, shard_files

    if os.path.lexists(path / INDEX_NAME):
        return shard_files(path, check_index(read_json_object(path / INDEX_NAME), path / INDEX_NAME))
    f = path / WEIGHTS_NAME
    if not os.path.lexists(f):
        raise CheckpointError(f"{path}: missing weight file {f.name}")
    check_regular_file(f)
    return [f]


class _quiet_diffusers:
    """Silence diffusers' loader chatter (missing/unexpected-key notes we check ourselves) for a block."""

    def __enter__(self) -> None:
        from diffusers.utils import logging as dl

        self._level = dl.get_verbosity()
        dl.set_verbosity_error()

    def __exit__(self, *exc: object) -> None:
        from diffusers.utils import logging as dl

        dl.set_verbosity(self._level)


def model_dir(path: str | os.PathLike) -> Path:
    """A model directory: `path` itself, or a pipeline directory's `transformer/`."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"no such path: {path}")
    if not path.is_dir():
        raise ModelError(f"not a directory: {path}")
    if (path / "model_index.json").is_file() and (path / "transformer").is_dir():
        path = path / "transformer"
    return path


def from_pretrained(cls, source: str | os.PathLike, *, where: str | os.PathLike | None = None, **kwargs: Any) -> nn.Module:
    """`cls.from_pretrained(source, **kwargs)` with diffusers' errors turned into one-line bitflux errors."""
    from .backend import register

    register()
    try:
        with _quiet_diffusers():
            return cls.from_pretrained(str(source), **kwargs)
    except BitfluxError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, SafetensorError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{where or source}: cannot load ({msg})") from None


def load_single_file(cls, path: str | os.PathLike, *, config: str | None = None, **kwargs: Any) -> nn.Module:
    """`cls.from_single_file(path, ...)` for BFL's one-file layout, offline: without `config` (a local
    directory holding config.json, or a hub id) the config is derived from the file's tensor names."""
    import tempfile

    from .backend import register
    from .bfl import config_of

    register()
    with tempfile.TemporaryDirectory() as tmp:
        if config is None:
            (Path(tmp) / "config.json").write_text(json.dumps(config_of(Path(path))))
            config = tmp
        try:
            with _quiet_diffusers():
                return cls.from_single_file(str(path), config=config, **kwargs)
        except BitfluxError:
            raise
        except (OSError, ValueError, RuntimeError, KeyError, TypeError, SafetensorError) as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"{path}: cannot load as a single-file FLUX transformer ({msg})") from None


def load(
    path: str | os.PathLike,
    *,
    activations: ActPrecision | str | None = None,
    backend: Backend | str | None = None,
    device: str | None = None,
    torch_dtype: torch.dtype | None = None,
    verify: bool = True,
) -> nn.Module:
    """Load a bitflux checkpoint directory (or a pipeline directory's `transformer/`).

    The same path as `<ModelClass>.from_pretrained(path)`: the model's own class with TernaryLinear
    blocks, packed tensors assigned as stored (no dense weight ever exists). Everything is checked
    first (config schema, stored headers, recorded hashes unless `verify=False`), values after.
    `torch_dtype` is the dtype of the kept layers (default: as stored); `activations` overrides
    the stored precision.
    """
    from .backend import _VERIFY
    from .safeio import read_json_object
    from .validate import check_model_config

    path = model_dir(path)
    config = read_json_object(path / "config.json")
    quant_config_from(config, path / "config.json")
    cls = check_model_config(config, path / "config.json")
    kwargs: dict[str, Any] = {"torch_dtype": torch_dtype or stored_float_dtype(path)}
    if device not in (None, "cpu"):
        kwargs["device_map"] = str(device)
    token = _VERIFY.set(verify)
    try:
        model = from_pretrained(cls, path, where=path, **kwargs)
    finally:
        _VERIFY.reset(token)
    if activations is not None:
        set_activations(model, activations)
    if backend is not None:
        set_backend(model, backend)
    return model.eval()


def is_bitflux_dir(path: str | os.PathLike) -> bool:
    """True if `path` is a directory whose config.json carries a bitflux quantization_config."""
    from .safeio import read_json_object

    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        qc = read_json_object(cfg).get("quantization_config")
    except BitfluxError:
        return False
    return isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD


def stored_float_dtype(path: Path) -> torch.dtype:
    """The dtype of the first floating-point tensor stored in a model directory or single file
    (bf16 if none); headers only, first file only."""
    from .tensorcheck import FLOAT_DTYPES, read_headers

    files = [path] if path.is_file() else weight_files(path)[:1]
    return next((FLOAT_DTYPES[h.dtype] for h in read_headers(files).values() if h.dtype in FLOAT_DTYPES), torch.bfloat16)


def tensor_bytes(state: dict[str, torch.Tensor]) -> int:
    """Bytes of a state dict's tensors (meta tensors count by shape and dtype)."""
    return sum(math.prod(t.shape) * t.element_size() for t in state.values())
