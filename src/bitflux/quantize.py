"""`quantize`: swap a model's policy-selected `nn.Linear`s for `TernaryLinear`s, in place."""

from __future__ import annotations

from dataclasses import replace

from torch import nn

from .config import ActPrecision, Backend, QuantConfig
from .errors import ModelError
from .backend import attach, replace_linears, set_submodule
from .linear import TernaryLinear
from .policies import Policy, policy_for


_set_submodule = set_submodule  # used by calibration's student builder


def is_quantized(model: nn.Module) -> bool:
    """True if the model already holds TernaryLinear modules."""
    return any(isinstance(m, TernaryLinear) for m in model.modules())


def quantize(
    model: nn.Module, config: QuantConfig | None = None, *, policy: Policy | None = None, progress: bool = False
) -> nn.Module:
    """Ternarise the Linears the config's policy selects; returns the same model.

    Works on meta-device models too (shapes only), which is how `load` and `inspect` build
    models without allocating weights. `policy` overrides `config.policy` (e.g. a generic policy
    with extra globs). The config actually applied, with the policy's name and the names of the
    Linears left in the model dtype, is stored as `model.bitflux_config`.
    """
    config = config or QuantConfig()
    policy = policy or policy_for(model, config.policy, include=config.include, exclude=config.exclude)
    if policy.model_class and type(model).__name__ != policy.model_class:
        raise ModelError(f"policy {policy.name!r} is for {policy.model_class}, got {type(model).__name__}")
    if is_quantized(model):
        raise ModelError("model is already quantised")
    keep = replace_linears(model, config, policy, progress=progress)
    config = replace(config, policy=policy.name, modules_not_converted=tuple(keep))
    if hasattr(model, "save_pretrained") and not any(p.is_meta for p in model.parameters()):
        attach(model, config)  # diffusers models: save_pretrained now writes a bitflux checkpoint
    else:
        model.bitflux_config = config
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
