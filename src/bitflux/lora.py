"""LoRA on ternary layers through peft, the way diffusers uses it.

peft wraps each targeted layer in a LoRA layer chosen by its dispatchers; `TernaryLinear` is not an
`nn.Linear`, so peft needs a custom layer for it. `TernaryLoraLinear` computes

    y = TernaryLinear(x) + sum_adapters scaling_a * B_a(A_a(dropout(x)))

with the ternary base untouched (frozen packed buffers) and the adapters in their own dtype.
`register()` (run on `import bitflux`; peft is patched when something imports it) makes every `LoraConfig` map
`TernaryLinear -> TernaryLoraLinear` through peft's `_register_custom_module`, including the
configs diffusers builds inside `add_adapter` / `load_lora_weights`, and lets diffusers' FLUX LoRA
loader skip its shape-expansion step for ternary layers (it reads a dense `.weight` they lack).

Fusing (`fuse_lora`, peft `merge`) is refused in one line: folding B·A into ternary codes would
requantise the base silently. The adapter already runs as a low-rank side branch; keep it active.
"""

from __future__ import annotations

import functools
import importlib.abc
import sys
import warnings
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch
from torch import nn

from .errors import ModelError
from .linear import TernaryLinear

_FUSE_REFUSAL = (
    "bitflux: a LoRA cannot be fused into ternary weights without requantising them; keep the adapter "
    "loaded instead (it runs as a low-rank side branch beside the ternary layer)"
)


def _lora_layer_class() -> type:
    from peft.tuners.lora.layer import LoraLayer

    class TernaryLoraLinear(nn.Module, LoraLayer):
        """peft LoRA layer around a `TernaryLinear`: base output + the active adapters' B·A·x."""

        adapter_layer_names = LoraLayer.adapter_layer_names

        def __init__(self, base_layer: nn.Module, adapter_name: str, config: Any, r: int = 0,
                     lora_alpha: int = 1, **kwargs: Any) -> None:
            if config.use_dora:
                raise ModelError("bitflux: DoRA on ternary layers is not supported (it rescales the base weight)")
            super().__init__()
            LoraLayer.__init__(self, base_layer)
            self.fan_in_fan_out = False
            self._active_adapter = adapter_name
            self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

        def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:  # (..., K) -> (..., N)
            result = self.base_layer(x)
            if self.disable_adapters:
                return result
            for name in self.active_adapters:
                if name not in self.lora_A:
                    continue
                lora_a, lora_b = self.lora_A[name], self.lora_B[name]
                xa = self._cast_input_dtype(x, lora_a.weight.dtype)
                delta = lora_b(lora_a(self.lora_dropout[name](xa))) * self.scaling[name]
                result = result + delta.to(result.dtype)
            return result

        def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
            raise ModelError(_FUSE_REFUSAL)

        def unmerge(self) -> None:
            pass  # nothing is ever merged

        def get_delta_weight(self, adapter: str) -> torch.Tensor:
            raise ModelError(_FUSE_REFUSAL)

        def __repr__(self) -> str:
            return "lora." + super().__repr__()

    return TernaryLoraLinear


@functools.cache
def lora_layer_class() -> type:
    """The peft LoRA layer class for `TernaryLinear` (built on first use: peft is optional)."""
    return _lora_layer_class()


def _patch_lora_config(config_module: ModuleType) -> None:
    """Every LoraConfig (diffusers builds its own) maps TernaryLinear to our layer via peft's
    custom-module API; idempotent."""
    cls = config_module.LoraConfig
    if getattr(cls.__post_init__, "_bitflux", False):
        return
    original = cls.__post_init__

    def __post_init__(self, *args: Any, **kwargs: Any) -> None:  # noqa: N807
        original(self, *args, **kwargs)
        self._register_custom_module({TernaryLinear: lora_layer_class()})

    __post_init__._bitflux = True  # type: ignore[attr-defined]
    cls.__post_init__ = __post_init__


def _patch_flux_loader(pipeline_module: ModuleType) -> None:
    """diffusers' FLUX loader zero-pads LoRA inputs to an expanded base (Flux Control); it reads the
    dense `.weight` of every targeted module. Ternary block layers are never expanded, so their keys
    skip that step after a shape check; every other key goes through diffusers unchanged."""
    mixin = pipeline_module.FluxLoraLoaderMixin
    original = mixin.__dict__["_maybe_expand_lora_state_dict"].__func__
    if getattr(original, "_bitflux", False):
        return
    def _maybe_expand_lora_state_dict(cls, transformer, lora_state_dict):  # noqa: ANN001, ANN202
        prefix = f"{cls.transformer_name}."
        ternary = {  # module path -> layer, before (x) and after (x.base_layer) peft wraps it
            name.removesuffix(".base_layer"): mod for name, mod in transformer.named_modules() if isinstance(mod, TernaryLinear)
        }
        held = {}
        for key in list(lora_state_dict):
            stem = key.removeprefix(prefix)
            for part in (".lora_A.weight", ".lora_B.weight", ".lora_A.bias", ".lora_B.bias"):
                if stem.endswith(part) and stem[: -len(part)] in ternary:
                    layer, t = ternary[stem[: -len(part)]], lora_state_dict[key]
                    want = layer.in_features if ".lora_A." in part else layer.out_features
                    dim = 1 if part.endswith("weight") and ".lora_A." in part else 0
                    if t.shape[dim] != want:
                        raise ModelError(f"LoRA tensor {key} has shape {tuple(t.shape)}; the ternary layer has "
                                         f"{layer.in_features} inputs and {layer.out_features} outputs")
                    held[key] = lora_state_dict.pop(key)
        out = original(cls, transformer, lora_state_dict)
        out.update(held)
        return out

    _maybe_expand_lora_state_dict._bitflux = True  # type: ignore[attr-defined]
    mixin._maybe_expand_lora_state_dict = classmethod(_maybe_expand_lora_state_dict)


# module -> patch applied once it has been imported (peft costs ~10 s to import: never forced)
_PATCHES: dict[str, Callable[[ModuleType], None]] = {
    "peft.tuners.lora.config": _patch_lora_config,
    "diffusers.loaders.lora_pipeline": _patch_flux_loader,
}


class _PatchingLoader(importlib.abc.Loader):
    """Runs a module's own loader, then its patch; everything else is the wrapped loader's."""

    def __init__(self, loader: importlib.abc.Loader, patch: Callable[[ModuleType], None]) -> None:
        self._loader, self._patch = loader, patch

    def create_module(self, spec):  # noqa: ANN001, ANN201
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        self._patch(module)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Applies `_PATCHES` when (and only if) their modules are imported."""

    def find_spec(self, fullname, path, target=None):  # noqa: ANN001, ANN201
        patch = _PATCHES.get(fullname)
        if patch is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _PatchingLoader(spec.loader, patch)
                return spec
        return None


def register() -> None:
    """Make peft and diffusers' LoRA loading handle ternary layers (run on `import bitflux`; idempotent).

    Modules already imported are patched now; the others when they are imported, so importing
    bitflux never imports peft.
    """
    # peft's shape probe does not know TernaryLinear (it reads in/out_features, which we have) and
    # warns "proceed at your own risk" on every wrapped layer; the custom-module path is supported
    warnings.filterwarnings("ignore", message=r"Unsupported layer type '<class 'bitflux\.linear\.TernaryLinear'>'")
    for name, patch in _PATCHES.items():
        if name in sys.modules:
            patch(sys.modules[name])
    if not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport())
