"""`torch.distributed.checkpoint` (DCP) folders: `.metadata` plus `__<rank>_<n>.distcp` files.

`.metadata` is a pickle of torch's dataclasses: for each entry its kind (a tensor's size and dtype and
the chunks it was saved in, one per rank that held a piece; or a pickled object), and for each chunk
the `.distcp` file, offset and length of its bytes. It is read with the never-executing unpickler:
the dataclasses come back as inert records, of which only the fields named here are read (by class
name, and checked), so a `.metadata` that would run code runs nothing.

Each tensor chunk in a `.distcp` file is what torch 2.13's `FileSystemWriter` writes by default: a
complete `torch.save` zip archive of that chunk, at the offset `.metadata` gives. Its records are read
by `zip_records` through a window onto the file, so a chunk's elements are one `StorageRef` in its
`.distcp` file, and an edit patches them (and refreshes the archive's CRC-32s) where they lie. Items
written with a transform (a compression extension) or in the safetensors serialisation are refused
with a message that says so.

A tensor saved as one chunk (from one process, or replicated over ranks) is a plain `TensorRef`. A
tensor split in chunks across ranks (a DTensor, a ShardedTensor) is exposed whole, as the layouts
expect one tensor per parameter: its chunks are gathered into one read-only buffer, a further
`CheckpointFile` marked `gathered` (the only copy this module makes). An edit of it is planned on the
gathered buffer; `checksum_patches` turns each changed byte range back into patches of the chunks
where they lie (with their CRC-32s), and the gathered buffer itself is never written.
"""

from __future__ import annotations

import math
import mmap
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from lstm_surgeon.checkpoint import (
    Checkpoint,
    CheckpointFile,
    Contents,
    Entry,
    OutputTensor,
    StorageRef,
    TensorRef,
    close_buffer,
)
from lstm_surgeon.errors import CheckpointError, EditError, UnsupportedCheckpointError
from lstm_surgeon.formats.pickle_reader import Opaque, TensorStub, load_safely
from lstm_surgeon.formats.zip_records import (
    ZipRecord,
    read_records,
    require_stored,
)
from lstm_surgeon.writing import BytePatch, Progress

METADATA_NAME = ".metadata"
DATA_SUFFIX = ".distcp"
ZIP_MAGIC = b"PK\x03\x04"
MAX_METADATA_BYTES = 1 << 30


# --- What .metadata says -------------------------------------------------------------------------


@dataclass(frozen=True)
class Chunk:
    """One saved piece of a tensor: where it sits in the whole tensor, and where its item lies."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: str  # the .distcp file's name, relative to the folder
    offset: int
    length: int


@dataclass(frozen=True)
class TensorEntry:
    name: str
    size: tuple[int, ...]
    chunks: tuple[Chunk, ...]


@dataclass(frozen=True)
class DcpMetadata:
    """The parts of `.metadata` lstm-surgeon reads: tensors with their chunks, and the names of
    the other (pickled object) entries, in the file's order."""

    tensors: dict[str, TensorEntry]
    entries: tuple[Entry, ...]

    @property
    def files(self) -> list[str]:
        """Each .distcp file holding a tensor chunk, once, sorted (rank order)."""
        return sorted({chunk.file for entry in self.tensors.values() for chunk in entry.chunks})


def read_metadata(folder: Path) -> DcpMetadata:
    path = folder / METADATA_NAME
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except OSError as error:
        raise CheckpointError(f"{path}: cannot read: {error.strerror}") from None
    if len(data) > MAX_METADATA_BYTES:
        raise CheckpointError(f"{path}: more than 1 GB; not a DCP .metadata file")
    try:
        root = load_safely(data)
        return _metadata(folder, root)
    except CheckpointError:
        raise
    except Exception as error:  # a corrupt or hostile pickle, whatever it raises
        raise CheckpointError(
            f"{path}: not a readable DCP .metadata ({type(error).__name__}: {error})"
        ) from None


def _fields(value: Any, class_name: str, path: Path) -> dict[str, Any]:
    """The state of an inert record of torch's class `class_name`, checked to be one."""
    if (
        not isinstance(value, Opaque)
        or value.name != class_name
        or not isinstance(value.state, dict)
    ):
        raise CheckpointError(f"{path}: expected a {class_name} in the DCP .metadata")
    return value.state


def _metadata(folder: Path, root: Any) -> DcpMetadata:
    path = folder / METADATA_NAME
    state = _fields(root, "Metadata", path)
    described, stored = state.get("state_dict_metadata"), state.get("storage_data")
    if not isinstance(described, dict) or not isinstance(stored, dict):
        raise CheckpointError(f"{path}: a DCP .metadata without state_dict_metadata/storage_data")
    storage = _storage_by_chunk(path, stored)
    tensors, entries = {}, []
    for name, entry in described.items():
        if not isinstance(name, str):
            raise CheckpointError(f"{path}: an entry name that is not a string")
        if isinstance(entry, Opaque) and entry.name == "BytesStorageMetadata":
            entries.append(Entry(name, "value"))
            continue
        tensors[name] = _tensor_entry(
            path, name, _fields(entry, "TensorStorageMetadata", path), storage
        )
        entries.append(Entry(name, "tensor"))
    return DcpMetadata(tensors, tuple(entries))


def _storage_by_chunk(
    path: Path, stored: dict[Any, Any]
) -> dict[tuple[str, tuple[int, ...]], Chunk]:
    """Each saved item's place, by (entry name, chunk offsets)."""
    found = {}
    for key, value in stored.items():
        index = _fields(key, "MetadataIndex", path)
        info = _fields(value, "_StorageInfo", path)
        if info.get("transform_descriptors"):
            raise UnsupportedCheckpointError(
                f"{path}: {index.get('fqn')!r} was saved through transforms "
                f"({', '.join(map(str, info['transform_descriptors']))}); lstm-surgeon reads DCP "
                "items saved plainly (torch.save serialisation, no extensions)"
            )
        offsets = index.get("offset")
        if offsets is None:
            continue  # a pickled object, not a tensor chunk
        name, file, offset, length = (
            index.get("fqn"),
            info.get("relative_path"),
            info.get("offset"),
            info.get("length"),
        )
        if not (
            isinstance(name, str)
            and _ints(offsets)
            and isinstance(file, str)
            and Path(file).name == file
            and file not in ("", ".", "..", METADATA_NAME)
            and _ints((offset, length))
            and offset >= 0
            and length >= 0
        ):
            raise CheckpointError(f"{path}: a malformed storage entry for {name!r}")
        found[(name, tuple(offsets))] = Chunk(tuple(offsets), (), file, offset, length)
    return found


def _tensor_entry(
    path: Path, name: str, state: dict[str, Any], storage: dict[tuple[str, tuple[int, ...]], Chunk]
) -> TensorEntry:
    size, chunks = state.get("size"), state.get("chunks")
    if not _ints(size) or not isinstance(chunks, list) or not chunks:
        raise CheckpointError(f"{path}: tensor {name!r} has a malformed size or chunk list")
    found = []
    for chunk in chunks:
        fields = _fields(chunk, "ChunkStorageMetadata", path)
        offsets, sizes = fields.get("offsets"), fields.get("sizes")
        if not (_ints(offsets) and _ints(sizes) and len(offsets) == len(sizes) == len(size)):
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed chunk")
        if any(o < 0 or s < 0 or o + s > d for o, s, d in zip(offsets, sizes, size, strict=True)):
            raise CheckpointError(f"{path}: a chunk of tensor {name!r} lies outside the tensor")
        place = storage.get((name, tuple(offsets)))
        if place is None:
            raise CheckpointError(f"{path}: a chunk of tensor {name!r} has no storage entry")
        found.append(replace(place, sizes=tuple(sizes)))
    if sum(math.prod(chunk.sizes) for chunk in found) != math.prod(size):
        raise CheckpointError(f"{path}: the chunks of tensor {name!r} do not cover it")
    return TensorEntry(name, tuple(size), tuple(found))


def _ints(values: Any) -> bool:
    return isinstance(values, (tuple, list)) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in values
    )


# --- One item: a torch.save archive inside a .distcp file ----------------------------------------


class _Window:
    """A zip archive embedded in a larger map, as `zip_records` reads one: offsets from its start."""

    def __init__(self, buffer: mmap.mmap | bytes, start: int, length: int) -> None:
        self.buffer, self.start, self.length = buffer, start, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, key: slice) -> bytes:
        begin, end, _ = key.indices(self.length)
        return bytes(self.buffer[self.start + begin : self.start + max(begin, end)])

    def rfind(self, sub: bytes, start: int = 0) -> int:
        found = self.buffer.rfind(sub, self.start + start, self.start + self.length)
        return found - self.start if found >= 0 else -1


@dataclass(frozen=True)
class _Item:
    """A chunk's archive, read: its tensor (in file coordinates) and its data record's CRC."""

    ref: TensorRef
    record: ZipRecord  # offsets made absolute in the .distcp file


def _read_item(files: tuple[CheckpointFile, ...], file: int, name: str, chunk: Chunk) -> _Item:
    """Read the chunk's archive in `files[file]` (reusing the torch.save reader's checks)."""
    from lstm_surgeon.formats.torch_zip import _storage, _ZipState, tensor_ref, unpickle

    path, buffer = files[file].path, files[file].buffer
    where = f"{path} (chunk of {name!r} at offset {chunk.offset})"
    if chunk.offset + chunk.length > len(buffer):
        raise CheckpointError(f"{where}: runs past the end of the file (truncated?)")
    window = _Window(buffer, chunk.offset, chunk.length)
    if window[:4] != ZIP_MAGIC:
        raise UnsupportedCheckpointError(
            f"{where}: not a torch.save archive (saved in another serialisation format, such as "
            "DCP's safetensors option); lstm-surgeon reads DCP's default torch.save items"
        )
    records = read_records(Path(where), window, lambda offset, size: window[offset : offset + size])
    pickles = [key for key in records if key.endswith("data.pkl") and key.count("/") <= 1]
    if len(pickles) != 1:
        raise UnsupportedCheckpointError(
            f"{where}: not a torch.save archive (a DCP item in another serialisation)"
        )
    state = _ZipState(records, pickles[0][: -len("data.pkl")])
    pickle_record = _absolute(require_stored(Path(where), state.pickle_record()), chunk.offset)
    if not pickle_record.check_crc(buffer):
        raise CheckpointError(f"{where}: corrupt item (CRC-32 mismatch in its data.pkl)")
    data = bytes(buffer[pickle_record.data_offset : pickle_record.data_offset + pickle_record.size])
    stub = unpickle(Path(where), data)
    if not isinstance(stub, TensorStub):
        raise CheckpointError(f"{where}: the item holds no tensor")
    ref = tensor_ref(Path(where), name, stub, _storage(Path(where), state, stub))
    if ref.shape != chunk.sizes:
        raise CheckpointError(
            f"{where}: holds {list(ref.shape)}, .metadata says {list(chunk.sizes)}"
        )
    record = _absolute(records[ref.storage.key], chunk.offset)
    storage = StorageRef(f"{chunk.file}@{chunk.offset}", record.data_offset, record.size, file)
    return _Item(replace(ref, storage=storage), record)


def _absolute(record: ZipRecord, start: int) -> ZipRecord:
    return replace(
        record,
        data_offset=start + record.data_offset,
        crc_offsets=tuple(start + offset for offset in record.crc_offsets),
    )


# --- The checkpoint --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Gathered:
    """A tensor split in chunks: its gathered buffer's file index, and the chunks' items."""

    file: int
    shape: tuple[int, ...]
    chunks: tuple[tuple[Chunk, _Item], ...]


@dataclass
class _DcpState:
    """What only this module needs: each item's data record by storage, and gathered tensors."""

    records: dict[tuple[int, str], ZipRecord] = field(default_factory=dict)
    gathered: dict[int, _Gathered] = field(default_factory=dict)  # by gathered file index


class DcpFormat:
    name = "dcp"
    suffixes: tuple[str, ...] = ()  # an output is never a DCP folder

    def sniff(self, head: bytes) -> bool:
        return False  # a .distcp file says nothing by itself: the folder's .metadata does

    def read(self, path: Path, buffer: mmap.mmap | bytes) -> Checkpoint:
        raise CheckpointError(f"{path}: a DCP file is read through its folder's {METADATA_NAME}")

    def checksum_patches(
        self, checkpoint: Checkpoint, storages: dict[StorageRef, bytes]
    ) -> list[BytePatch]:
        state = _state(checkpoint)
        patches = []
        for storage, data in storages.items():
            gathered = state.gathered.get(storage.file)
            if gathered is not None:
                patches += _chunk_patches(checkpoint, gathered, data)
            else:
                record = state.records[storage.identity]
                patches += _crc_patches(checkpoint, storage.file, record, data)
        return patches

    def checksum_problems(
        self, checkpoint: Checkpoint, progress: Progress | None
    ) -> tuple[int, list[str]]:
        problems = []
        records = _state(checkpoint).records
        for (file, key), record in records.items():
            if not record.check_crc(checkpoint.files[file].buffer):
                problems.append(f"item {key}: CRC-32 mismatch (corrupt data)")
            if progress is not None:
                progress(record.size)
        return len(records), problems

    def write(
        self,
        out: BinaryIO,
        tensors: list[OutputTensor],
        source: Checkpoint,
        drop_keys: frozenset[str] = frozenset(),
    ) -> None:
        raise EditError(
            f"{source.path}: a DCP folder is edited in place only (same tensors, new values)"
        )


def _state(checkpoint: Checkpoint) -> _DcpState:
    state = checkpoint.format_state
    assert isinstance(state, _DcpState), "not a checkpoint read from a DCP folder"
    return state


def _crc_patches(
    checkpoint: Checkpoint, file: int, record: ZipRecord, data: bytes
) -> list[BytePatch]:
    """A chunk's data record gets new bytes: its CRC-32, everywhere its archive stores it."""
    buffer = checkpoint.files[file].buffer
    crc = zlib.crc32(data).to_bytes(4, "little")
    return [BytePatch(o, bytes(buffer[o : o + 4]), crc, file) for o in record.crc_offsets]


def _chunk_patches(checkpoint: Checkpoint, gathered: _Gathered, data: bytes) -> list[BytePatch]:
    """The new elements of a gathered tensor, written where each chunk's elements lie."""
    ref = next(r for r in checkpoint.tensors.values() if r.storage.file == gathered.file)
    whole = np.frombuffer(data, dtype=ref.dtype.storage).reshape(gathered.shape)
    patches = []
    for chunk, item in gathered.chunks:
        buffer = checkpoint.files[item.ref.storage.file].buffer
        storage = item.ref.storage
        old = bytes(buffer[storage.offset : storage.offset + storage.nbytes])
        new = bytearray(old)
        view = _view(new, replace(item.ref, storage=replace(storage, offset=0)))
        view[...] = whole[_box(chunk)]
        if bytes(new) != old:
            patches.append(BytePatch(storage.offset, old, bytes(new), storage.file))
            patches += _crc_patches(checkpoint, storage.file, item.record, bytes(new))
    return patches


def _view(buffer: bytearray | mmap.mmap | bytes, ref: TensorRef) -> np.ndarray:
    from lstm_surgeon.checkpoint import tensor_view

    return tensor_view(buffer, ref)


def _box(chunk: Chunk) -> tuple[slice, ...]:
    return tuple(slice(o, o + s) for o, s in zip(chunk.offsets, chunk.sizes, strict=True))


def _folder(path: Path) -> Path:
    return path if path.is_dir() else path.parent


class DcpFolder:
    name = "dcp"

    def claims(self, path: Path) -> bool:
        """The folder, its `.metadata`, or one of its `.distcp` files (which means nothing alone:
        it is read as part of its folder)."""
        if path.name == METADATA_NAME:
            return True
        folder = path if path.is_dir() else path.parent
        return (path.is_dir() or path.suffix == DATA_SUFFIX) and (folder / METADATA_NAME).is_file()

    def data_files(self, path: Path) -> list[Path]:
        folder = _folder(path)
        return [folder / name for name in read_metadata(folder).files]

    def open(self, path: Path, *, ignore_journal: bool = False) -> Checkpoint:
        from lstm_surgeon.formats import map_files, pending_rollback_warning

        folder = _folder(path)
        metadata = read_metadata(folder)
        paths = [folder / name for name in metadata.files]
        for data_file in paths:
            if not data_file.exists():
                raise CheckpointError(f"{data_file}: missing (the DCP .metadata lists it)")
        files = map_files(paths, ignore_journal=ignore_journal)
        try:
            checkpoint = _checkpoint(folder, metadata, files)
        except BaseException:
            for file in files:
                close_buffer(file.buffer)
            raise
        checkpoint.warnings += [
            pending_rollback_warning(file.path) for file in files if file.pending_rollback
        ]
        return checkpoint

    def structure_problems(self, path: Path) -> list[str]:
        """Each missing or truncated `.distcp` file and each unreadable item, by name."""
        from lstm_surgeon.formats import map_files

        folder = _folder(path)
        metadata = read_metadata(folder)
        problems = [
            f"{name}: missing (the DCP .metadata lists it)"
            for name in metadata.files
            if not (folder / name).exists()
        ]
        if problems:
            return problems
        files = map_files([folder / name for name in metadata.files], ignore_journal=True)
        index = {file.path.name: number for number, file in enumerate(files)}
        try:
            for name, entry in metadata.tensors.items():
                for chunk in entry.chunks:
                    try:
                        _read_item(files, index[chunk.file], name, chunk)
                    except UnsupportedCheckpointError:
                        raise  # not damage: a kind of item lstm-surgeon does not read
                    except CheckpointError as error:
                        problems.append(str(error))
        finally:
            for file in files:
                close_buffer(file.buffer)
        return problems


def _checkpoint(
    folder: Path, metadata: DcpMetadata, files: tuple[CheckpointFile, ...]
) -> Checkpoint:
    index = {file.path.name: number for number, file in enumerate(files)}
    state = _DcpState()
    tensors: dict[str, TensorRef] = {}
    gathered_files: list[CheckpointFile] = []
    for name, entry in metadata.tensors.items():
        items = [
            (chunk, _read_item(files, index[chunk.file], name, chunk)) for chunk in entry.chunks
        ]
        for _, item in items:
            state.records[item.ref.storage.identity] = item.record
        if len(items) == 1 and items[0][1].ref.shape == entry.size:
            tensors[name] = items[0][1].ref
            continue
        number = len(files) + len(gathered_files)
        ref, buffer = _gather(files, name, entry, items, number)
        gathered_files.append(CheckpointFile(folder / METADATA_NAME, buffer, gathered=True))
        state.gathered[number] = _Gathered(number, entry.size, tuple(items))
        tensors[name] = ref
    return Checkpoint(
        path=folder,
        format=FORMAT,
        tensors=tensors,
        files=(*files, *gathered_files),
        contents=Contents(entries=metadata.entries),
        format_state=state,
    )


def _gather(
    files: tuple[CheckpointFile, ...],
    name: str,
    entry: TensorEntry,
    items: list[tuple[Chunk, _Item]],
    number: int,
) -> tuple[TensorRef, bytes]:
    dtype = items[0][1].ref.dtype
    if any(item.ref.dtype is not dtype for _, item in items):
        raise CheckpointError(f"tensor {name!r}: its chunks disagree on the element type")
    whole = np.zeros(entry.size, dtype=dtype.storage)
    for chunk, item in items:
        whole[_box(chunk)] = _view(files[item.ref.storage.file].buffer, item.ref)
    data = whole.tobytes()
    storage = StorageRef(f"gathered:{name}", 0, len(data), number)
    return TensorRef(name, dtype, entry.size, storage), data


FORMAT = DcpFormat()
FOLDER = DcpFolder()
