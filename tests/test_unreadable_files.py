"""Files lstm-surgeon cannot read: the error says what the file is, and a re-save hint works as given.

Every file here is real (written by numpy, pickle, torch) or, where the writing library is not a
dependency (onnx, h5py), built byte for byte to the format's specification. Nothing is executed.
"""

from __future__ import annotations

import json
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_clean_failure
from hypothesis import given
from hypothesis import strategies as st

from lstm_surgeon import open_checkpoint
from lstm_surgeon.errors import CheckpointError, UnsupportedCheckpointError
from lstm_surgeon.formats.identify import HDF5_SIGNATURE, UNKNOWN, describe, is_onnx_model

READABLE = "not a checkpoint; lstm-surgeon reads torch.save and safetensors files"


def error_of(path: Path) -> str:
    with pytest.raises(CheckpointError) as error:
        open_checkpoint(path)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    return message


# --- A tiny protobuf writer, enough to build an ONNX ModelProto by the field numbers of onnx.proto ---


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def field(number: int, value: int | bytes | str) -> bytes:
    """One protobuf field: an int as a varint, bytes or str as a length-delimited value."""
    if isinstance(value, int):
        return varint(number << 3) + varint(value)
    data = value.encode() if isinstance(value, str) else value
    return varint(number << 3 | 2) + varint(len(data)) + data


def onnx_lstm_model() -> bytes:
    """An ONNX model of one LSTM node (input 2, hidden 3), as torch.onnx.export lays it out:
    ModelProto{ir_version, producer_name, producer_version, graph, opset_import}."""
    hidden = field(1, "hidden_size") + field(3, 3) + field(20, 2)  # AttributeProto, type INT
    node = b"".join(field(1, name) for name in ("X", "W", "R", "B"))
    node += field(2, "Y") + field(3, "LSTM_0") + field(4, "LSTM") + field(5, hidden)
    graph = field(1, node) + field(2, "main_graph")
    for name, shape in (("W", (1, 12, 2)), ("R", (1, 12, 3)), ("B", (1, 24))):
        initializer = b"".join(field(1, dim) for dim in shape) + field(2, 1)  # FLOAT
        initializer += field(8, name) + field(9, bytes(4 * int(np.prod(shape))))
        graph += field(5, initializer)
    graph += field(11, field(1, "X")) + field(12, field(1, "Y"))
    opset = field(1, "") + field(2, 17)
    return (
        field(1, 9) + field(2, "pytorch") + field(3, "2.13.0") + field(7, graph) + field(8, opset)
    )


# --- What the file is ------------------------------------------------------------------------


def test_onnx_model_is_read_now(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(onnx_lstm_model())
    with open_checkpoint(path) as checkpoint:
        assert checkpoint.format_name == "onnx"
        assert [op.kind for op in checkpoint.contents.operators] == ["LSTM"]


def test_hdf5_file(tmp_path):
    path = tmp_path / "model.h5"
    superblock = HDF5_SIGNATURE + bytes([0, 0, 0, 0, 0, 8, 8, 0]) + bytes(80)  # version 0, 8-byte
    path.write_bytes(superblock)
    assert error_of(path) == f"{path}: an HDF5 file (such as a Keras .h5 model), {READABLE}"


def test_hdf5_file_after_a_user_block(tmp_path):
    path = tmp_path / "with_user_block.h5"
    path.write_bytes(b"user block text".ljust(1024, b"\0") + HDF5_SIGNATURE + bytes(88))
    assert "an HDF5 file" in error_of(path)


def test_hdf5_signature_elsewhere_is_not_hdf5(tmp_path):
    path = tmp_path / "not.h5"
    path.write_bytes(bytes(100) + HDF5_SIGNATURE + bytes(1000))
    assert error_of(path) == f"{path}: {UNKNOWN}"


def test_numpy_array_file(tmp_path):
    path = tmp_path / "weights.npy"
    np.save(path, np.zeros((4, 3), dtype=np.float32))
    assert error_of(path) == f"{path}: a numpy array file (.npy, np.save), {READABLE}"


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_numpy_archive(tmp_path, save):
    path = tmp_path / "weights.npz"
    save(path, weight_ih_l0=np.zeros((12, 2)), bias_ih_l0=np.zeros(12))
    assert error_of(path) == f"{path}: a numpy .npz archive (np.savez), {READABLE}"


def test_other_zip_file_keeps_the_torch_save_explanation(tmp_path):
    import zipfile

    path = tmp_path / "notes.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("notes.txt", "hello")
    assert error_of(path) == f"{path}: a zip file, but not a torch.save checkpoint (no data.pkl)"


class Tripwire:
    """Unpickling this touches a file: it proves that lstm-surgeon never ran the pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_plain_pickle_is_named_and_not_run(tmp_path, protocol):
    marker = tmp_path / "pickle-was-run"
    path = tmp_path / "state.pkl"
    state = {"lstm.weight_ih_l0": [0.0] * 12, "trap": Tripwire(marker)}
    with open(path, "wb") as file:
        pickle.dump(state, file, protocol=protocol)
    assert error_of(path) == f"{path}: a plain pickle file (pickle.dump), {READABLE}"
    assert not marker.exists()


def test_gguf_file(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + bytes(16))
    assert error_of(path) == f"{path}: a GGUF file (llama.cpp), {READABLE}"


def test_unknown_bytes_keep_the_general_message(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("# not a model\n")
    assert error_of(path) == f"{path}: {UNKNOWN}"


# --- The ONNX check reads structure, not one magic byte ------------------------------------------


def test_a_protobuf_that_is_not_a_model_is_not_onnx():
    saved_model_like = field(1, 1) + field(2, field(1, "meta graph"))  # no graph field
    assert not is_onnx_model(saved_model_like)
    assert not is_onnx_model(field(1, 9) + field(7, "graph") + field(9, "unknown field"))
    assert not is_onnx_model(field(7, "graph") + field(1, 9))  # ir_version comes first
    assert not is_onnx_model(field(1, "ir_version must be a varint") + field(7, "graph"))


def test_every_truncation_of_an_onnx_model_inside_its_graph_is_not_onnx():
    model = onnx_lstm_model()
    assert is_onnx_model(model)
    graph_end = len(model) - len(field(8, field(1, "") + field(2, 17)))
    for cut in range(1, graph_end):
        assert not is_onnx_model(model[:cut]), cut


@given(st.binary(max_size=300))
def test_any_bytes_get_an_answer_and_never_an_exception(data):
    assert describe(data) in {
        None,
        "a numpy array file (.npy, np.save)",
        "an HDF5 file (such as a Keras .h5 model)",
        "a GGUF file (llama.cpp)",
        "a plain pickle file (pickle.dump)",
    }


# --- Through the command, with --json ------------------------------------------------------------


def test_a_truncated_onnx_model_is_named_on_stderr_and_in_json(run_cli, tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(onnx_lstm_model()[:-5])
    result = run_cli("inspect", path, "--json")
    line = assert_clean_failure(result.stderr, result.exit_code)
    assert line == f"lstm-surgeon: error: {path}: a truncated or malformed ONNX model"
    assert json.loads(result.stdout)["error"]["message"] == line.removeprefix(
        "lstm-surgeon: error: "
    )


# --- The pre-1.6 re-save hint works for a file saved from a GPU -----------------------------------


def legacy_file_saved_from_a_gpu(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A pre-1.6 (non-zip) torch.save file whose storages say `cuda:0`, made without a GPU: saved
    from the CPU, then the pickled location string rewritten (BINUNICODE: 'X', 4-byte length, text;
    the legacy format has no offsets, so the longer string shifts nothing that matters)."""
    torch.manual_seed(0)
    state = {key: value.detach() for key, value in torch.nn.LSTM(2, 3).state_dict().items()}
    cpu_file = tmp_path / "cpu.pt"
    torch.save(state, cpu_file, _use_new_zipfile_serialization=False)
    data = cpu_file.read_bytes()
    cpu, cuda = b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0"
    assert data.count(cpu) == 1  # pickled once, then referenced through the memo
    path = tmp_path / "gpu_legacy.pt"
    path.write_bytes(data.replace(cpu, cuda))
    return path, state


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_legacy_re_save_hint_works_for_a_file_saved_from_a_gpu(tmp_path):
    path, state = legacy_file_saved_from_a_gpu(tmp_path)
    with pytest.raises(RuntimeError, match="CUDA"):
        torch.load(path, weights_only=True)  # what a hint without map_location would do
    with pytest.raises(UnsupportedCheckpointError) as error:
        open_checkpoint(path)
    hint = re.search(r"\((torch\.save\(.*\))\) and try again", str(error.value))
    assert hint is not None, error.value
    new_path = tmp_path / "resaved.pt"
    script = f"import torch; path = {str(path)!r}; new_path = {str(new_path)!r}; {hint.group(1)}"
    resave = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert resave.returncode == 0, resave.stderr
    with open_checkpoint(new_path) as checkpoint:
        assert sorted(checkpoint.tensors) == sorted(state)
    loaded = torch.load(new_path, weights_only=True)
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key
