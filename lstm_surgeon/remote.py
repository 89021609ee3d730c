"""Checkpoints at URLs (`https://`, `hf://`, `s3://`, any protocol an installed fsspec filesystem
reads): opened by range requests, so a command fetches the headers and the tensors it needs, never
the whole file.

A remote file becomes a `RemoteBuffer`: what the format readers use of a memory map (`len()`,
slices, `rfind`), each slice fetched on demand. Editing commands write locally: a remote source is
first copied to a temporary file beside the output (`local_copy`), since the output holds every
byte anyway. fsspec and its HTTP backend are an extra (`lstm-surgeon[remote]`), imported only when a
URL is given.
"""

from __future__ import annotations

import contextlib
import re
import tempfile
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from lstm_surgeon.errors import CheckpointError, SurgeonError

URL_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")
INSTALL_HINT = "pip install 'lstm-surgeon[remote]'"
EXTRA_PROTOCOLS = frozenset({"http", "https", "hf"})  # what the extra's packages read
# Small reads (headers, zip records) are fetched in aligned blocks of this size; large reads (a
# tensor) are kept for a second use, up to MEMO_BYTES.
BLOCK_BYTES = 1 << 16
CACHED_BLOCKS = 64
MEMO_BYTES = 256 << 20
DOWNLOAD_CHUNK = 1 << 22


def is_url(source: object) -> bool:
    """True for a URL (`scheme://...`); a `Path` never is one (it has lost the `//`)."""
    return isinstance(source, RemoteLocation) or (
        isinstance(source, str) and URL_PATTERN.match(source) is not None
    )


class RemoteLocation(PurePosixPath):
    """A URL where the checkpoint model expects a path: `.name` and `.suffix` work as for a file,
    and `str()` gives the URL back (a plain path would fold its `//` into `/`)."""

    def __str__(self) -> str:
        scheme, *rest = self.parts
        return f"{scheme}//{'/'.join(rest)}"


class RemoteBuffer:
    """A remote file's bytes, fetched by range when sliced.

    Small reads go through a cache of aligned blocks (a zip's records and a safetensors header are
    read in many small pieces); a large read is fetched exactly and kept (up to MEMO_BYTES) for the
    next read of the same range, so each tensor crosses the network once."""

    def __init__(self, url: str, file: Any, size: int) -> None:
        self.url = url
        self._file = file
        self._size = size
        self._blocks: OrderedDict[int, bytes] = OrderedDict()
        self._memo: OrderedDict[tuple[int, int], bytes] = OrderedDict()
        self._memo_bytes = 0

    def __len__(self) -> int:
        return self._size

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, int):
            position = index + self._size if index < 0 else index
            if not 0 <= position < self._size:
                raise IndexError("remote buffer index out of range")
            return self[position : position + 1][0]
        start, stop, step = index.indices(self._size)
        if step != 1:
            raise ValueError("a remote buffer is read in contiguous ranges only")
        if stop <= start:
            return b""
        if stop - start < BLOCK_BYTES:
            return self._from_blocks(start, stop)
        return self._memoised(start, stop)

    def __iter__(self) -> Iterator[int]:
        """Refused: `bytes(buffer)` would otherwise fetch the file one byte per call; a reader
        takes what it needs by slices (or `checkpoint.byte_range`)."""
        raise TypeError("a remote buffer is read by slices, not byte by byte")

    def rfind(self, sub: bytes, start: int = 0, end: int | None = None) -> int:
        """Like `bytes.rfind`: the zip reader looks for its end record in the file's last bytes."""
        start = max(0, start)
        found = self[start:end].rfind(sub)
        return found if found < 0 else start + found

    def close(self) -> None:
        self._file.close()
        self._blocks.clear()
        self._memo.clear()

    def _from_blocks(self, start: int, stop: int) -> bytes:
        first, last = start // BLOCK_BYTES, (stop - 1) // BLOCK_BYTES
        missing = [block for block in range(first, last + 1) if block not in self._blocks]
        if missing:
            data = self.fetch(missing[0] * BLOCK_BYTES, (missing[-1] + 1) * BLOCK_BYTES)
            for block in missing:
                offset = (block - missing[0]) * BLOCK_BYTES
                self._blocks[block] = data[offset : offset + BLOCK_BYTES]
        for block in range(first, last + 1):
            self._blocks.move_to_end(block)
        while len(self._blocks) > CACHED_BLOCKS:
            self._blocks.popitem(last=False)
        joined = b"".join(self._blocks[block] for block in range(first, last + 1))
        return joined[start - first * BLOCK_BYTES : stop - first * BLOCK_BYTES]

    def _memoised(self, start: int, stop: int) -> bytes:
        key = (start, stop)
        if key in self._memo:
            self._memo.move_to_end(key)
            return self._memo[key]
        data = self.fetch(start, stop)
        if len(data) <= MEMO_BYTES:
            self._memo[key] = data
            self._memo_bytes += len(data)
            while self._memo_bytes > MEMO_BYTES:
                _, dropped = self._memo.popitem(last=False)
                self._memo_bytes -= len(dropped)
        return data

    def fetch(self, start: int, stop: int) -> bytes:
        """Bytes [start, stop) in one range request; any failure of the transport (a dropped
        connection, a server that ignores ranges) becomes one clear error."""
        stop = min(stop, self._size)
        try:
            self._file.seek(start)
            data = self._file.read(stop - start)
        except Exception as error:
            raise _read_error(self.url, error) from None
        if len(data) != stop - start:
            raise CheckpointError(
                f"{self.url}: the server sent {len(data)} of the {stop - start} bytes asked for "
                f"at offset {start} (the file changed, or the connection was cut)"
            )
        return data


def _read_error(url: str, error: Exception) -> CheckpointError:
    if "range requests" in str(error):
        return CheckpointError(
            f"{url}: the server ignores range requests (HTTP Range), so only the whole file "
            "could be read; download it and give the local path instead"
        )
    return CheckpointError(f"{url}: reading failed ({type(error).__name__}: {error})")


def open_remote(url: str) -> RemoteBuffer:
    """A lazy buffer over the file at `url` (no byte of it is fetched yet)."""
    filesystem, path = _filesystem(url)
    try:
        size = filesystem.size(path)
        file = filesystem.open(path, "rb", block_size=BLOCK_BYTES, cache_type="none")
    except FileNotFoundError:
        raise CheckpointError(f"{url}: no such file") from None
    except Exception as error:
        raise CheckpointError(f"{url}: cannot open ({type(error).__name__}: {error})") from None
    if size is None:
        file.close()
        raise CheckpointError(f"{url}: the server does not say how large the file is")
    if size == 0:
        file.close()
        raise CheckpointError(f"{url}: the file is empty")
    return RemoteBuffer(url, file, size)


def _filesystem(url: str) -> tuple[Any, str]:
    """The fsspec filesystem for the URL's protocol; a missing extra is named by its install line."""
    try:
        from fsspec.core import url_to_fs
    except ImportError:
        raise SurgeonError(f"{url}: reading URLs needs fsspec: {INSTALL_HINT}") from None
    scheme = url.split("://", 1)[0]
    try:
        return url_to_fs(url)
    except ImportError as error:
        if scheme.lower() in EXTRA_PROTOCOLS:
            raise SurgeonError(f"{url}: {scheme}:// URLs need {INSTALL_HINT}") from None
        raise SurgeonError(
            f"{url}: reading {scheme}:// URLs needs another package ({error})"
        ) from None
    except ValueError:
        raise CheckpointError(
            f"{url}: no installed filesystem reads {scheme}:// URLs ({INSTALL_HINT} gives "
            "http, https and hf)"
        ) from None


def remote_size(url: str) -> int:
    """The file's size, or 0 when the server does not tell (a progress total, nothing more)."""
    with contextlib.suppress(SurgeonError):
        buffer = open_remote(url)
        buffer.close()
        return len(buffer)
    return 0


@contextlib.contextmanager
def local_copy(source: str, folder: Path, progress: Any = None) -> Iterator[Path]:
    """`source` itself when it is a local path; a URL is downloaded to a temporary file in
    `folder` (beside the output), removed when done. An edit reads every byte it writes anyway."""
    if not is_url(source):
        yield Path(source)
        return
    buffer = open_remote(source)
    name = RemoteLocation(source).name
    with contextlib.ExitStack() as stack:
        stack.callback(buffer.close)
        temporary = stack.enter_context(
            tempfile.TemporaryDirectory(prefix=".lstm-surgeon-", dir=folder)
        )
        path = Path(temporary) / name
        _download(buffer, path, progress)
        yield path


def _download(buffer: RemoteBuffer, path: Path, progress: Any) -> None:
    with open(path, "wb") as out:
        for start in range(0, len(buffer), DOWNLOAD_CHUNK):
            chunk = buffer.fetch(start, start + DOWNLOAD_CHUNK)
            out.write(chunk)
            if progress is not None:
                progress(len(chunk))
