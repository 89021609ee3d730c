"""Safe file writing: atomic outputs, kernel-side copies, in-place patches that survive `kill -9`.

- A new file is written to a temporary file in the destination's folder, given the source's mode, then
  renamed over the destination: readers (and a killed run) see the old file or the new one, never a
  mix. Replacing the input (`--in-place`) or asking for `--fsync` also fsyncs the file and the folder
  first, so the result survives a power loss too; a plain `-o` skips that, as `cp` does.
- The bulk of an unchanged checkpoint is copied by the kernel (`copy_file_range`, else `sendfile`).
- An in-place patch first writes the original bytes of every region it will touch to a journal next to
  the file (fsynced), then patches, fsyncs and deletes the journal. A run that finds a journal rolls
  the file back to the old checkpoint. An exclusive `flock` keeps two editors of one file apart.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import signal
import stat
import struct
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from lstm_surgeon.errors import CheckpointError, EditError, OutputError

Progress = Callable[[int], None]  # called with the number of bytes just done
JOURNAL_MAGIC = b"lstm-surgeon journal 2\n"
LOCK_WAIT_SECONDS = 60.0
COPY_CHUNK = 1 << 26


FAULT_VARIABLE = "LSTM_SURGEON_FAULT"


def fault_point(name: str) -> None:
    """Kill this process at a named step when the tests ask for it (LSTM_SURGEON_FAULT=<name>), to prove
    that a crash at that step leaves the old or the new checkpoint behind."""
    if os.environ.get(FAULT_VARIABLE) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def journal_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.lstm-surgeon-journal")


def check_output_path(output: Path, source: Path, force: bool) -> None:
    """Refuse outputs that would lose data: the input itself, a non-regular file, an existing file."""
    try:
        info = output.stat()
    except FileNotFoundError:
        if not output.parent.is_dir():
            raise OutputError(f"{output}: the folder {output.parent} does not exist") from None
        return
    if not stat.S_ISREG(info.st_mode):
        raise OutputError(f"{output}: exists and is not a regular file; choose another output path")
    if output.resolve() == source.resolve() or os.path.samefile(output, source):
        raise OutputError(f"{output}: is the input file; use --in-place to edit it")
    if not force:
        raise OutputError(f"{output}: already exists; pass --force to overwrite it")


@contextlib.contextmanager
def atomic_output(destination: Path, mode: int, durable: bool = True) -> Iterator[BinaryIO]:
    """A temporary file that becomes `destination` (with `mode`) only if the block succeeds;
    `durable` fsyncs it before the rename (and the folder after)."""
    folder = destination.parent
    try:
        handle, temp_name = tempfile.mkstemp(
            prefix=f".{destination.name}.", suffix=".lstm-surgeon-tmp", dir=folder
        )
    except OSError as error:
        raise OutputError(f"{destination}: cannot write in {folder}: {error.strerror}") from None
    temp = Path(temp_name)
    try:
        with os.fdopen(handle, "w+b") as file:
            yield file
            file.flush()
            if durable:
                os.fsync(file.fileno())
            os.fchmod(file.fileno(), stat.S_IMODE(mode))
        os.replace(temp, destination)
        if durable:
            fsync_folder(folder)
    except OSError as error:
        temp.unlink(missing_ok=True)
        raise OutputError(f"{destination}: cannot write: {error.strerror or error}") from None
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def fsync_folder(folder: Path) -> None:
    """Make a rename or unlink in `folder` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def copy_file(
    source: BinaryIO, destination: BinaryIO, size: int, progress: Progress | None = None
) -> None:
    """Copy `size` bytes from the start of `source` to `destination` inside the kernel where possible."""
    source_fd, destination_fd = source.fileno(), destination.fileno()
    done = 0
    copy = _kernel_copy()
    while done < size:
        step = min(COPY_CHUNK, size - done)
        try:
            copied = copy(source_fd, destination_fd, step, done)
        except OSError as error:
            if error.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            copy = _user_copy
            continue
        if copied == 0:
            raise OSError(errno.EIO, "the input file shrank while it was being copied")
        done += copied
        if progress is not None:
            progress(copied)


def _kernel_copy() -> Callable[[int, int, int, int], int]:
    if hasattr(os, "copy_file_range"):
        return lambda src, dst, count, offset: os.copy_file_range(src, dst, count, offset, offset)
    if hasattr(os, "sendfile"):
        return _sendfile_copy
    return _user_copy


def _sendfile_copy(source_fd: int, destination_fd: int, count: int, offset: int) -> int:
    os.lseek(destination_fd, offset, os.SEEK_SET)
    return os.sendfile(destination_fd, source_fd, offset, count)


def _user_copy(source_fd: int, destination_fd: int, count: int, offset: int) -> int:
    data = os.pread(source_fd, min(count, 1 << 22), offset)
    return os.pwrite(destination_fd, data, offset)


# --- Locking ----------------------------------------------------------------------------------


@contextlib.contextmanager
def exclusive_lock(path: Path, wait_seconds: float = LOCK_WAIT_SECONDS) -> Iterator[BinaryIO]:
    """Hold an exclusive lock on the file at `path` (waiting for another editor to finish)."""
    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            file = open(path, "r+b")  # noqa: SIM115 - closed below, after the lock is released
        except PermissionError:
            raise OutputError(f"{path}: permission denied; cannot edit it in place") from None
        except OSError as error:
            raise OutputError(f"{path}: cannot open for editing: {error.strerror}") from None
        if _try_lock(file, deadline) and _still_same_file(file, path):
            break
        file.close()
        if time.monotonic() >= deadline:
            raise EditError(f"{path}: another lstm-surgeon is editing this file; try again later")
    try:
        yield file
    finally:
        fcntl.flock(file.fileno(), fcntl.LOCK_UN)
        file.close()


def _try_lock(file: BinaryIO, deadline: float) -> bool:
    while True:
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)


def _still_same_file(file: BinaryIO, path: Path) -> bool:
    """False when the path was replaced (renamed over) while we waited for the lock."""
    try:
        return os.path.samestat(os.fstat(file.fileno()), os.stat(path))
    except FileNotFoundError:
        return False


# --- The journal of an in-place patch ---------------------------------------------------------


@dataclass(frozen=True)
class BytePatch:
    """Bytes to write at an offset of the file, with the bytes they replace."""

    offset: int
    old: bytes
    new: bytes


def write_patches(file: BinaryIO, patches: list[BytePatch]) -> None:
    for patch in patches:
        os.pwrite(file.fileno(), patch.new, patch.offset)


def write_journal(path: Path, file: BinaryIO, patches: list[BytePatch]) -> Path:
    """Save, durably and next to `path`, which file is being patched and the old and new bytes of
    every patch: enough to roll the file back, and to tell whether the journal still fits it."""
    info = os.fstat(file.fileno())
    body = bytearray(JOURNAL_MAGIC)
    body += struct.pack("<QQQI", info.st_dev, info.st_ino, info.st_size, len(patches))
    for patch in patches:
        body += struct.pack("<QQ", patch.offset, len(patch.old)) + patch.old + patch.new
    body += hashlib.sha256(body).digest()
    journal = journal_path(path)
    try:
        with open(journal, "wb") as out:
            out.write(body)
            out.flush()
            os.fsync(out.fileno())
        fsync_folder(path.parent)
    except BaseException:
        journal.unlink(missing_ok=True)  # the file was not touched yet: nothing to roll back
        raise
    return journal


def finish_journal(path: Path) -> None:
    """The patch is durable: the journal is no longer needed."""
    journal_path(path).unlink(missing_ok=True)
    fsync_folder(path.parent)


def roll_back(path: Path, file: BinaryIO) -> bool:
    """Undo an interrupted patch of `file` using its journal; True if something was rolled back.

    An incomplete journal (the run died while writing it) means the file was not touched yet: it
    is removed. A complete one is applied only if it fits the file: same file (device, inode,
    size) and every patched region still holding its old or its new bytes; otherwise the file has
    changed since, and nothing is written. The caller holds the exclusive lock."""
    journal = journal_path(path)
    try:
        body = journal.read_bytes()
    except FileNotFoundError:
        return False
    parsed = _parse_journal(body)
    if parsed is None:
        finish_journal(path)
        return False
    identity, patches = parsed
    if not _journal_fits(file, identity, patches):
        raise CheckpointError(
            f"{path}: the journal {journal.name} of an interrupted in-place edit does not match "
            "this file (it changed since); nothing was rolled back. If `lstm-surgeon check` finds "
            "the file sound, delete the journal"
        )
    for patch in patches:
        os.pwrite(file.fileno(), patch.old, patch.offset)
    os.fsync(file.fileno())
    finish_journal(path)
    return True


def _journal_fits(file: BinaryIO, identity: tuple[int, int, int], patches: list[BytePatch]) -> bool:
    info = os.fstat(file.fileno())
    if (info.st_dev, info.st_ino, info.st_size) != identity:
        return False
    for patch in patches:
        current = os.pread(file.fileno(), len(patch.old), patch.offset)
        if current not in (patch.old, patch.new):
            return False
    return True


def _parse_journal(body: bytes) -> tuple[tuple[int, int, int], list[BytePatch]] | None:
    header = len(JOURNAL_MAGIC) + 28
    if len(body) < header + 32 or not body.startswith(JOURNAL_MAGIC):
        return None
    if hashlib.sha256(body[:-32]).digest() != body[-32:]:
        return None
    device, inode, size, count = struct.unpack_from("<QQQI", body, len(JOURNAL_MAGIC))
    position, patches = header, []
    for _ in range(count):
        offset, length = struct.unpack_from("<QQ", body, position)
        position += 16
        old = body[position : position + length]
        new = body[position + length : position + 2 * length]
        patches.append(BytePatch(offset, old, new))
        position += 2 * length
    return (device, inode, size), patches


def recover_interrupted_edit(path: Path) -> bool:
    """If an in-place edit of `path` was killed, roll the file back to the old checkpoint."""
    if not journal_path(path).exists():
        return False
    try:
        with exclusive_lock(path) as file:
            return roll_back(path, file)
    except OutputError:
        raise CheckpointError(
            f"{path}: an in-place edit of this file was interrupted; run lstm-surgeon once as a "
            "user who can write the file (and its folder) to roll it back"
        ) from None


def backup_copy(path: Path, force: bool) -> Path:
    """Copy `path` to `path.bak` atomically (refusing to overwrite an old backup without force)."""
    backup = path.with_name(path.name + ".bak")
    check_output_path(backup, path, force)
    with open(path, "rb") as source, atomic_output(backup, path.stat().st_mode) as out:
        copy_file(source, out, os.fstat(source.fileno()).st_size)
    return backup
