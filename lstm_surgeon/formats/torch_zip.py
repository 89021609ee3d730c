"""The torch.save zip format: `<archive>/data.pkl` (the object tree) plus one record per storage.

Reading never runs the pickle's code (`pickle_reader`), so checkpoints that `torch.load(weights_only=True)`
refuses still show their tensors. Each tensor is named by its dotted path from the pickle's root
(`state_dict.model.lstm.bias_ih_l0`). Patching writes into the storage records where they lie and then
refreshes their CRC-32 everywhere the zip stores it. Writing a new structure (tensors added or dropped)
needs torch, and only for files whose objects torch can re-create safely.
"""

from __future__ import annotations

import mmap
import os
import pickle
import struct
import zlib
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from lstm_surgeon.checkpoint import (
    Checkpoint,
    CheckpointFile,
    OutputTensor,
    StorageRef,
    TensorRef,
    contiguous_strides,
)
from lstm_surgeon.dtypes import DType
from lstm_surgeon.errors import CheckpointError, EditError, UnsupportedCheckpointError
from lstm_surgeon.formats.pickle_reader import Opaque, StorageStub, TensorStub, load_safely
from lstm_surgeon.formats.zip_records import ZipRecord, read_records, require_stored
from lstm_surgeon.torch_import import import_torch
from lstm_surgeon.writing import BytePatch, Progress

LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"  # pickled magic number of pre-1.6 files
MAX_DEPTH = 200

Location = tuple[Any, ...]  # the keys from the pickle root to a tensor


@dataclass
class ZipDetails:
    """What writing back needs: the records, the archive prefix, where each tensor sits in the tree."""

    records: dict[str, ZipRecord]
    prefix: str
    locations: dict[str, Location]
    foreign_objects: list[str]  # qualified names of classes torch would have to re-create


class TorchZipFormat:
    name = "pt"
    suffixes = (".pt", ".pth", ".bin", ".ckpt", ".tar")

    def sniff(self, head: bytes) -> bool:
        return head.startswith(b"PK\x03\x04") or head.startswith(LEGACY_MAGIC)

    def read(self, path: Path, buffer: mmap.mmap | bytes) -> Checkpoint:
        if bytes(buffer[: len(LEGACY_MAGIC)]) == LEGACY_MAGIC:
            raise UnsupportedCheckpointError(
                f"{path}: a pre-1.6 torch.save file; re-save it with a current torch "
                "(torch.save(torch.load(path, weights_only=True), new_path)) and try again"
            )
        with open(path, "rb") as file:
            records = read_records(path, buffer, lambda at, size: os.pread(file.fileno(), size, at))
        prefix = _archive_prefix(path, records)
        _check_byteorder(path, buffer, records, prefix)
        pickle_record = require_stored(path, records[f"{prefix}data.pkl"])
        if not pickle_record.check_crc(buffer):
            raise CheckpointError(f"{path}: corrupt file (CRC-32 mismatch in {pickle_record.name})")
        root = _unpickle(
            path,
            bytes(
                buffer[pickle_record.data_offset : pickle_record.data_offset + pickle_record.size]
            ),
        )
        tensors, locations, foreign = _collect_tensors(path, root, records, prefix)
        top_keys = tuple(str(key) for key in root) if isinstance(root, dict) else ()
        return Checkpoint(
            path=path,
            format=self,
            tensors=tensors,
            files=(CheckpointFile(path, buffer),),
            details=ZipDetails(records, prefix, locations, foreign),
            top_level_keys=top_keys,
        )

    def checksum_patches(
        self, checkpoint: Checkpoint, storages: dict[StorageRef, bytes]
    ) -> list[BytePatch]:
        """The new CRC-32 of each patched record, everywhere the zip stores it (in its file)."""
        records = checkpoint.details.records
        patches = []
        for storage, data in storages.items():
            crc = struct.pack("<I", zlib.crc32(data))
            buffer = checkpoint.files[storage.file].buffer
            for offset in records[storage.key].crc_offsets:
                old = bytes(buffer[offset : offset + 4])
                patches.append(BytePatch(offset, old, crc, storage.file))
        return patches

    def checksum_problems(
        self, checkpoint: Checkpoint, progress: Progress | None
    ) -> tuple[int, list[str]]:
        problems = []
        for record in checkpoint.details.records.values():
            if not record.stored:
                problems.append(f"zip record {record.name}: compressed, so not checked")
            elif not record.check_crc(checkpoint.buffer):
                problems.append(f"zip record {record.name}: CRC-32 mismatch (corrupt data)")
            if progress is not None:
                progress(record.size)
        return len(checkpoint.details.records), problems

    def write(
        self,
        out: BinaryIO,
        tensors: list[OutputTensor],
        source: Checkpoint,
        drop_keys: frozenset[str] = frozenset(),
    ) -> None:
        """Rebuild the object tree with torch (the one path here that needs it) and torch.save it."""
        torch = import_torch("a structure-changing edit of a .pt file")

        root = _load_tree_with_torch(source)
        originals = _tensors_by_location(root, source)
        for key in drop_keys:
            del root[key]
        _place_tensors(root, tensors, source, originals, torch, drop_keys)
        torch.save(root, out)


def _archive_prefix(path: Path, records: dict[str, ZipRecord]) -> str:
    names = list(records)
    pickles = [name for name in names if name.endswith("data.pkl") and name.count("/") <= 1]
    if any(name.endswith("constants.pkl") for name in names):
        raise UnsupportedCheckpointError(
            f"{path}: a TorchScript archive (torch.jit.save); lstm-surgeon reads torch.save files"
        )
    if len(pickles) != 1:
        raise CheckpointError(f"{path}: a zip file, but not a torch.save checkpoint (no data.pkl)")
    return pickles[0][: -len("data.pkl")]


def _check_byteorder(
    path: Path, buffer: mmap.mmap | bytes, records: dict[str, ZipRecord], prefix: str
) -> None:
    record = records.get(f"{prefix}byteorder")
    if record is None:
        return
    require_stored(path, record)
    order = bytes(buffer[record.data_offset : record.data_offset + record.size])
    if order != b"little":
        raise UnsupportedCheckpointError(f"{path}: big-endian checkpoints are not supported")


def _unpickle(path: Path, data: bytes) -> Any:
    try:
        return load_safely(data)
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
        KeyError,
        MemoryError,
        RecursionError,
        UnicodeDecodeError,
        OverflowError,
    ) as error:
        raise CheckpointError(
            f"{path}: corrupt data.pkl ({type(error).__name__}: {error})"
        ) from None


def _walk(
    node: Any, location: Location, visited: set[int], depth: int = 0
) -> Iterator[tuple[Location, Any]]:
    """Every (location, value) below `node`, depth first, in container order; an object reached
    twice (the pickle memo can share containers) is visited once, so a tiny file cannot make the
    walk exponential."""
    if depth > MAX_DEPTH:
        raise RecursionError("nested too deeply")
    if id(node) in visited:
        return
    visited.add(id(node))
    yield location, node
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
            yield from _walk(value, (*location, key), visited, depth + 1)


def _dotted(location: Location) -> str:
    return ".".join(str(key) for key in location)


def _collect_tensors(
    path: Path, root: Any, records: dict[str, ZipRecord], prefix: str
) -> tuple[dict[str, TensorRef], dict[str, Location], list[str]]:
    tensors: dict[str, TensorRef] = {}
    locations: dict[str, Location] = {}
    foreign: list[str] = []
    try:
        for location, node in _walk(root, (), set()):
            if isinstance(node, Opaque):
                foreign.append(node.qualname)
            if not isinstance(node, TensorStub):
                continue
            name = _dotted(location)
            if name in tensors:
                raise CheckpointError(f"{path}: two tensors are both named {name!r} (ambiguous)")
            tensors[name] = _tensor_ref(path, name, node, records, prefix)
            locations[name] = location
    except RecursionError:
        raise CheckpointError(f"{path}: the object tree is nested too deeply to read") from None
    return tensors, locations, sorted(set(foreign))


def _tensor_ref(
    path: Path, name: str, stub: TensorStub, records: dict[str, ZipRecord], prefix: str
) -> TensorRef:
    if not _well_formed(stub):
        raise CheckpointError(
            f"{path}: tensor {name!r} has a malformed size, stride, offset or dtype"
        )
    record = records.get(f"{prefix}data/{stub.storage.key}")
    if record is None:
        raise CheckpointError(f"{path}: tensor {name!r} refers to a missing storage record")
    require_stored(path, record)
    contiguous = contiguous_strides(stub.shape) == stub.stride
    ref = TensorRef(
        name=name,
        dtype=stub.dtype,
        shape=stub.shape,
        storage=StorageRef(record.name, record.data_offset, record.size),
        element_offset=stub.storage_offset,
        strides=None if contiguous else stub.stride,
    )
    if (
        any(d < 0 for d in ref.shape)
        or any(s < 0 for s in ref.element_strides)
        or ref.element_offset < 0
    ):
        raise CheckpointError(f"{path}: tensor {name!r} has a negative size, stride or offset")
    if ref.extent_elements() * ref.dtype.itemsize > record.size:
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


# --- Writing a new structure (torch needed) ---------------------------------------------------


def _load_tree_with_torch(source: Checkpoint) -> Any:
    """The source's object tree as torch builds it, refusing anything that is not plain data."""
    torch = import_torch("a structure-changing edit of a .pt file")

    if source.format_name != "pt":
        return OrderedDict()
    details: ZipDetails = source.details
    if details.foreign_objects:
        raise EditError(
            f"{source.path}: holds objects lstm-surgeon will not re-create safely "
            f"({', '.join(details.foreign_objects[:3])}); a structure-changing edit needs a file that "
            "torch.load(weights_only=True) accepts"
        )
    try:
        return torch.load(source.path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:
        raise EditError(
            f"{source.path}: torch cannot re-create this file safely ({error})"
        ) from None


def _tensors_by_location(root: Any, source: Checkpoint) -> dict[str, Any]:
    return {name: _get(root, location) for name, location in _source_locations(source).items()}


def _get(root: Any, location: Location) -> Any:
    node = root
    for key in location:
        node = node[key]
    return node


def _location_for(name: str, source: Checkpoint) -> Location:
    """Where tensor `name` goes: the location of the source tensor it is named after (same name or
    a sibling in the same module), with the last key adjusted."""
    locations = _source_locations(source)
    if not locations:
        return (name,)
    if name in locations:
        return locations[name]
    module, _, parameter = name.rpartition(".")
    for other, location in locations.items():
        other_module, _, other_parameter = other.rpartition(".")
        last = str(location[-1])
        if other_module == module and last.endswith(other_parameter):
            return (*location[:-1], last[: len(last) - len(other_parameter)] + parameter)
    return (name,)


def _place_tensors(
    root: Any,
    tensors: list[OutputTensor],
    source: Checkpoint,
    originals: dict[str, Any],
    torch: Any,
    dropped: frozenset[str],
) -> None:
    """Drop the source tensors not in `tensors`, set the others, and put each new key right after
    the tensor listed before it in the same container."""
    wanted = {out.ref.name for out in tensors}
    for name, location in _source_locations(source).items():
        if name not in wanted and location[0] not in dropped:
            del _get(root, location[:-1])[location[-1]]
    inserted: dict[int, tuple[Any, list[tuple[Any, Any]]]] = {}
    previous: dict[int, Any] = {}
    for out in tensors:
        location = _location_for(out.ref.name, source)
        parent, key = _get(root, location[:-1]), location[-1]
        if isinstance(parent, dict) and key not in parent:
            inserted.setdefault(id(parent), (parent, []))[1].append((key, previous.get(id(parent))))
        parent[key] = _torch_tensor(out, source, originals, torch)
        previous[id(parent)] = key
    for parent, new_keys in inserted.values():
        _insert_after_anchors(parent, new_keys)


def _insert_after_anchors(container: dict[Any, Any], new_keys: list[tuple[Any, Any]]) -> None:
    """Reorder `container` so each (key, anchor) sits right after its anchor (first if None)."""
    followers: dict[Any, list[Any]] = {}
    for key, anchor in new_keys:
        followers.setdefault(anchor, []).append(key)
    fresh = {key for key, _ in new_keys}
    order: list[Any] = []

    def emit(key: Any) -> None:
        order.append(key)
        for follower in followers.get(key, []):
            emit(follower)

    for key in followers.get(None, []):
        emit(key)
    for key in [key for key in container if key not in fresh]:
        emit(key)
    items = [(key, container[key]) for key in order]
    metadata = getattr(container, "_metadata", None)
    container.clear()
    container.update(items)
    if metadata is not None:
        container._metadata = metadata  # type: ignore[attr-defined]


def _source_locations(source: Checkpoint) -> dict[str, Location]:
    return source.details.locations if source.format_name == "pt" else {}


def _torch_tensor(
    out: OutputTensor, source: Checkpoint, originals: dict[str, Any], torch: Any
) -> Any:
    if out.data is None and out.source is not None and out.source.name in originals:
        return originals[out.source.name]
    raw = out.raw(source)
    dtype = getattr(torch, out.ref.dtype.name)
    tensor = (
        torch.frombuffer(bytearray(raw.tobytes()), dtype=dtype)
        if raw.size
        else torch.empty(0, dtype=dtype)
    )
    return tensor.reshape(out.ref.shape)


FORMAT = TorchZipFormat()
