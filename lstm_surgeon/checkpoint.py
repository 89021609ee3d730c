"""The format-neutral checkpoint model: where each tensor's bytes lie, and how to read them.

A `Checkpoint` is a read-only memory map of the file plus a `TensorRef` per tensor. Nothing is read until
asked for, so opening a 1 GB file costs what opening a 1 MB one does. Formats (`formats/`) build these
records; everything else (discovery, statistics, edits, diff) only sees these records.
"""

from __future__ import annotations

import contextlib
import math
import mmap
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lstm_surgeon.dtypes import DType, widen

if TYPE_CHECKING:
    from lstm_surgeon.formats import CheckpointFormat


@dataclass(frozen=True)
class StorageRef:
    """A contiguous run of bytes in the file that one or more tensors view."""

    key: str
    offset: int  # absolute file offset of the first byte
    nbytes: int


@dataclass(frozen=True)
class TensorRef:
    """One tensor: its dotted name, element type, shape, and where its elements lie in the file."""

    name: str
    dtype: DType
    shape: tuple[int, ...]
    storage: StorageRef
    element_offset: int = 0  # first element, counted in elements from the storage's start
    strides: tuple[int, ...] | None = None  # in elements; None means contiguous (row-major)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)  # exact: a hostile shape must not wrap around

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @property
    def element_strides(self) -> tuple[int, ...]:
        """Strides in elements, computed for contiguous tensors."""
        return self.strides if self.strides is not None else contiguous_strides(self.shape)

    @property
    def is_contiguous(self) -> bool:
        return self.strides is None or contiguous_strides(self.shape) == self.strides

    def extent_elements(self) -> int:
        """One past the last storage element this tensor touches (0 for an empty tensor)."""
        if self.numel == 0:
            return 0
        last = sum(
            (size - 1) * stride
            for size, stride in zip(self.shape, self.element_strides, strict=True)
        )
        return self.element_offset + last + 1


def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


@dataclass
class Checkpoint:
    """An opened checkpoint file: its tensors in file order, and a read-only map of its bytes."""

    path: Path
    format: CheckpointFormat
    size: int
    tensors: dict[str, TensorRef]
    buffer: mmap.mmap | bytes
    metadata: dict[str, str] | None = None  # safetensors `__metadata__`
    details: Any = (
        None  # format-specific facts the writers need (zip records, the pickle tree, ...)
    )
    top_level_keys: tuple[str, ...] = ()
    warnings: list[str] = field(default_factory=list)

    @property
    def format_name(self) -> str:
        return self.format.name

    @property
    def has_optimizer_state(self) -> bool:
        """True when the file carries optimizer moments (keyed by parameter index, not by name)."""
        return bool(self.optimizer_keys())

    def optimizer_keys(self) -> frozenset[str]:
        """Top-level entries that hold optimizer state (`optimizer_state_dict`, Lightning's
        `optimizer_states`, `optim`, ...); a tensor at the top level is never one."""
        return frozenset(
            key for key in self.top_level_keys if "optim" in key and key not in self.tensors
        )

    def raw(self, ref: TensorRef | str) -> np.ndarray:
        """The tensor's elements as stored (bfloat16 as uint16), a read-only view of the file."""
        ref = self.tensors[ref] if isinstance(ref, str) else ref
        return tensor_view(self.buffer, ref)

    def values(self, ref: TensorRef | str) -> np.ndarray:
        """The tensor's exact values as a float64 copy (for statistics and comparisons)."""
        ref = self.tensors[ref] if isinstance(ref, str) else ref
        return widen(self.raw(ref), ref.dtype)

    def storages(self) -> Iterator[StorageRef]:
        """Each storage once, in file order."""
        seen: dict[str, StorageRef] = {}
        for ref in self.tensors.values():
            seen.setdefault(ref.storage.key, ref.storage)
        yield from sorted(seen.values(), key=lambda storage: storage.offset)

    def close(self) -> None:
        """Unmap the file; views returned by `raw()` keep it mapped until they are released."""
        if isinstance(self.buffer, mmap.mmap):
            with contextlib.suppress(BufferError):
                self.buffer.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def tensor_view(buffer: mmap.mmap | bytes | bytearray, ref: TensorRef) -> np.ndarray:
    """A numpy view of `ref`'s elements inside `buffer` (writeable when the buffer is)."""
    storage = np.frombuffer(
        buffer,
        dtype=ref.dtype.storage,
        count=ref.storage.nbytes // ref.dtype.itemsize,
        offset=ref.storage.offset,
    )
    if ref.is_contiguous:
        return storage[ref.element_offset : ref.element_offset + ref.numel].reshape(ref.shape)
    itemsize = ref.dtype.itemsize
    return np.lib.stride_tricks.as_strided(
        storage[ref.element_offset :],
        shape=ref.shape,
        strides=tuple(stride * itemsize for stride in ref.element_strides),
        writeable=storage.flags.writeable,
    )


@dataclass(frozen=True)
class OutputTensor:
    """A tensor of a file being written: kept from the source, or given new raw elements."""

    ref: TensorRef  # name, dtype and shape in the new file
    source: TensorRef | None = None  # copy the elements of this source tensor
    data: np.ndarray | None = None  # or write these raw elements (already in ref.dtype's storage)

    def raw(self, checkpoint: Checkpoint) -> np.ndarray:
        """The elements to write, contiguous."""
        if self.data is not None:
            return np.ascontiguousarray(self.data)
        assert self.source is not None
        return np.ascontiguousarray(checkpoint.raw(self.source))
