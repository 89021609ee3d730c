"""Carry out an `EditPlan`: patch bytes where they lie, or write a new file when the structure changes.

Same-structure edits to a file of the same format are patches: `-o` copies the file in the kernel and
writes the new slices into the copy; `--in-place` journals the old bytes, then writes the slices into the
file itself. Everything else (tensors added or dropped, another output format) rewrites the file through
its format module. Every write is atomic.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from lstm_surgeon.checkpoint import Checkpoint, OutputTensor, StorageRef, TensorRef, tensor_view
from lstm_surgeon.dtypes import BY_NAME
from lstm_surgeon.errors import OutputError
from lstm_surgeon.formats import CheckpointFormat, format_for_suffix, open_checkpoint
from lstm_surgeon.plan import EditPlan, SliceEdit, edited_copy
from lstm_surgeon.writing import (
    BytePatch,
    Progress,
    atomic_output,
    backup_copy,
    check_output_path,
    copy_file,
    exclusive_lock,
    fault_point,
    finish_journal,
    roll_back,
    write_journal,
    write_patches,
)


@dataclass(frozen=True)
class Destination:
    """Where an edit goes: a new file (`output`) or the input itself (`in_place`)."""

    output: Path | None = None
    in_place: bool = False
    force: bool = False
    backup: bool = False
    fsync: bool = False  # make a -o output durable against power loss (in-place edits always are)

    @property
    def durable(self) -> bool:
        return self.in_place or self.fsync

    def __post_init__(self) -> None:
        if (self.output is None) == (not self.in_place):
            raise OutputError("give exactly one of -o/--output PATH and --in-place")


@dataclass(frozen=True)
class WriteResult:
    path: str
    format: str
    in_place: bool
    written: bool
    method: str  # "patch", "copy" (-o with nothing to change), "rewrite" or "none" (in place)
    backup: str | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "format": self.format,
            "in_place": self.in_place,
            "written": self.written,
            "method": self.method,
            "backup": self.backup,
        }


@contextlib.contextmanager
def open_for_edit(path: Path, in_place: bool) -> Iterator[Checkpoint]:
    """Open a checkpoint to edit; for in-place edits, hold the file's lock from reading to writing."""
    if not in_place:
        with open_checkpoint(path) as checkpoint:
            yield checkpoint
        return
    with exclusive_lock(path) as locked:
        roll_back(path, locked)
        with open_checkpoint(path, recover=False) as checkpoint:
            yield checkpoint


Planner = Callable[[Checkpoint], EditPlan]


def edit_checkpoint(
    path: Path,
    planner: Planner,
    destination: Destination | None,
    before_write: Callable[[EditPlan], bool] = lambda plan: True,
    progress: Progress | None = None,
) -> tuple[EditPlan, WriteResult | None]:
    """Open, plan, and (unless `destination` is None: a dry run) write; the whole edit in one call.

    `before_write` sees the plan before anything is written (to preview it, or to ask the user) and
    returns False to stop there. For in-place edits the file stays locked from reading to writing."""
    in_place = destination is not None and destination.in_place
    with open_for_edit(path, in_place) as checkpoint:
        plan = planner(checkpoint)
        if destination is None or not before_write(plan):
            return plan, None
        return plan, apply_plan(plan, checkpoint, destination, progress)


def apply_plan(
    plan: EditPlan,
    checkpoint: Checkpoint,
    destination: Destination,
    progress: Progress | None = None,
) -> WriteResult:
    """Write the plan's result where `destination` says (in-place edits need `open_for_edit`)."""
    target = checkpoint.path if destination.in_place else destination.output
    assert target is not None
    target_format = _target_format(checkpoint, target, destination.in_place)
    if not destination.in_place:
        check_output_path(target, checkpoint.path, destination.force)
    backup = None
    if destination.in_place and destination.backup and plan.changes_anything:
        backup = str(backup_copy(checkpoint.path, destination.force))
    same_structure = not plan.changes_structure and target_format is checkpoint.format
    patches = byte_patches(checkpoint, plan.edits) if same_structure else []
    if destination.in_place and not patches and same_structure:
        method = "none"
    elif same_structure and destination.in_place:
        _patch_in_place(checkpoint, patches)
        method = "patch"
    elif same_structure:
        _copy_and_patch(checkpoint, patches, target, destination.durable, progress)
        method = "patch" if patches else "copy"
    else:
        _rewrite(checkpoint, plan, target, target_format, destination.durable)
        method = "rewrite"
    return WriteResult(
        str(target), target_format.name, destination.in_place, method != "none", method, backup
    )


def _target_format(checkpoint: Checkpoint, target: Path, in_place: bool) -> CheckpointFormat:
    """An in-place edit keeps the file's format; a `-o` output's suffix may ask for another."""
    if in_place:
        return checkpoint.format
    return format_for_suffix(target) or checkpoint.format


def byte_patches(checkpoint: Checkpoint, edits: list[SliceEdit]) -> list[BytePatch]:
    """The bytes a same-structure edit writes, as (offset, old, new): each touched storage is
    edited in memory, trimmed to the bytes that change, plus the checksums the format keeps."""
    edits_by_storage: dict[str, list[SliceEdit]] = {}
    for edit in edits:
        key = checkpoint.tensors[edit.tensor].storage.key
        edits_by_storage.setdefault(key, []).append(edit)
    patches, new_storages = [], {}
    for key, storage_edits in edits_by_storage.items():
        storage = checkpoint.tensors[storage_edits[0].tensor].storage
        old = bytes(checkpoint.buffer[storage.offset : storage.offset + storage.nbytes])
        new = bytearray(old)
        for edit in storage_edits:
            ref = checkpoint.tensors[edit.tensor]
            edit.write_into(tensor_view(new, replace(ref, storage=replace(storage, offset=0))))
        changed = _changed_span(storage.offset, old, bytes(new))
        if changed:
            patches += changed
            new_storages[key] = bytes(new)
    return patches + checkpoint.format.checksum_patches(checkpoint, new_storages)


def _changed_span(offset: int, old: bytes, new: bytes) -> list[BytePatch]:
    differs = np.flatnonzero(np.frombuffer(old, np.uint8) != np.frombuffer(new, np.uint8))
    if differs.size == 0:
        return []
    first, last = int(differs[0]), int(differs[-1]) + 1
    return [BytePatch(offset + first, old[first:last], new[first:last])]


def _copy_and_patch(
    checkpoint: Checkpoint,
    patches: list[BytePatch],
    target: Path,
    durable: bool,
    progress: Progress | None,
) -> None:
    with (
        open(checkpoint.path, "rb") as source,
        atomic_output(target, _mode(checkpoint), durable) as out,
    ):
        copy_file(source, out, checkpoint.size, progress)
        write_patches(out, patches)


def _patch_in_place(checkpoint: Checkpoint, patches: list[BytePatch]) -> None:
    """Journal the old and new bytes, patch, make it durable, drop the journal; roll back on any
    failure (Ctrl-C included)."""
    path = checkpoint.path
    try:
        file = open(path, "r+b")  # noqa: SIM115 - closed in the finally below
    except OSError as error:
        raise OutputError(f"{path}: cannot open for editing: {error.strerror}") from None
    try:
        try:
            write_journal(path, file, patches)
            fault_point("after-journal")
            write_patches(file, patches[:1])
            fault_point("mid-patch")
            write_patches(file, patches[1:])
            os.fsync(file.fileno())
            fault_point("before-journal-removal")
        except BaseException:
            roll_back(path, file)
            raise
        finish_journal(path)
    except OSError as error:
        raise OutputError(f"{path}: cannot write: {error.strerror or error}") from None
    finally:
        file.close()


def _mode(checkpoint: Checkpoint) -> int:
    return checkpoint.path.stat().st_mode


def _rewrite(
    checkpoint: Checkpoint,
    plan: EditPlan,
    target: Path,
    target_format: CheckpointFormat,
    durable: bool,
) -> None:
    drop_keys = checkpoint.optimizer_keys() if plan.drop_optimizer_state else frozenset()
    tensors = output_tensors(checkpoint, plan, drop_keys)
    with atomic_output(target, _mode(checkpoint), durable) as out:
        target_format.write(out, tensors, checkpoint, drop_keys)


def output_tensors(
    checkpoint: Checkpoint, plan: EditPlan, drop_keys: frozenset[str] = frozenset()
) -> list[OutputTensor]:
    """The tensors of the new file, in order: the source's, less removals, plus additions placed
    right after their anchors, with edited tensors carrying their new elements."""
    removed = {removal.tensor for removal in plan.removals}
    edits_by_tensor: dict[str, list[SliceEdit]] = {}
    for edit in plan.edits:
        edits_by_tensor.setdefault(edit.tensor, []).append(edit)
    followers: dict[str, list[OutputTensor]] = {}
    for addition in plan.additions:
        dtype = BY_NAME[addition.dtype]
        ref = TensorRef(addition.tensor, dtype, addition.shape, StorageRef("", 0, 0))
        new = OutputTensor(ref, data=np.zeros(addition.shape, dtype=dtype.storage))
        followers.setdefault(addition.after, []).append(new)
    result: list[OutputTensor] = []

    def emit(tensor: OutputTensor) -> None:
        result.append(tensor)
        for follower in followers.get(tensor.ref.name, []):
            emit(follower)

    for name, ref in checkpoint.tensors.items():
        if name in removed or name.split(".", 1)[0] in drop_keys:
            continue
        if name in edits_by_tensor:
            emit(OutputTensor(ref, data=edited_copy(checkpoint.raw(ref), edits_by_tensor[name])))
        else:
            emit(OutputTensor(ref, source=ref))
    return result
