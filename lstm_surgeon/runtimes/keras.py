"""Keras as the oracle of its own layers: build the layer in Keras 3, give it the file's weights, run it.

Keras runs on the torch backend (torch is already here; `KERAS_BACKEND` is only set when the user has
not chosen one). A Keras 2 CuDNNLSTM/CuDNNGRU has no Keras 3 class: its weights go through Keras 2's
own conversion to LSTM / GRU(reset_after=True) (`keras2_cudnn_weights`, ported line by line from
Keras 2's `_convert_rnn_weights`), never through this project's regions, so the check is independent.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import numpy as np

from lstm_surgeon.errors import SurgeonError

if TYPE_CHECKING:
    from lstm_surgeon.checkpoint import Checkpoint
    from lstm_surgeon.layers import RecurrentLayer

INSTALL_HINT = "pip install 'lstm-surgeon[keras]'"
GATE_COUNT = {"LSTM": 4, "GRU": 3}
LAYER_CLASS = {"LSTM": "LSTM", "CuDNNLSTM": "LSTM", "GRU": "GRU", "CuDNNGRU": "GRU"}


def import_keras() -> Any:
    """Keras 3, or an error naming how to install it."""
    os.environ.setdefault("KERAS_BACKEND", "torch")
    try:
        import keras
    except ImportError:
        raise SurgeonError(f"verify of Keras layers needs Keras 3: {INSTALL_HINT}") from None
    if not keras.__version__.startswith("3."):
        raise SurgeonError(f"verify of Keras layers needs Keras 3, found {keras.__version__}")
    return keras


def run(checkpoint: Checkpoint, layer: RecurrentLayer, inputs: np.ndarray) -> np.ndarray:
    """The Keras layer's output sequence for `inputs`, both sequence-first as torch lays them
    (Keras itself is batch-first)."""
    keras = import_keras()
    keras_layer = build_layer(keras, layer)
    batch_first = np.ascontiguousarray(np.swapaxes(inputs, 0, 1), dtype=np.float32)
    keras_layer.build(batch_first.shape)
    keras_layer.set_weights(layer_weights(checkpoint, layer))
    return np.swapaxes(keras.ops.convert_to_numpy(keras_layer(batch_first)), 0, 1)


def max_abs_difference(
    checkpoint: Checkpoint, layer: RecurrentLayer, inputs: np.ndarray, expected: np.ndarray
) -> float:
    """Run the Keras layer on `inputs` (sequence-first, as torch took them) and compare."""
    return float(np.max(np.abs(run(checkpoint, layer, inputs) - expected)))


def build_layer(keras: Any, layer: RecurrentLayer) -> Any:
    """The Keras layer the file's class and settings describe, returning the whole sequence."""
    attributes = layer.attributes
    keras_class = str(attributes.get("keras_class", "LSTM"))
    options: dict[str, Any] = {
        "units": layer.hidden_size,
        "return_sequences": True,
        "use_bias": layer.bias,
        "activation": attributes.get("activation", "tanh"),
        "go_backwards": bool(attributes.get("go_backwards", False)),
    }
    if keras_class != "SimpleRNN":
        options["recurrent_activation"] = attributes.get("recurrent_activation", "sigmoid")
    if LAYER_CLASS.get(keras_class) == "GRU":
        options["reset_after"] = keras_class == "CuDNNGRU" or attributes.get("reset_after", True)
    inner = getattr(keras.layers, LAYER_CLASS.get(keras_class, keras_class))(**options)
    if layer.bidirectional:
        return keras.layers.Bidirectional(inner, merge_mode="concat")
    return inner


def layer_weights(checkpoint: Checkpoint, layer: RecurrentLayer) -> list[np.ndarray]:
    """The weights as Keras's layer takes them: kernel, recurrent kernel, bias, per direction."""
    keras_class = str(layer.attributes.get("keras_class", "LSTM"))
    weights = []
    for cell in layer.cells:
        values = [checkpoint.values(ref).astype(np.float32) for ref in cell.tensors()]
        if keras_class.startswith("CuDNN"):
            values = keras2_cudnn_weights(values, keras_class.removeprefix("CuDNN"))
        weights += values
    return weights


def keras2_cudnn_weights(weights: list[np.ndarray], target: str) -> list[np.ndarray]:
    """Keras 2's conversion of CuDNNLSTM weights to LSTM, and of CuDNNGRU weights to
    GRU(reset_after=True) (`keras/saving/hdf5_format.py`, `_convert_rnn_weights`, from_cudnn)."""
    n_gates = GATE_COUNT[target]

    def transform_kernels(kernels: np.ndarray, func: Any) -> np.ndarray:
        return np.hstack([func(k) for k in np.hsplit(kernels, n_gates)])

    def transpose_input(kernel: np.ndarray) -> np.ndarray:
        return kernel.T.reshape(kernel.shape, order="F")

    kernels = transform_kernels(weights[0], transpose_input)
    recurrent_kernels = transform_kernels(weights[1], lambda k: k.T)
    if target == "LSTM":
        biases = np.sum(np.split(weights[2], 2, axis=0), axis=0)
    else:
        biases = np.array(weights[2]).reshape((2, -1))
    return [kernels, recurrent_kernels, biases]
