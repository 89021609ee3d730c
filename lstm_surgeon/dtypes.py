"""Element types as the two file formats name them, and exact conversions to and from numpy.

numpy has no bfloat16 (nor float8), so those are kept as raw unsigned integers and only ever *widened*
for statistics; new values are rounded to the file's dtype the way torch rounds (to nearest, ties to even).
The bytes of a checkpoint never pass through a lossy conversion.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DType:
    """One element type: its torch name, safetensors code, size, and how numpy stores it."""

    name: str
    safetensors_code: str
    itemsize: int
    storage: np.dtype  # what numpy holds the raw bytes as
    is_float: bool

    @property
    def numpy_exact(self) -> bool:
        """True when numpy can compute in this dtype directly (not bfloat16 or float8)."""
        return self.storage.kind == "f" or not self.is_float


def _dt(name: str, code: str, storage: str, is_float: bool) -> DType:
    numpy_dtype = np.dtype(storage).newbyteorder("<")
    return DType(name, code, numpy_dtype.itemsize, numpy_dtype, is_float)


ALL_DTYPES: tuple[DType, ...] = (
    _dt("float64", "F64", "f8", True),
    _dt("float32", "F32", "f4", True),
    _dt("float16", "F16", "f2", True),
    _dt("bfloat16", "BF16", "u2", True),
    _dt("float8_e4m3fn", "F8_E4M3", "u1", True),
    _dt("float8_e5m2", "F8_E5M2", "u1", True),
    _dt("int64", "I64", "i8", False),
    _dt("int32", "I32", "i4", False),
    _dt("int16", "I16", "i2", False),
    _dt("int8", "I8", "i1", False),
    _dt("uint64", "U64", "u8", False),
    _dt("uint32", "U32", "u4", False),
    _dt("uint16", "U16", "u2", False),
    _dt("uint8", "U8", "u1", False),
    _dt("bool", "BOOL", "?", False),
    _dt("complex64", "C64", "c8", False),
)

BY_NAME: dict[str, DType] = {d.name: d for d in ALL_DTYPES}
BY_SAFETENSORS_CODE: dict[str, DType] = {d.safetensors_code: d for d in ALL_DTYPES}

# torch.save names the element type of a legacy typed storage by its class.
BY_TORCH_STORAGE_CLASS: dict[str, DType] = {
    "DoubleStorage": BY_NAME["float64"],
    "FloatStorage": BY_NAME["float32"],
    "HalfStorage": BY_NAME["float16"],
    "BFloat16Storage": BY_NAME["bfloat16"],
    "LongStorage": BY_NAME["int64"],
    "IntStorage": BY_NAME["int32"],
    "ShortStorage": BY_NAME["int16"],
    "CharStorage": BY_NAME["int8"],
    "ByteStorage": BY_NAME["uint8"],
    "BoolStorage": BY_NAME["bool"],
    "ComplexFloatStorage": BY_NAME["complex64"],
}

# Floating dtypes lstm-surgeon can compute on and write to.
EDITABLE: frozenset[str] = frozenset({"float64", "float32", "float16", "bfloat16"})


def _float8_table(exponent_bits: int, mantissa_bits: int, finite_only: bool) -> np.ndarray:
    """The float value of each of the 256 bit patterns of an 8-bit float (IEEE-like layout)."""
    bias = 2 ** (exponent_bits - 1) - 1
    table = np.zeros(256, dtype=np.float64)
    for bits in range(256):
        sign = -1.0 if bits & 0x80 else 1.0
        exponent = (bits >> mantissa_bits) & ((1 << exponent_bits) - 1)
        mantissa = bits & ((1 << mantissa_bits) - 1)
        top_exponent = exponent == (1 << exponent_bits) - 1
        if finite_only and top_exponent and mantissa == (1 << mantissa_bits) - 1:
            value = float("nan")  # e4m3fn: only S.1111.111 is NaN, there is no infinity
        elif not finite_only and top_exponent:
            value = float("inf") if mantissa == 0 else float("nan")
        elif exponent == 0:
            value = mantissa / (1 << mantissa_bits) * 2.0 ** (1 - bias)
        else:
            value = (1 + mantissa / (1 << mantissa_bits)) * 2.0 ** (exponent - bias)
        table[bits] = sign * value
    return table


_FLOAT8_TABLES = {
    "float8_e4m3fn": _float8_table(4, 3, finite_only=True),
    "float8_e5m2": _float8_table(5, 2, finite_only=False),
}


def widen(raw: np.ndarray, dtype: DType) -> np.ndarray:
    """Exact float64 values of raw elements stored as `dtype` (bfloat16 and float8 included)."""
    with np.errstate(invalid="ignore"):  # a signalling NaN stays a NaN, without a warning
        if dtype.name == "bfloat16":
            return (raw.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
        if dtype.name in _FLOAT8_TABLES:
            return _FLOAT8_TABLES[dtype.name][raw]
        return raw.astype(np.float64)


def compute_dtype(dtype: DType) -> np.dtype:
    """The precision torch computes in for elementwise ops on CPU ("opmath"): float64 stays, others float32."""
    return np.dtype(np.float64) if dtype.name == "float64" else np.dtype(np.float32)


def round_to(values: np.ndarray, dtype: DType) -> np.ndarray:
    """Round float values to `dtype` as torch does (nearest, ties to even); return raw storage elements."""
    if dtype.name not in EDITABLE:
        raise ValueError(f"cannot write values of dtype {dtype.name}")
    if dtype.name == "bfloat16":
        bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
        is_nan = np.isnan(bits.view(np.float32))
        rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
        return np.where(is_nan, np.uint32(0x7FC0), rounded).astype(np.uint16)
    if dtype.name == "float16":  # torch rounds through float32 first, so must we
        return np.asarray(values, dtype=np.float32).astype(np.float16)
    return np.asarray(values).astype(dtype.storage)
