"""Safe file writing: atomic outputs, kernel-side copies, in-place patches that survive `kill -9`.

- A new file is written to a temporary file in the destination's folder, given the source's mode, then
  renamed over the destination: readers (and a killed run) see the old file or the new one, never a
  mix. Replacing the input (`--in-place`) or asking for `--fsync` also fsyncs the file and the folder
  first, so the result survives a power loss too; a plain `-o` skips that, as `cp` does.
- The bulk of an unchanged checkpoint is copied by the kernel (`copy_file_range`, else `sendfile`).
- An in-place patch first writes the original bytes of every region it will touch to a journal next to
  each file it touches (fsynced), then patches, fsyncs and deletes the journals. An editing run (or
  `recover_interrupted_edit`) that finds a journal rolls every file back to the old checkpoint; a
  reading run only reads the checkpoint as that rollback would leave it (`formats.open_checkpoint`).
  Exclusive `flock`s, taken in one fixed order, keep two editors of one file apart.
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
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from lstm_surgeon.errors import CheckpointError, EditError, OutputError

Progress = Callable[[int], None]  # called with the number of bytes just done
JOURNAL_MAGIC = b"lstm-surgeon journal 3\n"  # one edit of one or more files
JOURNAL_MAGIC_SINGLE_FILE = (
    b"lstm-surgeon journal 2\n"  # left by earlier versions: still rolled back
)
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


Held = dict[Path, BinaryIO]  # locked files by absolute path


@contextlib.contextmanager
def exclusive_locks(paths: Iterable[Path]) -> Iterator[Held]:
    """Hold the locks of several files, taken in one fixed order (sorted absolute paths) so that
    two editors of overlapping sets of files cannot each wait for the other."""
    with contextlib.ExitStack() as stack:
        held: Held = {}
        for path in sorted({absolute(path) for path in paths}, key=str):
            held[path] = stack.enter_context(exclusive_lock(path))
        yield held


def absolute(path: Path) -> Path:
    """The path as journals and locks name it: absolute, without `..`, symbolic links kept."""
    return Path(os.path.abspath(path))


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
#
# An in-place edit of several files is all-or-nothing. Every file touched gets a journal beside it
# that lists *every* file's identity and old and new bytes; all journals are durable before the
# first file is touched, and they are removed only after every file is patched and fsynced. A
# journal left behind (by `kill -9` at any moment) therefore means: roll back every file it lists.
# Removing the journals one by one is safe too: while one is left, recovery rolls every file back.


@dataclass(frozen=True)
class BytePatch:
    """Bytes to write at an offset of one file of the checkpoint, with the bytes they replace."""

    offset: int
    old: bytes
    new: bytes
    file: int = 0  # index into `Checkpoint.files`


Identity = tuple[int, int, int]  # device, inode, size: which file a journal was written for


@dataclass(frozen=True)
class JournalEntry:
    """One file of an in-place edit: its path, which file it was, and the patches it gets."""

    path: Path  # absolute
    identity: Identity
    patches: tuple[BytePatch, ...]

    def fits(self, fd: int) -> bool:
        """True when the file open at `fd` is the journaled one and every patched region holds
        its old or its new bytes (a file changed since must never be 'rolled back')."""
        info = os.fstat(fd)
        if (info.st_dev, info.st_ino, info.st_size) != self.identity:
            return False
        return all(
            os.pread(fd, len(patch.old), patch.offset) in (patch.old, patch.new)
            for patch in self.patches
        )

    def is_file(self, fd: int) -> bool:
        info = os.fstat(fd)
        return (info.st_dev, info.st_ino) == self.identity[:2]


class StaleJournalError(CheckpointError):
    """A journal beside the file no longer fits it: rolling back would corrupt the file."""


def entry_for(path: Path, file: BinaryIO, patches: list[BytePatch]) -> JournalEntry:
    info = os.fstat(file.fileno())
    return JournalEntry(absolute(path), (info.st_dev, info.st_ino, info.st_size), tuple(patches))


def encode_journal(folder: Path, entries: list[JournalEntry]) -> bytes:
    """A journal to store in `folder`: paths relative to it (a moved folder keeps working)."""
    body = bytearray(JOURNAL_MAGIC)
    body += struct.pack("<I", len(entries))
    for entry in entries:
        name = os.fsencode(os.path.relpath(entry.path, folder))
        body += struct.pack("<H", len(name)) + name
        body += struct.pack("<QQQI", *entry.identity, len(entry.patches))
        for patch in entry.patches:
            body += struct.pack("<QQ", patch.offset, len(patch.old)) + patch.old + patch.new
    body += hashlib.sha256(body).digest()
    return bytes(body)


def read_journal(path: Path) -> tuple[JournalEntry, ...] | None:
    """The entries of the journal beside `path`: None when there is none, () when it is incomplete
    (the run died while writing it, so no file was touched yet)."""
    journal = journal_path(path)
    try:
        body = journal.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as error:
        raise CheckpointError(
            f"{path}: an in-place edit of this file was interrupted and its journal "
            f"{journal.name} cannot be read ({error.strerror}); {RECOVER_HINT.format(path=path)}"
        ) from None
    if len(body) < 32 or hashlib.sha256(body[:-32]).digest() != body[-32:]:
        return ()
    if body.startswith(JOURNAL_MAGIC):
        return _parse_entries(body[:-32], len(JOURNAL_MAGIC), journal.parent)
    if body.startswith(JOURNAL_MAGIC_SINGLE_FILE):
        identity = struct.unpack_from("<QQQ", body, len(JOURNAL_MAGIC_SINGLE_FILE))
        count_at = len(JOURNAL_MAGIC_SINGLE_FILE) + 24
        patches, _ = _parse_patches(body, count_at)
        return (JournalEntry(absolute(path), identity, patches),)
    return ()


def _parse_entries(body: bytes, position: int, folder: Path) -> tuple[JournalEntry, ...]:
    (count,) = struct.unpack_from("<I", body, position)
    position += 4
    entries = []
    for _ in range(count):
        (length,) = struct.unpack_from("<H", body, position)
        name = os.fsdecode(body[position + 2 : position + 2 + length])
        identity = struct.unpack_from("<QQQ", body, position + 2 + length)
        patches, position = _parse_patches(body, position + 2 + length + 24)
        entries.append(JournalEntry(absolute(folder / name), identity, patches))
    return tuple(entries)


def _parse_patches(body: bytes, position: int) -> tuple[tuple[BytePatch, ...], int]:
    """The patches after a count at `position`, and where they end."""
    (count,) = struct.unpack_from("<I", body, position)
    position += 4
    patches = []
    for _ in range(count):
        offset, length = struct.unpack_from("<QQ", body, position)
        position += 16
        old = body[position : position + length]
        new = body[position + length : position + 2 * length]
        patches.append(BytePatch(offset, old, new))
        position += 2 * length
    return tuple(patches), position


def write_journals(entries: list[JournalEntry]) -> None:
    """Make a journal of the whole edit durable beside every file, before any file is touched; on
    failure remove the ones written (nothing was touched, so there is nothing to roll back)."""
    written: list[JournalEntry] = []
    try:
        for entry in entries:
            if written:
                fault_point("between-journals")
            _write_durably(journal_path(entry.path), encode_journal(entry.path.parent, entries))
            written.append(entry)
    except BaseException:
        for entry in written:
            journal_path(entry.path).unlink(missing_ok=True)
        journal_path(entries[len(written)].path).unlink(missing_ok=True)
        raise


def _write_durably(path: Path, body: bytes) -> None:
    with open(path, "wb") as out:
        out.write(body)
        out.flush()
        os.fsync(out.fileno())
    fsync_folder(path.parent)


def remove_journals(paths: Iterable[Path]) -> None:
    """The edit is durable (or rolled back): the journals beside these files are not needed."""
    for index, path in enumerate(paths):
        if index:
            fault_point("mid-journal-removal")
        journal_path(path).unlink(missing_ok=True)
        fsync_folder(path.parent)


def patch_files(entries: list[JournalEntry], held: Held) -> None:
    """Journal, patch every file, make it durable, drop the journals; on any failure (Ctrl-C
    included) roll every file back. The caller holds the lock of every file."""
    files = [_held_file(entry, held) for entry in entries]
    write_journals(entries)
    try:
        fault_point("after-journal")
        for index, (entry, file) in enumerate(zip(entries, files, strict=True)):
            if index:
                fault_point("between-files")
            write_patches(file, list(entry.patches[:1]))
            if index == 0:
                fault_point("mid-patch")
            write_patches(file, list(entry.patches[1:]))
        for file in files:
            os.fsync(file.fileno())
        fault_point("before-journal-removal")
        remove_journals(entry.path for entry in entries)
    except BaseException:
        _restore(entries, files)  # an interrupted removal too: a journal may be left
        raise


def write_patches(file: BinaryIO, patches: list[BytePatch]) -> None:
    for patch in patches:
        os.pwrite(file.fileno(), patch.new, patch.offset)


def _held_file(entry: JournalEntry, held: Held) -> BinaryIO:
    file = held.get(entry.path)
    if file is None:
        raise EditError(
            f"{entry.path}: was edited together with files this run did not lock; "
            f"{RECOVER_HINT.format(path=entry.path)}"
        )
    return file


def _restore(entries: Sequence[JournalEntry], files: list[BinaryIO]) -> None:
    """Write every file's old bytes back, make that durable, then drop the journals."""
    for entry, file in zip(entries, files, strict=True):
        for patch in entry.patches:
            os.pwrite(file.fileno(), patch.old, patch.offset)
    for file in files:
        os.fsync(file.fileno())
    remove_journals(entry.path for entry in entries)


def roll_back(path: Path, held: Held) -> bool:
    """Undo an interrupted edit found beside `path` in every file it touched; True if something
    was rolled back. The caller holds the lock of `path` and of every file the journal lists.

    An incomplete journal means no file was touched yet: it is removed. A complete one is applied
    only if it fits every file (same file, each region holding its old or its new bytes);
    otherwise a file has changed since, and nothing is written."""
    entries = read_journal(path)
    if entries is None:
        return False
    if not entries:
        remove_journals([path])
        return False
    files = [_held_file(entry, held) for entry in entries]
    for entry, file in zip(entries, files, strict=True):
        if not entry.fits(file.fileno()):
            raise stale_journal(entry.path)
    _restore(entries, files)
    return True


def stale_journal(path: Path) -> StaleJournalError:
    return StaleJournalError(
        f"{path}: the journal {journal_path(path).name} of an interrupted in-place edit does not "
        "match this file (it changed since); nothing was rolled back. If `lstm-surgeon check` "
        "finds the file sound, delete the journal"
    )


RECOVER_HINT = (
    "run `lstm-surgeon recover {path}` (or any editing command) as a user who can write the file "
    "and its folder to roll it back"
)


def recover_interrupted_edit(path: Path) -> bool:
    """If an in-place edit of `path` was killed, roll back every file it touched (this one and
    any edited with it) to the old checkpoint; True if something was rolled back. This is the
    one place, with the editing commands, where reading a checkpoint may write to it."""
    entries = read_journal(path)
    if entries is None:
        return False
    try:
        with exclusive_locks([path, *(entry.path for entry in entries)]) as held:
            return roll_back(path, held)
    except OutputError as error:
        raise CheckpointError(
            f"{path}: an in-place edit of this file was interrupted ({error}); "
            f"{RECOVER_HINT.format(path=path)}"
        ) from None


def backup_copy(path: Path, force: bool) -> Path:
    """Copy `path` to `path.bak` atomically (refusing to overwrite an old backup without force)."""
    backup = path.with_name(path.name + ".bak")
    check_output_path(backup, path, force)
    with open(path, "rb") as source, atomic_output(backup, path.stat().st_mode) as out:
        copy_file(source, out, os.fstat(source.fileno()).st_size)
    return backup
