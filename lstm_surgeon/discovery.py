"""Find every recurrent layer and cell in a checkpoint, by parameter names *and* shapes.

A module's name says nothing reliable about its kind (an LSTMCell may be called `rnn`), so the kind comes
from the shapes: `weight_hh` has `gates * hidden_size` rows, 4 for LSTM, 3 for GRU, 1 for RNN; a layer's
parameters carry an `_l{k}` (and `_reverse`) suffix, a cell's carry none.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from lstm_surgeon.checkpoint import Checkpoint, TensorRef
from lstm_surgeon.gates import FAMILY_BY_GATE_COUNT, Gate, gates_of

PARAMETER = re.compile(r"^(weight_ih|weight_hh|bias_ih|bias_hh|weight_hr)(?:_l(\d+)(_reverse)?)?$")
FORWARD, REVERSE = "forward", "reverse"


@dataclass(frozen=True)
class CellParams:
    """The tensors of one cell: a (sub-layer, direction) of a layer, or a whole `nn.*Cell`."""

    layer: int
    direction: str
    weight_ih: TensorRef
    weight_hh: TensorRef
    bias_ih: TensorRef | None = None
    bias_hh: TensorRef | None = None
    weight_hr: TensorRef | None = None

    def tensors(self) -> list[TensorRef]:
        found = [self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh, self.weight_hr]
        return [ref for ref in found if ref is not None]


@dataclass(frozen=True)
class RecurrentLayer:
    """A recurrent module found in the checkpoint, described as its torch constructor would be."""

    name: str  # dotted path to the module ("" when the parameters sit at the root)
    kind: str  # LSTM, GRU, RNN, LSTMCell, GRUCell, RNNCell
    input_size: int
    hidden_size: int
    proj_size: int
    num_layers: int
    bidirectional: bool
    bias: bool
    dtype: str
    cells: tuple[CellParams, ...]

    @property
    def is_cell(self) -> bool:
        return self.kind.endswith("Cell")

    @property
    def gates(self) -> tuple[Gate, ...]:
        return gates_of(self.kind)

    @property
    def display_name(self) -> str:
        return self.name or "(root)"

    def parameter_name(self, parameter: str, cell: CellParams) -> str:
        """The full tensor name of `parameter` ("bias_ih", ...) for `cell`, present or not."""
        suffix = (
            ""
            if self.is_cell
            else f"_l{cell.layer}" + ("_reverse" if cell.direction == REVERSE else "")
        )
        return f"{self.name}.{parameter}{suffix}" if self.name else f"{parameter}{suffix}"

    def tensor_names(self) -> set[str]:
        return {ref.name for cell in self.cells for ref in cell.tensors()}


@dataclass
class Discovery:
    """What discovery found: the layers, and warnings about parameters that fit no recurrent module."""

    layers: list[RecurrentLayer] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def recurrent_tensor_names(self) -> set[str]:
        return {name for layer in self.layers for name in layer.tensor_names()}


class ShapeMismatch(Exception):
    """A parameter whose shape fits no recurrent module; the message names the tensor."""


def discover(checkpoint: Checkpoint, layer_globs: Iterable[str] = ()) -> Discovery:
    """Every recurrent layer of the checkpoint (those whose name matches a glob, if globs are given)."""
    result = Discovery()
    for module, parameters in _group_by_module(checkpoint.tensors.values()).items():
        try:
            layer = _layer_from(module, parameters)
        except ShapeMismatch as mismatch:
            result.warnings.append(str(mismatch))
            continue
        if layer is not None:
            result.layers.append(layer)
    result.layers = select_layers(result.layers, layer_globs)
    return result


def select_layers(layers: list[RecurrentLayer], globs: Iterable[str]) -> list[RecurrentLayer]:
    """The layers whose name matches any of the globs (all of them when no glob is given)."""
    globs = list(globs)
    if not globs:
        return list(layers)
    return [layer for layer in layers if any(fnmatch.fnmatchcase(layer.name, g) for g in globs)]


def _group_by_module(tensors: Iterable[TensorRef]) -> dict[str, dict[str, TensorRef]]:
    groups: dict[str, dict[str, TensorRef]] = {}
    for ref in tensors:
        module, _, parameter = ref.name.rpartition(".")
        if PARAMETER.match(parameter):
            groups.setdefault(module, {})[parameter] = ref
    return groups


def _layer_from(module: str, parameters: dict[str, TensorRef]) -> RecurrentLayer | None:
    has_suffix = any(PARAMETER.match(p).group(2) is not None for p in parameters)  # type: ignore[union-attr]
    if has_suffix:
        return _stacked_layer(module, parameters)
    return _cell(module, parameters)


def _gate_count(module: str, weight_hh: TensorRef, hidden_size: int) -> int:
    rows = weight_hh.shape[0]
    if hidden_size <= 0 or rows % hidden_size or rows // hidden_size not in FAMILY_BY_GATE_COUNT:
        raise ShapeMismatch(
            f"{weight_hh.name}: shape {list(weight_hh.shape)} fits no LSTM, GRU or RNN "
            f"(rows must be 4, 3 or 1 times the hidden size {hidden_size})"
        )
    return rows // hidden_size


def _require_2d(*refs: TensorRef) -> None:
    for ref in refs:
        if len(ref.shape) != 2:
            raise ShapeMismatch(f"{ref.name}: expected a 2-D weight, found shape {list(ref.shape)}")


def _check_shape(ref: TensorRef | None, expected: tuple[int, ...]) -> None:
    if ref is not None and ref.shape != expected:
        raise ShapeMismatch(f"{ref.name}: shape {list(ref.shape)}, expected {list(expected)}")


def _check_biases(module: str, biases: list[TensorRef | None]) -> bool:
    present = [ref is not None for ref in biases]
    if any(present) and not all(present):
        found = next(ref for ref in biases if ref is not None)
        raise ShapeMismatch(f"{found.name}: some bias tensors of {module or '(root)'} are missing")
    return all(present)


def _cell(module: str, parameters: dict[str, TensorRef]) -> RecurrentLayer | None:
    weight_ih, weight_hh = parameters.get("weight_ih"), parameters.get("weight_hh")
    if weight_ih is None or weight_hh is None:
        return None
    _require_2d(weight_ih, weight_hh)
    hidden_size = weight_hh.shape[1]
    gate_count = _gate_count(module, weight_hh, hidden_size)
    rows = gate_count * hidden_size
    _check_shape(weight_ih, (rows, weight_ih.shape[1]))
    bias_ih, bias_hh = parameters.get("bias_ih"), parameters.get("bias_hh")
    _check_shape(bias_ih, (rows,))
    _check_shape(bias_hh, (rows,))
    has_bias = _check_biases(module, [bias_ih, bias_hh])
    cell = CellParams(0, FORWARD, weight_ih, weight_hh, bias_ih, bias_hh)
    kind = FAMILY_BY_GATE_COUNT[gate_count] + "Cell"
    return RecurrentLayer(
        module,
        kind,
        weight_ih.shape[1],
        hidden_size,
        0,
        1,
        False,
        has_bias,
        weight_ih.dtype.name,
        (cell,),
    )


def _stacked_layer(module: str, parameters: dict[str, TensorRef]) -> RecurrentLayer | None:
    by_cell: dict[tuple[int, str], dict[str, TensorRef]] = {}
    for parameter, ref in parameters.items():
        match = PARAMETER.match(parameter)
        assert match is not None
        if match.group(2) is None:
            raise ShapeMismatch(
                f"{ref.name}: a cell parameter among the parameters of a stacked layer"
            )
        direction = REVERSE if match.group(3) else FORWARD
        by_cell.setdefault((int(match.group(2)), direction), {})[match.group(1)] = ref
    first = by_cell.get((0, FORWARD), {})
    if "weight_ih" not in first or "weight_hh" not in first:
        some = next(iter(parameters.values()))
        raise ShapeMismatch(f"{some.name}: {module or '(root)'} lacks weight_ih_l0 or weight_hh_l0")
    num_layers = 1 + max(index for index, _ in by_cell)
    bidirectional = any(direction == REVERSE for _, direction in by_cell)
    directions = (FORWARD, REVERSE) if bidirectional else (FORWARD,)
    expected = {(k, d) for k in range(num_layers) for d in directions}
    for key in sorted(set(by_cell) ^ expected):
        some = next(iter(by_cell.get(key, first).values()))
        raise ShapeMismatch(
            f"{some.name}: sub-layer {key[0]} {key[1]} of {module or '(root)'} is incomplete"
        )
    weight_ih, weight_hh = first["weight_ih"], first["weight_hh"]
    _require_2d(weight_ih, weight_hh)
    weight_hr = first.get("weight_hr")
    if weight_hr is not None:
        _require_2d(weight_hr)
        proj_size, hidden_size = weight_hr.shape
    else:
        proj_size, hidden_size = 0, weight_hh.shape[1]
    gate_count = _gate_count(module, weight_hh, hidden_size)
    if proj_size and gate_count != 4:
        raise ShapeMismatch(f"{weight_hr.name}: only LSTM layers have projections")  # type: ignore[union-attr]
    cells = [
        _checked_cell(
            by_cell[(k, d)],
            k,
            d,
            gate_count,
            hidden_size,
            proj_size,
            len(directions),
            weight_ih.shape[1],
        )
        for k in range(num_layers)
        for d in directions
    ]
    has_bias = _check_biases(
        module, [ref for cell in cells for ref in (cell.bias_ih, cell.bias_hh)]
    )
    return RecurrentLayer(
        module,
        FAMILY_BY_GATE_COUNT[gate_count],
        weight_ih.shape[1],
        hidden_size,
        proj_size,
        num_layers,
        bidirectional,
        has_bias,
        weight_ih.dtype.name,
        tuple(cells),
    )


def _checked_cell(
    parameters: dict[str, TensorRef],
    layer: int,
    direction: str,
    gate_count: int,
    hidden_size: int,
    proj_size: int,
    num_directions: int,
    input_size: int,
) -> CellParams:
    """The cell's tensors, each checked against the shape torch would give it."""
    rows = gate_count * hidden_size
    output_size = proj_size or hidden_size
    missing = [name for name in ("weight_ih", "weight_hh") if name not in parameters]
    if missing or (proj_size and "weight_hr" not in parameters):
        some = next(iter(parameters.values()))
        raise ShapeMismatch(f"{some.name}: its sub-layer lacks {', '.join(missing) or 'weight_hr'}")
    layer_input = input_size if layer == 0 else num_directions * output_size
    _check_shape(parameters["weight_ih"], (rows, layer_input))
    _check_shape(parameters["weight_hh"], (rows, output_size))
    _check_shape(parameters.get("bias_ih"), (rows,))
    _check_shape(parameters.get("bias_hh"), (rows,))
    if proj_size:
        _check_shape(parameters["weight_hr"], (proj_size, hidden_size))
    elif "weight_hr" in parameters:
        raise ShapeMismatch(f"{parameters['weight_hr'].name}: a projection in only some sub-layers")
    return CellParams(
        layer,
        direction,
        parameters["weight_ih"],
        parameters["weight_hh"],
        parameters.get("bias_ih"),
        parameters.get("bias_hh"),
        parameters.get("weight_hr"),
    )
