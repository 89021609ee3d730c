"""Keras test files: Keras 3 models saved by Keras itself, and Keras 2 `.h5` files written with h5py
in Keras 2's own layout (Keras 2 is not installable beside Keras 3; its layout is plain HDF5).

Weights are drawn from a seeded generator, so every run builds the same files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np

os.environ.setdefault("KERAS_BACKEND", "torch")
import keras

SEQUENCE, FEATURES = 5, 3


def keras3_model() -> keras.Model:
    """Every Keras 3 recurrent layer kind: LSTM, GRU (both reset_after), SimpleRNN without bias,
    a Bidirectional wrapper and a GRU inside a nested model; random weights."""
    inputs = keras.Input((SEQUENCE, FEATURES))
    inner_inputs = keras.Input((SEQUENCE, 4))
    inner = keras.Model(
        inner_inputs, keras.layers.GRU(2, return_sequences=True, name="g")(inner_inputs), name="sub"
    )
    x = keras.layers.LSTM(4, return_sequences=True, name="lstm")(inputs)
    x = inner(x)
    x = keras.layers.GRU(3, reset_after=False, return_sequences=True, name="gru_before")(x)
    x = keras.layers.Bidirectional(keras.layers.LSTM(2, return_sequences=True), name="bi")(x)
    x = keras.layers.SimpleRNN(2, use_bias=False, return_sequences=True, name="srnn")(x)
    model = keras.Model(inputs, x)
    rng = np.random.default_rng(0)
    model.set_weights([random(rng, w.shape) for w in model.get_weights()])
    return model


def random(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return rng.normal(0.0, 0.5, shape).astype(np.float32)


# --- Keras 2 ------------------------------------------------------------------------------------

KERAS2_GATES = {"LSTM": 4, "CuDNNLSTM": 4, "GRU": 3, "CuDNNGRU": 3, "SimpleRNN": 1}


def keras2_weights(
    rng: np.random.Generator, keras_class: str, inputs: int, units: int, **config: object
) -> list[np.ndarray]:
    """kernel, recurrent_kernel, bias shaped as Keras 2 stores them for this class."""
    width = KERAS2_GATES[keras_class] * units
    if keras_class.startswith("CuDNN"):
        bias_shape: tuple[int, ...] = (2 * width,)
    elif keras_class == "GRU" and config.get("reset_after"):
        bias_shape = (2, width)
    else:
        bias_shape = (width,)
    return [random(rng, (inputs, width)), random(rng, (units, width)), random(rng, bias_shape)]


def layer_config(name: str, keras_class: str, units: int, **config: object) -> dict:
    return {"class_name": keras_class, "config": {"name": name, "units": units, **config}}


def write_keras2(
    path: Path,
    layers: list[tuple[dict, dict[str, list[np.ndarray]]]],
    whole_model: bool = True,
    keras_version: str = "2.2.4",
) -> Path:
    """A Keras 2 HDF5 file: `model_weights/<layer>/<layer>/<var>:0` with `layer_names` and
    `weight_names` (and the model config) in a whole-model file, the same groups at the root of a
    weights-only file. `layers` are (layer config, {weight prefix: [kernel, recurrent, bias]})."""
    with h5py.File(path, "w") as h5:
        h5.attrs["keras_version"] = keras_version.encode()
        h5.attrs["backend"] = b"tensorflow"
        root = h5
        if whole_model:
            config = {"class_name": "Sequential", "config": {"name": "m", "layers": []}}
            config["config"]["layers"] = [layer for layer, _ in layers]
            h5.attrs["model_config"] = json.dumps(config).encode()
            root = h5.create_group("model_weights")
        root.attrs["layer_names"] = [layer["config"]["name"].encode() for layer, _ in layers]
        for layer, weights in layers:
            name = layer["config"]["name"]
            group = root.create_group(name)
            names = []
            for prefix, values in weights.items():
                for var, value in zip(("kernel", "recurrent_kernel", "bias"), values, strict=False):
                    names.append(f"{prefix}/{var}:0".encode())
                    group.create_dataset(f"{prefix}/{var}:0", data=value)
            group.attrs["weight_names"] = names
    return path
