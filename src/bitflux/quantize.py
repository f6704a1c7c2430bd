"""`quantize`: swap a model's policy-selected `nn.Linear`s for `TernaryLinear`s, in place."""

from __future__ import annotations

from dataclasses import replace

from torch import nn
from tqdm.auto import tqdm

from .config import ActPrecision, Backend, QuantConfig
from .errors import ModelError
from .linear import TernaryLinear
from .policies import get_policy


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def is_quantized(model: nn.Module) -> bool:
    """True if the model already holds TernaryLinear modules."""
    return any(isinstance(m, TernaryLinear) for m in model.modules())


def quantize(model: nn.Module, config: QuantConfig | None = None, *, progress: bool = False) -> nn.Module:
    """Ternarise the Linears the config's policy selects; returns the same model.

    Works on meta-device models too (shapes only), which is how `load` and `inspect` build
    models without allocating weights. The config actually applied, with the names of the
    Linears left in the model dtype, is stored as `model.bitflux_config`.
    """
    config = config or QuantConfig()
    policy = get_policy(config.policy)
    if policy.model_class and type(model).__name__ != policy.model_class:
        raise ModelError(f"policy {policy.name!r} is for {policy.model_class}, got {type(model).__name__}")
    if is_quantized(model):
        raise ModelError("model is already quantised")
    convert, keep = policy.select(model)
    if not convert:
        raise ModelError(f"policy {policy.name!r} matched no Linear layers in {type(model).__name__}")
    for name in tqdm(convert, desc="ternarise", unit="layer", disable=not progress):
        linear = model.get_submodule(name)
        _set_submodule(
            model, name, TernaryLinear.from_linear(linear, fmt=config.format, init=config.init, act=config.activations)
        )
    model.bitflux_config = replace(config, modules_not_converted=tuple(keep))
    return model


def set_backend(model: nn.Module, backend: Backend | str) -> nn.Module:
    """Force the kernel backend of every TernaryLinear in `model` (e.g. "reference")."""
    for m in model.modules():
        if isinstance(m, TernaryLinear):
            m.backend = Backend(backend)
    return model


def set_activations(model: nn.Module, act: str) -> nn.Module:
    """Override the activation precision (bf16 | int8 | fp8) of every TernaryLinear."""
    act = ActPrecision(act)
    for m in model.modules():
        if isinstance(m, TernaryLinear):
            m.act = act
    if hasattr(model, "bitflux_config"):
        model.bitflux_config = replace(model.bitflux_config, activations=act)
    return model
