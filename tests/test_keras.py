"""Keras 3 files (`.keras` archives and `.weights.h5`) saved by Keras itself.

Oracles: Keras's own layers (loaded from the saved file) against torch's modules loaded from
`module_state`; after an edit, Keras loads the file and its own cell shows the gate's new value; the
bytes outside the edited gates stay as they were.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from keras_files import FEATURES, SEQUENCE, keras, keras3_model
from torch import nn

from lstm_surgeon.apply import Destination, edit_checkpoint, output_tensors
from lstm_surgeon.discovery import discover
from lstm_surgeon.errors import EditError, SurgeonError
from lstm_surgeon.formats import open_checkpoint
from lstm_surgeon.formats.zip_records import read_records
from lstm_surgeon.layers import BIAS_IH
from lstm_surgeon.layouts.pytorch import module_state
from lstm_surgeon.surgery import (
    Selection,
    plan_add_bias,
    plan_set_forget_bias,
    plan_set_gate_bias,
)
from lstm_surgeon.verify import verify_checkpoint

SUFFIXES = (".keras", ".weights.h5")
EXPRESSIBLE = ("lstm", "sub/g", "bi", "srnn")  # what torch's modules compute exactly
TORCH_CLASS = {"LSTM": nn.LSTM, "GRU": nn.GRU, "RNN": nn.RNN}


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("keras3")
    model = keras3_model()
    model.save(folder / "model.keras")
    model.save_weights(folder / "model.weights.h5")
    return {".keras": folder / "model.keras", ".weights.h5": folder / "model.weights.h5"}


@pytest.fixture(params=SUFFIXES)
def keras_file(request: pytest.FixtureRequest, saved: dict[str, Path], tmp_path: Path) -> Path:
    """A fresh copy of the saved file (edits write beside it)."""
    copy = tmp_path / saved[request.param].name
    shutil.copyfile(saved[request.param], copy)
    return copy


def loaded_model(path: Path) -> keras.Model:
    """Keras's own reading of the file."""
    if path.suffix == ".keras":
        return keras.saving.load_model(path)
    model = keras3_model()
    model.load_weights(path)
    return model


def keras_layer(model: keras.Model, name: str):
    layer = model
    for part in name.split("/"):
        layer = layer.get_layer(part)
    return layer


def torch_module(path: Path, name: str) -> nn.Module:
    """torch's module, loaded strictly from what the regions gather."""
    with open_checkpoint(path) as checkpoint:
        (layer,) = discover(checkpoint, [name]).layers
        state = {k: torch.from_numpy(v.copy()) for k, v in module_state(checkpoint, layer).items()}
    module = TORCH_CLASS[layer.kind](
        layer.input_size, layer.hidden_size, bidirectional=layer.bidirectional, bias=layer.bias
    )
    module.load_state_dict(state, strict=True)
    return module


def test_every_layer_is_found_with_its_path_and_settings(keras_file):
    with open_checkpoint(keras_file) as checkpoint:
        layers = {layer.name: layer for layer in discover(checkpoint).layers}
    assert set(layers) == {*EXPRESSIBLE, "gru_before"}
    kinds = {name: (layer.kind, layer.bidirectional, layer.bias) for name, layer in layers.items()}
    assert kinds == {
        "lstm": ("LSTM", False, True),
        "sub/g": ("GRU", False, True),
        "gru_before": ("GRU", False, True),
        "bi": ("LSTM", True, True),
        "srnn": ("RNN", False, False),
    }
    assert all(layer.framework == "keras" for layer in layers.values())
    assert layers["lstm"].bias_roles == (BIAS_IH,)
    assert len(layers["sub/g"].bias_roles) == 2  # reset_after=True: input and recurrent rows
    assert layers["gru_before"].pytorch_differences
    assert not any(layers[name].pytorch_differences for name in EXPRESSIBLE)


@pytest.mark.parametrize("name", EXPRESSIBLE)
def test_torch_computes_what_keras_computes(saved, name):
    for path in saved.values():
        layer = keras_layer(loaded_model(path), name)
        width = layer.input.shape[-1] if name != "lstm" else FEATURES
        x = np.random.default_rng(2).normal(size=(2, SEQUENCE, width)).astype(np.float32)
        expected = keras.ops.convert_to_numpy(layer(x))
        with torch.no_grad():
            got = torch_module(path, name)(torch.from_numpy(x).transpose(0, 1))[0]
        np.testing.assert_allclose(got.transpose(0, 1).numpy(), expected, atol=1e-5)


def keras_forget_gates(model: keras.Model, name: str) -> np.ndarray:
    """Keras's forget gate at zero input and state, from its own cells: c1(c0=1) - c1(c0=0)."""
    layer = keras_layer(model, name)
    cells = [layer.forward_layer.cell, layer.backward_layer.cell] if name == "bi" else [layer.cell]
    gates = []
    for cell in cells:
        x, h = np.zeros((1, cell.kernel.shape[0]), "float32"), np.zeros((1, cell.units), "float32")
        c1 = [
            keras.ops.convert_to_numpy(cell(x, [h, np.full_like(h, c0)])[1][1]) for c0 in (1.0, 0.0)
        ]
        gates.append(c1[0] - c1[1])
    return np.concatenate(gates)


@pytest.mark.parametrize("in_place", [False, True])
def test_set_forget_bias_loads_in_keras_and_keras_sees_it(keras_file, tmp_path, in_place):
    output = tmp_path / f"edited{''.join(keras_file.suffixes)}"
    destination = Destination(in_place=True) if in_place else Destination(output=output)
    original = keras_file.read_bytes()
    _, result = edit_checkpoint(
        keras_file,
        lambda ck: plan_set_forget_bias(ck, 1.5, selection=Selection(("lstm", "bi"))),
        destination,
    )
    assert result is not None and result.method == "patch"
    edited = Path(result.path)
    model = loaded_model(edited)
    for name in ("lstm", "bi"):
        np.testing.assert_allclose(
            keras_forget_gates(model, name), 1 / (1 + np.exp(-1.5)), atol=1e-6
        )
    before = loaded_model(_saved_original(tmp_path, original, keras_file.name))
    for name in ("sub/g", "gru_before", "srnn"):
        for old, new in zip(
            keras_layer(before, name).get_weights(),
            keras_layer(model, name).get_weights(),
            strict=True,
        ):
            np.testing.assert_array_equal(old, new)


def _saved_original(tmp_path: Path, data: bytes, name: str) -> Path:
    path = tmp_path / "original" / name
    path.parent.mkdir()
    path.write_bytes(data)
    return path


def test_only_the_forget_bias_bytes_change(keras_file, tmp_path):
    output = tmp_path / f"edited{''.join(keras_file.suffixes)}"
    edit_checkpoint(keras_file, lambda ck: plan_set_forget_bias(ck, 1.5), Destination(output))
    old, new = (
        np.frombuffer(keras_file.read_bytes(), np.uint8),
        np.frombuffer(output.read_bytes(), np.uint8),
    )
    assert old.size == new.size
    changed = set(np.flatnonzero(old != new).tolist())
    allowed: set[int] = set()
    with open_checkpoint(keras_file) as checkpoint:
        for layer in discover(checkpoint).layers:
            if layer.kind != "LSTM":
                continue
            for cell in layer.cells:
                region = cell.region(BIAS_IH, "forget")
                start = region.tensor.storage.offset + region.units.start * 4
                allowed |= set(range(start, start + layer.hidden_size * 4))
        if keras_file.suffix == ".keras":
            crcs = read_records(keras_file, checkpoint.buffer)["model.weights.h5"].crc_offsets
            allowed |= {offset + i for offset in crcs for i in range(4)}
    assert changed and changed <= allowed


def test_a_keras_archive_stays_a_valid_zip_after_an_edit(saved, tmp_path):
    import zipfile

    output = tmp_path / "edited.keras"
    edit_checkpoint(saved[".keras"], lambda ck: plan_set_forget_bias(ck, 0.5), Destination(output))
    with zipfile.ZipFile(output) as archive:
        assert archive.testzip() is None  # every member's CRC-32 matches


def test_gru_gate_edits_land_where_keras_reads_them(keras_file, tmp_path):
    output = tmp_path / f"edited{''.join(keras_file.suffixes)}"
    planner = lambda ck: plan_set_gate_bias(ck, "update", -2.0, selection=Selection(("sub/g",)))  # noqa: E731
    edit_checkpoint(keras_file, planner, Destination(output))
    bias = keras_layer(loaded_model(output), "sub/g").cell.bias.numpy()  # [2, 3u], z first
    units = bias.shape[1] // 3
    np.testing.assert_array_equal(bias[0, :units], -2.0)
    np.testing.assert_array_equal(bias[1, :units], 0.0)  # effective: the recurrent part zeroed


def test_modes_that_need_two_biases_are_refused_for_a_keras_lstm(keras_file):
    with (
        open_checkpoint(keras_file) as checkpoint,
        pytest.raises(EditError, match="one bias per gate"),
    ):
        plan_set_forget_bias(checkpoint, 1.0, "both", Selection(("lstm",)))


def test_add_bias_is_refused_with_the_way_out(keras_file):
    with (
        open_checkpoint(keras_file) as checkpoint,
        pytest.raises(EditError, match="use_bias=True"),
    ):
        plan_add_bias(checkpoint)


def test_verify_agrees_with_keras_and_flags_reset_before(saved):
    for path in saved.values():
        with open_checkpoint(path) as checkpoint:
            assert verify_checkpoint(checkpoint, EXPRESSIBLE).ok
            (gru,) = verify_checkpoint(checkpoint, ["gru_before"]).layers
        # torch cannot compute a GRU that resets before the recurrent product: Keras runs it alone
        assert gru.ok and gru.runtime_max_abs_diff is None
        assert any("reset_after=False" in note for note in gru.notes), gru.notes


def test_cli_inspect_json_names_the_framework(surgeon, saved):
    result = surgeon("inspect", saved[".keras"], "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["format"] == "keras"
    layers = {layer["name"]: layer for layer in report["layers"]}
    assert layers["lstm"]["framework"] == "keras"
    assert layers["gru_before"]["attributes"]["reset_after"] is False


def test_cli_drop_bias_is_refused_and_leaves_nothing(surgeon, saved, tmp_path):
    output = tmp_path / "out.keras"
    result = surgeon("zero-bias", saved[".keras"], "--drop", "-o", output, "--yes")
    assert result.returncode == 2
    assert "model config" in result.stderr
    assert not output.exists()


def test_without_h5py_reading_names_the_extra(saved, monkeypatch):
    monkeypatch.setitem(sys.modules, "h5py", None)
    with pytest.raises(SurgeonError, match=r"pip install 'lstm-surgeon\[keras\]'"):
        open_checkpoint(saved[".weights.h5"])


def test_without_keras_verify_names_the_extra(saved, monkeypatch):
    monkeypatch.setitem(sys.modules, "keras", None)
    with (
        open_checkpoint(saved[".keras"]) as checkpoint,
        pytest.raises(SurgeonError, match=r"pip install 'lstm-surgeon\[keras\]'"),
    ):
        verify_checkpoint(checkpoint, ["lstm"])


def test_help_imports_neither_h5py_nor_keras():
    code = (
        "import sys; from lstm_surgeon.cli import app; from typer.testing import CliRunner; "
        "CliRunner().invoke(app, ['--help']); "
        "print(any(m in sys.modules for m in ('h5py', 'keras')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"


def test_a_rewrite_through_h5py_holds_what_the_patch_writes(keras_file, tmp_path):
    """The format's `write` (the path for a file whose bytes cannot be patched) gives the same
    values as the byte patch, and Keras loads it."""
    suffix = "".join(keras_file.suffixes)
    patched, rewritten = tmp_path / f"patched{suffix}", tmp_path / f"rewritten{suffix}"
    planner = lambda ck: plan_set_forget_bias(ck, 2.5)  # noqa: E731
    edit_checkpoint(keras_file, planner, Destination(output=patched))
    with open_checkpoint(keras_file) as checkpoint, open(rewritten, "w+b") as out:
        checkpoint.format.write(out, output_tensors(checkpoint, planner(checkpoint)), checkpoint)
    with open_checkpoint(patched) as a, open_checkpoint(rewritten) as b:
        assert a.tensors.keys() == b.tensors.keys()
        for name in a.tensors:
            np.testing.assert_array_equal(a.raw(name), b.raw(name))
    np.testing.assert_allclose(
        keras_forget_gates(loaded_model(rewritten), "lstm"), 1 / (1 + np.exp(-2.5)), atol=1e-6
    )


def test_another_format_is_not_written_as_keras(surgeon, saved, tmp_path):
    output = tmp_path / "out.h5"
    result = surgeon("set-forget-bias", saved[".keras"], "-o", output, "--yes")
    assert result.returncode == 2, result.stderr
    assert not output.exists()


# --- convert: Keras's outputs against torch's modules loaded from convert's output ---------------


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_converted_layers_compute_what_keras_computes(surgeon, saved, tmp_path, suffix):
    from safetensors.torch import load_file

    output = tmp_path / "converted.safetensors"
    selection = [arg for name in EXPRESSIBLE for arg in ("--layer", name)]
    result = surgeon("convert", saved[suffix], "-o", output, *selection, "--json")
    assert result.returncode == 0, result.stderr
    converted = load_file(str(output))
    model = loaded_model(saved[suffix])
    with open_checkpoint(saved[suffix]) as checkpoint:
        layers = {layer.name: layer for layer in discover(checkpoint).layers}
    for name in EXPRESSIBLE:
        layer = layers[name]
        module = TORCH_CLASS[layer.kind](
            layer.input_size, layer.hidden_size, bidirectional=layer.bidirectional, bias=layer.bias
        )
        prefix = name.replace("/", ".") + "."
        state = {k.removeprefix(prefix): v for k, v in converted.items() if k.startswith(prefix)}
        module.load_state_dict(state, strict=True)
        x = np.random.default_rng(3).normal(size=(2, SEQUENCE, layer.input_size))
        x = x.astype(np.float32)
        expected = keras.ops.convert_to_numpy(keras_layer(model, name)(x))
        with torch.no_grad():
            got = module(torch.from_numpy(x).transpose(0, 1))[0].transpose(0, 1).numpy()
        np.testing.assert_allclose(got, expected, atol=1e-5)


def test_convert_refuses_a_gru_with_reset_before(surgeon, saved, tmp_path):
    output = tmp_path / "converted.safetensors"
    result = surgeon("convert", saved[".keras"], "-o", output, "--layer", "gru_before")
    assert result.returncode == 2
    assert "reset_after=False" in result.stderr
    assert not output.exists()
