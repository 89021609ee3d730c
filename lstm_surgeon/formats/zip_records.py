"""A strict reader of the zip container that torch.save writes, for patching records where they lie.

Python's `zipfile` hides what a patcher needs: where each record's bytes start and every place its CRC-32
is stored (local header, data descriptor, central directory). This reader finds them and refuses what
lstm-surgeon cannot patch safely: compressed records, records out of bounds, inconsistent sizes.
"""

from __future__ import annotations

import mmap
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lstm_surgeon.checkpoint import byte_range
from lstm_surgeon.errors import CheckpointError
from lstm_surgeon.writing import BytePatch

if TYPE_CHECKING:
    from lstm_surgeon.checkpoint import Checkpoint, StorageRef
    from lstm_surgeon.writing import Progress

LOCAL_HEADER = b"PK\x03\x04"
CENTRAL_HEADER = b"PK\x01\x02"
END_OF_CENTRAL_DIRECTORY = b"PK\x05\x06"
ZIP64_END = b"PK\x06\x06"
ZIP64_LOCATOR = b"PK\x06\x07"
DATA_DESCRIPTOR = b"PK\x07\x08"
ZIP64_EXTRA_ID = 0x0001
STORED = 0
DEFLATED = 8
FLAG_DATA_DESCRIPTOR = 0x08
MAX_COMMENT = 0xFFFF


@dataclass(frozen=True)
class ZipRecord:
    """One record of the archive: where its bytes lie and where its CRC-32 is written."""

    name: str
    data_offset: int
    size: int
    crc: int
    crc_offsets: tuple[int, ...]  # every file offset holding this record's CRC-32
    stored: bool = True  # False: compressed, so its bytes cannot be read or patched in place
    method: int = STORED
    compressed_size: int = -1  # the bytes it takes in the file (its size when stored)

    @property
    def checkable(self) -> bool:
        """Stored or deflated: the compression methods whose CRC-32 can be checked."""
        return self.stored or self.method == DEFLATED

    def check_crc(self, buffer: mmap.mmap | bytes) -> bool:
        if self.stored:
            return crc32_of(buffer, self.data_offset, self.size) == self.crc
        return inflated_crc32(buffer, self) == (self.crc, self.size)


def inflated_crc32(
    buffer: mmap.mmap | bytes, record: ZipRecord, chunk: int = 1 << 20
) -> tuple[int, int] | None:
    """CRC-32 and length of a deflated record's inflated bytes, inflated in bounded chunks (a
    record that claims a small size and inflates to gigabytes is stopped past its size), or None
    when the data is not a valid deflate stream."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    crc, produced = 0, 0
    view = memoryview(buffer)[record.data_offset : record.data_offset + record.compressed_size]
    try:
        pending = view
        while pending and produced <= record.size:
            out = inflater.decompress(pending, chunk)
            crc, produced = zlib.crc32(out, crc), produced + len(out)
            pending = inflater.unconsumed_tail
        if produced <= record.size:
            out = inflater.flush()
            crc, produced = zlib.crc32(out, crc), produced + len(out)
    except zlib.error:
        return None
    finally:
        view.release()
    return crc, produced


def crc_patches(
    checkpoint: Checkpoint, records: dict[str, ZipRecord], storages: dict[StorageRef, bytes]
) -> list[BytePatch]:
    """The new CRC-32 of each patched record (a storage's key is its record's name), everywhere
    the zip stores it, in the storage's file."""
    patches = []
    for storage, data in storages.items():
        crc = struct.pack("<I", zlib.crc32(data))
        buffer = checkpoint.files[storage.file].buffer
        for offset in records[storage.key].crc_offsets:
            old = bytes(buffer[offset : offset + 4])
            patches.append(BytePatch(offset, old, crc, storage.file))
    return patches


def crc_problems(
    checkpoint: Checkpoint, records: dict[str, ZipRecord], progress: Progress | None
) -> tuple[int, list[str]]:
    """How many records the archive has, and each whose CRC-32 does not match its bytes (stored
    and deflated records are checked; other compression methods are named as unchecked)."""
    problems = []
    for record in records.values():
        if not record.checkable:
            problems.append(f"zip record {record.name}: compressed, so not checked")
        elif not record.check_crc(checkpoint.buffer):
            problems.append(f"zip record {record.name}: CRC-32 mismatch (corrupt data)")
        if progress is not None:
            progress(record.size)
    return len(records), problems


def crc32_of(buffer: mmap.mmap | bytes, offset: int, size: int, chunk: int = 1 << 24) -> int:
    """CRC-32 of a byte range, in chunks so a large storage is never copied whole."""
    crc = 0
    for start in range(offset, offset + size, chunk):
        crc = zlib.crc32(byte_range(buffer, start, min(chunk, offset + size - start)), crc)
    return crc


def require_stored(path: Path, record: ZipRecord) -> ZipRecord:
    """The record, if its bytes lie uncompressed in the file (as torch.save writes them)."""
    if not record.stored:
        raise CheckpointError(
            f"{path}: zip record {record.name!r} is compressed; torch.save writes stored records only"
        )
    return record


ReadAt = Callable[[int, int], bytes]  # (offset, size) -> the bytes there (fewer at the end of file)


def read_records(
    path: Path, buffer: mmap.mmap | bytes, read_at: ReadAt | None = None
) -> dict[str, ZipRecord]:
    """Every record of the archive, by name, in central-directory order.

    The local headers are spread over the whole file; `read_at` (an `os.pread`, say) reads them
    without touching the memory map, whose every touch can map a large page-cache block."""
    read_at = read_at or (lambda offset, size: bytes(buffer[offset : offset + size]))
    directory_offset, count = _find_central_directory(path, buffer)
    records: dict[str, ZipRecord] = {}
    position = directory_offset
    for _ in range(count):
        record, position = _read_central_entry(path, buffer, read_at, position)
        if record.name in records:
            raise CheckpointError(f"{path}: the zip archive holds {record.name!r} twice")
        records[record.name] = record
    return records


def _unpack(path: Path, fmt: str, buffer: mmap.mmap | bytes, offset: int) -> tuple[int, ...]:
    """Unpack from a slice, so that `buffer` may also be a window onto a zip archive embedded in a
    larger file (a DCP item): anything with `len`, slicing and `rfind`."""
    size = struct.calcsize(fmt)
    if offset < 0 or offset + size > len(buffer):
        raise CheckpointError(f"{path}: truncated or corrupt zip archive")
    return struct.unpack(fmt, bytes(buffer[offset : offset + size]))


def _find_central_directory(path: Path, buffer: mmap.mmap | bytes) -> tuple[int, int]:
    size = len(buffer)
    search_from = max(0, size - 22 - MAX_COMMENT)
    end = buffer.rfind(END_OF_CENTRAL_DIRECTORY, search_from)
    if end < 0 or end + 22 > size:
        raise CheckpointError(f"{path}: truncated zip archive (no end of central directory)")
    count, _, directory_offset = _unpack(path, "<HII", buffer, end + 10)
    locator = end - 20
    if locator >= 0 and buffer[locator : locator + 4] == ZIP64_LOCATOR:
        (zip64_end,) = _unpack(path, "<Q", buffer, locator + 8)
        if buffer[zip64_end : zip64_end + 4] != ZIP64_END:
            raise CheckpointError(f"{path}: corrupt zip archive (bad zip64 end record)")
        count, _, directory_offset = _unpack(path, "<QQQ", buffer, zip64_end + 32)
    if directory_offset > size:
        raise CheckpointError(f"{path}: truncated or corrupt zip archive (directory out of bounds)")
    return directory_offset, count


@dataclass(frozen=True)
class _CentralEntry:
    """What the central directory says of a record (to check its local header against)."""

    raw_name: bytes
    flags: int
    method: int
    crc: int
    compressed: int

    @property
    def name(self) -> str:
        return self.raw_name.decode("utf-8", "replace")


def _read_central_entry(
    path: Path, buffer: mmap.mmap | bytes, read_at: ReadAt, position: int
) -> tuple[ZipRecord, int]:
    if buffer[position : position + 4] != CENTRAL_HEADER:
        raise CheckpointError(f"{path}: corrupt zip archive (bad central directory entry)")
    (flags, method, crc, compressed, size, name_len, extra_len, comment_len) = _unpack(
        path, "<HH4xIIIHHH", buffer, position + 8
    )
    (local_offset,) = _unpack(path, "<I", buffer, position + 42)
    raw_name = bytes(buffer[position + 46 : position + 46 + name_len])
    name = raw_name.decode("utf-8", "replace")
    extra = bytes(buffer[position + 46 + name_len : position + 46 + name_len + extra_len])
    central = _CentralEntry(raw_name, flags, method, crc, compressed)
    size, compressed, local_offset = _apply_zip64(extra, size, compressed, local_offset)
    stored = method == STORED and compressed == size
    data_offset, local_crc_offset = _local_data_offset(path, read_at, local_offset, central)
    if data_offset + compressed > len(buffer):
        raise CheckpointError(f"{path}: truncated zip archive (record {name!r} runs past the end)")
    crc_offsets = [position + 16]
    if flags & FLAG_DATA_DESCRIPTOR:
        crc_offsets.append(_descriptor_crc_offset(path, read_at, data_offset + compressed))
    else:
        crc_offsets.append(local_crc_offset)
    record = ZipRecord(name, data_offset, size, crc, tuple(crc_offsets), stored, method, compressed)
    return record, position + 46 + name_len + extra_len + comment_len


def _apply_zip64(extra: bytes, size: int, compressed: int, offset: int) -> tuple[int, int, int]:
    """Replace 0xFFFFFFFF fields by their 64-bit values from the zip64 extra field."""
    position = 0
    while position + 4 <= len(extra):
        field_id, field_len = struct.unpack_from("<HH", extra, position)
        body = extra[position + 4 : position + 4 + field_len]
        if field_id == ZIP64_EXTRA_ID:
            values = list(struct.unpack_from(f"<{len(body) // 8}Q", body))
            if size == 0xFFFFFFFF and values:
                size = values.pop(0)
            if compressed == 0xFFFFFFFF and values:
                compressed = values.pop(0)
            if offset == 0xFFFFFFFF and values:
                offset = values.pop(0)
        position += 4 + field_len
    return size, compressed, offset


def _local_data_offset(
    path: Path, read_at: ReadAt, offset: int, central: _CentralEntry
) -> tuple[int, int]:
    """Where the record's data starts (and where the local header keeps its CRC), after checking
    that the local header agrees with the central directory: a flipped bit in either would
    otherwise shift the record silently."""
    header = read_at(offset, 30)
    if len(header) < 30 or header[:4] != LOCAL_HEADER:
        raise CheckpointError(f"{path}: corrupt zip archive (no local header for {central.name!r})")
    method, crc, compressed, name_len, extra_len = struct.unpack_from("<8xH4xII4xHH", header)
    name = read_at(offset + 30, name_len)
    extra = read_at(offset + 30 + name_len, extra_len)
    sizes_agree = central.flags & FLAG_DATA_DESCRIPTOR or (
        crc == central.crc and compressed in (central.compressed, 0xFFFFFFFF)
    )
    if (
        name != central.raw_name
        or method != central.method
        or len(extra) != extra_len
        or not _extra_fields_fill(extra)
        or not sizes_agree
    ):
        raise CheckpointError(
            f"{path}: corrupt zip archive (the local header of {central.name!r} disagrees with "
            "the central directory)"
        )
    return offset + 30 + name_len + extra_len, offset + 14


def _extra_fields_fill(extra: bytes) -> bool:
    """True when the extra field is a run of (id, length, data) records that fills it exactly."""
    position = 0
    while position + 4 <= len(extra):
        (length,) = struct.unpack_from("<H", extra, position + 2)
        position += 4 + length
    return position == len(extra)


def _descriptor_crc_offset(path: Path, read_at: ReadAt, offset: int) -> int:
    descriptor = read_at(offset, 8)
    if descriptor[:4] == DATA_DESCRIPTOR:
        offset, descriptor = offset + 4, descriptor[4:]
    if len(descriptor) < 4:
        raise CheckpointError(f"{path}: truncated zip archive (no data descriptor)")
    return offset
