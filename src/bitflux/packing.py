"""Packing formats for ternary codes: pure functions, exact round trips, named and versioned.

Codes are int8 tensors (N, K) with values in {-1, 0, +1}; packing is along K (the reduction
dimension), row by row, so a kernel reading a tile of rows reads contiguous bytes.

* `2bit` (version 1): 4 codes per byte, see `pack_2bit_u8`.
* `base3` (version 1): 5 trits per byte, see `pack_base3_u8`.

Both pad K up to a whole byte with code 0.
"""

from __future__ import annotations

import torch

from .config import PackFormat
from .errors import FormatError

CODES_PER_BYTE: dict[PackFormat, int] = {PackFormat.TWO_BIT: 4, PackFormat.BASE3: 5}


def packed_cols(in_features: int, fmt: PackFormat | str) -> int:
    """Bytes per row of a packed (N, K) code matrix."""
    per = CODES_PER_BYTE[PackFormat(fmt)]
    return (in_features + per - 1) // per


def _pad_k(codes: torch.Tensor, per: int) -> torch.Tensor:
    k = codes.shape[-1]
    pad = (-k) % per
    if pad:
        codes = torch.nn.functional.pad(codes, (0, pad))
    return codes


# --------------------------------------------------------------------------------------------- 2bit
def pack_2bit_u8(codes: torch.Tensor) -> torch.Tensor:
    """Pack int8 codes (N, K) in {-1,0,1} into uint8 (N, ceil(K/4)).

    Field values: 0b00 = 0, 0b01 = +1, 0b10 = -1, 0b11 = invalid. Code k of a row sits in byte
    k // 4 at bits 2*(k % 4):

        byte j:  bit 7 6 | 5 4 | 3 2 | 1 0
                 k=4j+3  4j+2  4j+1  4j+0

    Decode is `value = (f & 1) - (f >> 1)`; an all-zero byte is four zero codes, so padding and
    freshly zeroed buffers are valid.
    """
    c = _pad_k(codes.to(torch.int8), 4)
    n, kp = c.shape
    f = torch.where(c < 0, 2, c).to(torch.uint8).view(n, kp // 4, 4)  # fields (N, K/4, 4)
    return f[..., 0] | (f[..., 1] << 2) | (f[..., 2] << 4) | (f[..., 3] << 6)


def unpack_2bit_u8(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """Inverse of `pack_2bit_u8`: uint8 (N, ceil(K/4)) -> int8 codes (N, K)."""
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=packed.device)
    f = (packed[..., None] >> shifts) & 3  # (N, K/4, 4)
    v = (f & 1).to(torch.int8) - (f >> 1).to(torch.int8)
    return v.flatten(-2)[..., :in_features]


def invalid_2bit(packed: torch.Tensor) -> bool:
    """True if any 2-bit field holds the invalid value 0b11."""
    both = packed & (packed >> 1) & 0x55  # low bit of each field set iff field == 0b11
    return bool(both.any())


# -------------------------------------------------------------------------------------------- base3
_POW3 = (81, 27, 9, 3, 1)  # weight of trit i in the byte value, most significant first


def pack_base3_u8(codes: torch.Tensor) -> torch.Tensor:
    """Pack int8 codes (N, K) in {-1,0,1} into uint8 (N, ceil(K/5)), 5 trits per byte.

    Trits t = code + 1 in {0,1,2}. A group of 5 codes k = 5j..5j+4 has the value
    p = sum_i t_(5j+i) * 3^(4-i) in [0, 242], stored as s = ceil(p * 256 / 243) in [0, 255].
    That scaling makes the byte a base-3 fixed-point fraction, so trit i decodes with one
    multiply and one shift and no division (the trick of llama.cpp's TQ1_0):

        m_i = (s * 3^i) mod 256;   t_i = (m_i * 3) >> 8

    Only 243 of the 256 byte values are produced; the others are rejected on load.
    """
    c = _pad_k(codes.to(torch.int8), 5)
    n, kp = c.shape
    t = (c.to(torch.int32) + 1).view(n, kp // 5, 5)  # (N, K/5, 5)
    w = torch.tensor(_POW3, dtype=torch.int32, device=codes.device)
    p = (t * w).sum(-1)  # (N, K/5) in [0, 242]
    return ((p * 256 + 242) // 243).to(torch.uint8)


def unpack_base3_u8(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """Inverse of `pack_base3_u8` by multiply-shift: uint8 (N, ceil(K/5)) -> int8 codes (N, K)."""
    s = packed.to(torch.int32)[..., None]  # (N, K/5, 1)
    mul = torch.tensor([1, 3, 9, 27, 81], dtype=torch.int32, device=packed.device)
    m = (s * mul) & 0xFF  # (N, K/5, 5)
    t = (m * 3) >> 8
    return (t - 1).to(torch.int8).flatten(-2)[..., :in_features]


def _valid_base3_bytes() -> torch.Tensor:
    p = torch.arange(243, dtype=torch.int32)
    valid = torch.zeros(256, dtype=torch.bool)
    valid[(p * 256 + 242) // 243] = True
    return valid


_VALID_BASE3 = _valid_base3_bytes()


def invalid_base3(packed: torch.Tensor) -> bool:
    """True if any byte is not one that `pack_base3_u8` can produce."""
    return bool((~_VALID_BASE3.to(packed.device)[packed.long()]).any())


# ------------------------------------------------------------------------------------------ generic
def pack(codes: torch.Tensor, fmt: PackFormat | str) -> torch.Tensor:
    """Pack codes (N, K) in the named format."""
    fmt = PackFormat(fmt)
    return pack_2bit_u8(codes) if fmt is PackFormat.TWO_BIT else pack_base3_u8(codes)


def unpack(packed: torch.Tensor, fmt: PackFormat | str, in_features: int) -> torch.Tensor:
    """Unpack bytes (N, ceil(K/per)) of the named format into int8 codes (N, K)."""
    fmt = PackFormat(fmt)
    if fmt is PackFormat.TWO_BIT:
        return unpack_2bit_u8(packed, in_features)
    return unpack_base3_u8(packed, in_features)


def check_packed(packed: torch.Tensor, fmt: PackFormat | str, name: str = "weight") -> None:
    """Raise `FormatError` if `packed` holds a byte the format never writes."""
    fmt = PackFormat(fmt)
    if packed.dtype != torch.uint8:
        raise FormatError(f"{name}: packed codes must be uint8, got {packed.dtype}")
    bad = invalid_2bit(packed) if fmt is PackFormat.TWO_BIT else invalid_base3(packed)
    if bad:
        raise FormatError(f"{name}: invalid {fmt.value} code found (corrupted checkpoint)")
