"""Keras's layout: transposed kernels, gates in Keras's order, one bias or a packed pair.

- `kernel` `[input, gates * units]` and `recurrent_kernel` `[units, gates * units]`: a gate's units run
  along axis 1 (block k of `units` columns), its inputs along axis 0: PyTorch's weight transposed.
- Gate blocks: LSTM `i, f, c, o` (PyTorch's order), GRU `z, r, h` (PyTorch's `r, z, n` with the first
  two swapped), SimpleRNN one.
- Biases: LSTM and SimpleRNN one `[gates * units]` (what the gate sees: `bias_ih` only); GRU with
  `reset_after=True` `[2, gates * units]` (row 0 the input bias, row 1 the recurrent one, PyTorch's
  equations); GRU with `reset_after=False` one `[gates * units]`, the reset gate applied before the
  recurrent product (PyTorch has no such cell); Keras 2's CuDNNLSTM/CuDNNGRU `[2 * gates * units]`,
  the input half then the recurrent half.
- CuDNN kernels keep each gate's block in cuDNN's memory order: the `[rows, units]` block holds, in
  row-major order, cuDNN's `[units, rows]` matrix (Keras 2's own conversion to LSTM, `transpose_input`
  with `order='F'` and a plain transpose of the recurrent blocks, reads them so). `CuDNNKernelRegion`
  reads a block that way; it covers the gate's elements exactly, but no input feature's column.
- `Bidirectional`: its forward and backward layers are one layer with two directions.

Layers come from the operators the Keras formats read (`formats/keras_weights.py`); the shapes are
checked against the kind before any region is made.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lstm_surgeon.checkpoint import Checkpoint, Operator, TensorRef
from lstm_surgeon.errors import EditError
from lstm_surgeon.gates import Gate, gates_of, with_summing_new_gate
from lstm_surgeon.layers import (
    BIAS_HH,
    BIAS_IH,
    WEIGHT_HH,
    WEIGHT_IH,
    Cell,
    RecurrentLayer,
    Region,
)
from lstm_surgeon.layouts import Found, NewTensor
from lstm_surgeon.vocabulary import FORWARD, REVERSE

KERAS_FORMATS = ("hdf5", "keras")
STORED_ORDER = {  # canonical gate names in the order Keras stacks their blocks
    "LSTM": ("input", "forget", "cell", "output"),
    "GRU": ("update", "reset", "new"),
    "RNN": ("hidden",),
}
TORCH_KIND = {
    "LSTM": "LSTM",
    "CuDNNLSTM": "LSTM",
    "GRU": "GRU",
    "CuDNNGRU": "GRU",
    "SimpleRNN": "RNN",
}
DIRECTION_PREFIX = {FORWARD: "", REVERSE: "backward_"}


class ShapeMismatch(Exception):
    """Weights whose shapes do not fit the layer's class; the message names the tensor."""


@dataclass(frozen=True)
class CuDNNKernelRegion(Region):
    """Blocks of a CuDNN kernel: each `[rows, units]` block holds cuDNN's `[units, rows]` matrix
    in row-major order. `canonical` gives `[blocks * units, rows]` (units, then inputs)."""

    hidden_size: int = 0

    def canonical(self, stored: np.ndarray) -> np.ndarray:
        rows, width = stored.shape
        blocks = np.split(np.asarray(stored), width // self.hidden_size, axis=1)
        return np.concatenate(
            [np.ascontiguousarray(b).reshape(self.hidden_size, rows) for b in blocks]
        )

    def stored(self, canonical: np.ndarray) -> np.ndarray:
        units, rows = canonical.shape
        blocks = np.split(np.asarray(canonical), units // self.hidden_size, axis=0)
        return np.concatenate(
            [np.ascontiguousarray(b).reshape(rows, self.hidden_size) for b in blocks], axis=1
        )

    def restricted_to_inputs(self, features: object) -> Region:
        raise EditError(
            f"{self.tensor.name}: a CuDNN kernel keeps no input feature in its own columns; "
            "zero-input is not supported for CuDNN layers"
        )


class KerasLayout:
    framework = "keras"

    def find_layers(self, checkpoint: Checkpoint) -> Found:
        found = Found()
        if checkpoint.format_name not in KERAS_FORMATS:
            return found
        for operator in checkpoint.contents.operators:
            try:
                found.layers.append(_layer(operator, checkpoint.tensors))
            except ShapeMismatch as mismatch:
                found.warnings.append(f"{operator.name}: {mismatch}")
        return found

    def missing_biases(self, layer: RecurrentLayer, cell: Cell) -> list[NewTensor]:
        raise EditError(
            f"{layer.display_name}: a Keras layer built with use_bias=False; its model config "
            "would disagree with an added bias: rebuild it in Keras with use_bias=True"
        )


def _layer(operator: Operator, tensors: dict[str, TensorRef]) -> RecurrentLayer:
    keras_class = operator.kind
    kind = TORCH_KIND.get(keras_class)
    if kind is None:
        raise ShapeMismatch(f"unknown recurrent class {keras_class!r}")
    directions = (FORWARD, REVERSE) if operator.attributes.get("bidirectional") else (FORWARD,)
    weights = [_weights(operator, tensors, direction) for direction in directions]
    kernel, recurrent, bias = weights[0]
    hidden = recurrent.shape[0] if len(recurrent.shape) == 2 else 0
    gates = _gates(kind, operator)
    shapes = _Shapes(kind, keras_class, kernel.shape[0] if kernel.shape else 0, hidden)
    cells = tuple(
        _cell(direction, refs, shapes, gates)
        for direction, refs in zip(directions, weights, strict=True)
    )
    return RecurrentLayer(
        operator.name,
        kind,
        shapes.input_size,
        hidden,
        0,
        1,
        len(directions) == 2,
        bias is not None,
        kernel.dtype.name,
        cells,
        gates,
        KerasLayout.framework,
        dict(operator.attributes),
        _pytorch_differences(kind, operator.attributes),
    )


def _weights(
    operator: Operator, tensors: dict[str, TensorRef], direction: str
) -> tuple[TensorRef, TensorRef, TensorRef | None]:
    prefix = DIRECTION_PREFIX[direction]
    names = [operator.inputs.get(prefix + var) for var in ("kernel", "recurrent_kernel", "bias")]
    if names[0] is None or names[1] is None:
        raise ShapeMismatch(f"the {direction} direction lacks its kernel or recurrent kernel")
    kernel, recurrent = tensors[names[0]], tensors[names[1]]
    return kernel, recurrent, None if names[2] is None else tensors[names[2]]


def _gates(kind: str, operator: Operator) -> tuple[Gate, ...]:
    gates = gates_of(kind)
    if kind == "GRU" and operator.attributes.get("reset_after") is False:
        return with_summing_new_gate(gates)
    return gates


def _pytorch_differences(kind: str, attributes: dict[str, object]) -> tuple[str, ...]:
    """What torch's module cannot compute of this Keras layer."""
    differences = []
    if kind == "GRU" and attributes.get("reset_after") is False:
        differences.append("reset_after=False: the reset gate applies before the recurrent product")
    recurrent_activation = attributes.get("recurrent_activation", "sigmoid")
    if kind != "RNN" and recurrent_activation != "sigmoid":
        assumed = " (assumed)" if attributes.get("recurrent_activation_assumed") else ""
        differences.append(f"recurrent_activation={recurrent_activation}{assumed}")
    if attributes.get("activation", "tanh") != "tanh":
        differences.append(f"activation={attributes['activation']}")
    if attributes.get("go_backwards"):
        differences.append("go_backwards=True: the sequence runs in reverse")
    return tuple(differences)


@dataclass(frozen=True)
class _Shapes:
    kind: str
    keras_class: str
    input_size: int
    hidden_size: int

    @property
    def width(self) -> int:
        return len(STORED_ORDER[self.kind]) * self.hidden_size

    @property
    def cudnn(self) -> bool:
        return self.keras_class.startswith("CuDNN")


def _cell(
    direction: str,
    refs: tuple[TensorRef, TensorRef, TensorRef | None],
    shapes: _Shapes,
    gates: tuple[Gate, ...],
) -> Cell:
    kernel, recurrent, bias = refs
    _check(kernel, (shapes.input_size, shapes.width))
    _check(recurrent, (shapes.hidden_size, shapes.width))
    regions = {}
    regions.update(_kernel_regions(WEIGHT_IH, kernel, shapes))
    regions.update(_kernel_regions(WEIGHT_HH, recurrent, shapes))
    if bias is not None:
        regions.update(_bias_regions(bias, shapes, gates))
    ordered = tuple(ref for ref in refs if ref is not None)
    return Cell(0, direction, regions, ordered)


def _check(ref: TensorRef, expected: tuple[int, ...]) -> None:
    if ref.shape != expected or not ref.dtype.is_float:
        raise ShapeMismatch(
            f"{ref.name}: {ref.dtype.name} {list(ref.shape)}, expected {list(expected)}"
        )


def _blocks(shapes: _Shapes) -> list[tuple[str | None, range]]:
    """(canonical gate, its units' positions along a gate axis), and (None, every position)."""
    hidden = shapes.hidden_size
    blocks: list[tuple[str | None, range]] = [(None, range(0, shapes.width))]
    for block, gate in enumerate(STORED_ORDER[shapes.kind]):
        blocks.append((gate, range(block * hidden, (block + 1) * hidden)))
    return blocks


def _kernel_regions(
    role: str, ref: TensorRef, shapes: _Shapes
) -> dict[tuple[str, str | None], Region]:
    rows = range(0, ref.shape[0])
    if shapes.cudnn:
        return {
            (role, gate): CuDNNKernelRegion(ref, (rows, units), 1, 0, shapes.hidden_size)
            for gate, units in _blocks(shapes)
        }
    return {(role, gate): Region(ref, (rows, units), 1, 0) for gate, units in _blocks(shapes)}


def _bias_regions(
    ref: TensorRef, shapes: _Shapes, gates: tuple[Gate, ...]
) -> dict[tuple[str, str | None], Region]:
    """One bias (`bias_ih` only), GRU's `[2, width]` rows, or CuDNN's two halves."""
    width = shapes.width
    regions: dict[tuple[str, str | None], Region] = {}
    if ref.shape == (2, width) and shapes.kind == "GRU" and gates[-1].biases_sum is False:
        for row, role in enumerate((BIAS_IH, BIAS_HH)):
            for gate, units in _blocks(shapes):
                regions[(role, gate)] = Region(ref, (row, units), 1)
        return regions
    if shapes.cudnn and ref.shape == (2 * width,):
        for half, role in enumerate((BIAS_IH, BIAS_HH)):
            for gate, units in _blocks(shapes):
                shifted = range(units.start + half * width, units.stop + half * width)
                regions[(role, gate)] = Region(ref, (shifted,), 0)
        return regions
    _check(ref, (width,))
    return {(BIAS_IH, gate): Region(ref, (units,), 0) for gate, units in _blocks(shapes)}


LAYOUT = KerasLayout()
