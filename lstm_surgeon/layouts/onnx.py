"""ONNX's layout: one `LSTM`/`GRU`/`RNN` node is one layer, fed by `W [D, G*H, I]`, `R [D, G*H, H]`
and `B [D, 2*G*H]` (the input biases Wb, then the recurrent biases Rb), direction `d` of a
bidirectional node at index 0 (forward) and 1 (reverse).

Gates are stacked in ONNX's own orders: LSTM `[i, o, f, c]`, GRU `[z, r, h]`. Wb is reported as
`bias_ih` and Rb as `bias_hh`. A GRU node's `linear_before_reset` says how its new gate uses Rbh:
0 (ONNX's default) applies the reset gate before the recurrent product, so Wbh and Rbh simply sum;
1 scales `R h + Rbh` by the reset gate, as PyTorch does. What ONNX stores that PyTorch's modules
cannot compute (peepholes, that default `linear_before_reset=0`, other activations, `clip`,
`input_forget`) is listed in `RecurrentLayer.pytorch_differences`.
"""

from __future__ import annotations

from typing import Any

from lstm_surgeon.checkpoint import Checkpoint, TensorRef
from lstm_surgeon.errors import EditError
from lstm_surgeon.gates import gates_of, with_summing_new_gate
from lstm_surgeon.layers import BIAS_HH, BIAS_IH, WEIGHT_HH, WEIGHT_IH, Cell, RecurrentLayer, Region
from lstm_surgeon.layouts import Found, NewTensor
from lstm_surgeon.vocabulary import FORWARD, REVERSE

STORED_ORDER: dict[str, tuple[str, ...]] = {
    "LSTM": ("input", "output", "forget", "cell"),
    "GRU": ("update", "reset", "new"),
    "RNN": ("hidden",),
}
DIRECTIONS: dict[str, tuple[str, ...]] = {
    "forward": (FORWARD,),
    "reverse": (REVERSE,),
    "bidirectional": (FORWARD, REVERSE),
}
DEFAULT_ACTIVATIONS: dict[str, list[str]] = {
    "LSTM": ["Sigmoid", "Tanh", "Tanh"],
    "GRU": ["Sigmoid", "Tanh"],
    "RNN": ["Tanh"],
}

Regions = dict[tuple[str, str | None], Region]


class LayoutMismatch(Exception):
    """A node whose tensors do not have the shapes its attributes say; the message names it."""


class OnnxLayout:
    framework = "onnx"

    def find_layers(self, checkpoint: Checkpoint) -> Found:
        found = Found()
        if checkpoint.format_name != "onnx":
            return found  # another file's operators (Keras layers) are another layout's
        for operator in checkpoint.contents.operators:
            if operator.kind not in STORED_ORDER:
                continue
            tensors = {key: checkpoint.tensors.get(name) for key, name in operator.inputs.items()}
            if any(tensors[key] is None for key in ("W", "R", "B", "P") if key in tensors):
                continue  # the format's warning says which input cannot be read
            try:
                found.layers.append(
                    _layer(operator.kind, operator.name, operator.attributes, tensors)
                )
            except LayoutMismatch as mismatch:
                found.warnings.append(str(mismatch))
        return found

    def missing_biases(self, layer: RecurrentLayer, cell: Cell) -> list[NewTensor]:
        raise EditError(
            f"{layer.display_name}: an ONNX node without a B input would need a new graph input; "
            "lstm-surgeon does not change an ONNX graph"
        )


def _layer(
    kind: str, name: str, attributes: dict[str, Any], tensors: dict[str, TensorRef | None]
) -> RecurrentLayer:
    weights, recurrent, bias = tensors.get("W"), tensors.get("R"), tensors.get("B")
    if weights is None or recurrent is None:
        raise LayoutMismatch(f"{name} ({kind}): has no W or R tensor")
    directions = DIRECTIONS.get(str(attributes.get("direction", "forward")))
    if directions is None:
        raise LayoutMismatch(f"{name} ({kind}): unknown direction {attributes['direction']!r}")
    gate_count = len(STORED_ORDER[kind])
    hidden = _int(attributes, "hidden_size", recurrent.shape[-1] if recurrent.shape else 0)
    rows = gate_count * hidden
    input_size = weights.shape[-1] if len(weights.shape) == 3 else 0
    count = len(directions)
    _require_shape(name, "W", weights, (count, rows, input_size))
    _require_shape(name, "R", recurrent, (count, rows, hidden))
    if bias is not None:
        _require_shape(name, "B", bias, (count, 2 * rows))
    cells = tuple(
        _cell(kind, direction, position, hidden, weights, recurrent, bias)
        for position, direction in enumerate(directions)
    )
    gates = gates_of(kind)
    if kind == "GRU" and not _int(attributes, "linear_before_reset", 0):
        gates = with_summing_new_gate(gates)
    return RecurrentLayer(
        name,
        kind,
        input_size,
        hidden,
        0,
        1,
        count == 2,
        bias is not None,
        weights.dtype.name,
        cells,
        gates,
        "onnx",
        _reported_attributes(kind, attributes, "P" in tensors),
        _pytorch_differences(kind, attributes, "P" in tensors),
    )


def _require_shape(name: str, key: str, ref: TensorRef, expected: tuple[int, ...]) -> None:
    if ref.shape != expected or 0 in expected:
        raise LayoutMismatch(
            f"{name}: its {key} tensor {ref.name!r} has shape {list(ref.shape)}, not "
            f"{list(expected)} as the node's attributes say"
        )


def _cell(
    kind: str,
    direction: str,
    position: int,
    hidden: int,
    weights: TensorRef,
    recurrent: TensorRef,
    bias: TensorRef | None,
) -> Cell:
    """The regions of one direction: gate k of the stored order at rows `[k*H, (k+1)*H)`; Rb
    follows all of Wb in B."""
    rows = len(STORED_ORDER[kind]) * hidden
    regions: Regions = {}
    for role, ref in ((WEIGHT_IH, weights), (WEIGHT_HH, recurrent)):
        columns = range(0, ref.shape[2])
        regions[(role, None)] = Region(ref, (position, range(0, rows), columns), 1, 2)
        for block, gate in enumerate(STORED_ORDER[kind]):
            units = range(block * hidden, (block + 1) * hidden)
            regions[(role, gate)] = Region(ref, (position, units, columns), 1, 2)
    if bias is not None:
        for role, start in ((BIAS_IH, 0), (BIAS_HH, rows)):
            regions[(role, None)] = Region(bias, (position, range(start, start + rows)), 1)
            for block, gate in enumerate(STORED_ORDER[kind]):
                first = start + block * hidden
                regions[(role, gate)] = Region(bias, (position, range(first, first + hidden)), 1)
    refs = tuple(ref for ref in (weights, recurrent, bias) if ref is not None)
    return Cell(0, direction, regions, refs)


def _int(attributes: dict[str, Any], key: str, default: int) -> int:
    """An integer attribute, ONNX's default when it is absent (or not an integer: a broken file)."""
    value = attributes.get(key, default)
    return value if isinstance(value, int) else default


def _activations(kind: str, attributes: dict[str, Any], directions: int) -> list[str]:
    """The node's activations, ONNX's defaults filled in (one list per direction, concatenated)."""
    activations = attributes.get("activations")
    if isinstance(activations, list) and activations:
        return [str(activation) for activation in activations]
    return DEFAULT_ACTIVATIONS[kind] * directions


def _reported_attributes(kind: str, attributes: dict[str, Any], peepholes: bool) -> dict[str, Any]:
    """What the node says beyond PyTorch's constructor arguments, defaults filled in."""
    direction = str(attributes.get("direction", "forward"))
    reported: dict[str, Any] = {
        "direction": direction,
        "activations": _activations(kind, attributes, len(DIRECTIONS[direction])),
        "clip": attributes.get("clip"),
    }
    for key in ("activation_alpha", "activation_beta", "layout"):
        if key in attributes:
            reported[key] = attributes[key]
    if kind == "LSTM":
        reported["input_forget"] = _int(attributes, "input_forget", 0)
        reported["peepholes"] = peepholes
    if kind == "GRU":
        reported["linear_before_reset"] = _int(attributes, "linear_before_reset", 0)
    return reported


def _pytorch_differences(kind: str, attributes: dict[str, Any], peepholes: bool) -> tuple[str, ...]:
    """Why torch's module cannot compute this node, one reason each."""
    direction = str(attributes.get("direction", "forward"))
    differences = []
    if peepholes:
        differences.append("peepholes (P): PyTorch's LSTM has none")
    if kind == "GRU" and not _int(attributes, "linear_before_reset", 0):
        differences.append(
            "linear_before_reset=0: the reset gate applies before the recurrent product "
            "(PyTorch applies it after, as linear_before_reset=1)"
        )
    activations = _activations(kind, attributes, len(DIRECTIONS[direction]))
    default = DEFAULT_ACTIVATIONS[kind] * len(DIRECTIONS[direction])
    if (
        activations != default
        or "activation_alpha" in attributes
        or "activation_beta" in attributes
    ):
        differences.append(f"activations {','.join(activations)} (PyTorch: {','.join(default)})")
    if attributes.get("clip") is not None:
        differences.append(f"clip={attributes['clip']}: PyTorch does not clip")
    if _int(attributes, "input_forget", 0):
        differences.append("input_forget=1: PyTorch does not couple the input and forget gates")
    return tuple(differences)


LAYOUT = OnnxLayout()
