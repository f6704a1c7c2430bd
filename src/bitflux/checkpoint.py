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
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .config import FORMAT_VERSIONS, QUANT_METHOD, ActPrecision, Backend, PackFormat, QuantConfig
from .errors import CheckpointError, FormatError, ModelError, OutputExistsError
from .linear import TernaryLinear
from .packing import check_packed
from .quantize import quantize, set_activations, set_backend

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = WEIGHTS_NAME + ".index.json"
DEFAULT_SHARD_BYTES = 5 * 1024**3


# ------------------------------------------------------------------------------------------- paths
def atomic_dir(out: str | os.PathLike) -> tuple[Path, Path]:
    """(final path, temporary sibling to write into); raises if the final path exists."""
    out = Path(out)
    if out.exists():
        raise OutputExistsError(f"output path exists: {out} (bitflux never overwrites)")
    if not out.parent.exists():
        raise ModelError(f"parent directory does not exist: {out.parent}")
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return out, tmp


def read_json(path: Path, what: str = "config") -> dict[str, Any]:
    """Read a JSON object, turning I/O and syntax problems into one-line errors."""
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelError(f"{path.parent}: no {path.name} (not a diffusers model directory)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ModelError(f"cannot read {path}: {e}") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return obj


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


def _shards(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in state.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nbytes
    return shards


def save(
    model: nn.Module,
    out: str | os.PathLike,
    *,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    extra_json: dict[str, Any] | None = None,
) -> Path:
    """Write a quantised model to the new directory `out` (atomic: temp dir + rename).

    `extra_json` maps file names to objects written beside config.json (e.g. calibration stats).
    """
    state = state_to_save(model)
    config = model_config_dict(model)
    config["quantization_config"] = model.bitflux_config.to_dict()
    out, tmp = atomic_dir(out)
    try:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for name, obj in (extra_json or {}).items():
            (tmp / name).write_text(json.dumps(obj, indent=2) + "\n")
        shards = _shards({k: v.contiguous().cpu() for k, v in state.items()}, max_shard_bytes)
        meta = {"format": "pt", "quant_method": QUANT_METHOD, "bitflux_format": config["quantization_config"]["format"]}
        if len(shards) == 1:
            save_file(shards[0], str(tmp / WEIGHTS_NAME), metadata=meta)
        else:
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                name = WEIGHTS_NAME.replace(".safetensors", f"-{i:05d}-of-{len(shards):05d}.safetensors")
                save_file(shard, str(tmp / name), metadata=meta)
                weight_map.update({k: name for k in shard})
            total = sum(v.numel() * v.element_size() for v in state.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# -------------------------------------------------------------------------------------------- load
def quant_config_from(config: dict[str, Any], where: Path) -> QuantConfig:
    """Validate a config.json's `quantization_config` and turn it into a QuantConfig."""
    qc = config.get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD:
        raise ModelError(f"{where}: not a bitflux checkpoint (no bitflux quantization_config); use `bitflux quantize`")
    try:
        fmt = PackFormat(qc.get("format"))
    except ValueError:
        raise FormatError(f"{where}: unknown packing format {qc.get('format')!r}") from None
    if qc.get("format_version") != FORMAT_VERSIONS[fmt]:
        raise FormatError(
            f"{where}: {fmt.value} format version {qc.get('format_version')!r} is not supported "
            f"(this bitflux reads version {FORMAT_VERSIONS[fmt]})"
        )
    try:
        return QuantConfig(
            format=fmt,
            init=qc.get("init", "absmean"),
            activations=qc.get("activations", "bf16"),
            policy=qc.get("policy", "flux"),
            modules_not_converted=tuple(qc.get("modules_not_converted", ())),
            source=str(qc.get("source", "")),
        )
    except ValueError as e:
        raise CheckpointError(f"{where}: bad quantization_config: {e}") from None


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a model directory (single file or sharded with an index)."""
    if (path / INDEX_NAME).exists():
        index = read_json(path / INDEX_NAME, "index")
        names = sorted(set(index.get("weight_map", {}).values()))
        files = [path / n for n in names]
    else:
        files = [path / WEIGHTS_NAME]
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"{path}: missing weight file {f.name}")
    return files


def build_meta(config: dict[str, Any], qconfig: QuantConfig | None, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """The model described by `config` on the meta device in `dtype`, quantised per `qconfig` if given."""
    from diffusers import FluxTransformer2DModel
    from diffusers.utils import logging as diffusers_logging

    cls_name = config.get("_class_name", "FluxTransformer2DModel")
    if cls_name != "FluxTransformer2DModel":
        raise ModelError(f"not a FLUX transformer (config says {cls_name!r}); bitflux supports FluxTransformer2DModel")
    kwargs = {k: v for k, v in config.items() if not k.startswith("_") and k != "quantization_config"}
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # silence the "cast with .to()" advice: meta tensors only
    try:
        with torch.device("meta"):
            model = FluxTransformer2DModel.from_config(kwargs).to(dtype)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"config.json does not describe a valid FLUX transformer: {e}") from None
    finally:
        diffusers_logging.set_verbosity(level)
    if qconfig is not None:
        quantize(model, qconfig)
    return model


def _read_tensors(files: list[Path], device: str) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt", device=device) as fh:
                for k in fh.keys():
                    state[k] = fh.get_tensor(k).clone()  # own, aligned storage
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"{f}: truncated or corrupted safetensors file ({str(e).splitlines()[0]})") from None
    return state


def _check_state(model: nn.Module, state: dict[str, torch.Tensor], qconfig: QuantConfig, where: Path) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise CheckpointError(f"{where}: tensors disagree with config.json ({what})")
    for k, ref in expected.items():
        t = state[k]
        if t.shape != ref.shape:
            raise CheckpointError(f"{where}: {k} has shape {tuple(t.shape)}, config.json implies {tuple(ref.shape)}")
        if k.endswith((".qweight", ".scale")) and t.dtype != ref.dtype:  # packed tensors have fixed dtypes
            raise CheckpointError(f"{where}: {k} has dtype {t.dtype}, expected {ref.dtype}")
    for name, mod in model.named_modules():
        if isinstance(mod, TernaryLinear):
            check_packed(state[f"{name}.qweight"], qconfig.format, name)
            if not torch.isfinite(state[f"{name}.scale"].float()).all():
                raise FormatError(f"{where}: {name}.scale holds non-finite values")


def load(
    path: str | os.PathLike,
    *,
    activations: ActPrecision | str | None = None,
    backend: Backend | str | None = None,
    device: str = "cpu",
) -> nn.Module:
    """Load a bitflux checkpoint directory (or a pipeline directory's `transformer/`).

    Returns a `FluxTransformer2DModel` with TernaryLinear blocks, usable as
    `FluxPipeline(..., transformer=model)`. `activations` overrides the stored precision.
    """
    path = Path(path)
    if not path.exists():
        raise ModelError(f"no such path: {path}")
    if not path.is_dir():
        raise ModelError(f"not a directory: {path}")
    if (path / "model_index.json").exists() and (path / "transformer").is_dir():
        path = path / "transformer"
    config = read_json(path / "config.json")
    qconfig = quant_config_from(config, path)
    model = build_meta(config, qconfig)
    state = _read_tensors(weight_files(path), device)
    _check_state(model, state, qconfig, path)
    model.load_state_dict(state, strict=True, assign=True)
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise CheckpointError(f"{path}: tensors left unset after load: {leftover[:3]}")
    model.bitflux_config = qconfig
    if activations is not None:
        set_activations(model, activations)
    if backend is not None:
        set_backend(model, backend)
    return model.eval()


def is_bitflux_dir(path: str | os.PathLike) -> bool:
    """True if `path` is a directory whose config.json carries a bitflux quantization_config."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        qc = json.loads(cfg.read_text()).get("quantization_config")
    except (OSError, ValueError):
        return False
    return isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD


def stored_tensor_bytes(files: list[Path]) -> int:
    """Bytes of the tensors in safetensors files, read from their headers (nothing is loaded)."""
    total = 0
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as fh:
                for k in fh.keys():
                    sl = fh.get_slice(k)
                    total += math.prod(sl.get_shape()) * _DTYPE_BYTES[sl.get_dtype()]
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{f}: truncated or corrupted safetensors file ({str(e).splitlines()[0]})") from None
    return total


def stored_float_dtype(path: Path) -> torch.dtype:
    """The dtype of the first floating-point tensor stored in a model directory (bf16 if none)."""
    names = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
    for f in weight_files(path):
        try:
            with safe_open(str(f), framework="pt") as fh:
                for k in fh.keys():
                    dt = fh.get_slice(k).get_dtype()
                    if dt in names:
                        return names[dt]
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{f}: truncated or corrupted safetensors file ({str(e).splitlines()[0]})") from None
    return torch.bfloat16


_DTYPE_BYTES = {"U8": 1, "I8": 1, "F8_E4M3": 1, "BF16": 2, "F16": 2, "F32": 4, "I32": 4, "I64": 8, "F64": 8, "BOOL": 1}


def tensor_bytes(state: dict[str, torch.Tensor]) -> int:
    """Bytes of a state dict's tensors (meta tensors count by shape and dtype)."""
    return sum(math.prod(t.shape) * t.element_size() for t in state.values())
