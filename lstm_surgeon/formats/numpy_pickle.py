"""Plain pickles of numpy arrays (`pickle.dump` of a dict or list of arrays), read without unpickling.

Nothing in the file runs: numpy's array reconstruction (`_reconstruct` plus the state BUILD gives it,
or protocol 5's `_frombuffer`) and `numpy.dtype` become inert records, and every other global stays an
inert `Opaque` object (`pickle_reader.resolve_global`). The unpickler does not even read an array's
elements: each bytes payload is skipped and recorded by where it lies in the file, so the elements
are read, and patched, where they lie. Names are the keys, dotted through nested dicts and lists (as
the torch.save reader names them). Adding or dropping tensors writes a new pickle of plain containers
and real arrays (a file holding other objects is refused, since they are never re-created).
"""

from __future__ import annotations

import io
import mmap
import pickle
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, ClassVar

import numpy as np

from lstm_surgeon.checkpoint import (
    Buffer,
    Checkpoint,
    CheckpointFile,
    Contents,
    Entry,
    EntryKind,
    OutputTensor,
    StorageRef,
    TensorRef,
)
from lstm_surgeon.errors import CheckpointError, EditError
from lstm_surgeon.formats.numpy_format import NpyArray, element_type, numpy_array
from lstm_surgeon.formats.pickle_reader import READ_ERRORS, Opaque, resolve_global
from lstm_surgeon.writing import BytePatch, Progress

PICKLE_PROTOCOLS = range(2, 6)
TORCH_LEGACY_MAGIC = (
    b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"  # claimed by the torch.save format
)
MAX_DEPTH = 200
DTYPE_CODE = re.compile(r"[a-zA-Z?]\d{0,2}")  # what numpy pickles a dtype as: f4, i8, b1, O8...
WRITE_PROTOCOL = 4
Location = tuple[Any, ...]


@dataclass(frozen=True)
class LocatedBytes:
    """A bytes payload of the pickle, not read: where it lies in the file."""

    offset: int
    size: int


class DTypeStub:
    """What `numpy.dtype("f4", False, True)` builds; the BUILD after it sets the byte order."""

    def __init__(self, code: Any = None, *_: Any) -> None:
        self.code = code
        self.byteorder = "="

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) > 1 and isinstance(state[1], str):
            self.byteorder = state[1]

    def numpy(self) -> np.dtype | None:
        """The numpy dtype, for a plain code only (a record or subarray dtype is not a weight)."""
        if not isinstance(self.code, str) or not DTYPE_CODE.fullmatch(self.code):
            return None
        try:
            return np.dtype(self.byteorder.replace("|", "=") + self.code)
        except (TypeError, ValueError):
            return None


class ArrayStub:
    """What numpy's `_reconstruct(ndarray, (0,), b"b")` builds; the BUILD after it gives the state
    `(version, shape, dtype, is_fortran, raw bytes)`."""

    def __init__(self) -> None:
        self.shape: Any = None
        self.dtype: Any = None
        self.fortran: Any = False
        self.data: Any = None

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) in (4, 5):
            self.shape, self.dtype, self.fortran, self.data = state[-4:]


def _reconstruct(subtype: Any, *_: Any) -> ArrayStub | None:
    """Only plain `numpy.ndarray`s become arrays (subclasses such as masked arrays stay inert)."""
    return ArrayStub() if getattr(subtype, "qualname", None) == "numpy.ndarray" else None


def _frombuffer(data: Any, dtype: Any, shape: Any, order: Any = "C", *_: Any) -> ArrayStub:
    """Protocol 5's form of an array: its bytes, dtype, shape and order in one call."""
    stub = ArrayStub()
    stub.__setstate__((shape, dtype, order == "F", data))
    return stub


NUMPY_GLOBALS = {
    (module, name): function
    for core in ("numpy.core", "numpy._core")
    for module, name, function in (
        (f"{core}.multiarray", "_reconstruct", _reconstruct),
        (f"{core}.numeric", "_frombuffer", _frombuffer),
    )
} | {("numpy", "dtype"): DTypeStub}


class _BufferFile:
    """The minimal file interface pickle reads through, over the checkpoint's map."""

    def __init__(self, buffer: Buffer) -> None:
        self.buffer = buffer
        self.position = 0

    def read(self, size: int = -1) -> bytes:
        end = len(self.buffer) if size < 0 else min(len(self.buffer), self.position + size)
        data = bytes(self.buffer[self.position : end])
        self.position = max(self.position, end)
        return data

    def readline(self) -> bytes:
        end = self.buffer.find(b"\n", self.position)
        return self.read(-1 if end < 0 else end + 1 - self.position)

    def skip(self, size: int) -> int:
        """Step over `size` bytes; where they start."""
        start = self.position
        if start + size > len(self.buffer):
            raise pickle.UnpicklingError("truncated pickle (a bytes payload runs past the end)")
        self.position += size
        return start


class _LocatingUnpickler(pickle._Unpickler):  # type: ignore[misc,name-defined]
    """Python's own unpickler, with bytes payloads located instead of read, EXT codes refused
    (they resolve through `copyreg`'s process-wide cache before `find_class`), and globals
    resolved to inert records."""

    dispatch: ClassVar[dict[int, Any]] = dict(pickle._Unpickler.dispatch)  # type: ignore[attr-defined]

    def __init__(self, buffer: Buffer) -> None:
        self.source = _BufferFile(buffer)
        self.frame_start = 0
        super().__init__(self.source)

    def find_class(self, module: str, name: str) -> Any:
        return resolve_global(module, name, NUMPY_GLOBALS)

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("a plain pickle holds no persistent ids")

    def load_frame(self) -> None:
        (size,) = struct.unpack("<Q", self.read(8))
        self.frame_start = self.source.position
        self._unframer.load_frame(size)

    def locate(self, length_format: str) -> None:
        (size,) = struct.unpack(length_format, self.read(struct.calcsize(length_format)))
        frame = self._unframer.current_frame
        if frame is not None and frame.tell() < len(frame.getbuffer()):
            start = frame.tell()
            if start + size > len(frame.getbuffer()):
                raise pickle.UnpicklingError("a bytes payload runs past the end of its frame")
            frame.seek(size, io.SEEK_CUR)
            self.append(LocatedBytes(self.frame_start + start, size))
            return
        self._unframer.current_frame = None
        self.append(LocatedBytes(self.source.skip(size), size))

    def refuse_extension(self) -> None:
        raise pickle.UnpicklingError("the pickle uses an extension code (EXT1/2/4)")

    dispatch[pickle.FRAME[0]] = load_frame
    dispatch[pickle.SHORT_BINBYTES[0]] = lambda self: self.locate("<B")
    dispatch[pickle.BINBYTES[0]] = lambda self: self.locate("<I")
    dispatch[pickle.BINBYTES8[0]] = lambda self: self.locate("<Q")
    dispatch[pickle.BYTEARRAY8[0]] = lambda self: self.locate("<Q")
    dispatch.update(
        dict.fromkeys((pickle.EXT1[0], pickle.EXT2[0], pickle.EXT4[0]), refuse_extension)
    )


UNPICKLING_ERRORS = (*READ_ERRORS, struct.error)


@dataclass(frozen=True)
class _PickleState:
    """What only this module needs of a pickle it read: its tree (to write it back) and protocol."""

    root: Any
    protocol: int


class NumpyPickleFormat:
    name = "pickle"
    suffixes = (".pkl", ".pickle")

    def sniff(self, head: bytes) -> bool:
        return (
            len(head) > 2
            and head[0] == pickle.PROTO[0]
            and head[1] in PICKLE_PROTOCOLS
            and not head.startswith(TORCH_LEGACY_MAGIC)
        )

    def read(self, path: Path, buffer: mmap.mmap | bytes) -> Checkpoint:
        try:
            root = _LocatingUnpickler(buffer).load()
        except UNPICKLING_ERRORS as error:
            raise CheckpointError(
                f"{path}: corrupt pickle ({type(error).__name__}: {error})"
            ) from None
        tensors = {
            name: _tensor_ref(path, name, stub, len(buffer)) for name, stub in _arrays(path, root)
        }
        if not tensors:
            raise CheckpointError(
                f"{path}: a plain pickle file without numpy arrays, not a checkpoint"
            )
        return Checkpoint(
            path,
            self,
            tensors,
            (CheckpointFile(path, buffer),),
            _contents(root),
            format_state=_PickleState(root, buffer[1]),
        )

    def checksum_patches(
        self, checkpoint: Checkpoint, storages: dict[StorageRef, bytes]
    ) -> list[BytePatch]:
        return []  # a pickle has no checksum

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
        """The source's tree (or a plain dict) of containers and values with real arrays in place
        of its arrays; each new tensor right after the one before it, in that one's container."""
        arrays = {tensor.ref.name: numpy_array(tensor, source).copy() for tensor in tensors}
        state = source.format_state
        if not isinstance(state, _PickleState):
            pickle.dump(arrays, out, WRITE_PROTOCOL)
            return
        order = list(arrays)
        new = [name for name in order if name not in source.tensors]
        names = {id(stub): name for name, stub in _arrays(source.path, state.root)}
        placing = _Placing(source, arrays, order, new, drop_keys, names)
        root = placing.rebuild(state.root, ())
        if placing.unplaced():
            raise EditError(
                f"{source.path}: cannot place new tensor {placing.unplaced()[0]!r} in its object tree"
            )
        pickle.dump(root, out, state.protocol)


# --- Reading ----------------------------------------------------------------------------------


def _walk(node: Any, location: Location, depth: int = 0) -> Iterator[tuple[Location, Any]]:
    if depth > MAX_DEPTH:
        raise RecursionError("nested too deeply")
    yield location, node
    if isinstance(node, dict):
        children: Any = node.items()
    elif isinstance(node, (list, tuple)):
        children = enumerate(node)
    else:
        return
    for key, value in children:
        yield from _walk(value, (*location, key), depth + 1)


def _dotted(location: Location) -> str:
    return ".".join(str(key) for key in location)


def _arrays(path: Path, root: Any) -> list[tuple[str, ArrayStub]]:
    """Every array of the tree by dotted name (dicts, lists and tuples are walked; objects not);
    an array reached twice (the pickle memo shares it) is named where it is first reached."""
    arrays: dict[str, ArrayStub] = {}
    seen: set[int] = set()
    try:
        for location, node in _walk(root, ()):
            if not isinstance(node, ArrayStub) or id(node) in seen:
                continue
            name = _dotted(location)
            if name in arrays:
                raise CheckpointError(f"{path}: two arrays are both named {name!r} (ambiguous)")
            arrays[name] = node
            seen.add(id(node))
    except RecursionError:
        raise CheckpointError(f"{path}: the object tree is nested too deeply to read") from None
    return list(arrays.items())


def _tensor_ref(path: Path, name: str, stub: ArrayStub, file_size: int) -> TensorRef:
    where = f"{path}: array {name!r}"
    if not isinstance(stub.data, LocatedBytes):
        raise CheckpointError(
            f"{where}: its elements are not pickled as raw bytes (pickle protocol 2 stores them as "
            "text); re-save it with pickle protocol 3 or later"
        )
    numpy_dtype = stub.dtype.numpy() if isinstance(stub.dtype, DTypeStub) else None
    shape = stub.shape
    if (
        numpy_dtype is None
        or not isinstance(shape, tuple)
        or not all(type(size) is int and size >= 0 for size in shape)
        or not isinstance(stub.fortran, bool)
    ):
        raise CheckpointError(f"{where}: malformed dtype, shape or order")
    array = NpyArray(element_type(where, numpy_dtype), shape, stub.fortran, stub.data.offset)
    if array.nbytes != stub.data.size or stub.data.offset + stub.data.size > file_size:
        raise CheckpointError(f"{where}: its bytes do not match its shape and dtype")
    return array.tensor_ref(name, f"bytes@{stub.data.offset}")


def _contents(root: Any) -> Contents:
    if isinstance(root, dict):
        items = [(str(key), value) for key, value in root.items()]
    elif isinstance(root, (list, tuple)):
        items = [(str(index), value) for index, value in enumerate(root)]
    else:
        items = []
    return Contents(entries=tuple(Entry(key, _entry_kind(value)) for key, value in items))


def _entry_kind(value: Any) -> EntryKind:
    if isinstance(value, ArrayStub):
        return "tensor"
    if isinstance(value, (dict, list, tuple, set, frozenset)):
        return "container"
    if isinstance(value, (Opaque, DTypeStub, type)):
        return "object"
    return "value"


# --- Writing a new structure --------------------------------------------------------------------


@dataclass
class _Placing:
    """Rebuilds the read tree with real arrays: kept ones by name, new ones after their anchors."""

    source: Checkpoint
    arrays: dict[str, np.ndarray]
    order: list[str]
    new: list[str]
    drop_keys: frozenset[str]
    names: dict[int, str]  # id of each array stub -> its name (shared arrays stay shared)

    def unplaced(self) -> list[str]:
        return self.new

    def rebuild(self, node: Any, location: Location) -> Any:
        if isinstance(node, ArrayStub):
            return self.arrays[self.names[id(node)]]
        if isinstance(node, LocatedBytes):
            return bytes(self.source.buffer[node.offset : node.offset + node.size])
        if isinstance(node, (Opaque, DTypeStub, type)):
            raise EditError(
                f"{self.source.path}: its pickle holds a {getattr(node, 'qualname', 'numpy.dtype')} "
                "object that lstm-surgeon never re-creates; write a .npz or .safetensors output"
            )
        if isinstance(node, dict):
            return self._rebuild_dict(node, location)
        if isinstance(node, (list, tuple)):
            kept = [
                self.rebuild(value, (*location, index))
                for index, value in enumerate(node)
                if self._kept(value, (*location, index))
            ]
            return type(node)(kept) if type(node) in (list, tuple) else kept
        return node

    def _kept(self, value: Any, location: Location) -> bool:
        if len(location) == 1 and str(location[0]) in self.drop_keys:
            return False
        return not isinstance(value, ArrayStub) or self.names[id(value)] in self.arrays

    def _rebuild_dict(self, node: dict[Any, Any], location: Location) -> dict[Any, Any]:
        rebuilt = type(node)()  # a dict or an OrderedDict: the only mappings the reader makes
        prefix = _dotted(location) + "." if location else ""
        for key, value in node.items():
            if not self._kept(value, (*location, key)):
                continue
            rebuilt[key] = self.rebuild(value, (*location, key))
            if isinstance(value, ArrayStub) and self.names[id(value)] == _dotted((*location, key)):
                self._place_after(rebuilt, _dotted((*location, key)), prefix)
        return rebuilt

    def _place_after(self, container: dict[Any, Any], anchor: str, prefix: str) -> None:
        """Put the new tensors that follow `anchor` (in the output order) into its container."""
        index = self.order.index(anchor) + 1
        while index < len(self.order) and self.order[index] in self.new:
            name = self.order[index]
            if not name.startswith(prefix) or name[len(prefix) :] in container:
                return
            container[name[len(prefix) :]] = self.arrays[name]
            self.new.remove(name)
            index += 1


FORMAT = NumpyPickleFormat()
