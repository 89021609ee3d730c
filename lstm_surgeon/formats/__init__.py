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

from lstm_surgeon.checkpoint import (
    Buffer,
    Checkpoint,
    CheckpointFile,
    Contents,
    Entry,
    TensorRef,
    close_buffer,
)
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
    from lstm_surgeon.formats import (
        hdf5_format,
        keras_zip,
        numpy_format,
        numpy_pickle,
        onnx_format,
        pt2,
        safetensors_format,
        torch_legacy,
        torch_zip,
        torchscript,
    )

    return (
        safetensors_format.FORMAT,
        keras_zip.FORMAT,  # before torch.save's zips: it claims only Keras 3 archives
        numpy_format.NPZ_FORMAT,  # before torch.save's zips: it claims only zips of .npy members
        torch_zip.FORMAT,
        torchscript.FORMAT,
        pt2.FORMAT,
        torch_legacy.FORMAT,
        onnx_format.FORMAT,
        hdf5_format.FORMAT,
        numpy_format.NPY_FORMAT,
        numpy_pickle.FORMAT,  # after pre-1.6 torch.save, which also opens with a pickle
    )


class FolderFormat(Protocol):
    """A checkpoint that is a folder of files described by one of them (an index, a `.metadata`):
    the verbs `open_checkpoint`, the editing commands and `check` need beyond `CheckpointFormat`."""

    name: str

    def claims(self, path: Path) -> bool:
        """True when `path` (a folder, or the file that describes one) is of this kind."""

    def data_files(self, path: Path) -> list[Path]:
        """The files that hold tensor bytes (what an in-place edit locks, journals and patches)."""

    def open(self, path: Path, *, ignore_journal: bool = False) -> Checkpoint:
        """The whole folder as one checkpoint; any disagreement between its files is an error."""

    def structure_problems(self, path: Path) -> list[str]:
        """Every disagreement between the folder's files (missing, truncated, mismatched), each
        naming the file and tensor; [] when the folder opens as one checkpoint."""


def _folder_formats() -> tuple[FolderFormat, ...]:
    from lstm_surgeon.formats import dcp, sharded

    return (dcp.FOLDER, sharded.FOLDER)


def folder_format(path: str | os.PathLike[str]) -> FolderFormat | None:
    """The folder kind `path` names (a folder, an index file, a `.metadata`), or None for a file
    that is a checkpoint by itself."""
    for fmt in _folder_formats():
        if fmt.claims(Path(path)):
            return fmt
    return None


def checkpoint_files(paths: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """The files that hold the tensor bytes of the checkpoint these paths name."""
    found: list[Path] = []
    for path in map(Path, paths):
        folder = folder_format(path)
        found += [path] if folder is None else folder.data_files(path)
    return found


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
    if len(paths) == 1 and (folder := folder_format(paths[0])) is not None:
        return folder.open(paths[0], ignore_journal=ignore_journal)
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

    Its format is a `JoinedFormat` over the parts' own: checksums are kept by each part's format
    (a torch.save shard's CRC-32s), so safetensors and torch.save shards join alike."""
    from lstm_surgeon.formats.sharded import JoinedFormat

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
        format=JoinedFormat(first.format),
        tensors=tensors,
        files=tuple(file for part in parts for file in part.files),
        contents=Contents(
            entries=tuple(Entry(name, "tensor") for name in tensors), metadata=first.metadata
        ),
        format_state=tuple(parts),
        warnings=[warning for part in parts for warning in part.warnings],
    )


def _require_joinable(first: Checkpoint, part: Checkpoint) -> None:
    if part.format is not first.format:
        raise CheckpointError(
            f"{part.path}: is a {part.format.name} file and {first.path} a {first.format.name} "
            "file; the files of one checkpoint must be of one format"
        )
    others = [entry.key for entry in part.contents.entries if entry.kind != "tensor"]
    if others:
        raise CheckpointError(
            f"{part.path}: holds {others[0]!r} besides tensors; only plain state dicts (as "
            "shards are) form one checkpoint of several files"
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


def map_files(paths: Sequence[Path], *, ignore_journal: bool = False) -> tuple[CheckpointFile, ...]:
    """Read-only maps of files whose format is described elsewhere (a DCP folder's `.distcp`
    files), with the old bytes of an interrupted edit overlaid as `open_checkpoint_files` does."""
    entries = () if ignore_journal else _journal_entries(list(paths))
    files: list[CheckpointFile] = []
    try:
        for path in paths:
            buffer, pending = _map_file(path, entries)
            files.append(CheckpointFile(path, buffer, pending))
    except BaseException:
        for file in files:
            close_buffer(file.buffer)
        raise
    return tuple(files)


def pending_rollback_warning(path: Path) -> str:
    return f"{path}: {PENDING_ROLLBACK_NOTE.format(path=path)}"


def _open_file(path: Path, entries: tuple[JournalEntry, ...]) -> Checkpoint:
    buffer, pending = _map_file(path, entries) if isinstance(path, Path) else _remote(path)
    try:
        fmt = _sniff(path, buffer)
        checkpoint = fmt.read(path, buffer)
    except BaseException:
        close_buffer(buffer)
        raise
    if pending:
        checkpoint.files = (
            replace(checkpoint.files[0], pending_rollback=True),
            *checkpoint.files[1:],
        )
        checkpoint.warnings.append(pending_rollback_warning(path))
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
