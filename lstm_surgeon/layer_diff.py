"""`diff` across frameworks: recurrent layers compared gate by gate in canonical gate names.

Two files of different layouts (an ONNX export against the PyTorch checkpoint it came from, a Keras
file against a converted state dict) share no tensor names, so layers are matched instead: explicitly
(`--match A=B`), else by name (as `convert` names them), else in order among layers of the same kind
and sizes. Each side is read in torch's layout (`layouts.pytorch.module_parameters`) and compared
gate by gate. Biases are compared as the gate sees them: for a gate that sums its two biases, the
sum (so one bias of 1.0 equals 0.6 + 0.4); for a gate that scales its recurrent bias (GRU's new
gate), each bias on its own.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from lstm_surgeon.checkpoint import Checkpoint
from lstm_surgeon.convert import dotted_name
from lstm_surgeon.diff import (
    CellId,
    GateDiff,
    Running,
    TensorDiff,
    Tolerance,
    compare_chunk,
    merge_running,
)
from lstm_surgeon.dtypes import BY_NAME, widen
from lstm_surgeon.errors import SurgeonError
from lstm_surgeon.layers import BIAS_HH, BIAS_IH, Cell, RecurrentLayer
from lstm_surgeon.layouts.pytorch import ModuleParameter, module_parameters


class MatchError(SurgeonError):
    """A `--match A=B` that names no layer, or names one twice."""


@dataclass(frozen=True)
class LayerPair:
    a: RecurrentLayer
    b: RecurrentLayer

    def to_dict(self) -> dict[str, str]:
        return {"a": self.a.name, "b": self.b.name}


FLOAT64 = BY_NAME["float64"]
GateValues = dict[tuple[str, str | None], np.ndarray]  # (parameter name, gate) -> values


def parse_matches(texts: Iterable[str]) -> tuple[tuple[str, str], ...]:
    """`--match A=B` options as (A, B) pairs (split at the last `=`)."""
    pairs = []
    for text in texts:
        a, separator, b = text.rpartition("=")
        if not separator or not b:
            raise MatchError(f"--match {text!r}: expected LAYER_A=LAYER_B")
        pairs.append((a, b))
    return tuple(pairs)


def pair_layers(
    a: Sequence[RecurrentLayer], b: Sequence[RecurrentLayer], matches: Sequence[tuple[str, str]]
) -> list[LayerPair]:
    """Explicit matches, then equal (converted) names, then the remaining layers in order when
    they have the same kind and sizes."""
    left, right = list(a), list(b)
    pairs = [_explicit(left, right, wanted) for wanted in matches]
    for layer in list(left):
        twin = next(
            (other for other in right if dotted_name(other.name) == dotted_name(layer.name)), None
        )
        if twin is not None and _same_shape(layer, twin):
            pairs.append(_take(left, right, layer, twin))
    for layer in list(left):
        twin = next((other for other in right if _same_shape(layer, other)), None)
        if twin is not None:
            pairs.append(_take(left, right, layer, twin))
    return pairs


def _explicit(
    left: list[RecurrentLayer], right: list[RecurrentLayer], wanted: tuple[str, str]
) -> LayerPair:
    a = next((layer for layer in left if layer.name == wanted[0]), None)
    b = next((layer for layer in right if layer.name == wanted[1]), None)
    if a is None or b is None:
        missing = wanted[0] if a is None else wanted[1]
        raise MatchError(f"--match {wanted[0]}={wanted[1]}: no layer {missing!r} left to match")
    return _take(left, right, a, b)


def _take(
    left: list[RecurrentLayer], right: list[RecurrentLayer], a: RecurrentLayer, b: RecurrentLayer
) -> LayerPair:
    left.remove(a)
    right.remove(b)
    return LayerPair(a, b)


def _same_shape(a: RecurrentLayer, b: RecurrentLayer) -> bool:
    fields = ("kind", "input_size", "hidden_size", "proj_size", "num_layers", "bidirectional")
    return all(getattr(a, name) == getattr(b, name) for name in fields)


def gate_values(checkpoint: Checkpoint, layer: RecurrentLayer) -> GateValues:
    """Every (parameter, gate) of the layer in torch's layout as float64, biases as the gate sees
    them: a summing gate's two biases folded into `bias_ih` (and `bias_hh` zero)."""
    values: GateValues = {}
    parameters = module_parameters(layer)
    for parameter in parameters:
        values.update(_parameter_values(checkpoint, layer, parameter))
    for cell in layer.cells:
        _fold_biases(values, layer, cell, parameters)
    return values


def _parameter_values(
    checkpoint: Checkpoint, layer: RecurrentLayer, parameter: ModuleParameter
) -> GateValues:
    if parameter.zeros_like is not None:
        return {(parameter.name, gate.name): np.zeros(layer.hidden_size) for gate in layer.gates}
    return {
        (parameter.name, gate): widen(region.raw(checkpoint), region.tensor.dtype)
        for gate, region in parameter.parts
    }


def _fold_biases(
    values: GateValues, layer: RecurrentLayer, cell: Cell, parameters: list[ModuleParameter]
) -> None:
    names = {p.role: p.name for p in parameters if p.cell is cell and p.role in (BIAS_IH, BIAS_HH)}
    if len(names) != 2:
        return
    for gate in layer.gates:
        if gate.biases_sum:
            ih, hh = (names[BIAS_IH], gate.name), (names[BIAS_HH], gate.name)
            values[ih] = values[ih] + values[hh]
            values[hh] = np.zeros_like(values[hh])


@dataclass
class LayerComparison:
    """What `diff_layers` found: the pairs, the parameters that differ, and the layers left over."""

    pairs: tuple[LayerPair, ...]
    removed: tuple[str, ...]  # A's layers without a partner
    added: tuple[str, ...]  # B's layers without a partner
    changed: list[TensorDiff] = field(default_factory=list)
    unchanged_count: int = 0
    warnings: list[str] = field(default_factory=list)


def diff_layers(
    a: Checkpoint,
    b: Checkpoint,
    layers: tuple[Sequence[RecurrentLayer], Sequence[RecurrentLayer]],
    matches: Sequence[tuple[str, str]],
    tolerance: Tolerance,
) -> LayerComparison:
    """Compare the recurrent layers of two files of any layouts, gate by gate."""
    pairs = pair_layers(layers[0], layers[1], matches)
    paired = ({pair.a.name for pair in pairs}, {pair.b.name for pair in pairs})
    comparison = LayerComparison(
        pairs=tuple(pairs),
        removed=tuple(layer.name for layer in layers[0] if layer.name not in paired[0]),
        added=tuple(layer.name for layer in layers[1] if layer.name not in paired[1]),
    )
    for pair in pairs:
        comparison.warnings += _semantic_differences(pair)
        values = (gate_values(a, pair.a), gate_values(b, pair.b))
        for parameter in module_parameters(pair.a):
            found = _parameter_diff(pair, parameter, values, tolerance)
            if found is None:
                comparison.unchanged_count += 1
            else:
                comparison.changed.append(found)
    return comparison


def _semantic_differences(pair: LayerPair) -> list[str]:
    sums = {gate.name: gate.biases_sum for gate in pair.b.gates}
    return [
        f"{pair.a.display_name} and {pair.b.display_name}: the {gate.name} gate combines its biases "
        "differently on the two sides, so equal numbers compute different outputs"
        for gate in pair.a.gates
        if sums.get(gate.name, gate.biases_sum) != gate.biases_sum
    ]


def _parameter_diff(
    pair: LayerPair,
    parameter: ModuleParameter,
    values: tuple[GateValues, GateValues],
    tolerance: Tolerance,
) -> TensorDiff | None:
    """How one parameter of torch's module differs between the two layers (None: it does not)."""
    keys = [key for key in values[0] if key[0] == parameter.name]
    if any(key not in values[1] for key in keys):
        return _reshaped(pair, parameter)
    per_gate: list[tuple[str | None, Running]] = []
    for key in keys:
        a, b = values[0][key], values[1][key]
        if a.shape != b.shape:
            return _reshaped(pair, parameter)
        running = Running()
        running.add(*compare_chunk(a, b, (FLOAT64, FLOAT64), tolerance))
        per_gate.append((key[1], running))
    total = merge_running(running for _, running in per_gate)
    if not total.changed:
        return None
    gate_diffs = tuple(
        GateDiff(gate, running.largest, running.mean, running.changed)
        for gate, running in per_gate
        if gate is not None
    )
    return _tensor_diff(pair, parameter, total.largest, total.mean, gate_diffs)


def _reshaped(pair: LayerPair, parameter: ModuleParameter) -> TensorDiff:
    return _tensor_diff(pair, parameter, None, None, ())


def _tensor_diff(
    pair: LayerPair,
    parameter: ModuleParameter,
    largest: float | None,
    mean: float | None,
    gate_diffs: tuple[GateDiff, ...],
) -> TensorDiff:
    prefix = dotted_name(pair.a.name)
    return TensorDiff(
        key=f"{prefix}.{parameter.name}" if prefix else parameter.name,
        max_abs_diff=largest,
        mean_abs_diff=mean,
        gates=tuple(gate.gate for gate in gate_diffs if gate.changed),
        gate_diffs=gate_diffs,
        layer=pair.a.name,
        kind=pair.a.kind,
        parameter=parameter.role,
        cell=CellId(parameter.cell.layer, parameter.cell.direction),
    )
