"""Bytes two layers read: an edit of one layer's tensor changes the other layer too.

An exporter may feed one stored constant to two nodes (the two branches of an `If`, say). An edit
writes such bytes once. When a layer the plan does not edit reads bytes the plan changes, the edit
is refused and names that layer, so a `--layer` selection never changes a layer it did not select.
"""

from __future__ import annotations

import numpy as np

from lstm_surgeon.checkpoint import Checkpoint
from lstm_surgeon.discovery import discover
from lstm_surgeon.errors import EditError
from lstm_surgeon.layers import RecurrentLayer, Region
from lstm_surgeon.plan import EditPlan, SliceEdit

StorageIdentity = tuple[int, str]


def shared_bytes_notes(checkpoint: Checkpoint, plan: EditPlan) -> list[str]:
    """A note for each tensor the plan edits for several layers at once; an error when a layer
    the plan does not edit reads bytes it changes."""
    readers = _readers_by_storage(discover(checkpoint).layers)
    edited_layers = {edit.layer for edit in plan.edits}
    notes: dict[str, None] = {}
    for edit in plan.edits:
        identity = edit.region.tensor.storage.identity
        others = [layer for layer in readers.get(identity, []) if layer.name != edit.layer]
        if not edit.changes_anything or not others:
            continue
        changed = storage_elements(edit.region)
        for other in others:
            if not _reads_any(other, identity, changed):
                continue
            if other.name not in edited_layers:
                raise EditError(_refusal(edit, other))
            notes[
                f"layers {edit.layer!r} and {other.name!r} share tensor {edit.tensor!r}; "
                "its bytes are written once"
            ] = None
    return list(notes)


def _refusal(edit: SliceEdit, other: RecurrentLayer) -> str:
    return (
        f"editing layer {edit.layer!r} would also change layer {other.name!r}, which reads the same "
        f"bytes (tensor {edit.tensor!r}); select both layers (add --layer {other.name!r}) to edit "
        "them together"
    )


def _readers_by_storage(
    layers: list[RecurrentLayer],
) -> dict[StorageIdentity, list[RecurrentLayer]]:
    readers: dict[StorageIdentity, list[RecurrentLayer]] = {}
    for layer in layers:
        identities = {ref.storage.identity for cell in layer.cells for ref in cell.tensors()}
        for identity in identities:
            readers.setdefault(identity, []).append(layer)
    return readers


def _reads_any(layer: RecurrentLayer, identity: StorageIdentity, elements: np.ndarray) -> bool:
    """Whether any whole parameter of the layer in that storage covers one of `elements`."""
    return any(
        np.intersect1d(storage_elements(region), elements).size > 0
        for cell in layer.cells
        for (_, gate), region in cell.regions.items()
        if gate is None and region.tensor.storage.identity == identity
    )


def storage_elements(region: Region) -> np.ndarray:
    """The positions, in elements from its storage's start, of every element of the region."""
    ref = region.tensor
    positions = np.arange(ref.storage.nbytes // ref.dtype.itemsize, dtype=np.int64)
    view = np.lib.stride_tricks.as_strided(
        positions[ref.element_offset :],
        shape=ref.shape,
        strides=tuple(stride * positions.itemsize for stride in ref.element_strides),
        writeable=False,
    )
    return np.unique(view[region.numpy_index()])
