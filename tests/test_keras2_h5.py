"""Keras 2 `.h5` files (whole models and weights-only), written with h5py in Keras 2's layout.

Oracles: Keras 3 loading the file (and, for CuDNN layers, Keras 2's own CuDNN-to-LSTM/GRU weight
conversion, ported line by line in `runtimes/keras.py` and its inverse here); torch's modules from a
reference `nn.LSTM`/`nn.GRU`; h5py reading the edited datasets back.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import assert_clean_failure
from keras_files import keras, keras2_weights, layer_config, write_keras2
from torch import nn

from lstm_surgeon.apply import Destination, edit_checkpoint
from lstm_surgeon.discovery import discover
from lstm_surgeon.errors import CheckpointError
from lstm_surgeon.formats import open_checkpoint
from lstm_surgeon.layers import BIAS_HH, BIAS_IH
from lstm_surgeon.layouts.pytorch import module_state
from lstm_surgeon.surgery import plan_set_forget_bias
from lstm_surgeon.verify import verify_checkpoint

SIGMOID = {"recurrent_activation": "sigmoid"}


def whole_model(path: Path, seed: int = 1) -> Path:
    """LSTM, CuDNNLSTM, CuDNNGRU, GRU(reset_after=True), a TF 2 style `lstm_cell` level, and a
    Bidirectional LSTM; input sizes differ from hidden sizes (CuDNN blocks are not square)."""
    rng = np.random.default_rng(seed)
    layers = [
        (layer_config("lstm", "LSTM", 4, **SIGMOID), {"lstm": keras2_weights(rng, "LSTM", 3, 4)}),
        (layer_config("cudnn", "CuDNNLSTM", 4), {"cudnn": keras2_weights(rng, "CuDNNLSTM", 3, 4)}),
        (
            layer_config("cudnn_gru", "CuDNNGRU", 2),
            {"cudnn_gru": keras2_weights(rng, "CuDNNGRU", 5, 2)},
        ),
        (
            layer_config("gru", "GRU", 2, reset_after=True, **SIGMOID),
            {"gru": keras2_weights(rng, "GRU", 3, 2, reset_after=True)},
        ),
        (
            layer_config("tf2", "LSTM", 3, **SIGMOID),
            {"tf2/lstm_cell": keras2_weights(rng, "LSTM", 2, 3)},
        ),
        (
            {
                "class_name": "Bidirectional",
                "config": {"name": "bi", "layer": layer_config("lstm_1", "LSTM", 2, **SIGMOID)},
            },
            {
                "bi/forward_lstm_1": keras2_weights(rng, "LSTM", 3, 2),
                "bi/backward_lstm_1": keras2_weights(rng, "LSTM", 3, 2),
            },
        ),
    ]
    return write_keras2(path, layers, keras_version="2.3.1")


@pytest.fixture
def keras2_file(tmp_path: Path) -> Path:
    return whole_model(tmp_path / "model.h5")


def test_every_layer_is_found_by_name_and_class(keras2_file):
    with open_checkpoint(keras2_file) as checkpoint:
        layers = {layer.name: layer for layer in discover(checkpoint).layers}
    summary = {
        name: (layer.kind, layer.attributes["keras_class"], layer.bidirectional, layer.bias_roles)
        for name, layer in layers.items()
    }
    assert summary == {
        "lstm": ("LSTM", "LSTM", False, (BIAS_IH,)),
        "cudnn": ("LSTM", "CuDNNLSTM", False, (BIAS_IH, BIAS_HH)),
        "cudnn_gru": ("GRU", "CuDNNGRU", False, (BIAS_IH, BIAS_HH)),
        "gru": ("GRU", "GRU", False, (BIAS_IH, BIAS_HH)),
        "tf2": ("LSTM", "LSTM", False, (BIAS_IH,)),
        "bi": ("LSTM", "LSTM", True, (BIAS_IH,)),
    }
    assert not any(layer.pytorch_differences for layer in layers.values())


def test_verify_agrees_with_keras_and_keras2s_cudnn_conversion(keras2_file):
    with open_checkpoint(keras2_file) as checkpoint:
        verification = verify_checkpoint(checkpoint)
    assert verification.ok, verification.to_dict()
    assert all(layer.runtime_max_abs_diff < 1e-5 for layer in verification.layers)


# --- CuDNN weights against Keras 2's own conversion, from a reference torch module ---------------


def transform_kernels(kernels: np.ndarray, func, n_gates: int) -> np.ndarray:
    """Keras 2 `_convert_rnn_weights`' helper."""
    return np.hstack([func(k) for k in np.hsplit(kernels, n_gates)])


def to_cudnn(weights: list[np.ndarray], n_gates: int, lstm: bool) -> list[np.ndarray]:
    """Keras 2's conversion of LSTM / GRU(reset_after=True) weights to CuDNN (from_cudnn=False)."""
    kernels = transform_kernels(weights[0], lambda k: k.T.reshape(k.shape, order="C"), n_gates)
    recurrent = transform_kernels(weights[1], lambda k: k.T, n_gates)
    biases = np.tile(0.5 * weights[2], 2) if lstm else np.array(weights[2]).reshape(-1)
    return [kernels, recurrent, biases]


def order(stacked: np.ndarray) -> np.ndarray:
    """PyTorch's GRU blocks r, z, n in Keras's order z, r, h."""
    reset, update, new = np.split(stacked, 3)
    return np.concatenate([update, reset, new])


def keras_weights_of(module: nn.Module) -> list[np.ndarray]:
    """A torch module's weights as Keras's LSTM / GRU(reset_after=True) holds them: transposed,
    GRU blocks reordered r,z,n -> z,r,h, LSTM biases summed, GRU's kept as two rows."""
    state = {k: v.detach().numpy() for k, v in module.state_dict().items()}
    if isinstance(module, nn.GRU):
        return [
            order(state["weight_ih_l0"]).T,
            order(state["weight_hh_l0"]).T,
            np.stack([order(state["bias_ih_l0"]), order(state["bias_hh_l0"])]),
        ]
    return [
        state["weight_ih_l0"].T,
        state["weight_hh_l0"].T,
        state["bias_ih_l0"] + state["bias_hh_l0"],
    ]


@pytest.mark.parametrize("module_class", [nn.LSTM, nn.GRU])
def test_cudnn_weights_read_as_keras2_converts_them(tmp_path, module_class):
    torch.manual_seed(4)
    reference = module_class(5, 3)
    lstm = module_class is nn.LSTM
    keras_class = "CuDNNLSTM" if lstm else "CuDNNGRU"
    cudnn = to_cudnn(keras_weights_of(reference), 4 if lstm else 3, lstm)
    path = write_keras2(tmp_path / "cudnn.h5", [(layer_config("c", keras_class, 3), {"c": cudnn})])
    with open_checkpoint(path) as checkpoint:
        (layer,) = discover(checkpoint).layers
        state = {k: torch.from_numpy(v.copy()) for k, v in module_state(checkpoint, layer).items()}
    loaded = module_class(5, 3)
    loaded.load_state_dict(state, strict=True)
    x = torch.randn(6, 2, 5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)[0], reference(x)[0], atol=1e-5, rtol=0)


# --- Edits ---------------------------------------------------------------------------------------


def test_set_forget_bias_in_place_writes_only_the_forget_blocks(keras2_file):
    before = keras2_file.read_bytes()
    with h5py.File(keras2_file, "r") as h5:
        old = {}
        h5.visititems(lambda n, o: old.update({n: o[...]}) if isinstance(o, h5py.Dataset) else None)
    edit_checkpoint(
        keras2_file, lambda ck: plan_set_forget_bias(ck, 1.5), Destination(in_place=True)
    )
    with h5py.File(keras2_file, "r") as h5:
        new = {}
        h5.visititems(lambda n, o: new.update({n: o[...]}) if isinstance(o, h5py.Dataset) else None)
    cudnn_bias = new["model_weights/cudnn/cudnn/bias:0"]
    np.testing.assert_array_equal(cudnn_bias[4:8], 1.5)  # input half, forget block
    np.testing.assert_array_equal(cudnn_bias[16 + 4 : 16 + 8], 0.0)  # recurrent half
    np.testing.assert_array_equal(new["model_weights/lstm/lstm/bias:0"][4:8], 1.5)
    for name, value in old.items():
        if not name.endswith("bias:0") or "gru" in name:
            np.testing.assert_array_equal(new[name], value)
    after = keras2_file.read_bytes()
    assert len(after) == len(before)
    changed = np.flatnonzero(np.frombuffer(before, np.uint8) != np.frombuffer(after, np.uint8))
    with open_checkpoint(keras2_file) as checkpoint:
        biases = [ref for name, ref in checkpoint.tensors.items() if name.endswith("bias:0")]
    assert all(
        any(b.storage.offset <= o < b.storage.offset + b.nbytes for b in biases) for o in changed
    )


def test_keras_loads_the_edited_file_and_its_forget_gate_shows_sigmoid_v(tmp_path):
    rng = np.random.default_rng(3)
    path = write_keras2(
        tmp_path / "plain.h5",
        [
            (
                layer_config("lstm", "LSTM", 4, **SIGMOID),
                {"lstm": keras2_weights(rng, "LSTM", 3, 4)},
            ),
            (
                layer_config("gru", "GRU", 2, reset_after=True, **SIGMOID),
                {"gru": keras2_weights(rng, "GRU", 4, 2, reset_after=True)},
            ),
        ],
    )
    output = tmp_path / "edited.h5"
    edit_checkpoint(path, lambda ck: plan_set_forget_bias(ck, -0.75), Destination(output=output))
    inputs = keras.Input((5, 3))
    x = keras.layers.LSTM(4, return_sequences=True, name="lstm")(inputs)
    model = keras.Model(inputs, keras.layers.GRU(2, name="gru")(x))
    model.load_weights(str(output))
    cell = model.get_layer("lstm").cell
    x0, h0 = np.zeros((1, 3), "float32"), np.zeros((1, 4), "float32")
    c1 = [keras.ops.convert_to_numpy(cell(x0, [h0, np.full_like(h0, c)])[1][1]) for c in (1, 0)]
    np.testing.assert_allclose(c1[0] - c1[1], 1 / (1 + np.exp(0.75)), atol=1e-6)


# --- The hard_sigmoid trap -----------------------------------------------------------------------


def weights_only(path: Path, keras_version: str) -> Path:
    rng = np.random.default_rng(5)
    layers = [(layer_config("lstm", "LSTM", 3), {"lstm": keras2_weights(rng, "LSTM", 2, 3)})]
    return write_keras2(path, layers, whole_model=False, keras_version=keras_version)


def test_a_weights_only_file_from_before_keras_2_3_is_assumed_hard_sigmoid(tmp_path):
    with open_checkpoint(weights_only(tmp_path / "w.h5", "2.2.4")) as checkpoint:
        (layer,) = discover(checkpoint).layers
    assert layer.attributes["recurrent_activation"] == "hard_sigmoid"
    assert layer.attributes["recurrent_activation_assumed"] is True
    assert layer.pytorch_differences == ("recurrent_activation=hard_sigmoid (assumed)",)


def test_the_model_config_says_which_activation(tmp_path):
    rng = np.random.default_rng(6)
    config = layer_config("lstm", "LSTM", 3, recurrent_activation="hard_sigmoid")
    path = write_keras2(
        tmp_path / "m.h5",
        [(config, {"lstm": keras2_weights(rng, "LSTM", 2, 3)})],
        keras_version="2.2.4",
    )
    with open_checkpoint(path) as checkpoint:
        (layer,) = discover(checkpoint).layers
    assert "recurrent_activation_assumed" not in layer.attributes
    assert layer.pytorch_differences == ("recurrent_activation=hard_sigmoid",)


def test_cli_verify_takes_the_recurrent_activation_as_an_option(surgeon, tmp_path):
    path = weights_only(tmp_path / "w.h5", "2.2.4")
    assumed = surgeon("verify", path, "--json")  # hard_sigmoid: Keras runs it alone, torch cannot
    assert assumed.returncode == 0, assumed.stderr
    assert "recurrent_activation=hard_sigmoid (assumed)" in assumed.stderr
    (alone,) = json.loads(assumed.stdout)["layers"]
    assert alone["runtime_max_abs_diff"] is None
    told = surgeon("verify", path, "--recurrent-activation", "sigmoid", "--json")
    assert told.returncode == 0, told.stderr
    (compared,) = json.loads(told.stdout)["layers"]
    assert compared["runtime_max_abs_diff"] < 1e-4


# --- Hostile and broken files --------------------------------------------------------------------


def test_a_dataset_claiming_an_absurd_size_is_a_clean_error(surgeon, tmp_path):
    path = tmp_path / "absurd.h5"
    with h5py.File(path, "w") as h5:
        h5.create_dataset("lstm/lstm/bias:0", data=np.zeros(7919, np.float32))
    data = path.read_bytes()
    assert data.count(struct.pack("<Q", 7919)) >= 1
    path.write_bytes(data.replace(struct.pack("<Q", 7919), struct.pack("<Q", 1 << 50)))
    with pytest.raises(CheckpointError):
        open_checkpoint(path)
    result = surgeon("inspect", path)
    assert_clean_failure(result.stderr, result.returncode)


def test_a_truncated_hdf5_file_is_a_clean_error(surgeon, tmp_path):
    source = whole_model(tmp_path / "model.h5").read_bytes()
    path = tmp_path / "truncated.h5"
    path.write_bytes(source[: len(source) // 3])
    result = surgeon("inspect", path)
    assert_clean_failure(result.stderr, result.returncode)


def test_a_compressed_dataset_is_named_and_left_out(tmp_path):
    path = tmp_path / "compressed.h5"
    with h5py.File(path, "w") as h5:
        h5.create_dataset(
            "lstm/lstm/kernel:0", data=np.ones((3, 16), np.float32), compression="gzip"
        )
        h5.create_dataset("lstm/lstm/recurrent_kernel:0", data=np.ones((4, 16), np.float32))
    with open_checkpoint(path) as checkpoint:
        assert "lstm/lstm/kernel:0" not in checkpoint.tensors
        assert any("compressed" in warning for warning in checkpoint.warnings)
        found = discover(checkpoint)
    assert not found.layers and found.warnings


def test_a_model_config_is_parsed_never_run(surgeon, tmp_path):
    canary = tmp_path / "canary"
    code = f"open({str(canary)!r}, 'w').write('ran')"
    rng = np.random.default_rng(7)
    lambda_layer = {"class_name": "Lambda", "config": {"name": "evil", "function": code}}
    path = write_keras2(
        tmp_path / "m.h5",
        [
            (lambda_layer, {}),
            (
                layer_config("lstm", "LSTM", 3, **SIGMOID),
                {"lstm": keras2_weights(rng, "LSTM", 2, 3)},
            ),
        ],
    )
    for command in ("inspect", "check"):
        assert surgeon(command, path).returncode in (0, 1)
    assert not canary.exists()


def test_cli_convert_refuses_an_assumed_hard_sigmoid_unless_told(surgeon, tmp_path):
    path = weights_only(tmp_path / "w.h5", "2.2.4")
    output = tmp_path / "converted.safetensors"
    refused = surgeon("convert", path, "-o", output)
    assert "hard_sigmoid (assumed)" in assert_clean_failure(refused.stderr, refused.returncode)
    assert not output.exists()
    told = surgeon("convert", path, "-o", output, "--recurrent-activation", "sigmoid")
    assert told.returncode == 0, told.stderr
    assert output.exists()
