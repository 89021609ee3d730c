"""Write a zip archive the way torch.save lays it out, so `zip_records` and torch both read it.

Every record is stored (not compressed) with its payload 64-byte aligned (padding in the local header's
extra field, as torch's writer does), so tensors can be memory-mapped and patched where they lie. The
CRC-32 is computed while the payload streams out and written in a data descriptor (flag 0x08) and the
central directory; a zip64 end record is always written, and zip64 fields wherever a size or an offset
needs them.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import BinaryIO

from lstm_surgeon.formats.zip_records import (
    CENTRAL_HEADER,
    DATA_DESCRIPTOR,
    END_OF_CENTRAL_DIRECTORY,
    FLAG_DATA_DESCRIPTOR,
    LOCAL_HEADER,
    STORED,
    ZIP64_END,
    ZIP64_EXTRA_ID,
    ZIP64_LOCATOR,
)

ALIGNMENT = 64
PADDING_EXTRA_ID = 0x4246  # "FB": the padding field torch's writer uses
DOS_DATE = (0 << 9) | (1 << 5) | 1  # 1980-01-01, torch's fixed timestamp
VERSION = 45  # zip64
FLAGS = FLAG_DATA_DESCRIPTOR | 0x800  # CRC and sizes after the data; names in UTF-8
SENTINEL_32 = 0xFFFFFFFF  # "see the zip64 field"
SENTINEL_16 = 0xFFFF
ZIP64_FROM = SENTINEL_32  # values from this one up go to zip64 fields


def _field_32(value: int) -> int:
    return value if value < ZIP64_FROM else SENTINEL_32


@dataclass(frozen=True)
class _Written:
    """What the central directory says of one record."""

    name: bytes
    header_offset: int
    size: int
    crc: int


class ZipWriter:
    """Append stored records to `out` (from its current position), then `close()` the directory."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.position = out.tell()
        self.written: list[_Written] = []

    def _write(self, data: bytes | memoryview) -> None:
        self.out.write(data)
        self.position += len(data)

    def add(self, name: str, chunks: Iterable[bytes | memoryview]) -> int:
        """Write one record from its payload's chunks; returns the payload's CRC-32."""
        raw_name = name.encode("utf-8")
        header_offset = self.position
        unpadded = header_offset + 30 + len(raw_name) + 4
        padding = -unpadded % ALIGNMENT
        extra = struct.pack("<HH", PADDING_EXTRA_ID, padding) + b"Z" * padding
        self._write(
            LOCAL_HEADER
            + struct.pack(
                "<HHHHHIIIHH",
                VERSION,
                FLAGS,
                STORED,
                0,
                DOS_DATE,
                0,
                0,
                0,
                len(raw_name),
                len(extra),
            )
            + raw_name
            + extra
        )
        crc, size = 0, 0
        for chunk in chunks:
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
            self._write(chunk)
        sizes = "<QQ" if size >= ZIP64_FROM else "<II"
        self._write(DATA_DESCRIPTOR + struct.pack("<I", crc) + struct.pack(sizes, size, size))
        self.written.append(_Written(raw_name, header_offset, size, crc))
        return crc

    def close(self) -> None:
        """Write the central directory, the zip64 end record and locator, and the end record."""
        directory_offset = self.position
        for record in self.written:
            self._write(_central_entry(record))
        directory_size = self.position - directory_offset
        zip64_end = self.position
        count = len(self.written)
        self._write(
            ZIP64_END
            + struct.pack(
                "<QHHIIQQQQ",
                44,
                VERSION,
                VERSION,
                0,
                0,
                count,
                count,
                directory_size,
                directory_offset,
            )
        )
        self._write(ZIP64_LOCATOR + struct.pack("<IQI", 0, zip64_end, 1))
        self._write(
            END_OF_CENTRAL_DIRECTORY
            + struct.pack(
                "<HHHHIIH",
                0,
                0,
                min(count, SENTINEL_16),
                min(count, SENTINEL_16),
                _field_32(directory_size),
                _field_32(directory_offset),
                0,
            )
        )


def _central_entry(record: _Written) -> bytes:
    """A central directory entry; sizes and offset that do not fit 32 bits go to a zip64 field."""
    large = [value for value in (record.size, record.size) if value >= ZIP64_FROM]
    if record.header_offset >= ZIP64_FROM:
        large.append(record.header_offset)
    extra = b""
    if large:
        extra = struct.pack(f"<HH{len(large)}Q", ZIP64_EXTRA_ID, 8 * len(large), *large)
    size = _field_32(record.size)
    return (
        CENTRAL_HEADER
        + struct.pack(
            "<HHHHHHIIIHHHHHII",
            VERSION,
            VERSION,
            FLAGS,
            STORED,
            0,
            DOS_DATE,
            record.crc,
            size,
            size,
            len(record.name),
            len(extra),
            0,
            0,
            0,
            0,
            _field_32(record.header_offset),
        )
        + record.name
        + extra
    )
