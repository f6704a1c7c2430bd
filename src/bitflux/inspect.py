"""Size accounting: parameter counts, ternary fraction and bytes of the tensors `save` writes.

Models are built on the meta device (`archs.build_meta_model`), so even a 32B transformer is
counted in a second with no weights and no download.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .archs import ARCHS, FLUX_DEV_CONFIG, build_meta_model  # noqa: F401 (FLUX_DEV_CONFIG: bench imports it here)
from .checkpoint import (
    is_bitflux_dir,
    quant_config_from,
    state_to_save,
    stored_float_dtype,
    tensor_bytes,
    weight_files,
)
from .config import PackFormat, QuantConfig
from .errors import ModelError
from .linear import TernaryLinear
from .packing import packed_cols
from .policies import policy_for
from .quantize import quantize


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
        "class": type(model).__name__,
        "policy": cfg.policy,
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


def _quantized_meta(config: dict[str, Any], qconfig: QuantConfig, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """The model `config` describes, on the meta device, quantised per `qconfig` (policy "auto" allowed)."""
    model = build_meta_model(config, dtype)
    return quantize(model, qconfig, policy=policy_for(model, qconfig.policy))


def inspect_arch(arch: str, qconfig: QuantConfig) -> dict[str, Any]:
    """Size report of a named architecture (meta device), with the bytes of every packing format."""
    if arch not in ARCHS:
        raise ModelError(f"unknown architecture {arch!r}; known: {', '.join(ARCHS)}")
    model = _quantized_meta(ARCHS[arch], qconfig)
    report = {"model": arch, **size_report(model)}
    ternary = [m for m in model.modules() if isinstance(m, TernaryLinear)]
    codes = sum(m.qweight.numel() for m in ternary)  # uint8: one byte each
    for fmt in PackFormat:  # both formats side by side: only the packed codes' bytes differ
        nbytes = report["bytes"] - codes + sum(m.out_features * packed_cols(m.in_features, fmt) for m in ternary)
        report[f"bytes_{fmt.value}"] = nbytes
        report[f"ratio_{fmt.value}"] = report["bf16_bytes"] / nbytes
    return report


def inspect_path(path: str | Path, qconfig: QuantConfig) -> dict[str, Any]:
    """Size report of a model directory: as stored if quantised, else as `qconfig` would store it."""
    path = Path(path)
    if (path / "model_index.json").is_file():
        path = path / "transformer"
    from .checkpoint import INDEX_NAME
    from .integrity import verify
    from .safeio import read_json_object
    from .tensorcheck import check_headers, check_index_headers, expected_state, read_headers
    from .validate import check_index, check_model_config, check_quantization_config

    config = read_json_object(path / "config.json")
    check_model_config(config, path / "config.json")  # before building anything from it
    quantised = "quantization_config" in config
    if quantised:  # a bitflux one (another backend's is refused: its sizes are not ours to report)
        check_quantization_config(config["quantization_config"], path / "config.json")
        verify(path, config, contents=False)  # config hash and file sizes: cheap, no tensor bytes read
        qconfig = quant_config_from(config, path)
    files = weight_files(path)
    headers = read_headers(files)  # the stored tensors must be what the config describes
    if (path / INDEX_NAME).exists():
        index = read_json_object(path / INDEX_NAME)
        check_index_headers(check_index(index, path / INDEX_NAME), headers, index.get("metadata", {}).get("total_size"), path / INDEX_NAME)
    dtype = stored_float_dtype(path)  # kept layers stay in the stored dtype, as `quantize` does
    model = _quantized_meta(config, qconfig, dtype)
    if quantised:
        check_headers(expected_state(model), headers, path)
    else:  # a dense model: names and shapes as the config says, float dtypes may mix
        check_headers(expected_state(build_meta_model(config, dtype)), headers, path, one_float_dtype=False)
    report = {"model": str(path), "quantized": quantised, **size_report(model)}
    if quantised:  # what is really on disk: tensors by their headers, and whole files
        report["stored_bytes"] = sum(h.nbytes for h in headers.values())
        report["disk_bytes"] = sum(f.stat().st_size for f in files)
    return report


def markdown_table(reports: list[dict[str, Any]]) -> str:
    """The README table: one row per architecture report from `inspect_arch`."""
    gb = lambda n: f"{n / 1e9:.2f} GB"  # noqa: E731
    rows = [
        "| model | class | policy | params | ternary | bf16 | 2bit | ratio | base3 | ratio |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in reports:
        rows.append(
            f"| {r['model']} | {r['class']} | {r['policy']} | {r['params'] / 1e9:.2f}B | {r['ternary_fraction']:.2%} "
            f"| {gb(r['bf16_bytes'])} | {gb(r['bytes_2bit'])} | {r['ratio_2bit']:.2f}x "
            f"| {gb(r['bytes_base3'])} | {r['ratio_base3']:.2f}x |"
        )
    return "\n".join(rows)
