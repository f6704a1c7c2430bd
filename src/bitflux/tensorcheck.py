"""Stored tensors against the model their config describes: names, shapes, dtypes, then values.

`read_headers` reads only the safetensors headers (no tensor data), so `check_headers` can refuse
a checkpoint before a byte of weights is loaded: every tensor the model expects present, no
extra, each shape equal, packed codes U8, scales BF16, and every other floating tensor in one
float dtype (the checkpoint's), so an I32 header on a bias is refused rather than reinterpreted.
After loading, `check_values` refuses non-finite floats, out-of-range scales and invalid codes.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import CheckpointError, FormatError
from .linear import SCALE_DTYPE, TernaryLinear
from .config import PackFormat
from .safeio import check_regular_file

# safetensors dtype names of the float dtypes a checkpoint may keep its unconverted layers in.
FLOAT_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}
DTYPE_NAMES = {
    torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64", torch.bool: "BOOL",
    torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64",
}  # fmt: skip
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
               "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}  # fmt: skip

# A ternary layer's scale is the mean magnitude of its full-precision row (absmean; TWN's is the
# mean over the kept entries), so it is at most max|w|. Trained diffusion transformers keep
# |w| far below 1e2 (FLUX.1-dev's scales: ~1e-2; the toy's: 8e-5 .. 0.25). A bf16 scale stored
# as >= 1e4 is therefore damage, not a model: a scale below 2 has its top exponent bit clear,
# and flipping it multiplies the scale by 2^128 (0.02 -> 6.8e36, finite), after which the
# activations overflow to inf/NaN a few layers later. Within one layer, rows have one
# magnitude (the toy's largest scale is at most 3x the median), so a scale more than 2^12 times
# its layer's median is refused too (an exponent flip of x2^16 or more on a row near the median).
# Smaller flips (x2, x4, x16) stay in range; only the integrity hash catches those.
SCALE_MAX = 1e4
SCALE_SPREAD = 2.0**12
_CHUNK = 1 << 24  # elements per finiteness check: bounded temporary memory


@dataclass(frozen=True)
class Header:
    """One stored tensor as its safetensors header describes it."""

    shape: tuple[int, ...]
    dtype: str  # safetensors dtype name: "U8", "BF16", ...
    file: Path

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_BYTES.get(self.dtype, 0)


def read_headers(files: Iterable[Path]) -> dict[str, Header]:
    """Name -> Header of every tensor in the safetensors `files`, reading headers only."""
    from safetensors import SafetensorError, safe_open

    headers: dict[str, Header] = {}
    for f in files:
        check_regular_file(f)  # safe_open on a FIFO would block
        try:
            with safe_open(str(f), framework="pt") as fh:
                for k in fh.keys():
                    if k in headers:
                        raise CheckpointError(f"{f}: tensor {k} is also stored in {headers[k].file.name}")
                    sl = fh.get_slice(k)
                    headers[k] = Header(tuple(int(d) for d in sl.get_shape()), str(sl.get_dtype()), Path(f))
        except (SafetensorError, OSError, RuntimeError, ValueError, TypeError) as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CheckpointError(f"{f}: truncated or corrupted safetensors file ({first})") from None
    return headers


def expected_state(model: nn.Module) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of what a checkpoint of `model` (meta device is fine) stores."""
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}


def check_headers(
    expected: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
    headers: Mapping[str, Header],
    where: str | os.PathLike,
    *,
    one_float_dtype: bool = True,
) -> torch.dtype | None:
    """Refuse stored tensors that disagree with the model; returns the checkpoint's float dtype.

    Packed layers (`P.qweight` with `P.scale`) must be U8 codes and BF16 scales; every other
    tensor the model holds as a float must be stored in one float dtype, the one returned
    (None if there is none; `one_float_dtype=False` allows a mix, as dense diffusers models
    that keep some modules in fp32 have); non-float tensors must have their exact dtype.
    """
    missing = sorted(set(expected) - set(headers))
    extra = sorted(set(headers) - set(expected))
    if missing:
        raise CheckpointError(f"{where}: tensors disagree with config.json (missing {missing[:3]}{' ...' if len(missing) > 3 else ''})")
    if extra:
        raise CheckpointError(f"{where}: tensors disagree with config.json (unexpected {extra[:3]}{' ...' if len(extra) > 3 else ''})")
    packed = {k[: -len(".qweight")] for k in expected if k.endswith(".qweight")}
    float_dtype: str | None = None
    first_float = ""
    for name in sorted(expected):
        shape, dtype = expected[name]
        h = headers[name]
        if h.shape != tuple(shape):
            raise CheckpointError(f"{h.file}: {name} has shape {list(h.shape)}, config.json implies {list(shape)}")
        prefix, _, leaf = name.rpartition(".")
        if prefix in packed and leaf == "qweight":
            want = "U8"
        elif prefix in packed and leaf == "scale":
            want = DTYPE_NAMES[SCALE_DTYPE]
        elif dtype.is_floating_point:
            if h.dtype not in FLOAT_DTYPES:
                raise CheckpointError(f"{h.file}: {name} is stored as {h.dtype}, expected a float dtype ({'/'.join(FLOAT_DTYPES)})")
            if float_dtype is None:
                float_dtype, first_float = h.dtype, name
            want = float_dtype if one_float_dtype else h.dtype
            if h.dtype != want:
                raise CheckpointError(f"{h.file}: {name} is stored as {h.dtype}, but {first_float} as {want} (one float dtype per checkpoint)")
        else:
            want = DTYPE_NAMES.get(dtype, str(dtype))
        if h.dtype != want:
            raise CheckpointError(f"{h.file}: {name} is stored as {h.dtype}, expected {want}")
    return FLOAT_DTYPES[float_dtype] if float_dtype else None


def check_index_headers(weight_map: Mapping[str, str], headers: Mapping[str, Header], total_size: int | None, where: str | os.PathLike) -> None:
    """The index agrees with the shards: each tensor where the map says, nothing unlisted, total_size right."""
    for name, h in headers.items():
        if name not in weight_map:
            raise CheckpointError(f"{where}: {h.file.name} stores {name}, which the index does not list")
        if weight_map[name] != h.file.name:
            raise CheckpointError(f"{where}: index puts {name} in {weight_map[name]}, but it is stored in {h.file.name}")
    absent = sorted(set(weight_map) - set(headers))
    if absent:
        raise CheckpointError(f"{where}: index lists {absent[0]}, which no shard stores")
    if total_size is not None:
        stored = sum(h.nbytes for h in headers.values())
        if stored != total_size:
            raise CheckpointError(f"{where}: metadata.total_size is {total_size:,}, but the shards store {stored:,} bytes")


def _finite(t: torch.Tensor) -> bool:
    """No NaN or inf in `t`. torch.aminmax propagates NaN (documented) and keeps inf, so its two
    outputs are finite iff every element is: one reduction without temporaries, ~60x faster
    than `isfinite(t).all()` on bf16 here (2.6 G vs 41 M elements/s)."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t.detach().reshape(-1))
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


def check_scale(name: str, scale: torch.Tensor, where: str | os.PathLike) -> None:
    """A ternary layer's scales: finite, >= 0, below SCALE_MAX and SCALE_SPREAD x the layer median."""
    s = scale.detach().float()
    if not bool(torch.isfinite(s).all()):
        raise FormatError(f"{where}: {name} holds non-finite values")
    if bool((s < 0).any()):
        raise FormatError(f"{where}: {name} holds a negative scale ({float(s.min()):.3g}); scales are magnitudes")
    top = float(s.max()) if s.numel() else 0.0
    if top >= SCALE_MAX:
        raise FormatError(f"{where}: {name} holds a scale of {top:.3g}, above any trained weight's magnitude (limit {SCALE_MAX:g})")
    median = float(s[s > 0].median()) if bool((s > 0).any()) else 0.0
    if median > 0 and top > SCALE_SPREAD * median:
        raise FormatError(f"{where}: {name} holds a scale {top / median:.3g}x its layer's median (limit {SCALE_SPREAD:g}x; corrupted?)")


def _invalid_bytes(fmt: PackFormat) -> torch.Tensor:
    """(256,) bool: the byte values a format never writes."""
    if fmt is PackFormat.TWO_BIT:
        b = torch.arange(256)
        return (b & (b >> 1) & 0x55) != 0  # a 2-bit field holding 0b11
    from .packing import _VALID_BASE3

    return ~_VALID_BASE3.cpu()


def codes_valid(packed: torch.Tensor, fmt: PackFormat | str) -> bool:
    """True if every byte of `packed` is one the format writes.

    Counts byte values (one `bincount` pass, chunked to bound its int64 temporaries) and looks
    up the invalid ones: 0.8 GB/s on this (busy) machine, 3.7x `packing.invalid_2bit` and 19x
    `invalid_base3`, which matters for the 3 GB of codes of FLUX.1-dev.
    """
    fmt = PackFormat(fmt)
    bad = _invalid_bytes(fmt).to(packed.device)
    flat = packed.detach().reshape(-1)
    for i in range(0, flat.numel(), _CHUNK):
        counts = torch.bincount(flat[i : i + _CHUNK], minlength=256)
        if bool(counts[bad].any()):
            return False
    return True


def check_values(model: nn.Module, where: str | os.PathLike) -> None:
    """After loading: every float tensor finite, scales in range, packed codes valid."""
    ternary = {name: mod for name, mod in model.named_modules() if isinstance(mod, TernaryLinear)}
    for name, mod in ternary.items():
        if mod.qweight.dtype != torch.uint8:
            raise FormatError(f"{where}: {name}.qweight: packed codes must be uint8, got {mod.qweight.dtype}")
        if not codes_valid(mod.qweight, mod.fmt):
            raise FormatError(f"{where}: {name}.qweight: invalid {mod.fmt.value} code found (corrupted checkpoint)")
        check_scale(f"{name}.scale", mod.scale, where)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and not t.is_meta and not _finite(t):
            raise FormatError(f"{where}: {name} holds non-finite values (NaN or inf)")
