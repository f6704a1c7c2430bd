"""Typed options for quantisation: packing format, initialisation, activation precision, backend.

Every option is a `str` Enum so it round-trips through config.json and the CLI unchanged.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

from diffusers.quantizers.quantization_config import QuantizationConfigMixin


class QuantMethod(str, Enum):
    """The `quant_method` diffusers dispatches on (its backends' configs carry an Enum here)."""

    BITFLUX = "bitflux"


QUANT_METHOD = QuantMethod.BITFLUX.value


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

    AUTO = "auto"
    """The fastest precision that keeps quality on the input's device, chosen at forward time
    (`bitflux.kernels.resolve_act`): int8 on CPUs with the int8 kernels, bf16 elsewhere."""
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


@dataclass
class QuantConfig(QuantizationConfigMixin):
    """What `bitflux.quantize` does, and what a checkpoint's `quantization_config` records.

    It is also diffusers' quantization config for the bitflux backend (`BitfluxConfig`):
    `FluxTransformer2DModel.from_pretrained(src, quantization_config=BitfluxConfig(...))`
    ternarises while loading, and a bitflux checkpoint's config.json round-trips through it.
    """

    quant_method: QuantMethod = field(default=QuantMethod.BITFLUX, init=False, repr=False, compare=False)  # diffusers reads it

    format: PackFormat = PackFormat.TWO_BIT  # storage/packing of the ternary codes
    init: InitMethod = InitMethod.ABSMEAN  # how codes and scales are derived from the weights
    activations: ActPrecision = ActPrecision.AUTO  # activation precision at inference (auto: per device)
    policy: str = "auto"  # module policy name (bitflux.policies); "auto": the one for the model's class
    include: tuple[str, ...] = field(default_factory=tuple)  # extra name globs to ternarise (policy override)
    exclude: tuple[str, ...] = field(default_factory=tuple)  # name globs to keep in the model dtype (override)
    modules_not_converted: tuple[str, ...] = field(default_factory=tuple)  # filled when quantising
    source: str = ""  # where the full-precision model came from (absolute path, hub id, bundled name)

    def __post_init__(self) -> None:
        # Accept plain strings (from JSON or the CLI) and normalise them to the enums.
        self.format = PackFormat(self.format)
        self.init = InitMethod(self.init)
        self.activations = ActPrecision(self.activations)
        self.modules_not_converted = tuple(self.modules_not_converted)
        self.include, self.exclude = tuple(self.include), tuple(self.exclude)

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs: Any):
        """From a config.json `quantization_config` (diffusers calls this); unknown keys are refused."""
        from .validate import check_quantization_config

        check_quantization_config({"quant_method": QUANT_METHOD, **config_dict}, "quantization_config")
        known = {"format", "init", "activations", "policy", "include", "exclude", "modules_not_converted", "source"}
        d = {k: v for k, v in {**config_dict, **kwargs}.items() if k in known}
        cfg = cls(**d)
        return (cfg, {}) if return_unused_kwargs else cfg

    def update(self, **kwargs: Any) -> dict[str, Any]:
        """Set the given known fields (diffusers' config API); returns the unused keys."""
        unused = {}
        for k, v in kwargs.items():
            if k in {"format", "init", "activations", "policy", "source"}:
                setattr(self, k, v)
            else:
                unused[k] = v
        self.__post_init__()
        return unused

    def to_json_string(self, use_diff: bool = True) -> str:
        import json

        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def __repr__(self) -> str:
        return f"BitfluxConfig({', '.join(f'{k}={v!r}' for k, v in self.to_dict().items())})"

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
            **({"include": list(self.include)} if self.include else {}),
            **({"exclude": list(self.exclude)} if self.exclude else {}),
            "modules_not_converted": list(d["modules_not_converted"]),
            "source": self.source,
        }


BitfluxConfig = QuantConfig  # the name diffusers users know it by
