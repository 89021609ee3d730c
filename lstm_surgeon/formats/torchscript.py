"""TorchScript archives (`torch.jit.save`): the module tree in `data.pkl`, constants in `constants.pkl`.

The archive is a zip written by the same writer as torch.save's, so its records are read and patched
with the same machinery (`zip_records`, `torch_zip`'s helpers). `data.pkl` pickles the scripted
modules as `__torch__.…` objects whose state holds parameters and submodules as attributes; each
tensor is named by its module path (`encoder.rnn.weight_ih_l0`), as a state dict would name it, so
discovery works unchanged. Tensors that exist only in `constants.pkl` (a frozen module's weights,
whose storages lie in `constants/`) are named as the code names them, `CONSTANTS.c0`, ... Neither
pickle is executed, and nothing in `code/` is run or parsed.

Edits that keep the structure patch the storage records in place (their CRC-32 refreshed); the code
refers to every attribute by name, so a tensor cannot be added or removed without rewriting it. The
checkpoint's entries are its tensors: the rest of the module tree (flags, submodule objects) is the
program's, so a conversion writes the tensors as a plain state dict.
"""

from __future__ import annotations

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
from lstm_surgeon.errors import CheckpointError, EditError
from lstm_surgeon.formats.pickle_reader import TensorStub
from lstm_surgeon.formats.torch_zip import (
    Location,
    check_byteorder,
    storage_of,
    tensor_ref,
    tensor_slots,
    unpickle_record,
)
from lstm_surgeon.formats.zip_records import ZipRecord, crc_patches, crc_problems, read_records
from lstm_surgeon.writing import BytePatch, Progress

STATE = "__state__"  # the walker's key for an object's pickled state (a module's attributes)
CONSTANTS = "CONSTANTS"  # how TorchScript code names the entries of constants.pkl


@dataclass(frozen=True)
class _ScriptState:
    """What only this module needs of an archive it read: its records and folder name."""

    records: dict[str, ZipRecord]
    prefix: str


class TorchScriptFormat:
    name = "torchscript"
    suffixes = (".jit", ".pt", ".pth", ".zip")

    def sniff(self, head: bytes) -> bool:
        """Never by the first bytes: every zip goes to `torch_zip`, whose reader tells a TorchScript
        archive by its records (`claims`) and hands it here."""
        return False

    def claims(self, records: dict[str, ZipRecord]) -> bool:
        """A `constants.pkl` beside the archive's `data.pkl` (torch.save never writes one)."""
        return any(name.endswith("/constants.pkl") and name.count("/") == 1 for name in records)

    def read(self, path: Path, buffer: mmap.mmap | bytes) -> Checkpoint:
        records = read_records(path, buffer)
        if not self.claims(records):
            raise CheckpointError(f"{path}: not a TorchScript archive (no constants.pkl)")
        return self.read_archive(path, buffer, records)

    def read_archive(
        self, path: Path, buffer: mmap.mmap | bytes, records: dict[str, ZipRecord]
    ) -> Checkpoint:
        state = _ScriptState(records, _prefix(path, records))
        check_byteorder(path, buffer, records, state.prefix)
        root = unpickle_record(path, buffer, _record(path, state, "data.pkl"))
        constants = unpickle_record(path, buffer, _record(path, state, "constants.pkl"))
        tensors = _tensors(path, state, root, "data")
        constant_tensors = _tensors(path, state, constants, CONSTANTS)
        if tensors.keys() & constant_tensors.keys():
            raise CheckpointError(
                f"{path}: a module attribute is named like a constant (ambiguous)"
            )
        tensors |= constant_tensors
        checkpoint = Checkpoint(
            path=path,
            format=self,
            tensors=tensors,
            files=(CheckpointFile(path, buffer),),
            contents=Contents(entries=tuple(Entry(name, "tensor") for name in tensors)),
            format_state=state,
        )
        checkpoint.warnings += _constants_note(path, tensors)
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
        """Refused: a TorchScript archive's code names every tensor it uses, so only edits that
        keep each tensor's name, shape and type can be written into one."""
        if source.format is self:
            raise EditError(
                f"{source.path}: a TorchScript archive's code refers to each of its tensors, so "
                "tensors cannot be added, dropped or changed in type; edit values only, or write "
                "the tensors as a state dict with -o OUT.safetensors"
            )
        raise EditError(
            f"{source.path}: cannot write a TorchScript archive from a {source.format_name} file "
            "(it needs the model's code); choose an output suffix of that format"
        )


def _state(checkpoint: Checkpoint) -> _ScriptState:
    state = checkpoint.format_state
    assert isinstance(state, _ScriptState), "not a checkpoint read by the TorchScript format"
    return state


def _prefix(path: Path, records: dict[str, ZipRecord]) -> str:
    pickles = [name for name in records if name.endswith("/data.pkl") and name.count("/") == 1]
    if len(pickles) != 1:
        raise CheckpointError(f"{path}: a TorchScript archive without its data.pkl")
    return pickles[0][: -len("data.pkl")]


def _record(path: Path, state: _ScriptState, name: str) -> ZipRecord:
    record = state.records.get(state.prefix + name)
    if record is None:
        raise CheckpointError(f"{path}: a TorchScript archive without its {name}")
    return record


def _tensors(path: Path, state: _ScriptState, root: Any, kind: str) -> dict[str, TensorRef]:
    """The tensors of one pickle: the module tree's by module path (storages in `data/`), or the
    constants' as `CONSTANTS.c<i>` (storages in `constants/`)."""
    naming = _module_path if kind == "data" else _constant_name
    folder = "data" if kind == "data" else "constants"
    return {
        name: tensor_ref(path, name, slot.stub, _storage(path, state, folder, slot.stub))
        for name, slot in tensor_slots(path, root, naming).items()
    }


def _storage(path: Path, state: _ScriptState, folder: str, stub: TensorStub) -> StorageRef | None:
    key = getattr(stub.storage, "key", None)
    record = state.records.get(f"{state.prefix}{folder}/{key}") if isinstance(key, str) else None
    return None if record is None else storage_of(path, record)


def _module_path(location: Location) -> str:
    """`enc.weight_ih_l0` for the tensor at (__state__, enc, __state__, weight_ih_l0): a module's
    attributes are its pickled state, which a state dict's names leave out."""
    return ".".join(str(key) for key in location if key != STATE)


def _constant_name(location: Location) -> str:
    """`CONSTANTS.c0` for the first entry of constants.pkl, as the archive's code names it."""
    first, *rest = location
    return ".".join([f"{CONSTANTS}.c{first}", *(str(key) for key in rest)])


def _constants_note(path: Path, tensors: dict[str, TensorRef]) -> list[str]:
    """Constant tensors carry no module path (torch.jit.freeze turns weights into constants)."""
    constants = [name for name in tensors if name.startswith(f"{CONSTANTS}.")]
    if not constants:
        return []
    shown = ", ".join(constants[:4]) + (", ..." if len(constants) > 4 else "")
    return [
        f"{path}: {len(constants)} tensors are TorchScript constants ({shown}), named as the "
        "archive's code names them (a frozen module keeps its weights there, without module paths)"
    ]


FORMAT = TorchScriptFormat()
