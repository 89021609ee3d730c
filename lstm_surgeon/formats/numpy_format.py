"""numpy's own files: `.npy` (one array, `np.save`) and `.npz` (a zip of `.npy` members, `np.savez`
and `np.savez_compressed`).

A `.npy` header is a Python dict literal; numpy's `read_array_header_1_0/2_0` parse it without
executing anything (`ast.literal_eval`), and an array of Python objects (`allow_pickle`) is refused,
never unpickled. A `.npy` file's array is named by the file's stem, an `.npz` member's by its key
(what `np.load` calls it). Elements of `.npy` files and stored `.npz` members lie uncompressed in the
file and are patched where they lie (an `.npz` member's CRC-32 updated). A deflated member is
inflated into memory to be read (a member that claims or inflates to an absurd size is refused), and
an edit of it rewrites the archive, each member keeping its compression.
"""

from __future__ import annotations

import io
import mmap
import os
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from tokenize import TokenError  # numpy tokenizes a header before it parses it
from typing import BinaryIO

import numpy as np

from lstm_surgeon.checkpoint import (
    Buffer,
    Checkpoint,
    CheckpointFile,
    Contents,
    Entry,
    OutputTensor,
    StorageRef,
    TensorRef,
    contiguous_strides,
)
from lstm_surgeon.dtypes import BY_NAME, DType
from lstm_surgeon.errors import CheckpointError, EditError, UnsupportedCheckpointError
from lstm_surgeon.formats.zip_records import LOCAL_HEADER, ZipRecord, crc_problems, read_records
from lstm_surgeon.writing import BytePatch, Progress

NPY_MAGIC = b"\x93NUMPY"
NPY_SUFFIX = ".npy"
HEADER_READERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}
MAX_HEADER_BYTES = 10_000  # numpy's own limit on a header it will parse
DEFLATED = zipfile.ZIP_DEFLATED
MAX_INFLATED_BYTES = 1 << 32  # the most one archive's compressed members may inflate to, together
DEFLATE_MAX_RATIO = 1032  # deflate cannot shrink data more than this (zeros reach ~1030:1)


@dataclass(frozen=True)
class NpyArray:
    """What a `.npy` header says: element type, shape, order, and where the elements start."""

    dtype: DType
    shape: tuple[int, ...]
    fortran_order: bool
    data_offset: int  # in the buffer the header was read from

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=object)) * self.dtype.itemsize

    def tensor_ref(self, name: str, key: str, file: int = 0) -> TensorRef:
        """The tensor these elements are; Fortran order is a strided view (reversed strides)."""
        strides = None
        if self.fortran_order and len(self.shape) > 1:
            strides = tuple(reversed(contiguous_strides(tuple(reversed(self.shape)))))
        storage = StorageRef(key, self.data_offset, self.nbytes, file)
        return TensorRef(name, self.dtype, self.shape, storage, strides=strides)


def parse_npy(where: str, buffer: Buffer, start: int, end: int) -> NpyArray:
    """The header of the `.npy` bytes in `buffer[start:end]`, checked against the bytes there."""
    head = io.BytesIO(bytes(buffer[start : min(end, start + 16 + MAX_HEADER_BYTES)]))
    try:
        version = np.lib.format.read_magic(head)
        reader = HEADER_READERS.get(version)
        if reader is None:
            raise UnsupportedCheckpointError(
                f"{where}: .npy format version {version[0]}.{version[1]} is not supported "
                "(lstm-surgeon reads versions 1.0 and 2.0)"
            )
        shape, fortran_order, numpy_dtype = reader(head, max_header_size=MAX_HEADER_BYTES)
    except (ValueError, TypeError, SyntaxError, EOFError, struct.error, TokenError) as error:
        raise CheckpointError(f"{where}: corrupt .npy header ({error})") from None
    array = NpyArray(
        element_type(where, numpy_dtype), tuple(shape), fortran_order, start + head.tell()
    )
    if array.data_offset + array.nbytes > end:
        raise CheckpointError(f"{where}: the array runs past the end of its bytes (truncated?)")
    return array


def element_type(where: str, numpy_dtype: np.dtype) -> DType:
    """lstm-surgeon's element type for a numpy dtype; arrays of objects, records, strings or
    big-endian numbers are refused (never unpickled)."""
    if numpy_dtype.hasobject:
        raise UnsupportedCheckpointError(
            f"{where}: an array of Python objects (saved with allow_pickle); lstm-surgeon never "
            "unpickles them: save the weights as numeric arrays"
        )
    if numpy_dtype.byteorder == ">":
        raise UnsupportedCheckpointError(f"{where}: big-endian arrays are not supported")
    dtype = BY_NAME.get(numpy_dtype.name)
    if dtype is None or dtype.storage != numpy_dtype.newbyteorder("<"):
        raise UnsupportedCheckpointError(
            f"{where}: an array of {numpy_dtype}, not of numbers lstm-surgeon reads"
        )
    return dtype


def numpy_array(tensor: OutputTensor, source: Checkpoint) -> np.ndarray:
    """The elements to write into a numpy file, in a dtype numpy has."""
    dtype = tensor.ref.dtype
    if not dtype.numpy_exact:
        raise EditError(
            f"{tensor.ref.name}: numpy has no {dtype.name}; write a .safetensors or .pt output"
        )
    return tensor.raw(source)


def _contents(tensors: dict[str, TensorRef]) -> Contents:
    return Contents(entries=tuple(Entry(name, "tensor") for name in tensors))


class NpyFormat:
    """One array: named by the file's stem (`lstm.weight_ih_l0.npy` holds `lstm.weight_ih_l0`),
    so a folder of `.npy` files opened together is one checkpoint."""

    name = "npy"
    suffixes = (NPY_SUFFIX,)

    def sniff(self, head: bytes) -> bool:
        return head.startswith(NPY_MAGIC)

    def read(self, path: Path, buffer: mmap.mmap | bytes) -> Checkpoint:
        array = parse_npy(str(path), buffer, 0, len(buffer))
        tensors = {path.stem: array.tensor_ref(path.stem, "array")}
        return Checkpoint(path, self, tensors, (CheckpointFile(path, buffer),), _contents(tensors))

    def checksum_patches(
        self, checkpoint: Checkpoint, storages: dict[StorageRef, bytes]
    ) -> list[BytePatch]:
        return []  # a .npy file has no checksum

    def checksum_problems(
        self, checkpoint: Checkpoint, progress: Progress | None
    ) -> tuple[int, list[str]]:
        return 0, []

    def write(
        self,
        out: BinaryIO,
        tensors: list[OutputTensor],
        source: Checkpoint,
        drop_keys: frozenset[str] = frozenset(),
    ) -> None:
        if len(tensors) != 1:
            raise EditError(
                f"{source.path}: a .npy file holds one array, and the result has {len(tensors)}; "
                "write a .npz output"
            )
        np.lib.format.write_array(out, numpy_array(tensors[0], source), allow_pickle=False)


@dataclass(frozen=True)
class _NpzState:
    """What only this module needs of an archive it read: its records, and each tensor's member."""

    records: dict[str, ZipRecord]
    members: dict[str, str]  # tensor name -> member name

    def method(self, tensor: str) -> int | None:
        member = self.members.get(tensor)
        return None if member is None else self.records[member].method


class NpzFormat:
    """A zip of `.npy` members, stored (`np.savez`) or deflated (`np.savez_compressed`)."""

    name = "npz"
    suffixes = (".npz",)

    def sniff(self, head: bytes) -> bool:
        """A zip whose first member is a `.npy` file (torch.save's first record is its pickle)."""
        if not head.startswith(LOCAL_HEADER) or len(head) < 30:
            return False
        (name_length,) = struct.unpack_from("<H", head, 26)
        return head[30 : 30 + name_length].endswith(NPY_SUFFIX.encode())

    def read(self, path: Path, buffer: mmap.mmap | bytes) -> Checkpoint:
        with open(path, "rb") as file:
            records = read_records(
                path, buffer, lambda offset, size: os.pread(file.fileno(), size, offset)
            )
        files = [CheckpointFile(path, buffer)]
        tensors: dict[str, TensorRef] = {}
        members: dict[str, str] = {}
        budget = MAX_INFLATED_BYTES
        for record in records.values():
            key = _member_key(path, record)
            where = f"{path}: member {record.name!r}"
            if record.stored:
                array = parse_npy(
                    where, buffer, record.data_offset, record.data_offset + record.size
                )
                tensors[key] = array.tensor_ref(key, record.name)
            else:
                inflated = _inflate(where, buffer, record, budget)
                budget -= len(inflated)
                array = parse_npy(where, inflated, 0, len(inflated))
                tensors[key] = array.tensor_ref(key, record.name, file=len(files))
                files.append(CheckpointFile(path, inflated, in_memory=True))
            members[key] = record.name
        return Checkpoint(
            path,
            self,
            tensors,
            tuple(files),
            _contents(tensors),
            format_state=_NpzState(records, members),
        )

    def checksum_patches(
        self, checkpoint: Checkpoint, storages: dict[StorageRef, bytes]
    ) -> list[BytePatch]:
        """The member's new CRC-32 (over its .npy header and the new elements), everywhere the zip
        stores it."""
        records = _state(checkpoint).records
        buffer = checkpoint.buffer
        patches = []
        for storage, data in storages.items():
            record = records[storage.key]
            header = buffer[record.data_offset : storage.offset]
            trailer = buffer[storage.offset + storage.nbytes : record.data_offset + record.size]
            crc = zlib.crc32(trailer, zlib.crc32(data, zlib.crc32(header)))
            for offset in record.crc_offsets:
                old = bytes(buffer[offset : offset + 4])
                patches.append(BytePatch(offset, old, struct.pack("<I", crc)))
        return patches

    def checksum_problems(
        self, checkpoint: Checkpoint, progress: Progress | None
    ) -> tuple[int, list[str]]:
        return crc_problems(checkpoint, _state(checkpoint).records, progress)

    def write(
        self,
        out: BinaryIO,
        tensors: list[OutputTensor],
        source: Checkpoint,
        drop_keys: frozenset[str] = frozenset(),
    ) -> None:
        """One member per tensor, in order; a member of the source keeps its compression, a new
        one takes the archive's (deflated if any member was)."""
        state = source.format_state if isinstance(source.format_state, _NpzState) else None
        default = zipfile.ZIP_STORED
        if state is not None and any(not record.stored for record in state.records.values()):
            default = DEFLATED
        with zipfile.ZipFile(out, "w", allowZip64=True) as archive:
            for tensor in tensors:
                method = state.method(tensor.ref.name) if state is not None else None
                info = zipfile.ZipInfo(
                    tensor.ref.name + NPY_SUFFIX, date_time=(1980, 1, 1, 0, 0, 0)
                )
                info.compress_type = default if method is None else method
                with archive.open(info, "w", force_zip64=True) as member:
                    np.lib.format.write_array(
                        member, numpy_array(tensor, source), allow_pickle=False
                    )


def _state(checkpoint: Checkpoint) -> _NpzState:
    state = checkpoint.format_state
    assert isinstance(state, _NpzState), "not a checkpoint read by the .npz format"
    return state


def _member_key(path: Path, record: ZipRecord) -> str:
    if not record.name.endswith(NPY_SUFFIX):
        raise UnsupportedCheckpointError(
            f"{path}: member {record.name!r} is not a .npy array; lstm-surgeon reads .npz archives "
            "of arrays only (np.savez, np.savez_compressed)"
        )
    return record.name[: -len(NPY_SUFFIX)]


def _inflate(where: str, buffer: Buffer, record: ZipRecord, budget: int) -> bytes:
    """A deflated member's bytes, refused before inflating when it claims an absurd size, and
    while inflating when it grows past what it claims (a zip bomb lies about one or the other)."""
    if record.method != DEFLATED:
        raise UnsupportedCheckpointError(
            f"{where}: compressed with zip method {record.method}; lstm-surgeon reads stored and "
            "deflated members (np.savez, np.savez_compressed)"
        )
    compressed = record.compressed_size
    if record.size > budget:
        raise CheckpointError(
            f"{where}: claims to inflate to {record.size} bytes, more than lstm-surgeon inflates "
            f"({MAX_INFLATED_BYTES} bytes per archive); refused (a zip bomb?)"
        )
    if record.size > compressed * DEFLATE_MAX_RATIO + 1024:
        raise CheckpointError(
            f"{where}: claims to inflate {compressed} bytes to {record.size}, more than deflate "
            "can; refused (a zip bomb?)"
        )
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        data = inflater.decompress(
            bytes(buffer[record.data_offset : record.data_offset + compressed]), record.size + 1
        )
    except zlib.error as error:
        raise CheckpointError(f"{where}: corrupt compressed data ({error})") from None
    if len(data) > record.size:
        raise CheckpointError(
            f"{where}: inflates to more than the {record.size} bytes it claims; refused (a zip bomb?)"
        )
    if len(data) < record.size or zlib.crc32(data) != record.crc:
        raise CheckpointError(f"{where}: corrupt compressed data (size or CRC-32 mismatch)")
    return data


NPY_FORMAT = NpyFormat()
NPZ_FORMAT = NpzFormat()
