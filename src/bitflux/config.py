"""Typed options for quantisation: packing format, initialisation, activation precision, backend.

Every option is a `str` Enum so it round-trips through config.json and the CLI unchanged.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum

QUANT_METHOD = "bitflux"


class PackFormat(str, Enum):
    """How ternary codes are stored on disk and in memory."""

    TWO_BIT = "2bit"
    """4 codes per byte; the layout the kernels read (see `packing.pack_2bit_u8`)."""
    BASE3 = "base3"
    """5 trits per byte (3^5 = 243 <= 256), 1.6 bits per weight (see `packing.pack_base3_u8`)."""


class InitMethod(str, Enum):
    """How a full-precision weight row becomes ternary codes and a scale."""

    ABSMEAN = "absmean"
    """BitNet b1.58: scale = mean|w|, codes = clip(round(w / scale), -1, 1)."""
    TWN = "twn"
    """Ternary weight networks, exact per-row optimum of the threshold rule."""


class ActPrecision(str, Enum):
    """Precision of the activations fed to the ternary matmul."""

    BF16 = "bf16"
    """No activation quantisation: W1.58A16 (activations stay in the model dtype)."""
    INT8 = "int8"
    """Per-token dynamic symmetric int8: W1.58A8 on integer units."""
    FP8 = "fp8"
    """Per-token dynamic fp8 e4m3: W1.58A8 on fp8 tensor cores."""


class Backend(str, Enum):
    """Which kernel runs `TernaryLinear.forward`; AUTO picks by device and availability."""

    AUTO = "auto"
    REFERENCE = "reference"
    """Unpack in bounded chunks, then a float matmul: slow, always available, the numerics oracle."""
    TRITON = "triton"
    """Triton GPU kernels (CUDA, or the Triton interpreter for tests)."""
    CPU = "cpu"
    """int8 x ternary on the CPU's integer GEMM (oneDNN VNNI/AMX via torch._int_mm)."""


# Version of each packing format's byte layout; bump when a layout changes.
FORMAT_VERSIONS: dict[PackFormat, int] = {PackFormat.TWO_BIT: 1, PackFormat.BASE3: 1}


@dataclass(frozen=True)
class QuantConfig:
    """What `bitflux.quantize` does, and what a checkpoint's `quantization_config` records."""

    format: PackFormat = PackFormat.TWO_BIT  # storage/packing of the ternary codes
    init: InitMethod = InitMethod.ABSMEAN  # how codes and scales are derived from the weights
    activations: ActPrecision = ActPrecision.BF16  # activation precision at inference
    policy: str = "flux"  # name of the module policy (bitflux.policies)
    modules_not_converted: tuple[str, ...] = field(default_factory=tuple)  # filled by quantize()
    source: str = ""  # where the full-precision model came from (pipeline dir, hub id, bundled name)

    def __post_init__(self) -> None:
        # Accept plain strings (from JSON or the CLI) and normalise them to the enums.
        object.__setattr__(self, "format", PackFormat(self.format))
        object.__setattr__(self, "init", InitMethod(self.init))
        object.__setattr__(self, "activations", ActPrecision(self.activations))
        object.__setattr__(self, "modules_not_converted", tuple(self.modules_not_converted))

    def to_dict(self) -> dict:
        """The `quantization_config` entry of config.json."""
        d = asdict(self)
        return {
            "quant_method": QUANT_METHOD,
            "format": self.format.value,
            "format_version": FORMAT_VERSIONS[self.format],
            "init": self.init.value,
            "activations": self.activations.value,
            "policy": self.policy,
            "modules_not_converted": list(d["modules_not_converted"]),
            "source": self.source,
        }
