"""Keras's recurrent layers among an HDF5 file's datasets, as `Operator`s (kind, path, weights, settings).

Keras 2 keeps a layer's weights as `<layer>/<layer>/kernel:0`, `recurrent_kernel:0`, `bias:0` (under
`model_weights/` in a whole-model file; TF 2 adds a `<layer>_cell/` level; a `Bidirectional` wrapper
holds `forward_<inner>/` and `backward_<inner>/`; a nested model holds its layers' groups). Keras 3
keeps `layers/<path>/cell/vars/0..2`, the variables in the order the cell creates them: kernel,
recurrent kernel, bias; each level's `vars` group names the layer in its `name` attribute.

The layer class comes from the model config when the file has one (parsed as JSON, never run), else
from the shapes, which are the evidence anyway: the recurrent kernel is `[units, gates * units]`
(4 gates: LSTM, 3: GRU, 1: SimpleRNN), and a 1-D bias of `2 * gates * units` is a CuDNN layer's.
What the shapes cannot say (the recurrent activation, `hard_sigmoid` by default before Keras 2.3) is
assumed, and the operator says so (`recurrent_activation_assumed`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from typing import Any

from lstm_surgeon.checkpoint import Checkpoint, Operator, TensorRef
from lstm_surgeon.vocabulary import FORWARD, REVERSE

RECURRENT_CLASSES = ("LSTM", "GRU", "SimpleRNN", "CuDNNLSTM", "CuDNNGRU")
CELL_CLASSES = {"LSTMCell": "LSTM", "GRUCell": "GRU", "SimpleRNNCell": "SimpleRNN"}
CLASS_BY_GATE_COUNT = {4: "LSTM", 3: "GRU", 1: "SimpleRNN"}
SETTINGS = (
    "units",
    "activation",
    "recurrent_activation",
    "use_bias",
    "reset_after",
    "go_backwards",
)
KERAS2_WEIGHT = re.compile(
    r"^(?:model_weights/)?(?P<group>.+)/(?P<var>kernel|recurrent_kernel|bias):0$"
)
KERAS3_VAR = re.compile(r"^(?P<group>.+)/vars/(?P<index>\d+)$")
KERAS3_VARS = ("kernel", "recurrent_kernel", "bias")  # the order a Keras 3 cell creates them
DIRECTION_GROUPS = {"forward_layer": FORWARD, "backward_layer": REVERSE}
OPTIMIZER_GROUP = "optimizer_weights/"


@dataclass
class _Layer:
    """One recurrent layer's weights by direction, as found in the file."""

    name: str
    weights: dict[str, dict[str, str]] = field(default_factory=dict)  # direction -> var -> tensor


def keras_operators(
    h5: Any, tensors: dict[str, TensorRef], config: Any, metadata: dict[str, str]
) -> tuple[Operator, ...]:
    """One operator per recurrent layer (a `Bidirectional` one holding both directions), in file
    order; the layout checks that its weights are complete and fit its class."""
    layers = _keras3_layers(h5, tensors) or _keras2_layers(tensors)
    classes = _config_classes(config)
    operators = []
    for layer in layers.values():
        if "recurrent_kernel" not in layer.weights.get(FORWARD, {}):
            continue  # a Keras 3 group of variables that is no recurrent cell
        settings = classes.get(layer.name.rsplit("/", 1)[-1])
        operators.append(_operator(layer, tensors, settings, metadata))
    return tuple(operators)


def assume_recurrent_activation(checkpoint: Checkpoint, activation: str) -> None:
    """Take `activation` as the recurrent activation of every layer whose file does not say which
    (`verify --recurrent-activation`); what a model config states is kept."""
    operators = tuple(
        replace(op, attributes={**op.attributes, "recurrent_activation": activation})
        if op.attributes.get("recurrent_activation_assumed")
        else op
        for op in checkpoint.contents.operators
    )
    checkpoint.contents = replace(checkpoint.contents, operators=operators)


def _operator(
    layer: _Layer,
    tensors: dict[str, TensorRef],
    settings: dict[str, Any] | None,
    metadata: dict[str, str],
) -> Operator:
    forward = layer.weights[FORWARD]
    inputs = dict(forward)
    inputs.update({f"backward_{var}": name for var, name in layer.weights.get(REVERSE, {}).items()})
    shapes = {var: tensors[name].shape for var, name in forward.items()}
    kind = settings["class_name"] if settings else _class_from_shapes(shapes)
    attributes: dict[str, Any] = {"keras_class": kind, "bidirectional": REVERSE in layer.weights}
    if settings:
        attributes.update({k: settings[k] for k in SETTINGS if k in settings})
    if kind.startswith("CuDNN"):
        attributes.update(activation="tanh", recurrent_activation="sigmoid")
    if "recurrent_activation" not in attributes and kind != "SimpleRNN":
        attributes["recurrent_activation"] = _assumed_recurrent_activation(metadata)
        attributes["recurrent_activation_assumed"] = True
    if kind == "GRU" and "reset_after" not in attributes and "bias" in shapes:
        attributes["reset_after"] = len(shapes["bias"]) == 2
    return Operator(kind, layer.name, inputs, attributes)


def _class_from_shapes(shapes: dict[str, tuple[int, ...]]) -> str:
    """The Keras class the weights' shapes say (the layout checks them in full)."""
    recurrent = shapes["recurrent_kernel"]
    units = recurrent[0] if recurrent else 0
    gates = recurrent[-1] // units if len(recurrent) == 2 and units else 0
    kind = CLASS_BY_GATE_COUNT.get(gates, "LSTM")
    bias = shapes.get("bias")
    if kind != "SimpleRNN" and bias is not None and bias == (2 * gates * units,):
        return f"CuDNN{kind}"
    return kind


def _assumed_recurrent_activation(metadata: dict[str, str]) -> str:
    """Keras's default when the file does not say: `hard_sigmoid` before Keras 2.3, then `sigmoid`."""
    version = re.match(r"(\d+)\.(\d+)", metadata.get("keras_version", ""))
    if version and (int(version[1]), int(version[2])) < (2, 3):
        return "hard_sigmoid"
    return "sigmoid"


def _keras3_layers(h5: Any, tensors: dict[str, TensorRef]) -> dict[str, _Layer]:
    """Layers of a Keras 3 file: `<layer path>/cell/vars/0..2` (each level named by `vars`)."""
    layers: dict[str, _Layer] = {}
    for name in tensors:
        match = KERAS3_VAR.match(name)
        if not match or not match["group"].endswith("/cell") or int(match["index"]) > 2:
            continue
        path = match["group"].removesuffix("/cell")
        layer_name, direction = _keras3_name(h5, path)
        layer = layers.setdefault(layer_name, _Layer(layer_name))
        layer.weights.setdefault(direction, {})[KERAS3_VARS[int(match["index"])]] = name
    return layers


def _keras3_name(h5: Any, path: str) -> tuple[str, str]:
    """The layer's name path from each level's `vars` name, and its direction in a wrapper."""
    parts = path.split("/")
    names, direction = [], FORWARD
    for depth in range(1, len(parts) + 1):
        if parts[depth - 1] in DIRECTION_GROUPS:
            direction = DIRECTION_GROUPS[parts[depth - 1]]
            continue
        group = h5.get("/".join(parts[:depth]) + "/vars")
        if group is not None:
            label = group.attrs.get("name", parts[depth - 1])
            names.append(label.decode() if isinstance(label, bytes) else str(label))
    return "/".join(names) or path, direction


def _keras2_layers(tensors: dict[str, TensorRef]) -> dict[str, _Layer]:
    """Layers of a Keras 2 file: `<layer>/<layer>[/<inner>_cell]/kernel:0` and its siblings."""
    groups: dict[str, dict[str, str]] = {}
    for name in tensors:
        match = KERAS2_WEIGHT.match(name)
        if match and not name.startswith(OPTIMIZER_GROUP):
            groups.setdefault(match["group"], {})[match["var"]] = name
    layers: dict[str, _Layer] = {}
    for group, weights in groups.items():
        if "recurrent_kernel" not in weights:
            continue
        layer_name, direction = _keras2_name(group)
        layers.setdefault(layer_name, _Layer(layer_name)).weights[direction] = weights
    return layers


def _keras2_name(group: str) -> tuple[str, str]:
    """`lstm/lstm` -> lstm; `lstm/lstm/lstm_cell` -> lstm; `bi/bi/forward_gru` -> bi (forward)."""
    parts, direction, names = group.split("/"), FORWARD, []
    if len(parts) > 1 and parts[-1].endswith("_cell"):
        parts = parts[:-1]
    for part in parts:
        if part.startswith(("forward_", "backward_")):
            direction = FORWARD if part.startswith("forward_") else REVERSE
        elif not names or names[-1] != part:
            names.append(part)
    return "/".join(names), direction


def _config_classes(config: Any) -> dict[str, dict[str, Any]]:
    """Each recurrent layer of the model config by name: its class and settings (a `Bidirectional`
    or `RNN` wrapper gives its inner layer's, under the wrapper's name). Names used twice are left
    out: the shapes decide for those."""
    if isinstance(config, (str, bytes)):
        try:
            config = json.loads(config)
        except ValueError:
            return {}
    found: dict[str, list[dict[str, Any]]] = {}
    for layer in _config_layers(config):
        settings = _recurrent_settings(layer)
        if settings is not None:
            found.setdefault(str(layer["config"].get("name")), []).append(settings)
    return {name: entries[0] for name, entries in found.items() if len(entries) == 1}


def _config_layers(node: Any) -> list[dict[str, Any]]:
    """Every `{"class_name": ..., "config": {...}}` in the config, at any depth."""
    layers = []
    if isinstance(node, dict):
        if isinstance(node.get("class_name"), str) and isinstance(node.get("config"), dict):
            layers.append(node)
        for value in node.values():
            layers += _config_layers(value)
    elif isinstance(node, list):
        for value in node:
            layers += _config_layers(value)
    return layers


def _recurrent_settings(layer: dict[str, Any]) -> dict[str, Any] | None:
    class_name, config = layer["class_name"], layer["config"]
    if class_name in RECURRENT_CLASSES:
        return {**config, "class_name": class_name}
    inner = config.get("layer") if class_name == "Bidirectional" else config.get("cell")
    if class_name in ("Bidirectional", "RNN") and isinstance(inner, dict):
        inner_class = inner.get("class_name")
        inner_class = CELL_CLASSES.get(inner_class, inner_class)
        if inner_class in RECURRENT_CLASSES and isinstance(inner.get("config"), dict):
            return {**inner["config"], "class_name": inner_class}
    return None
