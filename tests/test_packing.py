"""Packing round-trips are exact for every bit width and odd shapes."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from optimum_pot.format.packing import pack, packed_row_bytes, unpack


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (5, 8), (2, 9), (13, 72), (4, 577)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_round_trip_exact(bits, shape):
    torch.manual_seed(0)
    codes = torch.randint(0, 1 << bits, shape, dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (shape[0], packed_row_bytes(shape[1], bits))
    assert torch.equal(unpack(packed, bits, shape[1]), codes)


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from([2, 3, 4]), n=st.integers(1, 6), k=st.integers(1, 70), seed=st.integers(0, 2**16))
def test_round_trip_property(bits, n, k, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (n, k), dtype=torch.uint8, generator=g)
    assert torch.equal(unpack(pack(codes, bits), bits, k), codes)


def test_three_bit_is_dense():
    assert packed_row_bytes(8, 3) == 3  # 8 codes in 3 bytes, not one nibble each
    assert packed_row_bytes(576, 3) == 216


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_documented_bit_order(bits):
    """Code k sits at bits [k*b, (k+1)*b) of the row's little-endian stream (docs/format.md)."""
    codes = torch.zeros(1, 8, dtype=torch.uint8)
    codes[0, 1] = (1 << bits) - 1  # all ones in the second code
    stream = int.from_bytes(bytes(pack(codes, bits)[0].tolist()), "little")
    assert stream == ((1 << bits) - 1) << bits
