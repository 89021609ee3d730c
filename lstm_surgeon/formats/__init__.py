"""File formats: each module reads one format into the neutral `Checkpoint` model and writes it back.

Adding a format means one new module with the same verbs and one line in `FORMATS`.
"""

from __future__ import annotations

import mmap
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Protocol

from lstm_surgeon.errors import CheckpointError
from lstm_surgeon.formats.identify import unreadable_message

if TYPE_CHECKING:
    from lstm_surgeon.checkpoint import Checkpoint, OutputTensor
    from lstm_surgeon.writing import BytePatch, Progress


class CheckpointFormat(Protocol):
    """The verbs every format module provides."""

    name: str
    suffixes: tuple[str, ...]

    def sniff(self, head: bytes) -> bool:
        """True when the file's first bytes say it is of this format."""

    def read(self, path: Path, buffer: mmap.mmap | bytes) -> Checkpoint:
        """Parse and validate the file's structure; read no tensor data beyond what that needs."""

    def checksum_patches(
        self, checkpoint: Checkpoint, storages: dict[str, bytes]
    ) -> list[BytePatch]:
        """The checksum bytes to rewrite when storages (by key) get these new bytes."""

    def checksum_problems(
        self, checkpoint: Checkpoint, progress: Progress | None
    ) -> tuple[int, list[str]]:
        """How many records carry a checksum, and each one that does not match the bytes it covers
        (this reads the whole file)."""

    def write(
        self,
        out: BinaryIO,
        tensors: list[OutputTensor],
        source: Checkpoint,
        drop_keys: frozenset[str] = frozenset(),
    ) -> None:
        """Write a new file holding `tensors` in this order, keeping everything else of `source` that
        the format can carry (metadata, containers, key order), less the top-level `drop_keys`."""


def _formats() -> tuple[CheckpointFormat, ...]:
    from lstm_surgeon.formats import safetensors_format, torch_zip

    return (safetensors_format.FORMAT, torch_zip.FORMAT)


def format_for_suffix(path: Path) -> CheckpointFormat | None:
    """The format an output path's suffix asks for (None when the suffix says nothing)."""
    for fmt in _formats():
        if path.suffix.lower() in fmt.suffixes:
            return fmt
    return None


def open_checkpoint(path: str | os.PathLike[str], recover: bool = True) -> Checkpoint:
    """Open a checkpoint of any supported format, detected by content, not by suffix.

    If an in-place edit of the file was killed, the file is first rolled back to the old checkpoint
    (`recover=False` is for callers that already hold the edit lock and did that themselves)."""
    path = Path(path)
    if recover and path.is_file():
        from lstm_surgeon.writing import recover_interrupted_edit

        recover_interrupted_edit(path)
    buffer = _map_file(path)
    head = bytes(buffer[:64])
    for fmt in _formats():
        if fmt.sniff(head):
            try:
                return fmt.read(path, buffer)
            except BaseException:
                _close(buffer)
                raise
    message = unreadable_message(path, buffer)
    _close(buffer)
    raise CheckpointError(message)


def _map_file(path: Path) -> mmap.mmap | bytes:
    try:
        info = path.stat()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except OSError as error:
        raise CheckpointError(f"{path}: cannot read: {error.strerror}") from None
    if stat.S_ISDIR(info.st_mode):
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file")
    if not stat.S_ISREG(info.st_mode):
        raise CheckpointError(f"{path}: not a regular file")
    if info.st_size == 0:
        raise CheckpointError(f"{path}: the file is empty")
    try:
        with open(path, "rb") as file:
            return mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
    except PermissionError:
        raise CheckpointError(f"{path}: permission denied") from None
    except OSError as error:
        raise CheckpointError(f"{path}: cannot read: {error.strerror}") from None


def _close(buffer: mmap.mmap | bytes) -> None:
    if isinstance(buffer, mmap.mmap):
        buffer.close()
