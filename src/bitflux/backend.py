"""bitflux as a diffusers quantization backend: `from_pretrained` loads, quantises while loading, and saves.

diffusers builds the model on the meta device, calls `_process_model_before_weight_loading`, then
streams each shard's tensors through `check_if_quantized_param` / `create_quantized_param`. We swap
the policy's Linears for `TernaryLinear`s on the meta device first. Each one carries a *pending*
meta `weight` so a dense checkpoint's `...weight` key has somewhere to land: when it arrives it is
ternarised on its target device and dropped, so the dense transformer never exists in memory. A
packed checkpoint fills `qweight`/`scale` directly and the pending weight is simply removed.

Registered into diffusers' AUTO_* mappings on `import bitflux` (the way third-party backends do).
"""

from __future__ import annotations

import contextvars
import ctypes
import functools
import mmap
import os
from pathlib import Path
from typing import Any

import torch
from diffusers.quantizers.base import DiffusersQuantizer
from torch import nn

from .config import FORMAT_VERSIONS, QUANT_METHOD, QuantConfig
from .errors import CheckpointError, ModelError
from .linear import SCALE_DTYPE, TernaryLinear
from .policies import Policy, policy_for
from .ternary import ternarize

_VERIFY = contextvars.ContextVar("bitflux_verify", default=True)  # bitflux.load(verify=False) clears it
_PENDING = "weight"
_MADV_PAGEOUT = 21  # <linux/mman.h>; Python 3.11's mmap module does not name it  # the dense weight a TernaryLinear waits for while quantising during a load


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule called `name` (dotted path) with `module`."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def replace_linears(model: nn.Module, config: QuantConfig, policy: Policy, *, progress: bool = False) -> list[str]:
    """Swap the Linears `policy` selects for TernaryLinears (ternarised from their weights unless meta).

    Returns the names of the Linears kept in the model dtype.
    """
    from tqdm.auto import tqdm

    convert, keep = policy.select(model)
    if not convert:
        raise ModelError(f"policy {policy.name!r} matched no Linear layers in {type(model).__name__}")
    for name in tqdm(convert, desc="ternarise", unit="layer", disable=not progress):
        linear = model.get_submodule(name)
        ternary = TernaryLinear.from_linear(linear, fmt=config.format, init=config.init, act=config.activations)
        set_submodule(model, name, ternary)
    return keep


def attach(model: nn.Module, config: QuantConfig) -> None:
    """Mark `model` as bitflux-quantised for diffusers, so `save_pretrained` writes a bitflux checkpoint."""
    model.bitflux_config = config
    model.hf_quantizer = BitfluxQuantizer(config, pre_quantized=True)
    # diffusers refuses dtype casts of quantised models; TernaryLinear keeps its packed codes and
    # bf16 scales through casts, so only the kept layers change and the model stays saveable.
    model.is_quantized = False
    model.quantization_method = config.quant_method
    if hasattr(model, "register_to_config"):
        model.register_to_config(quantization_config=config)


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def _release_pages(t: torch.Tensor) -> None:
    """Ask the kernel to drop the resident pages of a consumed, file-backed (mmap) source tensor.

    diffusers maps a whole shard (10 GB for FLUX.1-dev) and every touched page stays in RSS until
    the shard's dict dies; MADV_PAGEOUT (Linux >= 5.4) reclaims clean pages and never changes data.
    """
    if t.device.type != "cpu" or not t.numel():
        return
    page = mmap.PAGESIZE
    start, end = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
    lo, hi = (start + page - 1) // page * page, end // page * page
    libc = _libc()
    if hi > lo and libc is not None:
        libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), ctypes.c_int(_MADV_PAGEOUT))


def _own_storage(model: nn.Module) -> None:
    """Give every CPU tensor its own aligned memory instead of a view into the loaded file's mmap.

    A model must not alias a file a user may overwrite, and aligned copies make the forward
    bit-identical to the model that was saved. One tensor at a time, the file pages released as
    we go, so the peak stays at the model's size plus one tensor.
    """
    for mod in model.modules():
        for store in (mod._parameters, mod._buffers):
            for name, t in list(store.items()):
                if t is None or t.device.type != "cpu":
                    continue
                own = t.detach().clone()
                _release_pages(t)
                store[name] = nn.Parameter(own, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else own


def _trim_heap() -> None:
    """Hand freed heap memory back to the OS (glibc keeps it, and the per-tensor transients of a
    12B-parameter load would otherwise pile up as resident memory)."""
    trim = getattr(_libc(), "malloc_trim", None)  # glibc only
    if trim is not None:
        trim(0)


def _module_and_tensor(model: nn.Module, param_name: str) -> tuple[nn.Module, str]:
    prefix, _, tensor = param_name.rpartition(".")
    return (model.get_submodule(prefix) if prefix else model), tensor


class BitfluxQuantizer(DiffusersQuantizer):
    """diffusers' side of bitflux: swap Linears on meta, ternarise or fill them as tensors stream in."""

    requires_calibration = False
    use_keep_in_fp32_modules = False

    def __init__(self, quantization_config: QuantConfig, **kwargs: Any) -> None:
        if not isinstance(quantization_config, QuantConfig):
            raise ModelError(f"bitflux needs a bitflux.BitfluxConfig, got {type(quantization_config).__name__}")
        super().__init__(quantization_config, **kwargs)

    # -------------------------------------------------------------------- before the tensors arrive
    def maybe_update_loaded_keys(self, loaded_keys: list[str], checkpoint_files: list[str]) -> list[str]:
        """diffusers names the files here: verify their recorded hashes before a byte is used."""
        self._files = [Path(f) for f in checkpoint_files if isinstance(f, (str, os.PathLike))]
        self._packed = any(k.endswith(".qweight") for k in loaded_keys)
        if self._files and self._packed and _VERIFY.get():
            from .integrity import verify
            from .safeio import read_json_object

            directory = self._files[0].parent
            verify(directory, read_json_object(directory / "config.json"))
        return loaded_keys

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        from .validate import check_model_config

        cfg: QuantConfig = self.quantization_config
        config = {k: v for k, v in dict(model.config).items() if not k.startswith("_") and k != "quantization_config"}
        check_model_config({**config, "_class_name": type(model).__name__}, type(model).__name__)
        policy = policy_for(model, cfg.policy, include=cfg.include, exclude=cfg.exclude)
        keep = replace_linears(model, cfg, policy)
        stored = set(cfg.modules_not_converted)
        if self.pre_quantized and stored and stored != set(keep):
            raise CheckpointError(
                f"quantization_config.modules_not_converted disagrees with policy {policy.name!r} for {type(model).__name__}"
            )
        if getattr(self, "_packed", False) and self._files:  # refuse stored tensors that disagree, headers only
            from .tensorcheck import check_headers, check_index_headers, expected_state, read_headers

            ternary = {n for n, m in model.named_modules() if isinstance(m, TernaryLinear)}
            expected = {k: v for k, v in expected_state(model).items() if k.rpartition(".")[::2] not in {(n, _PENDING) for n in ternary}}
            headers = read_headers(self._files)
            check_headers(expected, headers, self._files[0].parent)
            index = self._files[0].parent / "diffusion_pytorch_model.safetensors.index.json"
            if len(self._files) > 1 and index.is_file():
                from .safeio import read_json_object
                from .validate import check_index

                raw = read_json_object(index)
                check_index_headers(check_index(raw, index), headers, raw.get("metadata", {}).get("total_size"), index)
        for mod in model.modules():
            if isinstance(mod, TernaryLinear) and not getattr(self, "_packed", False):  # a dense source fills it
                dtype = mod.bias.dtype if mod.bias is not None else torch.bfloat16
                shape = (mod.out_features, mod.in_features)
                mod.register_parameter(_PENDING, nn.Parameter(torch.empty(shape, dtype=dtype, device="meta"), False))
        self.modules_to_not_convert = list(keep)
        from dataclasses import replace

        model.bitflux_config = replace(cfg, policy=policy.name, modules_not_converted=tuple(keep))
        self.quantization_config = model.bitflux_config
        model.register_to_config(quantization_config=model.bitflux_config)
        return model

    def update_missing_keys(self, model: nn.Module, missing_keys: list[str], prefix: str) -> list[str]:
        """A dense source never has qweight/scale, a packed one never has the pending weight."""
        ternary = {n for n, m in model.named_modules() if isinstance(m, TernaryLinear)}
        return [
            k
            for k in missing_keys
            if not (k.rpartition(".")[0] in ternary and k.rpartition(".")[2] in ("qweight", "scale", _PENDING))
        ]

    # ------------------------------------------------------------------------- as each one arrives
    def check_if_quantized_param(
        self, model: nn.Module, param_value: torch.Tensor, param_name: str, state_dict: dict[str, Any], **kwargs: Any
    ) -> bool:
        module, tensor = _module_and_tensor(model, param_name)
        return isinstance(module, TernaryLinear) and tensor in (_PENDING, "scale")

    def check_quantized_param_shape(self, param_name: str, current: torch.Tensor, loaded: torch.Tensor) -> bool:
        raise CheckpointError(f"{param_name} has shape {tuple(loaded.shape)}, config.json implies {tuple(current.shape)}")

    def create_quantized_param(
        self,
        model: nn.Module,
        param_value: torch.Tensor,
        param_name: str,
        target_device: torch.device | str,
        state_dict: dict[str, Any],
        unexpected_keys: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        module, tensor = _module_and_tensor(model, param_name)
        source = state_dict.get(param_name, param_value)  # as stored, before diffusers' dtype cast
        if tensor == "scale":  # packed scales keep their exact bf16 bits whatever torch_dtype says
            if source.shape != module.scale.shape:
                raise CheckpointError(f"{param_name} has shape {tuple(source.shape)}, expected {tuple(module.scale.shape)}")
            module.scale = source.to(device=target_device, dtype=SCALE_DTYPE).clone()
            return
        if tuple(source.shape) != (module.out_features, module.in_features):
            raise CheckpointError(
                f"{param_name} has shape {tuple(source.shape)}, expected {(module.out_features, module.in_features)}"
            )
        w = source.to(target_device)
        codes, scale = ternarize(w, self.quantization_config.init)
        module.qweight = torch.empty(module.qweight.shape, dtype=torch.uint8, device=target_device)
        module.scale = torch.empty(module.scale.shape, dtype=SCALE_DTYPE, device=target_device)
        module.set_codes(codes, scale)
        del module._parameters[_PENDING]
        del w, codes, scale
        _release_pages(source)
        _trim_heap()

    # ---------------------------------------------------------------------------- after the load
    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        for name, mod in model.named_modules():
            if isinstance(mod, TernaryLinear):
                mod._parameters.pop(_PENDING, None)  # a packed checkpoint never fills it
        unset = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
        if unset:
            raise CheckpointError(f"the checkpoint does not hold {len(unset)} tensors the model needs, e.g. {unset[0]}")
        _own_storage(model)
        from .tensorcheck import check_values

        files = getattr(self, "_files", None)
        check_values(model, files[0].parent if files else type(model).__name__)
        attach(model, model.bitflux_config)
        return model

    def get_state_dict_and_metadata(self, state_dict: dict[str, Any], safe_serialization: bool = False):
        meta = {"quant_method": QUANT_METHOD, "bitflux_format": self.quantization_config.format.value}
        meta["bitflux_format_version"] = str(FORMAT_VERSIONS[self.quantization_config.format])
        return state_dict, meta

    def _dequantize(self, model: nn.Module) -> nn.Module:
        for name, mod in list(model.named_modules()):
            if isinstance(mod, TernaryLinear):
                dense = nn.Linear(mod.in_features, mod.out_features, mod.bias is not None, device=mod.qweight.device)
                dtype = mod.bias.dtype if mod.bias is not None else torch.float32
                dense = dense.to(dtype)
                dense.weight.data.copy_(mod.dequantized_weight(dtype))
                if mod.bias is not None:
                    dense.bias.data.copy_(mod.bias.data)
                set_submodule(model, name, dense)
        for attr in ("bitflux_config", "quantization_method"):
            if hasattr(model, attr):
                delattr(model, attr)
        model.register_to_config(quantization_config=None)
        return model

    @property
    def supports_parallel_loading(self) -> bool:
        return False  # ternarising in threads would multiply the transient fp32 copies

    @property
    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True  # adapters (LoRA) train on top; the ternary base stays frozen

    @property
    def is_compileable(self) -> bool:
        return True


def register() -> None:
    """Make `quant_method: bitflux` known to diffusers (idempotent)."""
    from diffusers.quantizers import auto

    auto.AUTO_QUANTIZER_MAPPING[QUANT_METHOD] = BitfluxQuantizer
    auto.AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD] = QuantConfig
