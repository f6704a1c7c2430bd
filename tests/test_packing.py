import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bitflux.config import PackFormat
from bitflux.errors import FormatError
from bitflux.packing import (
    check_packed,
    pack,
    pack_2bit_u8,
    pack_base3_u8,
    packed_cols,
    unpack,
    unpack_2bit_u8,
    unpack_base3_u8,
)

FORMATS = [PackFormat.TWO_BIT, PackFormat.BASE3]


def _codes(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 9), k=st.integers(1, 70), fmt=st.sampled_from(FORMATS), seed=st.integers(0, 99))
def test_round_trip_exact_for_every_shape(n, k, fmt, seed):
    codes = _codes(n, k, seed)
    packed = pack(codes, fmt)
    assert packed.dtype == torch.uint8 and packed.shape == (n, packed_cols(k, fmt))
    assert torch.equal(unpack(packed, fmt, k), codes)


@pytest.mark.parametrize("k", [3072, 12288, 15360, 3071])
def test_round_trip_flux_widths(k):
    for fmt in FORMATS:
        codes = _codes(4, k)
        assert torch.equal(unpack(pack(codes, fmt), fmt, k), codes)


def test_2bit_layout_matches_docstring():
    # codes k=0..3 = (+1, -1, 0, +1) -> fields 01, 10, 00, 01 at bits 0,2,4,6
    packed = pack_2bit_u8(torch.tensor([[1, -1, 0, 1, -1]], dtype=torch.int8))
    assert packed.tolist() == [[0b01_00_10_01, 0b10]]
    assert torch.equal(unpack_2bit_u8(torch.zeros(1, 2, dtype=torch.uint8), 8), torch.zeros(1, 8, dtype=torch.int8))


def test_base3_all_243_groups_and_sizes():
    groups = torch.tensor(list(itertools.product([-1, 0, 1], repeat=5)), dtype=torch.int8)  # (243, 5)
    packed = pack_base3_u8(groups)
    assert packed.shape == (243, 1) and packed.unique().numel() == 243
    assert torch.equal(unpack_base3_u8(packed, 5), groups)
    assert packed_cols(3072, "base3") == 615 and packed_cols(3072, "2bit") == 768


def test_invalid_codes_are_rejected():
    good = pack_2bit_u8(_codes(3, 16))
    check_packed(good, "2bit")
    bad = good.clone()
    bad[1, 2] |= 0b11 << 4  # field 2 of that byte becomes 0b11
    with pytest.raises(FormatError, match="invalid 2bit"):
        check_packed(bad, "2bit")
    g3 = pack_base3_u8(_codes(3, 15))
    check_packed(g3, "base3")
    valid = set(pack_base3_u8(torch.tensor(list(itertools.product([-1, 0, 1], repeat=5)), dtype=torch.int8)).flatten().tolist())
    invalid = next(v for v in range(256) if v not in valid)
    g3[0, 0] = invalid
    with pytest.raises(FormatError, match="invalid base3"):
        check_packed(g3, "base3")
    with pytest.raises(FormatError, match="uint8"):
        check_packed(good.to(torch.int16), "2bit")
