"""Framework layouts: how each framework names and lays out a recurrent cell's parameters.

A layout finds recurrent layers among a checkpoint's tensors and describes each cell as regions
(`layers.Region`): which tensor, which index, for every (parameter role, canonical gate). Everything
else (statistics, edits, diff, verify) goes through those regions and never slices a tensor itself.

Adding a layout means one new module with the same verbs and one line in `_layouts`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from lstm_surgeon.checkpoint import Checkpoint
    from lstm_surgeon.layers import Cell, RecurrentLayer


@dataclass
class Found:
    """What a layout found: layers, and warnings about tensors that look like its parameters but
    fit no recurrent module."""

    layers: list[RecurrentLayer] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class NewTensor:
    """A tensor a layout would add (zeros), placed right after `after` in the file."""

    name: str
    shape: tuple[int, ...]
    after: str


class Layout(Protocol):
    """The verbs every layout module provides."""

    framework: str

    def find_layers(self, checkpoint: Checkpoint) -> Found:
        """Every recurrent layer of this framework in the checkpoint (found by names *and* shapes,
        or by the operators of a model graph), in file order."""

    def missing_biases(self, layer: RecurrentLayer, cell: Cell) -> list[NewTensor]:
        """The zero bias tensors that make a bias-free cell load into a `bias=True` module."""


def _layouts() -> tuple[Layout, ...]:
    from lstm_surgeon.layouts import onnx, pytorch

    return (pytorch.LAYOUT, onnx.LAYOUT)


def layout_for(framework: str) -> Layout:
    """The layout that found a layer (`RecurrentLayer.framework`)."""
    return next(layout for layout in _layouts() if layout.framework == framework)


def find_layers(checkpoint: Checkpoint) -> Found:
    """The layers every registered layout finds in the checkpoint."""
    found = Found()
    for layout in _layouts():
        result = layout.find_layers(checkpoint)
        found.layers += result.layers
        found.warnings += result.warnings
    return found
