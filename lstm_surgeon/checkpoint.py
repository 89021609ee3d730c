"""The format-neutral checkpoint model: where each tensor's bytes lie, and how to read them.

A `Checkpoint` is one or more files (`CheckpointFile`: a path and a read-only memory map of it) plus a
`TensorRef` per tensor, whose `StorageRef` names the file its bytes lie in and where. Nothing is read
until asked for, so opening a 1 GB file costs what opening a 1 MB one does. Formats (`formats/`) build
these records; everything else (discovery, statistics, edits, diff) only sees these records, so a
checkpoint split over several files (shards) is no different to them.
"""

from __future__ import annotations

import contextlib
import math
import mmap
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np

from lstm_surgeon.dtypes import DType, widen

if TYPE_CHECKING:
    from lstm_surgeon.formats import CheckpointFormat


@dataclass(frozen=True)
class StorageRef:
    """A contiguous run of bytes in one of the checkpoint's files that one or more tensors view."""

    key: str  # unique within its file (two files may both hold an `archive/data/0`)
    offset: int  # absolute offset of the first byte in its file
    nbytes: int
    file: int = 0  # index into `Checkpoint.files`; a single-file checkpoint has only file 0

    @property
    def identity(self) -> tuple[int, str]:
        """What tells two storages apart across the files of one checkpoint."""
        return self.file, self.key


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


EntryKind = Literal["tensor", "container", "value", "object"]
TRAINING_COUNTERS = ("epoch", "global_step", "step", "iteration")


@dataclass(frozen=True)
class Entry:
    """One top-level entry of a checkpoint: a key of its root mapping (or an index of its root list).

    `kind` is "tensor", "container" (a dict, list, tuple or set), "value" (a number, string, None...)
    or "object" (an instance of a class lstm-surgeon keeps inert and never re-creates)."""

    key: str
    kind: EntryKind
    optimizer_state: bool = False  # optimizer state: keyed by parameter position, not by name


@dataclass(frozen=True)
class Operator:
    """A recurrent operator a model file declares (an ONNX `LSTM` node, a Keras `GRU` layer): what
    it is, where it sits, which tensors feed it by its framework's own input names, and its
    settings. Layouts read these; a plain state dict has none."""

    kind: str  # the framework's name for it: "LSTM", "GRU", "RNN", "SimpleRNN", "CuDNNLSTM", ...
    name: str  # its path in the model ("encoder/lstm", "If_0/then_branch/LSTM_3")
    inputs: dict[str, str] = field(hash=False)  # input name ("W", "kernel") -> tensor name
    attributes: dict[str, Any] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class Contents:
    """What a checkpoint holds besides tensor elements, in words every format shares.

    Readers fill it; writers compare it with what their format can carry and refuse to lose any of it
    silently. The format-specific facts a writer needs stay private to that format's module."""

    entries: tuple[Entry, ...] = ()
    metadata: dict[str, str] | None = None  # the file's string key/value pairs, if any
    counters: dict[str, int] = field(default_factory=dict)  # epoch, global_step... as plain ints
    operators: tuple[Operator, ...] = ()  # a model graph's recurrent operators, if it has any

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(entry.key for entry in self.entries)

    def optimizer_keys(self) -> frozenset[str]:
        return frozenset(entry.key for entry in self.entries if entry.optimizer_state)


def optimizer_state_shaped(value: Any) -> bool:
    """True for what `torch.optim.Optimizer.state_dict()` returns (a mapping with `state` and
    `param_groups`), or a non-empty list of those (Lightning's `optimizer_states`): the shape is the
    evidence, not a name with "optim" in it."""
    if isinstance(value, (list, tuple)):
        return bool(value) and all(map(_one_optimizer_state, value))
    return _one_optimizer_state(value)


def _one_optimizer_state(value: Any) -> bool:
    return isinstance(value, Mapping) and "state" in value and "param_groups" in value


class LazyBuffer(Protocol):
    """A file's bytes fetched when sliced (a remote file): what the format readers may use of a
    buffer besides a memory map's buffer protocol. Slices give `bytes`."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: slice, /) -> bytes: ...

    def rfind(self, sub: bytes, start: int = 0, /) -> int: ...

    def close(self) -> None: ...


Buffer = mmap.mmap | bytes | LazyBuffer


def is_mapped(buffer: Buffer | bytearray) -> bool:
    """True when the buffer's bytes can be viewed in place (a memory map or bytes in memory)."""
    return isinstance(buffer, (mmap.mmap, bytes, bytearray))


def byte_range(buffer: Buffer, offset: int, nbytes: int) -> bytes | memoryview:
    """The bytes at [offset, offset + nbytes): a view of a map (no copy), a fetch of a lazy one."""
    if is_mapped(buffer):
        return memoryview(buffer)[offset : offset + nbytes]
    return buffer[offset : offset + nbytes]


@dataclass(frozen=True)
class CheckpointFile:
    """One file of a checkpoint and a read-only map of its bytes.

    `pending_rollback` is True when an in-place edit of the file was interrupted and the map shows
    the bytes the rollback will restore (a private copy-on-write overlay), not the bytes on disk.
    `in_memory` is True for bytes that lie in no file on disk (a compressed member of an archive,
    inflated): they are read like a file's, but an edit of them rewrites the archive.
    `gathered` marks no file but a read-only copy of a tensor whose chunks lie in several files
    (a DCP tensor split across ranks): edits never write it, the format patches the chunks."""

    path: Path
    buffer: Buffer
    pending_rollback: bool = False
    in_memory: bool = False
    gathered: bool = False

    @property
    def size(self) -> int:
        return len(self.buffer)


@dataclass
class Checkpoint:
    """An opened checkpoint: its tensors in file order, and the files that hold their bytes.

    `path` is the path the user gave (the first of `files`); a checkpoint of several files is opened
    with `formats.open_checkpoint_files`."""

    path: Path
    format: CheckpointFormat
    tensors: dict[str, TensorRef]
    files: tuple[CheckpointFile, ...]
    contents: Contents = field(default_factory=Contents)
    # Facts only the format module that read the file uses (its zip records, ...); no other code
    # reads them, so a format's internals never leak into the neutral model.
    format_state: object = field(default=None, repr=False)
    warnings: list[str] = field(default_factory=list)

    @property
    def format_name(self) -> str:
        return self.format.name

    @property
    def metadata(self) -> dict[str, str] | None:
        return self.contents.metadata

    @property
    def top_level_keys(self) -> tuple[str, ...]:
        return self.contents.keys

    @property
    def size(self) -> int:
        """The bytes of every file on disk together."""
        return sum(file.size for file in self.disk_files)

    @property
    def disk_files(self) -> tuple[CheckpointFile, ...]:
        """The files on disk (not inflated members, not gathered copies of split tensors)."""
        return tuple(file for file in self.files if not (file.in_memory or file.gathered))

    @property
    def buffer(self) -> Buffer:
        """The map of the main file (the only one of a single-file checkpoint)."""
        return self.files[0].buffer

    @property
    def has_optimizer_state(self) -> bool:
        """True when the file carries optimizer moments (keyed by parameter index, not by name)."""
        return bool(self.optimizer_keys())

    def optimizer_keys(self) -> frozenset[str]:
        """Top-level entries shaped like optimizer state (see `optimizer_state_shaped`)."""
        return self.contents.optimizer_keys()

    def raw(self, ref: TensorRef | str) -> np.ndarray:
        """The tensor's elements as stored (bfloat16 as uint16), a read-only view of the file."""
        ref = self.tensors[ref] if isinstance(ref, str) else ref
        view = tensor_view(self.files[ref.storage.file].buffer, ref)
        view.flags.writeable = False  # a map with a rollback overlay is writeable; the view is not
        return view

    def values(self, ref: TensorRef | str) -> np.ndarray:
        """The tensor's exact values as a float64 copy (for statistics and comparisons)."""
        ref = self.tensors[ref] if isinstance(ref, str) else ref
        return widen(self.raw(ref), ref.dtype)

    def storages(self) -> Iterator[StorageRef]:
        """Each storage once, in file order (file by file)."""
        seen: dict[tuple[int, str], StorageRef] = {}
        for ref in self.tensors.values():
            seen.setdefault(ref.storage.identity, ref.storage)
        yield from sorted(seen.values(), key=lambda storage: (storage.file, storage.offset))

    def close(self) -> None:
        """Unmap the files; views returned by `raw()` keep a file mapped until they are released."""
        for file in self.files:
            close_buffer(file.buffer)

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def close_buffer(buffer: Buffer) -> None:
    if isinstance(buffer, mmap.mmap):
        with contextlib.suppress(BufferError):
            buffer.close()
    elif not is_mapped(buffer):
        buffer.close()


def tensor_view(buffer: Buffer | bytearray, ref: TensorRef) -> np.ndarray:
    """A numpy view of `ref`'s elements inside `buffer` (writeable when the buffer is); a lazy
    buffer fetches the tensor's storage, and only that."""
    offset = ref.storage.offset
    if not is_mapped(buffer):
        buffer, offset = byte_range(buffer, offset, ref.storage.nbytes), 0
    storage = np.frombuffer(
        buffer,
        dtype=ref.dtype.storage,
        count=ref.storage.nbytes // ref.dtype.itemsize,
        offset=offset,
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
