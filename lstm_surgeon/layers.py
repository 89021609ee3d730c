"""The format-neutral model of a recurrent layer: its cells, and where each gate's parameters lie.

Every framework stores the same cells differently (gate orders, transposed kernels, one packed bias or
two), so nothing outside `layouts/` knows a tensor's layout. A layout describes each cell as regions:
for a parameter *role* (input weights, recurrent weights, input bias, recurrent bias, projection) and a
canonical gate, the tensor and the index into it. A region reads and writes its values in canonical
orientation: hidden units first, then (for weights) input features.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from lstm_surgeon.checkpoint import Checkpoint, TensorRef
from lstm_surgeon.dtypes import widen
from lstm_surgeon.gates import Gate

# Parameter roles: the canonical names of a cell's parameters (PyTorch's, as the JSON reports them).
WEIGHT_IH, WEIGHT_HH, BIAS_IH, BIAS_HH, PROJECTION = (
    "weight_ih",
    "weight_hh",
    "bias_ih",
    "bias_hh",
    "weight_hr",
)
GATED_ROLES = (WEIGHT_IH, WEIGHT_HH, BIAS_IH, BIAS_HH)
BIAS_ROLES = (BIAS_IH, BIAS_HH)

IndexPart = int | range | tuple[int, ...]
"""One dimension of a region's index: a fixed position, a range, or a list of positions."""


@dataclass(frozen=True)
class Region:
    """Where one gate's part of one parameter lies: a tensor and an index into it.

    `unit_axis` and `input_axis` say which entries of `index` run along the hidden units and along
    the input features (None for biases); the other entries are fixed positions (a direction, the
    row of a packed bias) or ranges of length one."""

    tensor: TensorRef
    index: tuple[IndexPart, ...]
    unit_axis: int
    input_axis: int | None = None

    @property
    def units(self) -> range:
        """The positions of the hidden units along the unit axis."""
        part = self.index[self.unit_axis]
        assert isinstance(part, range)
        return part

    @property
    def inputs(self) -> tuple[int, ...] | None:
        """The input features this region is restricted to (None: all of them, or a bias)."""
        if self.input_axis is None:
            return None
        part = self.index[self.input_axis]
        return part if isinstance(part, tuple) else None

    def numpy_index(self) -> tuple[Any, ...]:
        """The index as numpy takes it. With a list of positions, the kept dimensions become an
        open mesh (`np.ix_`): numpy would otherwise move the list's dimension to the front when a
        fixed position (an ONNX direction) and the list are separated by a range."""
        if not any(isinstance(part, tuple) for part in self.index):
            return tuple(
                slice(part.start, part.stop) if isinstance(part, range) else part
                for part in self.index
            )
        meshes = iter(np.ix_(*(list(part) for part in self.index if not isinstance(part, int))))
        return tuple(part if isinstance(part, int) else next(meshes) for part in self.index)

    def _moved_axes(self) -> tuple[int, ...]:
        """The positions, in the indexed array, of the unit axis and then the input axis."""
        kept = [axis for axis, part in enumerate(self.index) if not isinstance(part, int)]
        axes = [kept.index(self.unit_axis)]
        if self.input_axis is not None:
            axes.append(kept.index(self.input_axis))
        return tuple(axes)

    def canonical(self, stored: np.ndarray) -> np.ndarray:
        """Indexed elements of the tensor (`stored[numpy_index]`) as (units[, inputs])."""
        return np.moveaxis(stored, self._moved_axes(), range(len(self._moved_axes())))

    def stored(self, canonical: np.ndarray) -> np.ndarray:
        """The inverse of `canonical`: elements shaped as `tensor[numpy_index]`."""
        return np.moveaxis(canonical, range(len(self._moved_axes())), self._moved_axes())

    def raw_of(self, tensor: np.ndarray) -> np.ndarray:
        """This region of `tensor` (the stored elements of `self.tensor` or of a tensor shaped like
        it), in canonical orientation."""
        return self.canonical(tensor[self.numpy_index()])

    def raw(self, checkpoint: Checkpoint) -> np.ndarray:
        """The stored elements (bfloat16 as uint16), canonical orientation, read from the file."""
        return self.raw_of(checkpoint.raw(self.tensor))

    def values(self, checkpoint: Checkpoint) -> np.ndarray:
        """The exact values as float64, canonical orientation."""
        return widen(self.raw(checkpoint), self.tensor.dtype)

    def restricted_to_inputs(self, features: Iterable[int]) -> Region:
        """The same region over only some input features (a weight's columns in PyTorch)."""
        assert self.input_axis is not None
        index = list(self.index)
        index[self.input_axis] = tuple(features)
        return replace(self, index=tuple(index))

    def index_to_json(self) -> list[Any]:
        return [[part.start, part.stop] if isinstance(part, range) else part for part in self.index]


@dataclass(frozen=True)
class Cell:
    """One cell of a layer: a (sub-layer, direction) of a stacked layer, or a whole `*Cell` module.

    `regions` maps (role, gate name) to where that gate's part of the parameter lies, and
    (role, None) to the whole parameter (every gate at once, e.g. to zero an input feature)."""

    layer: int
    direction: str
    regions: dict[tuple[str, str | None], Region] = field(hash=False, compare=False)
    tensor_refs: tuple[TensorRef, ...] = ()

    def region(self, role: str, gate: str | None = None) -> Region | None:
        return self.regions.get((role, gate))

    def tensor(self, role: str) -> TensorRef | None:
        """The tensor holding the whole parameter of this role, if the cell has one."""
        whole = self.region(role)
        return None if whole is None else whole.tensor

    def tensors(self) -> list[TensorRef]:
        """Every tensor this cell reads (a tensor shared with other cells included)."""
        return list(self.tensor_refs)

    def bias_values(self, checkpoint: Checkpoint, gate: Gate) -> tuple[Any, Any]:
        """The gate's input-side and recurrent-side biases as float64 (None where not stored)."""
        return tuple(  # type: ignore[return-value]
            None if region is None else region.values(checkpoint)
            for region in (self.region(BIAS_IH, gate.name), self.region(BIAS_HH, gate.name))
        )


@dataclass(frozen=True)
class RecurrentLayer:
    """A recurrent module found in the checkpoint, described as its torch constructor would be."""

    name: str  # the layer's path ("" when the parameters sit at the root)
    kind: str  # LSTM, GRU, RNN, LSTMCell, GRUCell, RNNCell
    input_size: int
    hidden_size: int
    proj_size: int
    num_layers: int
    bidirectional: bool
    bias: bool
    dtype: str
    cells: tuple[Cell, ...]
    gates: tuple[Gate, ...]  # canonical order, with this layout's bias semantics
    framework: str = "pytorch"  # the layout that found it (`layouts._layouts`)
    # What the framework stores beyond PyTorch's constructor arguments (activations, clip, ...).
    attributes: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    # Why torch's module cannot compute this cell (peepholes, another activation...); () if it can.
    pytorch_differences: tuple[str, ...] = ()

    @property
    def is_cell(self) -> bool:
        return self.kind.endswith("Cell")

    @property
    def display_name(self) -> str:
        return self.name or "(root)"

    @property
    def bias_roles(self) -> tuple[str, ...]:
        """The bias roles this layer stores: both, or only the input-side one (one bias per gate)."""
        first = self.cells[0]
        return tuple(role for role in BIAS_ROLES if first.region(role) is not None)

    def tensor_names(self) -> set[str]:
        return {ref.name for cell in self.cells for ref in cell.tensors()}
