"""Carry out an `EditPlan`: patch bytes where they lie, or write a new file when the structure changes.

Same-structure edits to a file of the same format are patches: `-o` copies the file in the kernel and
writes the new slices into the copy; `--in-place` journals the old bytes, then writes the slices into the
file itself (into every file of a checkpoint split over several, all or nothing). Everything else
(tensors added or dropped, another output format) rewrites the file through its format module. Every
write is atomic, and the user is asked to confirm while nothing is locked.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from lstm_surgeon.checkpoint import Checkpoint, OutputTensor, StorageRef, TensorRef, tensor_view
from lstm_surgeon.dtypes import BY_NAME
from lstm_surgeon.errors import EditError, OutputError
from lstm_surgeon.formats import (
    CheckpointFormat,
    checkpoint_files,
    format_for_suffix,
    open_checkpoint_files,
    require_regular_file,
)
from lstm_surgeon.plan import EditPlan, SliceEdit, edited_copy
from lstm_surgeon.writing import (
    RECOVER_HINT,
    BytePatch,
    Progress,
    absolute,
    atomic_output,
    backup_copy,
    check_output_path,
    copy_file,
    entry_for,
    exclusive_locks,
    patch_files,
    recover_interrupted_edit,
    roll_back,
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


Source = Path | Sequence[Path]  # a checkpoint: its file, or the files it is split over
Planner = Callable[[Checkpoint], EditPlan]


def source_paths(source: Source) -> list[Path]:
    return [Path(source)] if isinstance(source, (str, os.PathLike)) else [Path(p) for p in source]


def recover_checkpoint(path: Path) -> bool:
    """Roll back an interrupted in-place edit of `path` (every file it touched; every file of a
    sharded or DCP folder); True if there was one. The editing commands do this first anyway;
    this is the call for doing only that."""
    files = checkpoint_files([path])
    for file in files:
        require_regular_file(file)
    return any([recover_interrupted_edit(file) for file in files])


def edit_checkpoint(
    path: Source,
    planner: Planner,
    destination: Destination | None,
    before_write: Callable[[EditPlan], bool] = lambda plan: True,
    progress: Progress | None = None,
) -> tuple[EditPlan, WriteResult | None]:
    """Open, plan, and (unless `destination` is None: a dry run) write; the whole edit in one call.

    `before_write` sees the plan before anything is written (to preview it, or to ask the user) and
    returns False to stop there. It runs while nothing is locked: an in-place edit then locks every
    file, opens and plans again, and refuses to write if the plan changed meanwhile (the file was
    edited while the user was deciding). A dry run only reads; an edit first rolls back an
    interrupted one. `path` may be the list of files one checkpoint is split over."""
    paths = source_paths(path)
    if destination is None:
        with open_checkpoint_files(paths) as checkpoint:
            return planner(checkpoint), None
    for each in checkpoint_files(paths):
        recover_interrupted_edit(each)
    with open_checkpoint_files(paths) as checkpoint:
        plan = planner(checkpoint)
        refuse_unsupported(checkpoint, plan, destination)
        if not before_write(plan):
            return plan, None
        if not destination.in_place:
            return plan, apply_plan(plan, checkpoint, destination, progress)
    with open_locked(paths) as checkpoint:
        require_same_plan(plan, planner(checkpoint), checkpoint)
        return plan, apply_plan(plan, checkpoint, destination, progress)


@contextlib.contextmanager
def open_locked(source: Source) -> Iterator[Checkpoint]:
    """Open a checkpoint to edit in place: every file locked (in one fixed order) from reading to
    writing, an interrupted edit rolled back first. `apply_plan` with `in_place` needs this."""
    paths = source_paths(source)
    files = checkpoint_files(paths)  # a folder's data files, not the folder
    with exclusive_locks(files) as held:
        for path in files:
            roll_back(path, held)
        with open_checkpoint_files(paths) as checkpoint:
            yield checkpoint


def require_same_plan(shown: EditPlan, now: EditPlan, checkpoint: Checkpoint) -> None:
    """Refuse to write a plan other than the one the user saw."""
    if _fingerprint(shown) != _fingerprint(now):
        raise EditError(
            f"{checkpoint.path}: changed after this edit was planned (another lstm-surgeon or "
            "another program edited it); nothing was written. Run the command again to plan the "
            "edit on the file as it is now"
        )


def _fingerprint(plan: EditPlan) -> tuple[str, tuple[bytes, ...]]:
    """What an edit shows and writes: its report, and the exact new elements."""
    report = json.dumps(plan.to_dict(), sort_keys=True, default=str)
    return report, tuple(np.ascontiguousarray(edit.new_raw).tobytes() for edit in plan.edits)


def refuse_unsupported(checkpoint: Checkpoint, plan: EditPlan, destination: Destination) -> None:
    """What a checkpoint of several files (or a folder) cannot do yet, said before anything is
    asked or written."""
    disk = checkpoint.disk_files
    if len(disk) == 1 and checkpoint.path == disk[0].path:
        return
    if not destination.in_place:
        raise OutputError(
            f"{checkpoint.path}: -o writes one file, and this checkpoint is {len(disk)} "
            "file(s) of a folder; edit it with --in-place (or copy the folder first)"
        )
    if destination.backup:
        raise OutputError(
            f"{checkpoint.path}: --backup of a checkpoint of several files is not supported yet"
        )
    if plan.changes_structure:
        raise EditError(
            f"{checkpoint.path}: adding or dropping tensors of a checkpoint of several files is "
            "not supported yet; only edits of existing values are"
        )


def apply_plan(
    plan: EditPlan,
    checkpoint: Checkpoint,
    destination: Destination,
    progress: Progress | None = None,
) -> WriteResult:
    """Write the plan's result where `destination` says (in-place edits need `open_locked`)."""
    refuse_unsupported(checkpoint, plan, destination)
    if any(file.pending_rollback for file in checkpoint.files):
        raise EditError(f"{checkpoint.path}: {RECOVER_HINT.format(path=checkpoint.path)} first")
    target = checkpoint.path if destination.in_place else destination.output
    assert target is not None
    target_format = _target_format(checkpoint, target, destination.in_place)
    if not destination.in_place:
        check_output_path(target, checkpoint.path, destination.force)
    backup = None
    if destination.in_place and destination.backup and plan.changes_anything:
        backup = str(backup_copy(checkpoint.path, destination.force))
    same_structure = (
        not plan.changes_structure
        and target_format is checkpoint.format
        and not _edits_in_memory(checkpoint, plan)
    )
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


def _edits_in_memory(checkpoint: Checkpoint, plan: EditPlan) -> bool:
    """True when an edit lands in bytes that lie in no file (an inflated compressed member): no
    patch can put them back, so the file is rewritten."""
    files = {
        checkpoint.tensors[edit.tensor].storage.file for edit in plan.edits if edit.changes_anything
    }
    return any(checkpoint.files[index].in_memory for index in files)


def _target_format(checkpoint: Checkpoint, target: Path, in_place: bool) -> CheckpointFormat:
    """An in-place edit keeps the file's format; so does a `-o` output with a suffix of that format
    (a `.pt` TorchScript archive stays one); another suffix may ask for another format."""
    if in_place or target.suffix.lower() in checkpoint.format.suffixes:
        return checkpoint.format
    return format_for_suffix(target) or checkpoint.format


def byte_patches(checkpoint: Checkpoint, edits: list[SliceEdit]) -> list[BytePatch]:
    """The bytes a same-structure edit writes, as (file, offset, old, new): each touched storage
    is edited in memory, trimmed to the bytes that change, plus the checksums the format keeps."""
    edits_by_storage: dict[tuple[int, str], list[SliceEdit]] = {}
    for edit in edits:
        storage = checkpoint.tensors[edit.tensor].storage
        edits_by_storage.setdefault(storage.identity, []).append(edit)
    patches, new_storages = [], {}
    for storage_edits in edits_by_storage.values():
        storage = checkpoint.tensors[storage_edits[0].tensor].storage
        buffer = checkpoint.files[storage.file].buffer
        old = bytes(buffer[storage.offset : storage.offset + storage.nbytes])
        new = bytearray(old)
        for edit in storage_edits:
            ref = checkpoint.tensors[edit.tensor]
            edit.write_into(tensor_view(new, replace(ref, storage=replace(storage, offset=0))))
        changed = _changed_span(storage, old, bytes(new))
        if changed:
            if not checkpoint.files[storage.file].gathered:  # the format patches its chunks
                patches += changed
            new_storages[storage] = bytes(new)
    return patches + checkpoint.format.checksum_patches(checkpoint, new_storages)


def _changed_span(storage: StorageRef, old: bytes, new: bytes) -> list[BytePatch]:
    differs = np.flatnonzero(np.frombuffer(old, np.uint8) != np.frombuffer(new, np.uint8))
    if differs.size == 0:
        return []
    first, last = int(differs[0]), int(differs[-1]) + 1
    offset = storage.offset + first
    return [BytePatch(offset, old[first:last], new[first:last], storage.file)]


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
    """Patch every file the edit touches, all or nothing (`writing.patch_files`: journals first,
    rolled back on any failure, Ctrl-C included). The caller holds the files' locks."""
    touched = sorted({patch.file for patch in patches})
    with contextlib.ExitStack() as stack:
        held, entries = {}, []
        for index in touched:
            path = checkpoint.files[index].path
            try:
                file = stack.enter_context(open(path, "r+b"))
            except OSError as error:
                raise OutputError(f"{path}: cannot open for editing: {error.strerror}") from None
            held[absolute(path)] = file
            entries.append(entry_for(path, file, [p for p in patches if p.file == index]))
        try:
            patch_files(entries, held)
        except OSError as error:
            raise OutputError(
                f"{checkpoint.path}: cannot write: {error.strerror or error}"
            ) from None


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
