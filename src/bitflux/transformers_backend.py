"""bitflux as a transformers quantization backend: causal LMs quantise, save and load like the DiTs.

`import bitflux.transformers_backend` registers quant_method "bitflux" with transformers (that
import costs seconds, so plain `import bitflux` does not do it). Then:
  * `LlamaForCausalLM.from_pretrained(dense_dir, quantization_config=BitfluxLMConfig())` ternarises
    each policy Linear (`bitflux.policies`: decoder layers; embeddings and lm_head kept) as its
    weight arrives, so the dense model never exists in memory;
  * `attach(model)` after `bitflux.quantize(model, ...)` lets `model.save_pretrained(d)` write a
    bitflux checkpoint, and `LlamaForCausalLM.from_pretrained(d)` loads it packed.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import nn
from transformers.core_model_loading import ConversionOps
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .config import QUANT_METHOD, QuantConfig
from .linear import SCALE_DTYPE, TernaryLinear
from .packing import pack
from .policies import policy_for
from .quantize import quantize
from .ternary import ternarize

_PENDING = "weight"  # the dense weight a TernaryLinear waits for while quantising during a load


class BitfluxLMConfig(QuantizationConfigMixin):
    """transformers' view of a `QuantConfig` (the same fields, the same config.json entry)."""

    def __init__(self, **fields: Any) -> None:
        fields = {k: v for k, v in fields.items() if k not in ("quant_method", "format_version")}
        self.quant_method = QUANT_METHOD
        self.config = QuantConfig(**fields)

    def to_dict(self) -> dict[str, Any]:
        return self.config.to_dict()


class _Ternarize(ConversionOps):
    """Turn one dense `<layer>.weight` into that TernaryLinear's packed codes and scales."""

    def __init__(self, config: QuantConfig) -> None:
        self.config = config

    def convert(self, input_dict: dict[str, Any], source_patterns=None, target_patterns=None, **kwargs: Any) -> dict:
        (name, values), = input_dict.items()
        weight = values[0] if isinstance(values, list) else values
        layer = name.rpartition(".")[0]
        module = kwargs["model"].get_submodule(layer)
        codes, scale = ternarize(weight.detach(), self.config.init)  # (N, K) int8, (N,)
        del module._parameters[_PENDING]
        if kwargs.get("missing_keys") is not None:
            kwargs["missing_keys"].discard(name)
        return {f"{layer}.qweight": pack(codes, module.fmt), f"{layer}.scale": scale.to(SCALE_DTYPE)}


class BitfluxHfQuantizer(HfQuantizer):
    """Swap the policy's Linears for TernaryLinears on the meta device; fill them as tensors arrive."""

    requires_calibration = False

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> None:
        cfg: QuantConfig = self.quantization_config.config
        quantize(model, cfg, policy=policy_for(model, cfg.policy))  # meta device: shapes only
        if not self.pre_quantized:
            for mod in model.modules():
                if isinstance(mod, TernaryLinear):
                    pending = torch.empty((mod.out_features, mod.in_features), device="meta")
                    mod.register_parameter(_PENDING, nn.Parameter(pending, requires_grad=False))
        self.modules_to_not_convert = list(model.bitflux_config.modules_not_converted)
        self.quantization_config = BitfluxLMConfig(**model.bitflux_config.to_dict())
        model.config.quantization_config = self.quantization_config

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> None:
        for mod in model.modules():
            if isinstance(mod, TernaryLinear):
                mod._parameters.pop(_PENDING, None)

    def param_needs_quantization(self, model: nn.Module, param_name: str, **kwargs: Any) -> bool:
        layer, _, tensor = param_name.rpartition(".")
        return tensor == _PENDING and isinstance(model.get_submodule(layer), TernaryLinear)

    def get_quantize_ops(self) -> ConversionOps:
        return _Ternarize(self.quantization_config.config)

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def attach(model: nn.Module) -> nn.Module:
    """Mark a `bitflux.quantize`d transformers model so `save_pretrained` writes a bitflux checkpoint."""
    config = BitfluxLMConfig(**model.bitflux_config.to_dict())
    model.config.quantization_config = config
    model.hf_quantizer = BitfluxHfQuantizer(config, pre_quantized=True)
    return model


def register() -> None:
    """Make quant_method "bitflux" known to transformers' `from_pretrained` (idempotent)."""
    AUTO_QUANTIZATION_CONFIG_MAPPING.setdefault(QUANT_METHOD, BitfluxLMConfig)
    AUTO_QUANTIZER_MAPPING.setdefault(QUANT_METHOD, BitfluxHfQuantizer)


register()
