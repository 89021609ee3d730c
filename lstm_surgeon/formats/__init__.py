"""File formats: each module reads one format into the neutral `Checkpoint` model and writes it back.

Adding a format means one new module with the same verbs and one line in `FORMATS`.
"""

from __future__ import annotations

import mmap
import os
import stat
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Protocol

from lstm_surgeon.checkpoint import Buffer, Checkpoint, Contents, Entry, TensorRef, close_buffer
from lstm_surgeon.errors import CheckpointError
from lstm_surgeon.formats.identify import unreadable_message

if TYPE_CHECKING:
    from lstm_surgeon.checkpoint import OutputTensor, StorageRef
    from lstm_surgeon.writing import BytePatch, JournalEntry, Progress


class CheckpointFormat(Protocol):
    """The verbs every format module provides."""

    name: str
    suffixes: tuple[str, ...]

    def sniff(self, head: bytes) -> bool:
        """True when the file's first bytes say it is of this format."""

    def read(self, path: Path, buffer: Buffer) -> Checkpoint:
        """Parse and validate the file's structure; read no tensor data beyond what that needs."""

    def checksum_patches(
        self, checkpoint: Checkpoint, storages: dict[StorageRef, bytes]
    ) -> list[BytePatch]:
        """The checksum bytes to rewrite (each in its storage's file) when storages get these new
        bytes."""

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
    from lstm_surgeon.formats import onnx_format, safetensors_format, torch_zip

    return (safetensors_format.FORMAT, torch_zip.FORMAT, onnx_format.FORMAT)


def format_for_suffix(path: Path) -> CheckpointFormat | None:
    """The format an output path's suffix asks for (None when the suffix says nothing)."""
    for fmt in _formats():
        if path.suffix.lower() in fmt.suffixes:
            return fmt
    return None


def open_checkpoint(path: str | os.PathLike[str], *, ignore_journal: bool = False) -> Checkpoint:
    """Open a checkpoint of any supported format, detected by content, not by suffix.

    Reading never writes: the file is opened read-only and nothing else is created or locked. When
    an in-place edit of the file was killed (its journal lies beside it), the checkpoint is read as
    the rollback will leave it: the journal's old bytes overlay a private copy-on-write map, and
    the file on disk is untouched until an editing command (or `recover_interrupted_edit`) rolls it
    back. `ignore_journal` reads the bytes on disk as they are (for `check`)."""
    return open_checkpoint_files([path], ignore_journal=ignore_journal)


def open_checkpoint_files(
    paths: Sequence[str | os.PathLike[str]], *, ignore_journal: bool = False
) -> Checkpoint:
    """Open one checkpoint whose tensors lie in several files (shards), read-only: each file is
    read by its format and their tensors joined (see `join_checkpoints`); `path` is the first.

    The journals beside every file are read together, so an interrupted edit of several files
    reads as all old even when it was killed while removing its journals."""
    paths = [_location(path) for path in paths]
    if not paths:
        raise CheckpointError("no checkpoint file given")
    entries = () if ignore_journal else _journal_entries(paths)
    parts: list[Checkpoint] = []
    try:
        for path in paths:
            parts.append(_open_file(path, entries))
        return parts[0] if len(parts) == 1 else join_checkpoints(parts)
    except BaseException:
        for part in parts:
            part.close()
        raise


def _location(path: str | os.PathLike[str]) -> Path:
    """A local path, or a URL kept whole (`remote.RemoteLocation`), read by range requests."""
    from lstm_surgeon.remote import RemoteLocation, is_url

    return RemoteLocation(path) if is_url(path) else Path(path)  # type: ignore[return-value]


def join_checkpoints(parts: Sequence[Checkpoint]) -> Checkpoint:
    """One checkpoint made of single-file checkpoints of one format: each tensor keeps its bytes
    in its own file (its `StorageRef.file` becomes that file's index), names stay unique.

    Only files that stand alone can be joined for now (safetensors: each shard is a complete file
    of named tensors; a torch zip's object tree describes one file only)."""
    first = parts[0]
    _require_distinct(parts)
    tensors: dict[str, TensorRef] = {}
    for index, part in enumerate(parts):
        _require_joinable(first, part)
        for name, ref in part.tensors.items():
            if name in tensors:
                raise CheckpointError(f"{part.path}: tensor {name!r} is also in another file")
            tensors[name] = replace(ref, storage=replace(ref.storage, file=index))
    return Checkpoint(
        path=first.path,
        format=first.format,
        tensors=tensors,
        files=tuple(file for part in parts for file in part.files),
        contents=Contents(
            entries=tuple(Entry(name, "tensor") for name in tensors), metadata=first.metadata
        ),
        warnings=[warning for part in parts for warning in part.warnings],
    )


def _require_joinable(first: Checkpoint, part: Checkpoint) -> None:
    if part.format is not first.format or part.format_state is not None:
        raise CheckpointError(
            f"{part.path}: only safetensors files can form one checkpoint of several files for now"
        )


def _require_distinct(parts: Sequence[Checkpoint]) -> None:
    """One file given twice (under two names) would be locked twice by an edit, and its tensors
    counted twice."""
    seen: set[tuple[int, int]] = set()
    for part in parts:
        if not isinstance(part.path, Path):
            raise CheckpointError(f"{part.path}: a URL is read as a checkpoint of its own")
        info = os.stat(part.path)
        if (info.st_dev, info.st_ino) in seen:
            raise CheckpointError(f"{part.path}: is given twice")
        seen.add((info.st_dev, info.st_ino))


def _journal_entries(paths: list[Path]) -> tuple[JournalEntry, ...]:
    """Every entry of every journal beside these files (each file's own journal lists the files
    edited with it)."""
    from lstm_surgeon.writing import read_journal

    local = [path for path in paths if isinstance(path, Path)]  # a URL has no journal beside it
    return tuple(entry for path in local for entry in read_journal(path) or ())


def _open_file(path: Path, entries: tuple[JournalEntry, ...]) -> Checkpoint:
    buffer, pending = _map_file(path, entries) if isinstance(path, Path) else _remote(path)
    try:
        fmt = _sniff(path, buffer)
        checkpoint = fmt.read(path, buffer)
    except BaseException:
        close_buffer(buffer)
        raise
    if pending:
        checkpoint.files = (replace(checkpoint.files[0], pending_rollback=True),)
        checkpoint.warnings.append(f"{path}: {PENDING_ROLLBACK_NOTE.format(path=path)}")
    return checkpoint


PENDING_ROLLBACK_NOTE = (
    "an in-place edit of this file was interrupted; this shows the checkpoint as it was before "
    "that edit (run `lstm-surgeon recover {path}` or any editing command to roll the file back)"
)


def _sniff(path: Path, buffer: Buffer) -> CheckpointFormat:
    head = bytes(buffer[:64])
    for fmt in _formats():
        if fmt.sniff(head):
            return fmt
    raise CheckpointError(unreadable_message(path, buffer))


def _remote(location: object) -> tuple[Buffer, bool]:
    from lstm_surgeon.remote import open_remote

    return open_remote(str(location)), False


def _map_file(path: Path, entries: tuple[JournalEntry, ...]) -> tuple[Buffer, bool]:
    """A read-only map of the file, with the old bytes of an interrupted edit overlaid (in a
    private copy-on-write map); True when there was one to overlay."""
    require_regular_file(path)
    try:
        with open(path, "rb") as file:
            patches = _pending_patches(path, file.fileno(), entries)
            if not patches:
                return mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ), False
            buffer = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY)
    except PermissionError:
        raise CheckpointError(f"{path}: permission denied") from None
    except OSError as error:
        raise CheckpointError(f"{path}: cannot read: {error.strerror}") from None
    for patch in patches:
        buffer[patch.offset : patch.offset + len(patch.old)] = patch.old
    return buffer, True


def _pending_patches(path: Path, fd: int, entries: tuple[JournalEntry, ...]) -> list[BytePatch]:
    """The old bytes to show instead of the file's, from the journal entries of this very file;
    a journal beside it that does not fit it (the file changed since) is an error."""
    from lstm_surgeon.writing import absolute, stale_journal

    own = [entry for entry in entries if entry.path == absolute(path)]
    if any(not entry.is_file(fd) for entry in own):
        raise stale_journal(path)
    mine = [entry for entry in entries if entry.is_file(fd)]
    if any(not entry.fits(fd) for entry in mine):
        raise stale_journal(path)
    return [patch for entry in mine[:1] for patch in entry.patches]


def require_regular_file(path: Path) -> None:
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
