"""bitflux: 1.58-bit (ternary) FLUX diffusion transformers inside diffusers.

Public API: `quantize` a FLUX transformer in place, `save` it packed, `load` it back without
ever materialising dense weights, and run it in an ordinary `FluxPipeline`.
"""

from . import _quiet

_quiet.install()  # before diffusers/transformers are imported: known third-party notices only

from .backend import register as _register_backend
from .lora import register as _register_lora
from .checkpoint import load, save
from .config import ActPrecision, Backend, BitfluxConfig, InitMethod, PackFormat, QuantConfig
from .errors import BitfluxError, CheckpointError, FormatError, ModelError, OutputExistsError
from .linear import TernaryLinear
from .quantize import quantize, set_activations, set_backend

# Last: binds `bitflux.calibrate` to the function, shadowing the subpackage of the same name
# (see bitflux/calibrate/__init__.py for why `from bitflux.calibrate import X` still works).
from .calibrate import CalibConfig, calibrate  # noqa: E402

_register_backend()  # diffusers' from_pretrained now knows quant_method "bitflux"
_register_lora()  # peft/diffusers LoRA handle TernaryLinear (patched when peft is imported)

__version__ = "0.1.0"

__all__ = [
    "ActPrecision",
    "Backend",
    "BitfluxConfig",
    "BitfluxError",
    "CalibConfig",
    "CheckpointError",
    "FormatError",
    "InitMethod",
    "ModelError",
    "OutputExistsError",
    "PackFormat",
    "QuantConfig",
    "TernaryLinear",
    "calibrate",
    "load",
    "quantize",
    "save",
    "set_activations",
    "set_backend",
]
