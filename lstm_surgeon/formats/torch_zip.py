"""The torch.save zip format: `<archive>/data.pkl` (the object tree) plus one record per storage.

Reading never runs the pickle's code (`pickle_reader`), so checkpoints that `torch.load(weights_only=True)`
refuses still show their tensors. Each tensor is named by its dotted path from the pickle's root
(`state_dict.model.lstm.bias_ih_l0`). TorchScript and PT2 archives are zips from the same writer:
`read` tells them by their records and hands them to their own modules (`torchscript`, `pt2`), which
share this module's helpers. Patching writes into the storage records where they lie and then
refreshes their CRC-32 everywhere the zip stores it. Writing a new structure (tensors added or dropped)
writes the reader's own object tree back (`pickle_writer`, `zip_writer`): no torch, nothing executed,
and every object of the file kept, inert or not; untouched storages keep their bytes.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import pickle
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import numpy as np

from lstm_surgeon.checkpoint import (
    TRAINING_COUNTERS,
    Buffer,
    Checkpoint,
    CheckpointFile,
    Contents,
    Entry,
    EntryKind,
    OutputTensor,
    StorageRef,
    TensorRef,
    contiguous_strides,
    optimizer_state_shaped,
    tensor_view,
)
from lstm_surgeon.dtypes import BY_TORCH_STORAGE_CLASS, DType
from lstm_surgeon.errors import CheckpointError, EditError, UnsupportedCheckpointError
from lstm_surgeon.formats.identify import unreadable_zip_message
from lstm_surgeon.formats.pickle_reader import (
    READ_ERRORS,
    Call,
    DTypeName,
    Opaque,
    StorageStub,
    StorageType,
    TensorStub,
    load_safely,
)
from lstm_surgeon.formats.pickle_writer import dumps
from lstm_surgeon.formats.zip_records import (
    ReadAt,
    ZipRecord,
    crc_patches,
    crc_problems,
    read_records,
    require_stored,
)
from lstm_surgeon.formats.zip_writer import ZipWriter
from lstm_surgeon.writing import BytePatch, Progress

MAX_DEPTH = 200
DEFAULT_PREFIX = "archive/"
# The small records torch.save writes beside data.pkl and the storages (for a file made from scratch).
DEFAULT_RECORDS = (
    (".format_version", b"1"),
    (".storage_alignment", b"64"),
    ("byteorder", b"little"),
    ("version", b"3\n"),
)
SERIALIZATION_ID = ".data/serialization_id"
COPY_CHUNK = 1 << 24
STORAGE_CLASS = {dtype.name: name for name, dtype in BY_TORCH_STORAGE_CLASS.items()}

Location = tuple[Any, ...]  # the keys from the pickle root to a tensor


@dataclass(frozen=True)
class _ZipState:
    """What only this module needs of a file it read: the archive's records and its folder name."""

    records: dict[str, ZipRecord]
    prefix: str

    def pickle_record(self) -> ZipRecord:
        return self.records[f"{self.prefix}data.pkl"]

    def storage_record(self, key: str) -> ZipRecord | None:
        return self.records.get(f"{self.prefix}data/{key}")


@dataclass(frozen=True)
class _Slot:
    """Where a tensor sits in the object tree: the container holding it, and its key there."""

    location: Location
    parent: Any
    stub: TensorStub

    @property
    def key(self) -> Any:
        return self.location[-1]


class TorchZipFormat:
    name = "pt"
    suffixes = (".pt", ".pth", ".bin", ".ckpt", ".tar")

    def sniff(self, head: bytes) -> bool:
        """Every zip: the records tell a torch.save file from a TorchScript or PT2 archive, and
        `read` hands those to their own format modules."""
        return head.startswith(b"PK\x03\x04")

    def read(self, path: Path, buffer: Buffer) -> Checkpoint:
        # Headers are read through the map itself: reopening the path could find another file
        # renamed over it since it was mapped.
        records = read_records(path, buffer)
        archive_format = _archive_format(records)
        if archive_format is not None:
            return archive_format.read_archive(path, buffer, records)
        state = _ZipState(records, _archive_prefix(path, records))
        check_byteorder(path, buffer, records, state.prefix)
        root = unpickle_record(path, buffer, state.pickle_record())
        tensors = {
            name: tensor_ref(path, name, slot.stub, _storage(path, state, slot.stub))
            for name, slot in tensor_slots(path, root).items()
        }
        return Checkpoint(
            path=path,
            format=self,
            tensors=tensors,
            files=(CheckpointFile(path, buffer),),
            contents=contents_of(root),
            format_state=state,
        )

    def checksum_patches(
        self, checkpoint: Checkpoint, storages: dict[StorageRef, bytes]
    ) -> list[BytePatch]:
        return crc_patches(checkpoint, _state(checkpoint).records, storages)

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
        """Write the source's object tree (a fresh parse of its pickle, or a plain state dict for a
        file of another format) with `tensors` in place, less the top-level `drop_keys`.

        What a .pt file cannot carry: string metadata (it has no place for it); only the `format`
        entry, which a .pt file states by being one, is left behind."""
        _refuse_uncarried_metadata(source)
        tree = _EditedTree.of(source)
        tree.drop_entries(drop_keys)
        tree.place(tensors, source)
        try:
            data_pkl, storage_keys = dumps(tree.root)
        except (pickle.PicklingError, RecursionError) as error:
            raise EditError(f"{source.path}: cannot write its object tree back ({error})") from None
        _write_archive(out, tree, data_pkl, storage_keys, source)


def _state(checkpoint: Checkpoint) -> _ZipState:
    """This module's private facts about a file it read."""
    state = checkpoint.format_state
    assert isinstance(state, _ZipState), "not a checkpoint read by the torch.save format"
    return state


class ArchiveFormat(Protocol):
    """A format of zip archives written by torch's zip writer (TorchScript, PT2): `claims` tells
    its archives by their record names, `read_archive` reads one whose records are read."""

    def claims(self, records: dict[str, ZipRecord]) -> bool: ...

    def read_archive(
        self, path: Path, buffer: mmap.mmap | bytes, records: dict[str, ZipRecord]
    ) -> Checkpoint: ...


def _archive_format(records: dict[str, ZipRecord]) -> ArchiveFormat | None:
    """The format module of a zip that is not a torch.save file (None for a torch.save file)."""
    from lstm_surgeon.formats import pt2, torchscript

    formats: tuple[ArchiveFormat, ...] = (torchscript.FORMAT, pt2.FORMAT)
    return next((fmt for fmt in formats if fmt.claims(records)), None)


def _storage(path: Path, state: _ZipState, stub: TensorStub) -> StorageRef | None:
    """The storage record a tensor of data.pkl views (None when the archive lacks it)."""
    record = state.storage_record(stub.storage.key) if _well_formed(stub) else None
    return None if record is None else storage_of(path, record)


def storage_of(path: Path, record: ZipRecord) -> StorageRef:
    """A stored record as the storage its tensors view."""
    require_stored(path, record)
    return StorageRef(record.name, record.data_offset, record.size)


def unpickle_record(path: Path, buffer: mmap.mmap | bytes, record: ZipRecord) -> Any:
    """The object tree of a pickle record, its CRC-32 checked first (a flipped bit in a pickle
    could change a tensor's offset silently)."""
    require_stored(path, record)
    if not record.check_crc(buffer):
        raise CheckpointError(f"{path}: corrupt file (CRC-32 mismatch in {record.name})")
    return unpickle(path, record_bytes(buffer, record), record.name.rsplit("/", 1)[-1])


def pread_reader(file: BinaryIO) -> ReadAt:
    """Read ranges of `file` with pread: the memory map stays untouched, so a large file read
    once is not counted whole in the process's memory."""
    return lambda offset, size: os.pread(file.fileno(), size, offset)


def record_bytes(buffer: mmap.mmap | bytes, record: ZipRecord) -> bytes:
    return bytes(buffer[record.data_offset : record.data_offset + record.size])


def _archive_prefix(path: Path, records: dict[str, ZipRecord]) -> str:
    names = list(records)
    pickles = [name for name in names if name.endswith("data.pkl") and name.count("/") <= 1]
    if len(pickles) != 1:
        raise CheckpointError(unreadable_zip_message(path, names))
    return pickles[0][: -len("data.pkl")]


def check_byteorder(
    path: Path, buffer: mmap.mmap | bytes, records: dict[str, ZipRecord], prefix: str
) -> None:
    record = records.get(f"{prefix}byteorder")
    if record is None:
        return
    require_stored(path, record)
    order = bytes(buffer[record.data_offset : record.data_offset + record.size])
    if order != b"little":
        raise UnsupportedCheckpointError(f"{path}: big-endian checkpoints are not supported")


def unpickle(path: Path, data: bytes, what: str = "data.pkl") -> Any:
    """The tree of a pickle read by the never-executing unpickler; any failure is a corrupt file."""
    try:
        return load_safely(data)
    except READ_ERRORS as error:
        raise CheckpointError(f"{path}: corrupt {what} ({type(error).__name__}: {error})") from None


def _walk(
    node: Any, location: Location, parent: Any, visited: set[int], depth: int = 0
) -> Iterator[tuple[Location, Any, Any]]:
    """Every (location, value, its container) below `node`, depth first, in container order; an
    object reached twice (the pickle memo can share containers) is visited once, so a tiny file
    cannot make the walk exponential."""
    if depth > MAX_DEPTH:
        raise RecursionError("nested too deeply")
    if id(node) in visited:
        return
    visited.add(id(node))
    yield location, node, parent
    if isinstance(node, dict):
        children = list(node.items())
    elif isinstance(node, (list, tuple)):
        children = list(enumerate(node))
    elif isinstance(node, Opaque):
        children = list(enumerate(node.args)) + node.items
        if node.state is not None:
            children.append(("__state__", node.state))
    else:
        return
    for key, value in children:
        if isinstance(value, (dict, list, tuple, Opaque, TensorStub)):
            yield from _walk(value, (*location, key), node, visited, depth + 1)


def dotted(location: Location) -> str:
    return ".".join(str(key) for key in location)


def tensor_slots(
    path: Path, root: Any, naming: Callable[[Location], str] = dotted
) -> dict[str, _Slot]:
    """Every tensor of the tree by name (`naming` of its location), with where it sits (the one
    naming, for reading and for writing)."""
    slots: dict[str, _Slot] = {}
    try:
        for location, node, parent in _walk(root, (), None, set()):
            if not isinstance(node, TensorStub):
                continue
            name = naming(location)
            if name in slots:
                raise CheckpointError(f"{path}: two tensors are both named {name!r} (ambiguous)")
            slots[name] = _Slot(location, parent, node)
    except RecursionError:
        raise CheckpointError(f"{path}: the object tree is nested too deeply to read") from None
    return slots


def contents_of(root: Any) -> Contents:
    """The top-level entries of the tree in neutral terms, optimizer state known by its shape."""
    if isinstance(root, dict):
        items = [(str(key), value) for key, value in root.items()]
    elif isinstance(root, (list, tuple)):
        items = [(str(index), value) for index, value in enumerate(root)]
    else:
        items = []
    return Contents(
        entries=tuple(
            Entry(key, _entry_kind(value), optimizer_state_shaped(value)) for key, value in items
        ),
        counters={
            key: value
            for key, value in items
            if key in TRAINING_COUNTERS and type(value) is int  # a bool is not a counter
        },
    )


def _entry_kind(value: Any) -> EntryKind:
    if isinstance(value, TensorStub):
        return "tensor"
    if isinstance(value, (dict, list, tuple, set, frozenset)):
        return "container"
    if isinstance(value, Opaque) or (isinstance(value, type) and issubclass(value, Opaque)):
        return "object"
    return "value"


def tensor_ref(path: Path, name: str, stub: TensorStub, storage: StorageRef | None) -> TensorRef:
    """A pickled tensor as a view of the storage that holds its bytes, checked against it."""
    if not _well_formed(stub):
        raise CheckpointError(
            f"{path}: tensor {name!r} has a malformed size, stride, offset or dtype"
        )
    if storage is None:
        raise CheckpointError(f"{path}: tensor {name!r} refers to a missing storage record")
    return checked_ref(
        path, TensorRef(name, stub.dtype, stub.shape, storage, stub.storage_offset, stub.stride)
    )


def checked_ref(path: Path, ref: TensorRef) -> TensorRef:
    """The tensor view, refused when it is negative or runs past its storage; contiguous strides
    are dropped (None says contiguous)."""
    if ref.strides is not None and contiguous_strides(ref.shape) == ref.strides:
        ref = replace(ref, strides=None)
    name = ref.name
    if (
        any(d < 0 for d in ref.shape)
        or any(s < 0 for s in ref.element_strides)
        or ref.element_offset < 0
    ):
        raise CheckpointError(f"{path}: tensor {name!r} has a negative size, stride or offset")
    if ref.extent_elements() * ref.dtype.itemsize > ref.storage.nbytes:
        raise CheckpointError(
            f"{path}: tensor {name!r} runs past the end of its storage (truncated?)"
        )
    return ref


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _well_formed(stub: TensorStub) -> bool:
    """The pickle supplies a tensor's record field by field (and BUILD can overwrite them): check types."""
    return (
        isinstance(stub.dtype, DType)
        and isinstance(stub.storage, StorageStub)
        and isinstance(stub.shape, tuple)
        and isinstance(stub.stride, tuple)
        and len(stub.shape) == len(stub.stride)
        and all(_is_int(value) for value in (*stub.shape, *stub.stride, stub.storage_offset))
    )


# --- Writing a new structure: the reader's tree, edited, written back ---------------------------


def _refuse_uncarried_metadata(source: Checkpoint) -> None:
    lost = sorted(key for key in source.metadata or {} if key != "format")
    if lost:
        raise EditError(
            f"{source.path}: its metadata ({', '.join(repr(key) for key in lost[:3])}) has no place "
            "in a .pt file; write a .safetensors output to keep it"
        )


@dataclass
class _EditedTree:
    """The object tree of the file being written, and the storages whose bytes are not the source's."""

    path: Path
    root: Any
    slots: dict[str, _Slot]
    state: _ZipState | None  # None: the source is not a torch.save file
    storages: dict[str, bytearray | np.ndarray] = field(default_factory=dict)
    next_key: int = 0

    @classmethod
    def of(cls, source: Checkpoint) -> _EditedTree:
        """A fresh parse of the source's pickle (the reader's tree stays as it was read), or an
        empty state dict when the source is of another format."""
        if not isinstance(source.format_state, _ZipState):
            return cls(source.path, OrderedDict(), {}, None)
        state = source.format_state
        root = unpickle(source.path, record_bytes(source.buffer, state.pickle_record()))
        taken = [
            int(name.rsplit("/", 1)[1])
            for name in state.records
            if name.startswith(f"{state.prefix}data/") and name.rsplit("/", 1)[1].isdigit()
        ]
        slots = tensor_slots(source.path, root)
        return cls(source.path, root, slots, state, next_key=max(taken, default=-1) + 1)

    def drop_entries(self, keys: frozenset[str]) -> None:
        """Remove top-level entries (by their printed key, as `Contents` names them) with all they
        hold; a list's from the highest index down, so the others keep theirs."""
        if not keys:
            return
        if not isinstance(self.root, (dict, list)):
            raise EditError(f"{self.path}: cannot remove entries from a {_kind_of(self.root)}")
        present = self.root if isinstance(self.root, dict) else range(len(self.root))
        for key in reversed([key for key in present if str(key) in keys]):
            del self.root[key]
        self.slots = {
            name: slot for name, slot in self.slots.items() if str(slot.location[0]) not in keys
        }

    def place(self, tensors: list[OutputTensor], source: Checkpoint) -> None:
        """Remove the tensors not in `tensors`, give edited ones their new elements, and add the
        new ones, each right after the tensor listed before it (the order `apply` decided)."""
        wanted = {tensor.ref.name for tensor in tensors}
        self._remove([name for name in self.slots if name not in wanted])
        previous: str | None = None
        for tensor in tensors:
            name = tensor.ref.name
            if name not in self.slots:
                self._add(tensor, source, previous)
            elif tensor.data is not None:
                self._edit(tensor, source)
            previous = name

    def _remove(self, names: list[str]) -> None:
        # Highest list index first, so the indices still to delete stay valid.
        for name in sorted(names, key=lambda n: _sort_key(self.slots[n].key), reverse=True):
            slot = self.slots.pop(name)
            if not isinstance(slot.parent, (dict, list)):
                raise EditError(
                    f"{self.path}: tensor {name!r} sits inside a {_kind_of(slot.parent)}; only "
                    "tensors of dicts and lists can be removed"
                )
            del slot.parent[slot.key]

    def _edit(self, tensor: OutputTensor, source: Checkpoint) -> None:
        """Write the new elements into a copy of the tensor's storage: views sharing it stay shared."""
        ref = source.tensors[tensor.ref.name]
        key = self.slots[tensor.ref.name].stub.storage.key
        if key not in self.storages:
            offset, size = ref.storage.offset, ref.storage.nbytes
            self.storages[key] = bytearray(source.buffer[offset : offset + size])
        storage = self.storages[key]
        assert isinstance(storage, bytearray)
        view = tensor_view(storage, replace(ref, storage=StorageRef(key, 0, len(storage))))
        view[...] = tensor.raw(source)

    def _add(self, tensor: OutputTensor, source: Checkpoint, previous: str | None) -> None:
        name = tensor.ref.name
        parent, key, location = self._new_slot(name, previous)
        if key in parent:
            raise EditError(f"{self.path}: cannot add tensor {name!r}: its key is already taken")
        stub = self._new_stub(tensor.ref)
        self.storages[stub.storage.key] = tensor.raw(source)
        beside = self.slots.get(previous) if previous is not None else None
        _insert_after(parent, beside.key if beside and beside.parent is parent else None, key, stub)
        self.slots[name] = _Slot(location, parent, stub)

    def _new_slot(self, name: str, previous: str | None) -> tuple[dict[Any, Any], Any, Location]:
        """Where a new tensor goes: beside the tensor before it when both name the same module (its
        key is that tensor's key with the last name part replaced), else at the root by its name."""
        module, _, leaf = name.rpartition(".")
        if previous is not None and previous in self.slots:
            slot = self.slots[previous]
            previous_module, _, previous_leaf = previous.rpartition(".")
            last = str(slot.key)
            if (
                isinstance(slot.parent, dict)
                and previous_module == module
                and last.endswith(previous_leaf)
            ):
                key = last[: len(last) - len(previous_leaf)] + leaf
                return slot.parent, key, (*slot.location[:-1], key)
        if not isinstance(self.root, dict):
            raise EditError(
                f"{self.path}: cannot add tensor {name!r}: the file's root is not a mapping"
            )
        return self.root, name, (name,)

    def _new_stub(self, ref: TensorRef) -> TensorStub:
        """A new contiguous tensor in a storage of its own, built the way torch.save writes it
        (`_rebuild_tensor_v2` of a typed storage, or `_v3` with an untyped one for the element types
        that have no storage class)."""
        key, self.next_key = str(self.next_key), self.next_key + 1
        stride = contiguous_strides(ref.shape)
        hooks: OrderedDict[Any, Any] = OrderedDict()
        typed = STORAGE_CLASS.get(ref.dtype.name)
        if typed is not None:
            kind = StorageType(ref.dtype.name, "torch", typed)
            storage = StorageStub(key, ref.dtype, "cpu", ref.numel, kind)
            args: tuple[Any, ...] = (storage, 0, ref.shape, stride, False, hooks)
            call = Call("torch._utils", "_rebuild_tensor_v2", args)
        else:
            kind = StorageType("", "torch.storage", "UntypedStorage")
            storage = StorageStub(key, None, "cpu", ref.nbytes, kind)
            args = (storage, 0, ref.shape, stride, False, hooks, DTypeName(ref.dtype.name))
            call = Call("torch._utils", "_rebuild_tensor_v3", args)
        return TensorStub(storage, 0, ref.shape, stride, ref.dtype, False, call)

    def storage_chunks(self, key: str, read_at: ReadAt) -> Iterator[bytes | memoryview]:
        """A storage's bytes: its new ones, or the source record's, read in chunks with `read_at`
        (a pread: touching the memory map would count the whole file in the process's memory)."""
        if key in self.storages:
            yield _byte_view(self.storages[key])
            return
        record = self.state.storage_record(key) if self.state is not None else None
        if record is None:
            raise EditError(f"{self.path}: the object tree refers to a missing storage {key!r}")
        end = record.data_offset + record.size
        for start in range(record.data_offset, end, COPY_CHUNK):
            yield read_at(start, min(COPY_CHUNK, end - start))


def _byte_view(data: bytearray | np.ndarray) -> memoryview:
    if isinstance(data, bytearray):
        return memoryview(data)
    return memoryview(np.ascontiguousarray(data).reshape(-1).view(np.uint8))


def _sort_key(key: Any) -> tuple[int, Any]:
    """List indices in numeric order; dict keys in any consistent order after them."""
    return (1, key) if type(key) is int else (0, 0)


def _kind_of(container: Any) -> str:
    return container.qualname if isinstance(container, Opaque) else type(container).__name__


def _insert_after(parent: dict[Any, Any], anchor: Any, key: Any, value: Any) -> None:
    """Set `parent[key] = value` right after `anchor` (at the end when there is none)."""
    if anchor is None or anchor not in parent or next(reversed(parent)) == anchor:
        parent[key] = value  # appending: no reordering (a conversion adds every tensor this way)
        return
    items = list(parent.items())
    index = list(parent).index(anchor) + 1
    parent.clear()  # an OrderedDict keeps its attributes (a state dict's `_metadata`)
    parent.update([*items[:index], (key, value), *items[index:]])


def _write_archive(
    out: BinaryIO,
    tree: _EditedTree,
    data_pkl: bytes,
    storage_keys: list[str],
    source: Checkpoint,
) -> None:
    """The records torch.save writes: data.pkl, the small ones, each storage, a serialization id."""
    prefix = tree.state.prefix if tree.state is not None else DEFAULT_PREFIX
    with open(source.files[0].path, "rb") as file:  # a folder's path is no file to read
        read_at = pread_reader(file)
        records: list[tuple[str, Iterable[bytes | memoryview]]] = [
            (f"{prefix}data.pkl", [data_pkl]),
            *_small_records(tree, prefix, source.buffer),
            *((f"{prefix}data/{key}", tree.storage_chunks(key, read_at)) for key in storage_keys),
        ]
        writer = ZipWriter(out)
        identity = hashlib.sha1()
        for name, chunks in records:
            crc = writer.add(name, chunks)
            identity.update(f"{name}:{crc};".encode())
    serialization_id = f"{int.from_bytes(identity.digest()[:16], 'big'):040d}"
    writer.add(prefix + SERIALIZATION_ID, [serialization_id.encode()])
    writer.close()


def _small_records(
    tree: _EditedTree, prefix: str, buffer: mmap.mmap | bytes
) -> list[tuple[str, list[bytes]]]:
    """The source's records other than its pickle, storages and id (as they were), or torch's."""
    if tree.state is None:
        return [(prefix + name, [data]) for name, data in DEFAULT_RECORDS]
    replaced = (f"{prefix}data.pkl", f"{prefix}{SERIALIZATION_ID}")
    return [
        (name, [record_bytes(buffer, require_stored(tree.path, record))])
        for name, record in tree.state.records.items()
        if name not in replaced and not name.startswith(f"{prefix}data/")
    ]


FORMAT = TorchZipFormat()
