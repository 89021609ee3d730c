"""PyTorch's layout: `weight_ih_l{k}[_reverse]`, `weight_hh`, `bias_ih`, `bias_hh`, `weight_hr` tensors,
gates stacked along dimension 0 in canonical order (LSTM `[i, f, g, o]`, GRU `[r, z, n]`), two biases.

A module's name says nothing reliable about its kind (an LSTMCell may be called `rnn`), so the kind
comes from the shapes: `weight_hh` has `gates * hidden_size` rows, 4 for LSTM, 3 for GRU, 1 for RNN; a
layer's parameters carry an `_l{k}` (and `_reverse`) suffix, a cell's carry none.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from lstm_surgeon.checkpoint import Checkpoint, TensorRef
from lstm_surgeon.gates import FAMILY_BY_GATE_COUNT, Gate, gates_of
from lstm_surgeon.layers import (
    BIAS_HH,
    BIAS_IH,
    GATED_ROLES,
    PROJECTION,
    WEIGHT_HH,
    WEIGHT_IH,
    Cell,
    RecurrentLayer,
    Region,
)
from lstm_surgeon.layouts import Found, NewTensor
from lstm_surgeon.vocabulary import FORWARD, REVERSE

PARAMETER = re.compile(r"^(weight_ih|weight_hh|bias_ih|bias_hh|weight_hr)(?:_l(\d+)(_reverse)?)?$")
ROLE_ORDER = (WEIGHT_IH, WEIGHT_HH, BIAS_IH, BIAS_HH, PROJECTION)  # as nn.LSTM registers them


class ShapeMismatch(Exception):
    """A parameter whose shape fits no recurrent module; the message names the tensor."""


class PyTorchLayout:
    framework = "pytorch"

    def find_layers(self, checkpoint: Checkpoint) -> Found:
        found = Found()
        for module, parameters in _group_by_module(checkpoint.tensors.values()).items():
            try:
                layer = _layer_from(module, parameters)
            except ShapeMismatch as mismatch:
                found.warnings.append(str(mismatch))
                continue
            if layer is not None:
                found.layers.append(layer)
        return found

    def missing_biases(self, layer: RecurrentLayer, cell: Cell) -> list[NewTensor]:
        """`bias_ih` then `bias_hh`, right after the cell's `weight_hh` (torch's registration order)."""
        rows = len(layer.gates) * layer.hidden_size
        weight_hh = cell.tensor(WEIGHT_HH)
        assert weight_hh is not None
        bias_ih, bias_hh = (tensor_name(layer, role, cell) for role in (BIAS_IH, BIAS_HH))
        return [NewTensor(bias_ih, (rows,), weight_hh.name), NewTensor(bias_hh, (rows,), bias_ih)]


def module_parameter_name(layer: RecurrentLayer, role: str, cell: Cell) -> str:
    """The name torch's module gives the cell's parameter of `role` (`bias_hh_l1_reverse`)."""
    if layer.is_cell:
        return role
    return f"{role}_l{cell.layer}" + ("_reverse" if cell.direction == REVERSE else "")


def tensor_name(layer: RecurrentLayer, role: str, cell: Cell) -> str:
    """The full tensor name of the cell's parameter of `role` in a PyTorch state dict."""
    parameter = module_parameter_name(layer, role, cell)
    return f"{layer.name}.{parameter}" if layer.name else parameter


def gate_rows(position: int, hidden_size: int) -> range:
    """The rows of the gate at `position` (canonical order) in a PyTorch gate-stacked parameter."""
    return range(position * hidden_size, (position + 1) * hidden_size)


@dataclass(frozen=True)
class ModuleParameter:
    """One parameter of torch's module for a layer, and where its parts lie in the checkpoint:
    regions stacked along dimension 0 in canonical gate order (one region for a parameter without
    gates; none for the zero `bias_hh` a one-bias layout stands for)."""

    name: str  # as the module names it: `weight_ih_l0_reverse`
    role: str
    cell: Cell
    parts: tuple[tuple[str | None, Region], ...]  # (gate, region)
    zeros_like: Region | None = None  # the parameter is zeros shaped like this region's tensor part

    def raw(self, checkpoint: Checkpoint) -> np.ndarray:
        """The stored elements in torch's layout."""
        if self.zeros_like is not None:
            return np.zeros_like(self.zeros_like.raw(checkpoint))
        return np.concatenate([region.raw(checkpoint) for _, region in self.parts])


def module_parameters(layer: RecurrentLayer) -> list[ModuleParameter]:
    """Every parameter of torch's module for the layer, in the module's order, gathered through the
    regions of whatever layout found it. A layout with one bias per gate stands for `bias_ih` = that
    bias and `bias_hh` = zeros: the gate sees the same."""
    found: list[ModuleParameter] = []
    for cell in layer.cells:
        for role in ROLE_ORDER:
            parameter = _module_parameter(layer, cell, role)
            input_bias = cell.region(BIAS_IH)
            if parameter is None and role == BIAS_HH and input_bias is not None:
                name = module_parameter_name(layer, role, cell)
                parameter = ModuleParameter(name, role, cell, (), zeros_like=input_bias)
            if parameter is not None:
                found.append(parameter)
    return found


def module_state(checkpoint: Checkpoint, layer: RecurrentLayer) -> dict[str, np.ndarray]:
    """The layer's parameters as torch's module names and lays them out (stored elements)."""
    return {parameter.name: parameter.raw(checkpoint) for parameter in module_parameters(layer)}


def _module_parameter(layer: RecurrentLayer, cell: Cell, role: str) -> ModuleParameter | None:
    whole = cell.region(role)
    if whole is None:
        return None
    name = module_parameter_name(layer, role, cell)
    if role not in GATED_ROLES:
        return ModuleParameter(name, role, cell, ((None, whole),))
    parts = tuple(
        (gate.name, region)
        for gate in layer.gates
        if (region := cell.region(role, gate.name)) is not None
    )
    return ModuleParameter(name, role, cell, parts)


def cell_regions(
    refs: dict[str, TensorRef], gates: tuple[Gate, ...], hidden_size: int
) -> dict[tuple[str, str | None], Region]:
    """Every (role, gate) region of a cell whose tensors are `refs` (by role): gate k's rows are
    `[k * hidden_size, (k + 1) * hidden_size)`; weights keep every input column."""
    regions: dict[tuple[str, str | None], Region] = {}
    for role, ref in refs.items():
        columns = (range(0, ref.shape[1]),) if len(ref.shape) == 2 else ()
        input_axis = 1 if columns else None
        regions[(role, None)] = Region(ref, (range(0, ref.shape[0]), *columns), 0, input_axis)
        if role not in GATED_ROLES:
            continue
        for position, gate in enumerate(gates):
            rows = gate_rows(position, hidden_size)
            regions[(role, gate.name)] = Region(ref, (rows, *columns), 0, input_axis)
    return regions


def _cell(
    layer: int, direction: str, refs: dict[str, TensorRef], gates: tuple[Gate, ...], hidden: int
) -> Cell:
    ordered = {role: refs[role] for role in ROLE_ORDER if refs.get(role) is not None}
    return Cell(layer, direction, cell_regions(ordered, gates, hidden), tuple(ordered.values()))


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
    return _single_cell(module, parameters)


def _gate_count(weight_hh: TensorRef, hidden_size: int) -> int:
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


def _single_cell(module: str, parameters: dict[str, TensorRef]) -> RecurrentLayer | None:
    weight_ih, weight_hh = parameters.get(WEIGHT_IH), parameters.get(WEIGHT_HH)
    if weight_ih is None or weight_hh is None:
        return None
    _require_2d(weight_ih, weight_hh)
    hidden_size = weight_hh.shape[1]
    gate_count = _gate_count(weight_hh, hidden_size)
    rows = gate_count * hidden_size
    _check_shape(weight_ih, (rows, weight_ih.shape[1]))
    _check_shape(parameters.get(BIAS_IH), (rows,))
    _check_shape(parameters.get(BIAS_HH), (rows,))
    has_bias = _check_biases(module, [parameters.get(BIAS_IH), parameters.get(BIAS_HH)])
    kind = FAMILY_BY_GATE_COUNT[gate_count] + "Cell"
    gates = gates_of(kind)
    cell = _cell(0, FORWARD, parameters, gates, hidden_size)
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
        gates,
    )


def _by_cell(parameters: dict[str, TensorRef]) -> dict[tuple[int, str], dict[str, TensorRef]]:
    """The parameters of a stacked layer grouped by (sub-layer, direction), keyed by role."""
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
    return by_cell


def _stacked_layer(module: str, parameters: dict[str, TensorRef]) -> RecurrentLayer | None:
    by_cell = _by_cell(parameters)
    first = by_cell.get((0, FORWARD), {})
    if WEIGHT_IH not in first or WEIGHT_HH not in first:
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
    weight_ih, weight_hh = first[WEIGHT_IH], first[WEIGHT_HH]
    _require_2d(weight_ih, weight_hh)
    weight_hr = first.get(PROJECTION)
    if weight_hr is not None:
        _require_2d(weight_hr)
        proj_size, hidden_size = weight_hr.shape
    else:
        proj_size, hidden_size = 0, weight_hh.shape[1]
    gate_count = _gate_count(weight_hh, hidden_size)
    if proj_size and gate_count != 4:
        raise ShapeMismatch(f"{weight_hr.name}: only LSTM layers have projections")  # type: ignore[union-attr]
    kind = FAMILY_BY_GATE_COUNT[gate_count]
    shape = _StackShape(gate_count * hidden_size, hidden_size, proj_size, len(directions))
    for (k, _), refs in sorted(by_cell.items()):
        _check_sublayer(refs, k, shape, weight_ih.shape[1])
    cells = tuple(
        _cell(k, d, by_cell[(k, d)], gates_of(kind), hidden_size)
        for k in range(num_layers)
        for d in directions
    )
    biases = [by_cell[key].get(role) for key in sorted(by_cell) for role in (BIAS_IH, BIAS_HH)]
    has_bias = _check_biases(module, biases)
    return RecurrentLayer(
        module,
        kind,
        weight_ih.shape[1],
        hidden_size,
        proj_size,
        num_layers,
        bidirectional,
        has_bias,
        weight_ih.dtype.name,
        cells,
        gates_of(kind),
    )


@dataclass(frozen=True)
class _StackShape:
    """The sizes every sub-layer of a stacked layer must agree on."""

    rows: int
    hidden_size: int
    proj_size: int
    num_directions: int


def _check_sublayer(
    parameters: dict[str, TensorRef], layer: int, shape: _StackShape, input_size: int
) -> None:
    """Check the sub-layer's tensors against the shapes torch would give them."""
    output_size = shape.proj_size or shape.hidden_size
    missing = [name for name in (WEIGHT_IH, WEIGHT_HH) if name not in parameters]
    if missing or (shape.proj_size and PROJECTION not in parameters):
        some = next(iter(parameters.values()))
        raise ShapeMismatch(f"{some.name}: its sub-layer lacks {', '.join(missing) or 'weight_hr'}")
    layer_input = input_size if layer == 0 else shape.num_directions * output_size
    _check_shape(parameters[WEIGHT_IH], (shape.rows, layer_input))
    _check_shape(parameters[WEIGHT_HH], (shape.rows, output_size))
    _check_shape(parameters.get(BIAS_IH), (shape.rows,))
    _check_shape(parameters.get(BIAS_HH), (shape.rows,))
    if shape.proj_size:
        _check_shape(parameters[PROJECTION], (shape.proj_size, shape.hidden_size))
    elif PROJECTION in parameters:
        raise ShapeMismatch(f"{parameters[PROJECTION].name}: a projection in only some sub-layers")


LAYOUT = PyTorchLayout()
