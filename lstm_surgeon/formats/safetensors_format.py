"""The safetensors format: an 8-byte little-endian header length, a JSON header, then the tensor bytes.

The header is validated as the specification demands before any tensor is touched: a size cap, valid
UTF-8 JSON, no duplicate keys, known dtypes, `dtype x shape == byte length`, offsets that cover the byte
buffer exactly (no gap, no overlap, nothing out of bounds) and string-to-string metadata.
"""

from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path
from typing import Any, BinaryIO

from lstm_surgeon.checkpoint import (
    Checkpoint,
    CheckpointFile,
    Contents,
    Entry,
    OutputTensor,
    StorageRef,
    TensorRef,
)
from lstm_surgeon.dtypes import BY_SAFETENSORS_CODE
from lstm_surgeon.errors import CheckpointError, EditError
from lstm_surgeon.writing import BytePatch, Progress

MAX_HEADER_BYTES = 100_000_000  # the reference implementation's cap
METADATA_KEY = "__metadata__"
HEADER_ALIGNMENT = 8


class SafetensorsFormat:
    name = "safetensors"
    suffixes = (".safetensors",)

    def sniff(self, head: bytes) -> bool:
        """An 8-byte length followed by a JSON object (the length is checked when reading)."""
        return len(head) >= 9 and head[8:9] == b"{"

    def read(self, path: Path, buffer: mmap.mmap | bytes) -> Checkpoint:
        size = len(buffer)
        header, data_start = parse_header(path, buffer)
        metadata = _metadata(path, header.pop(METADATA_KEY, None))
        tensors = _tensor_refs(path, header, data_start, size)
        return Checkpoint(
            path=path,
            format=self,
            tensors=tensors,
            files=(CheckpointFile(path, buffer),),
            contents=Contents(
                entries=tuple(Entry(name, "tensor") for name in tensors), metadata=metadata
            ),
        )

    def checksum_patches(
        self, checkpoint: Checkpoint, storages: dict[StorageRef, bytes]
    ) -> list[BytePatch]:
        return []  # safetensors keeps no checksums

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
        """Write tensors in the given order, keeping the source's metadata."""
        _refuse_uncarried(source, tensors, drop_keys)
        header: dict[str, Any] = {}
        if source.metadata is not None:
            header[METADATA_KEY] = source.metadata
        offset = 0
        for tensor in tensors:
            ref = tensor.ref
            header[ref.name] = {
                "dtype": ref.dtype.safetensors_code,
                "shape": list(ref.shape),
                "data_offsets": [offset, offset + ref.nbytes],
            }
            offset += ref.nbytes
        out.write(encode_header(header))
        for tensor in tensors:
            out.write(tensor.raw(source).data)


def _refuse_uncarried(
    source: Checkpoint, tensors: list[OutputTensor], drop_keys: frozenset[str]
) -> None:
    """What a safetensors file cannot carry, refused rather than lost: anything at the top level
    but named tensors (an epoch, a config, a nested state dict), and a tensor named like the
    header's metadata key. (Tensors that share or overlap storage are written as separate copies
    with the same values: a flat parameter buffer's views become the plain tensors they show.)"""
    others = [
        key for key in source.top_level_keys if key not in source.tensors and key not in drop_keys
    ]
    if others:
        raise EditError(
            f"{source.path}: only a plain state dict converts to safetensors; this file also "
            f"holds {', '.join(repr(key) for key in others[:3])}"
        )
    if any(tensor.ref.name == METADATA_KEY for tensor in tensors):
        raise EditError(
            f"{source.path}: a tensor named {METADATA_KEY!r} cannot be stored in safetensors"
        )


def encode_header(header: dict[str, Any]) -> bytes:
    """The length prefix and JSON header, padded with spaces so tensor data starts 8-byte aligned."""
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(len(text) + 8) % HEADER_ALIGNMENT)
    return struct.pack("<Q", len(text)) + text


def parse_header(path: Path, buffer: mmap.mmap | bytes) -> tuple[dict[str, Any], int]:
    """The decoded JSON header (keys in file order) and the offset where tensor data starts."""
    size = len(buffer)
    if size < 8:
        raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
    (length,) = struct.unpack("<Q", buffer[:8])
    if length > MAX_HEADER_BYTES:
        raise CheckpointError(
            f"{path}: safetensors header of {length} bytes exceeds the 100 MB limit"
        )
    if 8 + length > size:
        raise CheckpointError(
            f"{path}: truncated safetensors file (header says {length} bytes, file has {size - 8})"
        )
    try:
        text = bytes(buffer[8 : 8 + length]).decode("utf-8")
        header = json.loads(text, object_pairs_hook=_reject_duplicate_keys)
    except UnicodeDecodeError:
        raise CheckpointError(f"{path}: safetensors header is not valid UTF-8") from None
    except json.JSONDecodeError as error:
        raise CheckpointError(
            f"{path}: safetensors header is not valid JSON ({error.msg})"
        ) from None
    except _DuplicateKey as error:
        raise CheckpointError(f"{path}: safetensors header repeats the key {error.key!r}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is not a JSON object")
    return header, 8 + length


class _DuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        self.key = key


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


def _metadata(path: Path, metadata: Any) -> dict[str, str] | None:
    if metadata is None:
        return None
    if not isinstance(metadata, dict) or not all(
        isinstance(key, str) and isinstance(value, str) for key, value in metadata.items()
    ):
        raise CheckpointError(f"{path}: safetensors __metadata__ must map strings to strings")
    return metadata


def _tensor_refs(
    path: Path, header: dict[str, Any], data_start: int, size: int
) -> dict[str, TensorRef]:
    refs = {name: _tensor_ref(path, name, entry, data_start) for name, entry in header.items()}
    _check_coverage(path, refs, data_start, size)
    return refs


def _tensor_ref(path: Path, name: str, entry: Any, data_start: int) -> TensorRef:
    if not isinstance(entry, dict):
        raise CheckpointError(f"{path}: safetensors entry {name!r} is not an object")
    dtype = BY_SAFETENSORS_CODE.get(entry.get("dtype"))  # type: ignore[arg-type]
    if dtype is None:
        raise CheckpointError(f"{path}: tensor {name!r} has unknown dtype {entry.get('dtype')!r}")
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not _is_int_list(shape) or any(dim < 0 for dim in shape):
        raise CheckpointError(f"{path}: tensor {name!r} has an invalid shape {shape!r}")
    if not _is_int_list(offsets) or len(offsets) != 2 or not 0 <= offsets[0] <= offsets[1]:
        raise CheckpointError(f"{path}: tensor {name!r} has invalid data_offsets {offsets!r}")
    begin, end = offsets
    ref = TensorRef(name, dtype, tuple(shape), StorageRef(name, data_start + begin, end - begin))
    if ref.nbytes != end - begin:
        raise CheckpointError(
            f"{path}: tensor {name!r} is {dtype.name} {list(shape)} ({ref.nbytes} bytes) "
            f"but its data_offsets span {end - begin} bytes"
        )
    return ref


def _is_int_list(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(item, int) and not isinstance(item, bool) for item in value
    )


def _check_coverage(path: Path, refs: dict[str, TensorRef], data_start: int, size: int) -> None:
    """Offsets must tile the byte buffer exactly: sorted, contiguous, ending at the end of the file."""
    position = data_start
    for ref in sorted(refs.values(), key=lambda r: (r.storage.offset, r.storage.nbytes)):
        if ref.storage.offset != position:
            problem = (
                "overlaps the previous one" if ref.storage.offset < position else "leaves a gap"
            )
            raise CheckpointError(f"{path}: tensor {ref.name!r} {problem} in the data buffer")
        position += ref.storage.nbytes
    if position > size:
        raise CheckpointError(
            f"{path}: truncated safetensors file (tensors need {position} bytes, file has {size})"
        )
    if position != size:
        raise CheckpointError(f"{path}: {size - position} bytes after the last tensor")


FORMAT = SafetensorsFormat()
