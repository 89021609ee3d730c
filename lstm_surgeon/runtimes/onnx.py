"""onnxruntime as `verify`'s oracle for ONNX layers: the node run alone, with the file's own tensors.

The layer's node is rebuilt as a one-node graph (same op, same attributes, its W, R, B and P as
initializers read from the file as they are stored) and run on the input torch's module took, with
zero initial states, as torch starts. Nothing of the model's own graph is run.
"""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from lstm_surgeon.errors import SurgeonError
from lstm_surgeon.formats.onnx_format import INSTALL_HINT, import_onnx

if TYPE_CHECKING:
    from lstm_surgeon.checkpoint import Checkpoint, Operator
    from lstm_surgeon.layers import RecurrentLayer

OPSET = 14  # the opset whose LSTM/GRU/RNN take every attribute a node may carry (`layout` included)
PARAMETER_INPUTS = ("W", "R", "B", "P")
INPUT_POSITION = {"W": 1, "R": 2, "B": 3, "P": 7}  # an operator's input list, by name (onnx.proto)


def import_onnxruntime() -> ModuleType:
    try:
        import onnxruntime
    except ImportError:
        raise SurgeonError(f"verifying ONNX layers needs onnxruntime: {INSTALL_HINT}") from None
    return onnxruntime


def operator_of(checkpoint: Checkpoint, layer: RecurrentLayer) -> Operator:
    """The node a layer was found from (a layer's name is its node's path)."""
    return next(op for op in checkpoint.contents.operators if op.name == layer.name)


def run(checkpoint: Checkpoint, layer: RecurrentLayer, inputs: np.ndarray) -> np.ndarray:
    """The node's output sequence Y for `inputs` (sequence, batch, features), laid out as torch's
    module lays its output: (sequence, batch, directions * hidden)."""
    onnx, onnxruntime = import_onnx(), import_onnxruntime()
    model = _one_node_model(onnx, checkpoint, operator_of(checkpoint, layer))
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = onnxruntime.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    (y,) = session.run(["Y"], {"X": inputs.astype(np.float32)})
    sequence, directions, batch, hidden = y.shape
    return y.transpose(0, 2, 1, 3).reshape(sequence, batch, directions * hidden)


def max_abs_difference(
    checkpoint: Checkpoint, layer: RecurrentLayer, inputs: np.ndarray, expected: np.ndarray
) -> float:
    return float(np.max(np.abs(run(checkpoint, layer, inputs) - expected)))


def _one_node_model(onnx: ModuleType, checkpoint: Checkpoint, operator: Operator) -> Any:
    helper, numpy_helper = onnx.helper, onnx.numpy_helper
    names = ["X", "", "", "", "", "", "", ""]
    initializers = []
    for key in PARAMETER_INPUTS:
        if key in operator.inputs:
            values = checkpoint.values(operator.inputs[key]).astype(np.float32)
            initializers.append(numpy_helper.from_array(values, key))
            names[INPUT_POSITION[key]] = key
    while not names[-1]:
        names.pop()
    attributes = {key: value for key, value in operator.attributes.items() if key != "layout"}
    node = helper.make_node(operator.kind, names, ["Y"], **attributes)
    graph = helper.make_graph(
        [node],
        "verify",
        [helper.make_tensor_value_info("X", onnx.TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, None)],
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
