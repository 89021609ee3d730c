"""HDF5 files (Keras 2 `.h5`/`.hdf5` models and weights, Keras 3 `.weights.h5`), read through h5py.

h5py parses HDF5's structure and never executes anything in the file. It reads through a file object
over the checkpoint's read-only map (so an interrupted edit's rollback overlay is what it sees, and no
HDF5 file lock meets the editor's own lock), and only the metadata it needs: each dataset's bytes stay
where they lie. A contiguous dataset is a `TensorRef` at the offset HDF5 gives (`get_offset`), so an
edit of values patches those bytes and nothing else. A chunked, compressed, compact or external
dataset has no such offset: it is left out, with a warning naming it.

An edit that changes which datasets exist (adding or dropping biases) is refused: a Keras file's
model config and `weight_names` would no longer agree with its weights.
"""

from __future__ import annotations

import io
import mmap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from lstm_surgeon.checkpoint import (
    Checkpoint,
    CheckpointFile,
    Contents,
    Entry,
    Operator,
    OutputTensor,
    StorageRef,
    TensorRef,
)
from lstm_surgeon.dtypes import ALL_DTYPES, DType
from lstm_surgeon.errors import CheckpointError, EditError, SurgeonError
from lstm_surgeon.formats.identify import HDF5_SIGNATURE
from lstm_surgeon.formats.keras_weights import keras_operators
from lstm_surgeon.writing import BytePatch, Progress

INSTALL_HINT = "pip install 'lstm-surgeon[keras]'"
BY_NUMPY: dict[np.dtype, DType] = {
    dtype.storage: dtype for dtype in ALL_DTYPES if dtype.numpy_exact and dtype.name != "bool"
}


def import_h5py() -> Any:
    """h5py, or an error that says how to install it (it is an extra, imported only here)."""
    try:
        import h5py
    except ImportError:
        raise SurgeonError(f"reading HDF5 (Keras) files needs h5py: {INSTALL_HINT}") from None
    return h5py


class WindowFile(io.RawIOBase):
    """A read-only file object over `size` bytes of a buffer from `start` (a whole file's map, or a
    zip member's stored bytes): what h5py reads through, without copying the file."""

    def __init__(self, buffer: mmap.mmap | bytes, start: int = 0, size: int | None = None) -> None:
        super().__init__()
        self._view = memoryview(buffer)[start : start + (len(buffer) if size is None else size)]
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, target: Any) -> int:
        chunk = self._view[self._position : self._position + len(target)]
        target[: len(chunk)] = chunk
        self._position += len(chunk)
        return len(chunk)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: len(self._view)}[whence]
        self._position = max(0, base + offset)
        return self._position

    def tell(self) -> int:
        return self._position

    def close(self) -> None:
        self._view.release()
        super().close()


@dataclass
class H5Contents:
    """What an HDF5 file holds, as the neutral model takes it: tensors, operators, warnings."""

    tensors: dict[str, TensorRef] = field(default_factory=dict)
    operators: tuple[Operator, ...] = ()
    metadata: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def read_h5(
    path: Path,
    buffer: mmap.mmap | bytes,
    start: int = 0,
    size: int | None = None,
    config: Any = None,
) -> H5Contents:
    """Every contiguous dataset of the HDF5 bytes at `start` as a tensor (its offset counted from
    the start of `buffer`), and Keras's recurrent layers as operators. `config` is the model config
    a `.keras` archive keeps beside its weights; an `.h5` model keeps its own in `model_config`."""
    h5py = import_h5py()
    window = WindowFile(buffer, start, size)
    try:
        with h5py.File(window, "r") as h5:
            result = H5Contents(metadata=_string_attributes(h5))
            h5.visititems(lambda name, item: _add_dataset(path, h5py, name, item, start, result))
            _check_bounds(path, result.tensors, len(buffer))
            config = config if config is not None else result.metadata.get("model_config")
            result.operators = keras_operators(h5, result.tensors, config, result.metadata)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as error:
        raise CheckpointError(f"{path}: not a readable HDF5 file ({_first_line(error)})") from None
    finally:
        window.close()
    return result


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _string_attributes(h5: Any) -> dict[str, str]:
    """The root's string attributes (`keras_version`, `backend`, `model_config`...)."""
    metadata = {}
    for key, value in h5.attrs.items():
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        if isinstance(value, str):
            metadata[key] = value
    return metadata


def _add_dataset(
    path: Path, h5py: Any, name: str, item: Any, start: int, result: H5Contents
) -> None:
    if not isinstance(item, h5py.Dataset):
        return
    problem = _not_in_place(item)
    if problem is not None:
        result.warnings.append(f"{path}: dataset {name!r} is {problem}; lstm-surgeon leaves it out")
        return
    dtype = BY_NUMPY.get(item.dtype)
    if dtype is None and item.dtype.kind == "f":
        result.warnings.append(
            f"{path}: dataset {name!r} is {item.dtype.str}; lstm-surgeon leaves it out"
        )
    if dtype is None or item.shape is None:
        return  # strings, compound data, big-endian floats: not a recurrent layer's weights
    nbytes = int(np.prod(item.shape, dtype=object)) * dtype.itemsize
    offset = start + int(item.id.get_offset())
    result.tensors[name] = TensorRef(
        name, dtype, tuple(item.shape), StorageRef(name, offset, nbytes)
    )


def _not_in_place(dataset: Any) -> str | None:
    """Why a dataset's elements do not lie contiguous in the file (None when they do)."""
    if dataset.chunks is not None:
        return "chunked or compressed (re-save it without compression to edit it)"
    if dataset.external or dataset.is_virtual:
        return "stored outside this file"
    if dataset.shape and dataset.size and dataset.id.get_offset() is None:
        return "not stored contiguously (compact or never written)"
    return None


def _check_bounds(path: Path, tensors: dict[str, TensorRef], size: int) -> None:
    """A dataset that claims more bytes than the file holds (a hostile or truncated file)."""
    for ref in tensors.values():
        if ref.storage.offset < 0 or ref.storage.offset + ref.nbytes > size:
            raise CheckpointError(
                f"{path}: dataset {ref.name!r} claims {ref.nbytes} bytes at offset "
                f"{ref.storage.offset}, beyond the end of the file ({size} bytes)"
            )


def require_same_datasets(
    source: Checkpoint, tensors: list[OutputTensor], target_format: str
) -> None:
    """Refuse an output whose datasets differ from the source's (names, shapes and types), or
    whose format is not the source's."""
    wanted = {(t.ref.name, t.ref.shape, t.ref.dtype.name) for t in tensors}
    have = {(r.name, r.shape, r.dtype.name) for r in source.tensors.values()}
    if source.format.name != target_format or wanted != have:
        raise EditError(
            f"{source.path}: lstm-surgeon edits the values of a Keras file's weights but does not "
            "add, drop or convert them (its model config would disagree); rebuild the model in "
            "Keras for that"
        )


def write_values(h5_file: BinaryIO, tensors: list[OutputTensor], prefix_length: int = 0) -> None:
    """Write each tensor that carries new elements into its dataset of the HDF5 file `h5_file`."""
    h5py = import_h5py()
    with h5py.File(h5_file, "r+") as h5:
        for tensor in tensors:
            if tensor.data is not None:
                h5[tensor.ref.name[prefix_length:]][...] = tensor.data


class Hdf5Format:
    name = "hdf5"
    suffixes = (".h5", ".hdf5")

    def sniff(self, head: bytes) -> bool:
        """HDF5's signature at the start (a file with a user block is named by `identify`)."""
        return head.startswith(HDF5_SIGNATURE)

    def read(self, path: Path, buffer: mmap.mmap | bytes) -> Checkpoint:
        h5 = read_h5(path, buffer)
        metadata = {k: v for k, v in h5.metadata.items() if k != "model_config"}
        return Checkpoint(
            path=path,
            format=self,
            tensors=h5.tensors,
            files=(CheckpointFile(path, buffer),),
            contents=Contents(
                entries=tuple(Entry(name, "tensor") for name in h5.tensors),
                metadata=metadata,
                operators=h5.operators,
            ),
            warnings=h5.warnings,
        )

    def checksum_patches(
        self, checkpoint: Checkpoint, storages: dict[StorageRef, bytes]
    ) -> list[BytePatch]:
        return []  # HDF5 checksums its metadata only, never contiguous raw data

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
        """A copy of the source with the new values written through h5py (the same datasets)."""
        require_same_datasets(source, tensors, self.name)
        out.write(source.buffer)
        out.flush()
        out.seek(0)
        write_values(out, tensors)


FORMAT = Hdf5Format()
