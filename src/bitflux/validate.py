"""Schemas for a checkpoint's JSON: the model config, `quantization_config` and the shard index.

Each check raises a one-line `CheckpointError` (or `FormatError`) naming the file and the key,
before anything is built from the values. The model config is checked against the model class's
own `__init__` annotations (so any diffusers model gets types checked), then against rules
of the architecture that the types cannot say (FLUX: rope axes sum to the head dim, sizes
positive and bounded so a meta model is quick to build).
"""

from __future__ import annotations

import inspect
import json
import math
import os
import types
import typing
from pathlib import Path
from typing import Any

from .config import FORMAT_VERSIONS, QUANT_METHOD, ActPrecision, InitMethod, PackFormat
from .errors import CheckpointError, FormatError, ModelError

# Any int in a model config: a bound far above every real model, low enough that building the
# model on the meta device stays quick (sizes of meta tensors cost nothing, module counts do).
MAX_CONFIG_INT = 1 << 24
MAX_WIDTH = 1 << 16  # FLUX.1-dev: 3072 wide, T5 4096; a bound on every FLUX size
MAX_BLOCKS = 128  # per kind; FLUX.1-dev has 19 + 38 (256 blocks take ~2 s to build even on meta)
QC_KEYS = frozenset(
    {"quant_method", "format", "format_version", "init", "activations", "policy", "include", "exclude", "modules_not_converted", "source", "integrity"}
)


def _show(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


# -------------------------------------------------------------------------------- generic types
def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is type(None):
        return "null"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin in (tuple, list):
        return f"a list of {_describe(args[0])}" if args else "a list"
    if origin is dict:
        return "an object"
    if origin is typing.Literal:
        return " or ".join(json.dumps(a) for a in args)
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(hint, str(hint))


def matches(value: Any, hint: Any) -> bool:
    """Does JSON `value` fit the annotation `hint`? (unknown annotations accept anything)"""
    if hint is Any or hint is inspect.Parameter.empty:
        return True
    if hint is type(None) or hint is None:
        return value is None
    if hint is bool:
        return type(value) is bool
    if hint is int:
        return type(value) is int  # JSON true is not a size
    if hint is float:
        return type(value) in (int, float) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(matches(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if origin in (tuple, list):
        if not isinstance(value, list):
            return False
        if origin is tuple and len(args) > 1 and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(matches(v, a) for v, a in zip(value, args))
        return not args or all(matches(v, args[0]) for v in value)  # tuple[X] in diffusers means any length
    if origin is dict:
        return isinstance(value, dict)
    return True


def init_annotations(cls: type) -> dict[str, Any]:
    """The `__init__` parameter annotations of a model class ({} where they cannot be resolved)."""
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # noqa: BLE001 - forward references a module never imported: no types known
        return {}
    params = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in hints.items() if k in params and k != "self"}


def check_config_types(config: dict[str, Any], cls: type, where: str | os.PathLike) -> None:
    """Every key of `config` that `cls.__init__` declares holds a value of the declared type."""
    for key, hint in init_annotations(cls).items():
        if key not in config:
            continue
        value = config[key]
        if not matches(value, hint):
            raise CheckpointError(f"{where}: {key} must be {_describe(hint)}, got {_show(value)}")
        for v in value if isinstance(value, list) else [value]:
            if type(v) is int and not -MAX_CONFIG_INT <= v <= MAX_CONFIG_INT:
                raise CheckpointError(f"{where}: {key} = {_show(value)} is out of range")


# ----------------------------------------------------------------------------------- model config
def _positive(config: dict[str, Any], key: str, where: Any, low: int = 1, high: int = MAX_WIDTH) -> int:
    value = config.get(key)
    if type(value) is not int or not low <= value <= high:
        raise CheckpointError(f"{where}: {key} must be an integer in [{low}, {high}], got {_show(value)}")
    return value


def check_flux_config(config: dict[str, Any], where: str | os.PathLike) -> None:
    """The consistency rules of FluxTransformer2DModel that its annotations cannot state."""
    for key in ("patch_size", "in_channels", "joint_attention_dim", "pooled_projection_dim"):
        if key in config:
            _positive(config, key, where)
    heads = _positive({"num_attention_heads": config.get("num_attention_heads", 24)}, "num_attention_heads", where)
    head_dim = _positive({"attention_head_dim": config.get("attention_head_dim", 128)}, "attention_head_dim", where)
    if heads * head_dim > MAX_WIDTH:
        raise CheckpointError(
            f"{where}: num_attention_heads x attention_head_dim = {heads * head_dim} is wider than any FLUX model (limit {MAX_WIDTH})"
        )
    for key in ("num_layers", "num_single_layers"):
        if key in config:
            _positive(config, key, where, 0, MAX_BLOCKS)
    if config.get("out_channels") is not None:
        _positive(config, "out_channels", where)
    axes = config.get("axes_dims_rope", [16, 56, 56])
    # FluxPosEmbed splits each head's dims into one rotary part per position axis (text/frame, y, x):
    # the parts must cover the head exactly, be even (rotations act on pairs), and be three.
    if not (isinstance(axes, list) and len(axes) == 3 and all(type(a) is int and a > 0 and a % 2 == 0 for a in axes)):
        raise CheckpointError(f"{where}: axes_dims_rope must be 3 positive even integers, got {_show(axes)}")
    if sum(axes) != head_dim:
        raise CheckpointError(f"{where}: axes_dims_rope {axes} sums to {sum(axes)}, but attention_head_dim is {head_dim}")


# Architecture rules beyond types, by class name; other classes get the type checks only.
ARCH_RULES = {"FluxTransformer2DModel": check_flux_config}


def model_class(config: dict[str, Any], where: str | os.PathLike) -> type:
    """The diffusers model class config.json names in `_class_name`."""
    import diffusers

    name = config.get("_class_name")
    if not isinstance(name, str) or not name:
        raise CheckpointError(f"{where}: _class_name must name a diffusers model class, got {_show(name)}")
    cls = getattr(diffusers, name, None) if name.isidentifier() else None
    if not isinstance(cls, type) or not issubclass(cls, diffusers.ModelMixin):
        raise ModelError(f"{where}: _class_name {name!r} is not a diffusers model class")
    return cls


def check_model_config(config: Any, where: str | os.PathLike, cls: type | None = None) -> type:
    """Validate a model's config.json content; returns the model class it names.

    Types come from `cls.__init__`'s annotations (`cls` defaults to the class `_class_name`
    names), ranges and consistency from `ARCH_RULES`. `quantization_config` is not looked at
    (see `check_quantization_config`).
    """
    if not isinstance(config, dict):
        raise CheckpointError(f"{where}: expected a JSON object, found {type(config).__name__}")
    cls = cls or model_class(config, where)
    check_config_types(config, cls, where)
    rule = ARCH_RULES.get(cls.__name__)
    if rule is not None:
        rule(config, where)
    return cls


# --------------------------------------------------------------------------- quantization_config
def check_quantization_config(qc: Any, where: str | os.PathLike) -> None:
    """Validate config.json's `quantization_config` as bitflux writes it (unknown keys refused).

    A missing or foreign `quant_method` is a `ModelError` (not a bitflux checkpoint); an
    unknown format or version is a `FormatError`; any other problem a `CheckpointError`.
    """
    if not isinstance(qc, dict):
        raise ModelError(f"{where}: not a bitflux checkpoint (quantization_config is {_show(qc)})")
    if qc.get("quant_method") != QUANT_METHOD:
        raise ModelError(f"{where}: not a bitflux checkpoint (quant_method is {_show(qc.get('quant_method'))})")
    unknown = sorted(set(qc) - QC_KEYS)
    if unknown:
        raise CheckpointError(f"{where}: quantization_config has unknown keys {unknown} (written by a newer bitflux?)")
    try:
        fmt = PackFormat(qc.get("format"))
    except ValueError:
        raise FormatError(f"{where}: unknown packing format {_show(qc.get('format'))}") from None
    version = qc.get("format_version")
    if type(version) is not int or version != FORMAT_VERSIONS[fmt]:
        raise FormatError(
            f"{where}: {fmt.value} format version {_show(version)} is not supported (this bitflux reads version {FORMAT_VERSIONS[fmt]})"
        )
    for key, enum in (("init", InitMethod), ("activations", ActPrecision)):
        if key in qc and (not isinstance(qc[key], str) or qc[key] not in {e.value for e in enum}):
            raise CheckpointError(f"{where}: quantization_config.{key} must be one of {[e.value for e in enum]}, got {_show(qc[key])}")
    for key in ("policy", "source"):
        if key in qc and not isinstance(qc[key], str):
            raise CheckpointError(f"{where}: quantization_config.{key} must be a string, got {_show(qc[key])}")
    for key in ("include", "exclude"):
        globs = qc.get(key, [])
        if not isinstance(globs, list) or not all(isinstance(g, str) and g for g in globs):
            raise CheckpointError(f"{where}: quantization_config.{key} must be a list of name globs, got {_show(globs)}")
    names = qc.get("modules_not_converted", [])
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise CheckpointError(f"{where}: quantization_config.modules_not_converted must be a list of module names, got {_show(names)}")
    bad = [n for n in names if not n or not all(part.isidentifier() or part.isdigit() for part in n.split("."))]
    if bad:
        raise CheckpointError(f"{where}: quantization_config.modules_not_converted holds {_show(bad[0])}, not a module name")
    if len(set(names)) != len(names):
        raise CheckpointError(f"{where}: quantization_config.modules_not_converted repeats a name")
    if "integrity" in qc:
        from .integrity import check_schema

        check_schema(qc["integrity"], where)


# ------------------------------------------------------------------------------------------ index
def check_file_name(name: Any, where: str | os.PathLike, what: str) -> str:
    """`name` must be a plain file name in the checkpoint folder: no directories, no `..`."""
    ok = isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name and "\x00" not in name
    if not ok:
        raise CheckpointError(f"{where}: {what} {_show(name)} is not a file name in the checkpoint folder")
    return name


def check_index(index: Any, where: str | os.PathLike) -> dict[str, str]:
    """Validate a `*.safetensors.index.json`; returns its weight_map (tensor name -> shard file).

    Shard names must be plain `.safetensors` file names of the same folder (no `../x`, no
    absolute paths); `metadata.total_size`, when present, a non-negative integer.
    """
    if not isinstance(index, dict):
        raise CheckpointError(f"{where}: expected a JSON object, found {type(index).__name__}")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{where}: weight_map must be a non-empty object of tensor name -> file, got {_show(weight_map)}")
    for tensor, file in weight_map.items():
        check_file_name(file, where, f"weight_map[{tensor!r}]")
        if not file.endswith(".safetensors"):
            raise CheckpointError(f"{where}: weight_map[{tensor!r}] names {file!r}, not a .safetensors file")
    meta = index.get("metadata", {})
    if not isinstance(meta, dict):
        raise CheckpointError(f"{where}: metadata must be an object, got {_show(meta)}")
    total = meta.get("total_size")
    if total is not None and (type(total) is not int or total < 0):
        raise CheckpointError(f"{where}: metadata.total_size must be a non-negative integer, got {_show(total)}")
    return weight_map


def shard_files(directory: Path, weight_map: dict[str, str]) -> list[Path]:
    """The distinct shard files a (checked) weight_map names, each a regular file of `directory`."""
    from .safeio import check_regular_file

    files = [directory / name for name in sorted(set(weight_map.values()))]
    for f in files:
        if not os.path.lexists(f):
            raise CheckpointError(f"{directory}: missing weight file {f.name} (named in the index)")
        check_regular_file(f)
    return files


# --------------------------------------------------------------------------------- pipeline fit
def check_pipeline_fit(transformer_config: dict[str, Any], pipeline_dir: str | os.PathLike, model: str) -> None:
    """A FLUX transformer fits a local FluxPipeline folder: text widths and latent channels agree.

    FluxPipeline feeds the T5 encoder's states (width `d_model`) to `joint_attention_dim`, the
    CLIP encoder's pooled output (`hidden_size`) to `pooled_projection_dim`, and 2x2-packed VAE
    latents (4 x `latent_channels`) to `in_channels`; any mismatch fails deep inside a matmul.
    Components without a local config.json are skipped.
    """
    from .safeio import read_json_object

    pipeline_dir = Path(pipeline_dir)
    rules = (
        ("text_encoder_2", "d_model", "joint_attention_dim", 1, "text width (T5 d_model)"),
        ("text_encoder", "hidden_size", "pooled_projection_dim", 1, "pooled text width (CLIP hidden_size)"),
        ("vae", "latent_channels", "in_channels", 4, "latent channels (4 x VAE latent_channels)"),
    )
    for component, key, tkey, factor, what in rules:
        path = pipeline_dir / component / "config.json"
        if not path.is_file() or tkey not in transformer_config:
            continue
        have = read_json_object(path).get(key)
        if type(have) is int and have * factor != transformer_config[tkey]:
            raise ModelError(
                f"{model}: the transformer's {tkey} is {transformer_config[tkey]}, but pipeline {pipeline_dir} gives "
                f"{what} {have * factor}; it does not fit that pipeline"
            )


def check_is_transformer(config: dict[str, Any], model: str) -> None:
    """A model folder given where a FLUX transformer is expected must be one (not a VAE, say)."""
    name = config.get("_class_name")
    if name != "FluxTransformer2DModel":
        raise ModelError(f"{model}: config.json describes {_show(name)}, not a FluxTransformer2DModel")
