"""Pre-1.6 torch.save files (`_use_new_zipfile_serialization=False`): pickles, then raw storages.

The file is five pickles in a row -- a magic number, the protocol version (1001), system information
(byte order, type sizes), the saved object, and the list of storage keys -- followed, for each key in
that list's order, by the storage's element count (8 bytes, little-endian) and its raw bytes. The
object is read with the never-executing unpickler (`pickle_reader`), so tensors are named as in a
torch.save zip file and files saved from a GPU (storages located on `cuda:0`) read like any other.
There is no checksum: same-structure edits patch the storages' bytes where they lie, in place or in a
`-o` copy; nothing else of the file changes.
"""

from __future__ import annotations

import mmap
import pickle
import pickletools
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from lstm_surgeon.checkpoint import Checkpoint, CheckpointFile, OutputTensor, StorageRef
from lstm_surgeon.errors import CheckpointError, EditError, UnsupportedCheckpointError
from lstm_surgeon.formats.pickle_reader import StorageStub, TensorStub
from lstm_surgeon.formats.torch_zip import contents_of, tensor_ref, tensor_slots, unpickle
from lstm_surgeon.writing import BytePatch, Progress

MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"  # the pickled magic number that opens the file
MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001
COUNT = struct.Struct("<q")  # a storage's element count, before its bytes


@dataclass(frozen=True)
class _LegacyState:
    """What `check` needs: the storages in file order, and the bytes after the last one."""

    storages: tuple[StorageRef, ...]
    trailing: int


class _BufferReader:
    """A file-like window on the map, from `position` on, for `pickletools.genops` to find where a
    pickle ends without copying the rest of the file."""

    def __init__(self, buffer: mmap.mmap | bytes, position: int) -> None:
        self.buffer = buffer
        self.position = position

    def read(self, size: int = -1) -> bytes:
        end = len(self.buffer) if size < 0 else min(len(self.buffer), self.position + size)
        data = bytes(self.buffer[self.position : end])
        self.position = end
        return data

    def readline(self) -> bytes:
        end = self.buffer.find(b"\n", self.position)
        return self.read(-1 if end < 0 else end + 1 - self.position)

    def tell(self) -> int:
        return self.position


class LegacyTorchFormat:
    name = "pt-legacy"
    suffixes = (".pt", ".pth", ".bin", ".ckpt", ".tar")

    def sniff(self, head: bytes) -> bool:
        return head.startswith(MAGIC)

    def read(self, path: Path, buffer: mmap.mmap | bytes) -> Checkpoint:
        values, position = _pickles(path, buffer, 5)
        magic, protocol, sys_info, root, keys = values
        _check_header(path, magic, protocol, sys_info)
        slots = tensor_slots(path, root)
        storages, end = _storages(path, buffer, position, keys, [s.stub for s in slots.values()])
        tensors = {
            name: tensor_ref(path, name, slot.stub, storages.get(_key(slot.stub)))
            for name, slot in slots.items()
        }
        return Checkpoint(
            path=path,
            format=self,
            tensors=tensors,
            files=(CheckpointFile(path, buffer),),
            contents=contents_of(root),
            format_state=_LegacyState(tuple(storages.values()), len(buffer) - end),
        )

    def checksum_patches(
        self, checkpoint: Checkpoint, storages: dict[StorageRef, bytes]
    ) -> list[BytePatch]:
        return []  # the format has no checksums

    def checksum_problems(
        self, checkpoint: Checkpoint, progress: Progress | None
    ) -> tuple[int, list[str]]:
        """The structure: each storage's count and bytes were checked against the file when it
        was read; what is left to say is bytes after the last storage (torch.load ignores them)."""
        state = checkpoint.format_state
        assert isinstance(state, _LegacyState), "not a checkpoint read by the pre-1.6 format"
        problems = []
        if state.trailing:
            problems.append(
                f"{state.trailing} bytes after the last storage (not part of the checkpoint)"
            )
        if progress is not None:
            progress(sum(storage.nbytes for storage in state.storages))
        return len(state.storages), problems

    def write(
        self,
        out: BinaryIO,
        tensors: list[OutputTensor],
        source: Checkpoint,
        drop_keys: frozenset[str] = frozenset(),
    ) -> None:
        """Refused: only edits of values are written in this old format (patched in place)."""
        raise EditError(
            f"{source.path}: lstm-surgeon does not write pre-1.6 torch.save files; edits of values "
            "keep the format, other changes need a new format: -o OUT.safetensors"
        )


def _pickles(path: Path, buffer: mmap.mmap | bytes, count: int) -> tuple[list[Any], int]:
    """The first `count` pickles of the file, read one after another without running any, and
    the offset after the last."""
    values, position = [], 0
    for _ in range(count):
        reader = _BufferReader(buffer, position)
        try:
            for _ in pickletools.genops(reader):
                pass
        except (ValueError, pickle.UnpicklingError, EOFError, UnicodeDecodeError) as error:
            raise CheckpointError(f"{path}: corrupt pre-1.6 torch.save file ({error})") from None
        values.append(unpickle(path, bytes(buffer[position : reader.tell()]), "pickle"))
        position = reader.tell()
    return values, position


def _check_header(path: Path, magic: Any, protocol: Any, sys_info: Any) -> None:
    if magic != MAGIC_NUMBER or protocol != PROTOCOL_VERSION or not isinstance(sys_info, dict):
        raise CheckpointError(f"{path}: corrupt pre-1.6 torch.save file (bad header)")
    if sys_info.get("little_endian") is not True:
        raise UnsupportedCheckpointError(f"{path}: big-endian checkpoints are not supported")


def _key(stub: TensorStub) -> str | None:
    key = getattr(stub.storage, "key", None)
    return key if isinstance(key, str) else None


def _storages(
    path: Path, buffer: mmap.mmap | bytes, position: int, keys: Any, stubs: list[TensorStub]
) -> tuple[dict[str, StorageRef], int]:
    """Each storage where its bytes lie (after its count), in the keys' order, and the offset
    after the last; a count that disagrees with the pickle, or bytes past the end, are errors."""
    if not isinstance(keys, list) or not all(isinstance(key, str) for key in keys):
        raise CheckpointError(f"{path}: corrupt pre-1.6 torch.save file (bad storage key list)")
    described = {
        _key(stub): stub.storage for stub in stubs if isinstance(stub.storage, StorageStub)
    }
    storages: dict[str, StorageRef] = {}
    for key in keys:
        stub = described.get(key)
        if stub is None or stub.dtype is None or key in storages:
            raise CheckpointError(
                f"{path}: storage {key!r} is not one tensor storage lstm-surgeon reads"
            )
        if position + COUNT.size > len(buffer):
            raise CheckpointError(f"{path}: truncated file (storage {key!r} is missing)")
        (count,) = COUNT.unpack_from(buffer, position)
        if count < 0 or count != stub.numel:
            raise CheckpointError(
                f"{path}: storage {key!r} holds {count} elements where the pickle says {stub.numel}"
            )
        nbytes = count * stub.dtype.itemsize
        position += COUNT.size
        if position + nbytes > len(buffer):
            raise CheckpointError(f"{path}: truncated file (storage {key!r} runs past the end)")
        storages[key] = StorageRef(key, position, nbytes)
        position += nbytes
    return storages, position


FORMAT = LegacyTorchFormat()
