"""numpy files made by numpy's own savers (np.save, np.savez, np.savez_compressed, pickle.dump) from
real torch modules: read as np.load reads them, edited where the bytes lie (or rewritten, keeping
compression), and checked against np.load and the torch modules after an edit."""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lstm_surgeon import open_checkpoint
from lstm_surgeon.errors import CheckpointError

SAVERS = ("npz", "npz_compressed", "pickle3", "pickle4", "pickle5")
FORGET = slice(4, 8)  # hidden 4: nn.LSTM's gate rows are i, f, g, o


def lstm_state(bias: bool = True) -> dict[str, np.ndarray]:
    torch.manual_seed(0)
    module = torch.nn.LSTM(3, 4, num_layers=2, bidirectional=True, bias=bias)
    return {name: value.detach().numpy().copy() for name, value in module.state_dict().items()}


def save(kind: str, state: dict[str, np.ndarray], folder: Path) -> Path:
    """The state dict written by numpy's (or pickle's) own saver."""
    if kind == "npz":
        path = folder / "model.npz"
        np.savez(path, **state)
    elif kind == "npz_compressed":
        path = folder / "model.npz"
        np.savez_compressed(path, **state)
    else:
        path = folder / "model.pkl"
        with open(path, "wb") as file:
            pickle.dump({"model": {"rnn": state}, "epoch": 3}, file, protocol=int(kind[-1]))
    return path


def load(path: Path) -> dict[str, np.ndarray]:
    """The oracle: np.load, or pickle.load of a file a test wrote itself (flattened)."""
    if path.suffix == ".npz":
        with np.load(path) as archive:
            return {key: archive[key] for key in archive.files}
    with open(path, "rb") as file:
        root = pickle.load(file)  # our own test file, never a hostile one
    return {f"model.rnn.{key}": value for key, value in root["model"]["rnn"].items()}


def real_name(path: Path, name: str) -> str:
    return f"model.rnn.{name}" if path.suffix == ".pkl" else name


@pytest.mark.parametrize("kind", SAVERS)
def test_reader_equals_np_load(tmp_path, kind):
    path = save(kind, lstm_state(), tmp_path)
    expected = load(path)
    with open_checkpoint(path) as checkpoint:
        assert list(checkpoint.tensors) == list(expected)
        for name, array in expected.items():
            assert checkpoint.raw(name).dtype == array.dtype
            assert np.array_equal(checkpoint.raw(name), array)


def test_npy_file_is_named_by_its_stem_and_fortran_order_is_a_strided_view(tmp_path):
    array = np.asfortranarray(np.arange(12, dtype=np.float32).reshape(3, 4))
    path = tmp_path / "lstm.weight_ih_l0.npy"
    np.save(path, array)
    with open_checkpoint(path) as checkpoint:
        ref = checkpoint.tensors["lstm.weight_ih_l0"]
        assert ref.strides == (1, 3)
        assert np.array_equal(checkpoint.raw(ref), np.load(path))


@settings(max_examples=40, deadline=None)
@given(
    shape=st.lists(st.integers(0, 5), max_size=3).map(tuple),
    dtype=st.sampled_from(["<f4", "<f8", "<f2", "<i8", "|u1", "|b1"]),
    fortran=st.booleans(),
)
def test_any_npy_reads_as_np_load(tmp_path_factory, shape, dtype, fortran):
    array = (np.arange(int(np.prod(shape))) % 7).astype(dtype).reshape(shape)
    if fortran:
        array = np.asfortranarray(array)
    path = tmp_path_factory.mktemp("npy") / "x.npy"
    np.save(path, array)
    with open_checkpoint(path) as checkpoint:
        assert np.array_equal(checkpoint.raw("x"), np.load(path))


def forget_bias_of(state: dict[str, np.ndarray], layer: str) -> np.ndarray:
    """What the forget gate sees, from a real nn.LSTM loaded (strictly) with the state."""
    module = torch.nn.LSTM(3, 4, num_layers=2, bidirectional=True)
    module.load_state_dict({key: torch.from_numpy(value) for key, value in state.items()})
    bias_ih = getattr(module, f"bias_ih_{layer}").detach().numpy()
    bias_hh = getattr(module, f"bias_hh_{layer}").detach().numpy()
    return (bias_ih + bias_hh)[FORGET]


def module_state(path: Path) -> dict[str, np.ndarray]:
    return {key.rsplit(".", 1)[-1]: value for key, value in load(path).items()}


@pytest.mark.parametrize("kind", SAVERS)
def test_set_forget_bias_reaches_the_torch_module(run_cli, tmp_path, kind):
    path = save(kind, lstm_state(), tmp_path)
    out = tmp_path / f"out{path.suffix}"
    result = run_cli("set-forget-bias", path, "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    method = json.loads(result.stdout)["result"]["method"]
    assert method == ("rewrite" if kind == "npz_compressed" else "patch")
    state = module_state(out)
    for layer in ("l0", "l0_reverse", "l1", "l1_reverse"):
        np.testing.assert_allclose(forget_bias_of(state, layer), 1.0, atol=1e-6)
    before = module_state(path)
    for name, value in before.items():
        if not name.startswith("bias_"):
            assert np.array_equal(state[name], value), name


def new_crcs(path: Path) -> set[bytes]:
    with zipfile.ZipFile(path) as archive:
        return {info.CRC.to_bytes(4, "little") for info in archive.infolist()}


@pytest.mark.parametrize("kind", ["npz", "pickle4", "pickle5"])
def test_a_patch_touches_only_the_bias_bytes_and_the_crcs(run_cli, tmp_path, kind):
    path = save(kind, lstm_state(), tmp_path)
    out = tmp_path / f"out{path.suffix}"
    assert run_cli("set-forget-bias", path, "-o", out).exit_code == 0
    old, new = path.read_bytes(), out.read_bytes()
    assert len(old) == len(new)
    with open_checkpoint(path) as checkpoint:
        biases = [
            range(ref.storage.offset, ref.storage.offset + ref.storage.nbytes)
            for name, ref in checkpoint.tensors.items()
            if ".bias_" in f".{name.rsplit('.', 1)[-1]}"
        ]
    crcs = new_crcs(out) if path.suffix == ".npz" else set()
    for position in np.flatnonzero(np.frombuffer(old, np.uint8) != np.frombuffer(new, np.uint8)):
        if any(position in span for span in biases):
            continue
        windows = {new[start : start + 4] for start in range(position - 3, position + 1)}
        assert windows & crcs, f"byte {position} changed outside the biases and the CRC-32s"
    if path.suffix == ".npz":
        with zipfile.ZipFile(out) as archive:
            assert archive.testzip() is None  # every CRC-32 is right


def test_a_folder_of_npy_files_is_one_checkpoint_edited_in_place(tmp_path):
    from lstm_surgeon.apply import Destination, edit_checkpoint
    from lstm_surgeon.surgery import plan_set_forget_bias

    paths = {}
    for name, value in lstm_state().items():
        paths[name] = tmp_path / f"{name}.npy"
        np.save(paths[name], value)
    before = {name: path.read_bytes() for name, path in paths.items()}
    edit_checkpoint(list(paths.values()), plan_set_forget_bias, Destination(in_place=True))
    state = {name: np.load(path) for name, path in paths.items()}
    for layer in ("l0", "l0_reverse", "l1", "l1_reverse"):
        np.testing.assert_allclose(forget_bias_of(state, layer), 1.0, atol=1e-6)
    for name, path in paths.items():
        after = path.read_bytes()
        assert len(after) == len(before[name])
        if name.startswith("weight"):
            assert after == before[name]
        header = len(after) - state[name].nbytes
        assert after[:header] == before[name][:header]


def test_compressed_npz_keeps_its_compression_after_an_edit(run_cli, tmp_path):
    path = save("npz_compressed", lstm_state(), tmp_path)
    result = run_cli("zero-bias", path, "--gate", "forget", "--in-place", "--json")
    assert json.loads(result.stdout)["result"]["method"] == "rewrite"
    with zipfile.ZipFile(path) as archive:
        assert {info.compress_type for info in archive.infolist()} == {zipfile.ZIP_DEFLATED}
        assert archive.testzip() is None
    state = module_state(path)
    assert np.all(state["bias_ih_l0"][FORGET] == 0)
    assert np.array_equal(state["weight_ih_l0"], lstm_state()["weight_ih_l0"])


@pytest.mark.parametrize("kind", SAVERS)
def test_add_bias_writes_a_file_a_bias_true_module_loads(run_cli, tmp_path, kind):
    path = save(kind, lstm_state(bias=False), tmp_path)
    out = tmp_path / f"out{path.suffix}"
    result = run_cli("add-bias", path, "-o", out)
    assert result.exit_code == 0, result.stderr
    state = module_state(out)
    module = torch.nn.LSTM(3, 4, num_layers=2, bidirectional=True)
    module.load_state_dict({key: torch.from_numpy(value) for key, value in state.items()})
    assert np.all(module.bias_hh_l1_reverse.detach().numpy() == 0)
    if kind.startswith("pickle"):
        with open(out, "rb") as file:
            root = pickle.load(file)
        assert root["epoch"] == 3
        names = list(root["model"]["rnn"])
        assert names.index("bias_ih_l0") == names.index("weight_hh_l0") + 1
    if kind == "npz_compressed":
        with zipfile.ZipFile(out) as archive:
            assert {info.compress_type for info in archive.infolist()} == {zipfile.ZIP_DEFLATED}


def test_zero_bias_drop_removes_the_members(run_cli, tmp_path):
    path = save("npz", lstm_state(), tmp_path)
    out = tmp_path / "nobias.npz"
    assert run_cli("zero-bias", path, "--drop", "-o", out).exit_code == 0
    assert sorted(load(out)) == sorted(name for name in lstm_state() if name.startswith("weight"))


@pytest.mark.parametrize(("source", "target"), [("npz", "safetensors"), ("pickle4", "npz")])
def test_conversion_keeps_every_value(run_cli, tmp_path, source, target):
    path = save(source, lstm_state(), tmp_path)
    out = tmp_path / f"out.{target}"
    assert run_cli("set-forget-bias", path, "--value", "2", "-o", out).exit_code == 0
    assert run_cli("diff", path, out).exit_code == 1  # the forget biases differ
    with open_checkpoint(out) as converted, open_checkpoint(path) as original:
        assert list(converted.tensors) == list(original.tensors)


def test_pt_to_npz_conversion_is_read_back_by_np_load(run_cli, tmp_path, tmp_checkpoint):
    torch.manual_seed(1)
    module = torch.nn.GRU(3, 5)
    path = tmp_checkpoint(module.state_dict(), "gru.pt")
    out = tmp_path / "gru.npz"
    assert run_cli("zero-bias", path, "-o", out).exit_code == 0
    converted = load(out)
    assert np.array_equal(converted["weight_hh_l0"], module.weight_hh_l0.detach().numpy())
    assert np.all(converted["bias_ih_l0"] == 0)


def test_check_finds_a_corrupt_stored_member(run_cli, tmp_path):
    path = save("npz", lstm_state(), tmp_path)
    data = bytearray(path.read_bytes())
    with open_checkpoint(path) as checkpoint:
        offset = checkpoint.tensors["weight_ih_l0"].storage.offset
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))
    result = run_cli("check", path, "--json")
    assert result.exit_code == 1
    assert any("CRC-32 mismatch" in problem for problem in json.loads(result.stdout)["problems"])


def test_big_endian_and_truncated_arrays_are_refused(tmp_path):
    path = tmp_path / "big.npy"
    np.save(path, np.zeros(4, dtype=">f4"))
    with pytest.raises(CheckpointError, match="big-endian"):
        open_checkpoint(path)
    np.save(path, np.zeros(40, dtype="<f4"))
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(CheckpointError, match="truncated"):
        open_checkpoint(path)


def test_pickle_protocol_2_arrays_get_a_re_save_hint(tmp_path):
    path = tmp_path / "old.pkl"
    with open(path, "wb") as file:
        pickle.dump({"w": np.zeros(3, np.float32)}, file, protocol=2)
    with pytest.raises(CheckpointError, match="protocol 3 or later"):
        open_checkpoint(path)


def test_bfloat16_cannot_go_into_a_numpy_file(run_cli, tmp_path, tmp_checkpoint):
    module = torch.nn.LSTM(2, 3).to(torch.bfloat16)
    path = tmp_checkpoint(module.state_dict(), "bf16.pt")
    result = run_cli("set-forget-bias", path, "-o", tmp_path / "out.npz")
    assert result.exit_code == 2
    assert "numpy has no bfloat16" in result.stderr
    assert not (tmp_path / "out.npz").exists()


def test_a_shared_array_is_named_once_and_stays_shared(run_cli, tmp_path):
    state = lstm_state(bias=False)
    path = tmp_path / "tied.pkl"
    with open(path, "wb") as file:
        pickle.dump({"model": {"rnn": state}, "tied": [state["weight_ih_l0"]]}, file, protocol=4)
    with open_checkpoint(path) as checkpoint:
        assert "tied.0" not in checkpoint.tensors
    out = tmp_path / "out.pkl"
    assert run_cli("add-bias", path, "-o", out).exit_code == 0
    with open(out, "rb") as file:
        root = pickle.load(file)
    assert root["tied"][0] is root["model"]["rnn"]["weight_ih_l0"]
    assert "bias_hh_l1_reverse" in root["model"]["rnn"]


def test_a_list_of_arrays_is_named_by_index(tmp_path):
    arrays = [np.zeros((8, 3), np.float32), np.ones(8, np.float16)]
    path = tmp_path / "list.pkl"
    with open(path, "wb") as file:
        pickle.dump(arrays, file, protocol=5)
    with open_checkpoint(path) as checkpoint:
        assert list(checkpoint.tensors) == ["0", "1"]
        assert np.array_equal(checkpoint.raw("1"), arrays[1])
