"""PT2 archives (`torch.export.save`, `.pt2`): an exported program with its weights as plain records.

The archive is a zip written by torch's zip writer (the same as torch.save's): `archive_format` says
`pt2`, `models/<model>.json` holds the program, and `data/weights/<model>_weights_config.json` (and
`data/constants/<model>_constants_config.json`) map each parameter, buffer and constant by its
fully-qualified name to a record of raw bytes (`path_name`) with its dtype, sizes, strides and storage
offset. Those records are read and patched where they lie, CRC-32 refreshed. A tensor the archive
stores as a pickle (`use_pickle`: tensor subclasses, which only their own code can rebuild) is left
unread and named in a warning; nothing of the program is run.
"""

from __future__ import annotations

import json
import mmap
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
    TensorRef,
)
from lstm_surgeon.dtypes import BY_NAME, DType
from lstm_surgeon.errors import CheckpointError, EditError
from lstm_surgeon.formats.torch_zip import (
    check_byteorder,
    checked_ref,
    record_bytes,
    storage_of,
)
from lstm_surgeon.formats.zip_records import (
    ZipRecord,
    crc_patches,
    crc_problems,
    read_records,
    require_stored,
)
from lstm_surgeon.writing import BytePatch, Progress

ARCHIVE_FORMAT = "archive_format"
ARCHIVE_FORMAT_VALUE = b"pt2"
CONFIGS = (  # (folder of the records, ending of its config's name)
    ("data/weights/", "_weights_config.json"),
    ("data/constants/", "_constants_config.json"),
)
DEFAULT_MODEL = "model"
# torch._export.serde.schema.ScalarType: the element types the exporter writes by number.
SCALAR_TYPES: dict[int, DType] = {
    1: BY_NAME["uint8"],
    2: BY_NAME["int8"],
    3: BY_NAME["int16"],
    4: BY_NAME["int32"],
    5: BY_NAME["int64"],
    6: BY_NAME["float16"],
    7: BY_NAME["float32"],
    8: BY_NAME["float64"],
    10: BY_NAME["complex64"],
    12: BY_NAME["bool"],
    13: BY_NAME["bfloat16"],
    28: BY_NAME["uint16"],
    29: BY_NAME["float8_e4m3fn"],
    30: BY_NAME["float8_e5m2"],
    34: BY_NAME["uint32"],
    35: BY_NAME["uint64"],
}


@dataclass(frozen=True)
class _Pt2State:
    records: dict[str, ZipRecord]
    prefix: str


class Pt2Format:
    name = "pt2"
    suffixes = (".pt2",)

    def sniff(self, head: bytes) -> bool:
        """Never by the first bytes: every zip goes to `torch_zip`, whose reader tells a PT2
        archive by its records (`claims`) and hands it here."""
        return False

    def claims(self, records: dict[str, ZipRecord]) -> bool:
        return any(_is_top_level(name, ARCHIVE_FORMAT) for name in records)

    def read(self, path: Path, buffer: mmap.mmap | bytes) -> Checkpoint:
        records = read_records(path, buffer)
        if not self.claims(records):
            raise CheckpointError(f"{path}: not a PT2 archive (no {ARCHIVE_FORMAT} record)")
        return self.read_archive(path, buffer, records)

    def read_archive(
        self, path: Path, buffer: mmap.mmap | bytes, records: dict[str, ZipRecord]
    ) -> Checkpoint:
        state = _Pt2State(records, _prefix(path, buffer, records))
        check_byteorder(path, buffer, records, state.prefix)
        tensors: dict[str, TensorRef] = {}
        pickled: list[str] = []
        for folder, model, config in _configs(path, buffer, state):
            for fqn, meta in config.items():
                name = fqn if model == DEFAULT_MODEL else f"{model}.{fqn}"
                if _field(path, name, meta, "use_pickle", bool):
                    pickled.append(name)
                elif name not in tensors:
                    tensors[name] = _tensor(path, name, meta, state, folder)
        checkpoint = Checkpoint(
            path=path,
            format=self,
            tensors=tensors,
            files=(CheckpointFile(path, buffer),),
            contents=Contents(entries=tuple(Entry(name, "tensor") for name in tensors)),
            format_state=state,
        )
        if pickled:
            checkpoint.warnings.append(
                f"{path}: {len(pickled)} tensors are stored as pickles, which only running their "
                f"code could read; they are not shown ({', '.join(pickled[:4])})"
            )
        return checkpoint

    def checksum_patches(
        self, checkpoint: Checkpoint, storages: dict[StorageRef, bytes]
    ) -> list[BytePatch]:
        return crc_patches(checkpoint, _state(checkpoint).records, storages)

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
        """Refused: the exported program names every weight it takes, with its shape."""
        if source.format is self:
            raise EditError(
                f"{source.path}: a PT2 archive's program takes each of its weights by name and "
                "shape, so tensors cannot be added, dropped or changed in type; edit values only, "
                "or write the tensors as a state dict with -o OUT.safetensors"
            )
        raise EditError(
            f"{source.path}: cannot write a PT2 archive from a {source.format_name} file (it needs "
            "the exported program); choose an output suffix of that format"
        )


def _state(checkpoint: Checkpoint) -> _Pt2State:
    state = checkpoint.format_state
    assert isinstance(state, _Pt2State), "not a checkpoint read by the PT2 format"
    return state


def _is_top_level(name: str, leaf: str) -> bool:
    """`<archive folder>/<leaf>` (or `<leaf>` at the zip's root)."""
    return name == leaf or (name.endswith(f"/{leaf}") and name.count("/") == 1)


def _prefix(path: Path, buffer: mmap.mmap | bytes, records: dict[str, ZipRecord]) -> str:
    """The archive's folder, from its `archive_format` record (which must say pt2)."""
    names = [name for name in records if _is_top_level(name, ARCHIVE_FORMAT)]
    if len(names) != 1:
        raise CheckpointError(f"{path}: a PT2 archive with {len(names)} {ARCHIVE_FORMAT} records")
    record = require_stored(path, records[names[0]])
    value = record_bytes(buffer, record).strip()
    if value != ARCHIVE_FORMAT_VALUE:
        raise CheckpointError(f"{path}: an archive of format {value[:20]!r}, not a PT2 archive")
    return names[0][: -len(ARCHIVE_FORMAT)]


def _configs(
    path: Path, buffer: mmap.mmap | bytes, state: _Pt2State
) -> list[tuple[str, str, dict[str, Any]]]:
    """(records folder, model name, {fqn: payload meta}) of every weights and constants config."""
    found = []
    for folder, ending in CONFIGS:
        base = state.prefix + folder
        for name, record in state.records.items():
            if name.startswith(base) and name.endswith(ending) and "/" not in name[len(base) :]:
                model = name[len(base) : -len(ending)]
                found.append((base, model, _config(path, buffer, record)))
    return found


def _config(path: Path, buffer: mmap.mmap | bytes, record: ZipRecord) -> dict[str, Any]:
    require_stored(path, record)
    if not record.check_crc(buffer):
        raise CheckpointError(f"{path}: corrupt file (CRC-32 mismatch in {record.name})")
    try:
        config = json.loads(record_bytes(buffer, record))["config"]
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{path}: corrupt {record.name} ({error})") from None
    if not isinstance(config, dict) or not all(isinstance(v, dict) for v in config.values()):
        raise CheckpointError(f"{path}: corrupt {record.name} (not a mapping of tensors)")
    return config


def _field(path: Path, name: str, meta: dict[str, Any], key: str, kind: type) -> Any:
    value = meta.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise CheckpointError(f"{path}: tensor {name!r} has a malformed {key} in its config")
    return value


def _ints(path: Path, name: str, meta: dict[str, Any], key: str) -> tuple[int, ...]:
    """Sizes or strides: each `{"as_int": n}` (a symbolic size has no place in a stored weight)."""
    values = _field(path, name, meta, key, list)
    return tuple(_field(path, name, value, "as_int", int) for value in values)


def _tensor(
    path: Path, name: str, meta: dict[str, Any], state: _Pt2State, folder: str
) -> TensorRef:
    tensor_meta = _field(path, name, meta, "tensor_meta", dict)
    code = _field(path, name, tensor_meta, "dtype", int)
    if code not in SCALAR_TYPES:
        raise CheckpointError(f"{path}: tensor {name!r} has an element type lstm-surgeon lacks")
    record = state.records.get(folder + _field(path, name, meta, "path_name", str))
    if record is None:
        raise CheckpointError(f"{path}: tensor {name!r} refers to a missing record")
    offset = _field(path, name, tensor_meta, "storage_offset", dict)
    ref = TensorRef(
        name,
        SCALAR_TYPES[code],
        _ints(path, name, tensor_meta, "sizes"),
        storage_of(path, record),
        _field(path, name, offset, "as_int", int),
        _ints(path, name, tensor_meta, "strides"),
    )
    if len(ref.shape) != len(ref.element_strides):
        raise CheckpointError(
            f"{path}: tensor {name!r} has a different number of sizes and strides"
        )
    return checked_ref(path, ref)


FORMAT = Pt2Format()
