"""Keras 3 `.keras` archives: a zip of `metadata.json`, `config.json` and `model.weights.h5`.

Keras stores every member uncompressed, so the weights file's datasets lie in the archive itself: a
tensor is a dataset at the member's data offset plus the dataset's offset inside the HDF5 file, and an
edit of values patches those bytes and the member's CRC-32 (everywhere the zip keeps it), as a
`.pt` zip is patched. The config names each layer's class and settings; it is parsed as JSON, never
run. An archive whose weights member is compressed is refused with a way out.
"""

from __future__ import annotations

import io
import json
import mmap
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from lstm_surgeon.checkpoint import (
    Checkpoint,
    CheckpointFile,
    Contents,
    Entry,
    OutputTensor,
    StorageRef,
)
from lstm_surgeon.errors import CheckpointError
from lstm_surgeon.formats.hdf5_format import (
    WindowFile,
    read_h5,
    require_same_datasets,
    write_values,
)
from lstm_surgeon.formats.zip_records import LOCAL_HEADER, ZipRecord, crc_problems, read_records
from lstm_surgeon.writing import BytePatch, Progress

WEIGHTS, CONFIG, METADATA = "model.weights.h5", "config.json", "metadata.json"
MAX_JSON_BYTES = 64 << 20


@dataclass(frozen=True)
class _KerasState:
    records: dict[str, ZipRecord]


class KerasZipFormat:
    name = "keras"
    suffixes = (".keras",)

    def sniff(self, head: bytes) -> bool:
        """A zip whose first member is one Keras writes (a `.pt` zip opens with its archive
        folder)."""
        if not head.startswith(LOCAL_HEADER) or len(head) < 30:
            return False
        (name_length,) = struct.unpack_from("<H", head, 26)
        return head[30 : 30 + name_length] in (METADATA.encode(), CONFIG.encode(), WEIGHTS.encode())

    def read(self, path: Path, buffer: mmap.mmap | bytes) -> Checkpoint:
        records = read_records(path, buffer)
        weights = records.get(WEIGHTS)
        if weights is None:
            raise CheckpointError(f"{path}: a .keras archive without {WEIGHTS}")
        if not weights.stored:
            raise CheckpointError(
                f"{path}: {WEIGHTS} is compressed in this archive; lstm-surgeon edits .keras files "
                "as Keras writes them (stored): load and save the model with Keras again"
            )
        config = _json_member(path, buffer, records.get(CONFIG))
        metadata = _json_member(path, buffer, records.get(METADATA))
        h5 = read_h5(path, buffer, weights.data_offset, weights.size, config)
        strings = {key: str(value) for key, value in (metadata or {}).items()}
        return Checkpoint(
            path=path,
            format=self,
            tensors=h5.tensors,
            files=(CheckpointFile(path, buffer),),
            contents=Contents(
                entries=tuple(Entry(name, "tensor") for name in h5.tensors),
                metadata=strings,
                operators=h5.operators,
            ),
            format_state=_KerasState(records),
            warnings=h5.warnings,
        )

    def checksum_patches(
        self, checkpoint: Checkpoint, storages: dict[StorageRef, bytes]
    ) -> list[BytePatch]:
        """The weights member's new CRC-32 (its datasets replaced by their new bytes), everywhere
        the zip keeps it."""
        if not storages:
            return []
        record = _state(checkpoint).records[WEIGHTS]
        buffer = checkpoint.buffer
        crc = struct.pack("<I", _crc_with(buffer, record, storages))
        return [
            BytePatch(offset, bytes(buffer[offset : offset + 4]), crc)
            for offset in record.crc_offsets
        ]

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
        """A new archive with the same members, the weights' new values written through h5py."""
        require_same_datasets(source, tensors, self.name)
        with zipfile.ZipFile(WindowFile(source.buffer)) as archive:
            weights = io.BytesIO(archive.read(WEIGHTS))
            write_values(weights, tensors)
            with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as target:
                for info in archive.infolist():
                    data = weights.getvalue() if info.filename == WEIGHTS else archive.read(info)
                    target.writestr(info, data, compress_type=zipfile.ZIP_STORED)


def _state(checkpoint: Checkpoint) -> _KerasState:
    state = checkpoint.format_state
    assert isinstance(state, _KerasState), "not a checkpoint read by the .keras format"
    return state


def _json_member(path: Path, buffer: mmap.mmap | bytes, record: ZipRecord | None) -> Any:
    """A stored JSON member, parsed (None when absent or compressed: the shapes then decide)."""
    if record is None or not record.stored:
        return None
    if record.size > MAX_JSON_BYTES:
        raise CheckpointError(f"{path}: {record.name} of {record.size} bytes is too large")
    try:
        return json.loads(bytes(buffer[record.data_offset : record.data_offset + record.size]))
    except ValueError:
        raise CheckpointError(f"{path}: {record.name} is not valid JSON") from None


def _crc_with(
    buffer: mmap.mmap | bytes, record: ZipRecord, storages: dict[StorageRef, bytes]
) -> int:
    """CRC-32 of the member with each storage's bytes replaced, read in order without a copy."""
    crc, position = 0, record.data_offset
    with memoryview(buffer) as view:
        for storage in sorted(storages, key=lambda s: s.offset):
            crc = zlib.crc32(view[position : storage.offset], crc)
            crc = zlib.crc32(storages[storage], crc)
            position = storage.offset + storage.nbytes
        return zlib.crc32(view[position : record.data_offset + record.size], crc)


FORMAT = KerasZipFormat()
