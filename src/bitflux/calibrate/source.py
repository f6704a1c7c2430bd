"""The teacher on disk: a FLUX transformer directory read one module at a time, never whole.

`TransformerSource` maps every stored tensor name to its safetensors shard, builds the model's
skeleton on the meta device (no memory), and materialises a chosen submodule (one block, or the
small layers outside the blocks) by reading only that submodule's keys with `safe_open`, in the
stored dtype. `release` returns a submodule to the meta device, freeing its memory. This is what
lets block-wise calibration hold one teacher block at a time (see sequential.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ..errors import CheckpointError, ModelError

_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


class TransformerSource:
    """A FLUX transformer directory (config.json + single or sharded safetensors), read lazily."""

    def __init__(self, directory: str | os.PathLike) -> None:
        from ..checkpoint import weight_files

        self.path = Path(directory)
        try:
            self.config = json.loads((self.path / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise ModelError(f"{self.path / 'config.json'}: cannot read the transformer config ({e})") from None
        if self.config.get("_class_name") != "FluxTransformer2DModel":
            raise ModelError(f"{self.path}: not a FLUX transformer (config says {self.config.get('_class_name')!r})")
        if "quantization_config" in self.config:
            raise ModelError(f"{self.path}: already quantised; calibrate needs the full-precision transformer")
        self.file_of: dict[str, Path] = {}
        self.dtype = torch.bfloat16
        found_float = False
        for f in weight_files(self.path):
            try:
                with safe_open(str(f), framework="pt") as fh:
                    for k in fh.keys():
                        self.file_of[k] = f
                        dt = _DTYPES.get(fh.get_slice(k).get_dtype())
                        if dt is not None and not found_float:
                            self.dtype, found_float = dt, True
            except Exception as e:  # safetensors' own error types for torn files
                raise CheckpointError(f"{f}: truncated or corrupted safetensors file ({str(e).splitlines()[0]})") from None

    def skeleton(self) -> nn.Module:
        """The transformer on the meta device, in the stored dtype (no weights, no memory)."""
        from accelerate import init_empty_weights
        from diffusers import FluxTransformer2DModel

        kwargs = {k: v for k, v in self.config.items() if not k.startswith("_")}
        with init_empty_weights():
            model = FluxTransformer2DModel(**kwargs)
        nn.Module.to(model, self.dtype)  # nn.Module's own cast: diffusers' override warns about meta models
        return model.eval().requires_grad_(False)

    def read(self, prefix: str) -> dict[str, torch.Tensor]:
        """Every stored tensor whose name starts with `prefix`, keyed without it (stored dtype)."""
        keys = [k for k in self.file_of if k.startswith(prefix)]
        out: dict[str, torch.Tensor] = {}
        for f in sorted({self.file_of[k] for k in keys}):
            with safe_open(str(f), framework="pt") as fh:
                for k in keys:
                    if self.file_of[k] == f:
                        out[k[len(prefix):]] = fh.get_tensor(k)
        return out

    def load(self, model: nn.Module, name: str, device: torch.device | str = "cpu") -> nn.Module:
        """Materialise submodule `name` of the skeleton `model` from disk on `device`; returns it."""
        module = model.get_submodule(name)
        state = self.read(f"{name}.")
        expected = set(module.state_dict())
        if expected != set(state):
            missing = sorted(expected - set(state)) or sorted(set(state) - expected)
            raise CheckpointError(f"{self.path}: weights of {name} do not match the config ({missing[0]})")
        module.load_state_dict({k: v.to(device) for k, v in state.items()}, assign=True)
        return module

    def load_outer(self, model: nn.Module, device: torch.device | str = "cpu") -> None:
        """Materialise every layer outside the blocks (embedders, norm_out, proj_out): small, kept resident."""
        for name, child in model.named_children():
            if name not in ("transformer_blocks", "single_transformer_blocks") and any(True for _ in child.parameters()):
                self.load(model, name, device)


def release(module: nn.Module) -> None:
    """Return a materialised submodule to the meta device (frees its memory)."""
    module.to_empty(device="meta")
