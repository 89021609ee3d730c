"""Element types: widening is exact and rounding is bit-for-bit what torch does."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from lstm_surgeon.dtypes import ALL_DTYPES, BY_NAME, BY_SAFETENSORS_CODE, EDITABLE, round_to, widen

pytestmark = [
    pytest.mark.filterwarnings("ignore:invalid value encountered in cast:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning"),
]

BF16, F16, F32, F64 = (BY_NAME[name] for name in ("bfloat16", "float16", "float32", "float64"))
ALL_U16 = np.arange(1 << 16, dtype=np.uint16)


def torch_bits(tensor: torch.Tensor) -> np.ndarray:
    """A 16-bit tensor's bit patterns as uint16."""
    return tensor.view(torch.int16).numpy().view(np.uint16)


def torch_round(values: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """What torch stores when a tensor of `values` (their own dtype) is converted to `dtype`."""
    converted = torch.from_numpy(np.ascontiguousarray(values)).to(dtype)
    if dtype in (torch.bfloat16, torch.float16):
        return torch_bits(converted)
    return converted.numpy()


def float32_from_bits(bits: np.ndarray) -> np.ndarray:
    return np.asarray(bits, dtype=np.uint32).view(np.float32)


def assert_bfloat16_rounding(values: np.ndarray) -> None:
    """round_to(values, bfloat16) has torch's bits for every number, and a NaN for every NaN:
    torch itself writes 0x7FC0 from scalar paths and 0xFFFF from its vectorised float->bfloat16
    copy, so no single NaN pattern is "torch's"."""
    ours = round_to(values, BF16)
    assert ours.dtype == np.uint16
    assert ours.shape == values.shape
    expected = torch_round(values, torch.bfloat16)
    nan = np.isnan(values)
    assert ours[~nan].tolist() == expected[~nan].tolist()
    assert ((ours[nan] & 0x7F80) == 0x7F80).all()
    assert ((ours[nan] & 0x007F) != 0).all()


FLOAT32_BITS = hnp.arrays(np.uint32, st.integers(0, 64), elements=st.integers(0, 2**32 - 1))
FLOAT32_VALUES = hnp.arrays(
    np.float32,
    st.integers(0, 64),
    elements=st.floats(width=32, allow_nan=True, allow_infinity=True, allow_subnormal=True),
)
FLOAT64_VALUES = hnp.arrays(
    np.float64,
    st.integers(0, 64),
    elements=st.floats(allow_nan=False, allow_infinity=True, allow_subnormal=True),
)


# --- The table itself ---------------------------------------------------------------------------


def test_dtype_table_agrees_with_torch_and_safetensors():
    from safetensors import torch as safetensors_torch

    safetensors_types = safetensors_torch._TYPES
    for dtype in ALL_DTYPES:
        torch_dtype = getattr(torch, dtype.name)
        assert torch.empty((), dtype=torch_dtype).element_size() == dtype.itemsize, dtype.name
        assert dtype.storage.itemsize == dtype.itemsize, dtype.name
        assert dtype.is_float == (torch_dtype.is_floating_point), dtype.name
        assert safetensors_types[dtype.safetensors_code] == torch_dtype, dtype.name
        assert BY_SAFETENSORS_CODE[dtype.safetensors_code] is dtype


# --- widen: exact ---------------------------------------------------------------------------------


def test_widen_bfloat16_is_exact_for_every_bit_pattern():
    expected = torch.from_numpy(ALL_U16.view(np.int16).copy()).view(torch.bfloat16).double()
    ours = widen(ALL_U16, BF16)
    assert ours.dtype == np.float64
    assert ours.view(np.uint64).tolist() == expected.numpy().view(np.uint64).tolist()


def test_widen_float16_is_exact_for_every_bit_pattern():
    expected = torch.from_numpy(ALL_U16.view(np.int16).copy()).view(torch.float16).double()
    ours = widen(ALL_U16.view(np.float16), F16)
    np.testing.assert_array_equal(ours, expected.numpy())
    assert np.array_equal(np.signbit(ours), np.signbit(expected.numpy()))


@pytest.mark.parametrize("name", ["float8_e4m3fn", "float8_e5m2"])
def test_widen_float8_is_exact_for_every_bit_pattern(name):
    bits = np.arange(256, dtype=np.uint8)
    expected = torch.from_numpy(bits.copy()).view(getattr(torch, name)).double().numpy()
    ours = widen(bits, BY_NAME[name])
    np.testing.assert_array_equal(ours, expected)  # NaN where torch has NaN, equal elsewhere
    assert np.array_equal(np.signbit(ours[~np.isnan(ours)]), np.signbit(expected[~np.isnan(ours)]))


def test_widen_keeps_shape_and_returns_a_copy():
    raw = np.arange(12, dtype=np.uint16).reshape(3, 4)[:, ::2]
    ours = widen(raw, BF16)
    assert ours.shape == (3, 2)
    ours[...] = 0
    assert raw.tolist() == np.arange(12).reshape(3, 4)[:, ::2].tolist()


# --- round_to: bit-for-bit torch ------------------------------------------------------------------


def test_round_to_bfloat16_on_every_tie_and_near_tie():
    """Each high half with low halves 0, 1, 0x7FFF (below the tie), 0x8000 (the tie), 0x8001 and
    0xFFFF: round-to-nearest-even, overflow to infinity, NaNs and subnormals, all of them."""
    high = np.arange(1 << 16, dtype=np.uint32) << 16
    low = np.array([0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF], dtype=np.uint32)
    values = float32_from_bits((high[:, None] | low[None, :]).ravel())
    assert_bfloat16_rounding(values)


@settings(max_examples=50, deadline=None)
@given(bits=FLOAT32_BITS)
def test_round_to_bfloat16_matches_torch_on_any_float32(bits):
    assert_bfloat16_rounding(float32_from_bits(bits))


@settings(max_examples=50, deadline=None)
@given(values=FLOAT32_VALUES)
def test_round_to_bfloat16_matches_torch_on_float32_values(values):
    assert_bfloat16_rounding(values)


@settings(max_examples=50, deadline=None)
@given(values=FLOAT64_VALUES)
def test_round_to_bfloat16_matches_torch_on_float64_values(values):
    """torch converts double to bfloat16 through float: the same double rounding."""
    with np.errstate(over="ignore"):
        assert round_to(values, BF16).tolist() == torch_round(values, torch.bfloat16).tolist()


def test_round_to_float16_on_every_tie_and_near_tie():
    """float32 values at, just below and just above the midpoint of every pair of neighbouring
    float16 values (and at the values), including subnormals and the overflow threshold."""
    halves = ALL_U16.view(np.float16)
    finite = halves[np.isfinite(halves)].astype(np.float32)
    ordered = np.unique(finite)
    midpoints = ((ordered[:-1].astype(np.float64) + ordered[1:]) / 2).astype(np.float32)
    values = np.concatenate(
        [
            finite,
            midpoints,
            np.nextafter(midpoints, np.float32(-np.inf)),
            np.nextafter(midpoints, np.float32(np.inf)),
            np.array([65520.0, -65520.0, 65519.996, np.inf, -np.inf], dtype=np.float32),
        ]
    )
    assert (
        round_to(values, F16).view(np.uint16).tolist()
        == torch_round(values, torch.float16).tolist()
    )


@settings(max_examples=50, deadline=None)
@given(bits=FLOAT32_BITS)
def test_round_to_float16_matches_torch_on_any_float32(bits):
    values = float32_from_bits(bits)
    ours = round_to(values, F16).view(np.uint16)
    expected = torch_round(values, torch.float16)
    nan = np.isnan(values)
    assert ours[~nan].tolist() == expected[~nan].tolist()
    # NaNs stay NaNs with their sign (the payload of a signalling NaN may differ from torch's).
    assert np.isnan(ours[nan].view(np.float16)).all()
    assert (ours[nan] >> 15).tolist() == (expected[nan] >> 15).tolist()


def test_round_to_float16_matches_torch_on_float64_values():
    """1 + 2**-11 + 2**-40 is just above a float16 tie: direct rounding goes up, torch rounds to
    float32 first (landing on the tie) and then to even, giving 1.0."""
    values = np.array([1 + 2**-11 + 2**-40, -(1 + 2**-11 + 2**-40), 1 + 3 * 2**-11 - 2**-40])
    expected = torch_round(values, torch.float16)
    assert round_to(values, F16).view(np.uint16).tolist() == expected.tolist()


@settings(max_examples=50, deadline=None)
@given(values=FLOAT64_VALUES)
def test_round_to_float32_and_float64_match_torch(values):
    with np.errstate(over="ignore"):
        assert round_to(values, F32).tolist() == torch_round(values, torch.float32).tolist()
    assert round_to(values, F32).dtype == np.float32
    assert round_to(values, F64).tolist() == values.tolist()


def test_round_to_inverts_widen_for_every_16_bit_pattern():
    for dtype, storage in ((BF16, ALL_U16), (F16, ALL_U16.view(np.float16))):
        widened = widen(storage, dtype)
        keep = ~np.isnan(widened)
        back = round_to(widened, dtype).view(np.uint16)
        assert back[keep].tolist() == ALL_U16[keep].tolist(), dtype.name


def test_round_to_keeps_shape():
    values = np.linspace(-3, 3, 12).reshape(3, 4)
    for dtype in (BF16, F16, F32, F64):
        assert round_to(values, dtype).shape == (3, 4)


@pytest.mark.parametrize("name", sorted(set(BY_NAME) - EDITABLE))
def test_round_to_refuses_dtypes_it_cannot_write(name):
    with pytest.raises(ValueError, match=name):
        round_to(np.zeros(3), BY_NAME[name])
