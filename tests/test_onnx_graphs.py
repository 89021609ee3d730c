"""ONNX graphs built with `onnx.helper` the ways exporters write them: GRU with either
`linear_before_reset`, peepholes, weights as `Constant` nodes, an LSTM inside an `If` branch fed
through `Unsqueeze`, a transposed weight, external data, two nodes sharing one weight, and files that
must be refused (a path out of the folder, typed float_data, no recurrent node at all).

Oracle: onnxruntime running the (edited) file, against torch's module with the expected parameters,
or against ONNX's own equations at zero input where torch has no such cell.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import assert_clean_failure
from onnx import TensorProto, helper, numpy_helper
from onnx_models import model_of, onnx_weights, random_input, recurrent_node, run, save, value
from onnx_models import sequence_first as torch_layout
from torch import nn

from lstm_surgeon.discovery import discover
from lstm_surgeon.formats import open_checkpoint
from lstm_surgeon.layouts.pytorch import module_state
from lstm_surgeon.verify import verify_checkpoint

INPUT, HIDDEN = 3, 4


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


def torch_module(kind: str, seed: int = 0, bidirectional: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    return getattr(nn, kind)(INPUT, HIDDEN, bidirectional=bidirectional).eval()


def torch_output(module: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return module(torch.from_numpy(x))[0].numpy()


def loaded(path: Path, like: nn.Module, name: str | None = None) -> nn.Module:
    """torch's module loaded strictly from what module_state gathers for the (named) layer."""
    with open_checkpoint(path) as checkpoint:
        layers = discover(checkpoint).layers
        layer = next(lay for lay in layers if name in (None, lay.name))
        state = {k: torch.from_numpy(v.copy()) for k, v in module_state(checkpoint, layer).items()}
    module = type(like)(INPUT, HIDDEN, bidirectional=like.bidirectional)
    module.load_state_dict(state, strict=True)
    return module.eval()


def with_forget_bias(module: nn.Module, value: float) -> nn.Module:
    state = {name: tensor.clone() for name, tensor in module.state_dict().items()}
    for name, tensor in state.items():
        if name.startswith("bias_"):
            tensor[HIDDEN : 2 * HIDDEN] = value if name.startswith("bias_ih") else 0.0
    expected = type(module)(INPUT, HIDDEN, bidirectional=module.bidirectional)
    expected.load_state_dict(state)
    return expected.eval()


def single_node_file(tmp_path: Path, kind: str, module: nn.Module, **attrs) -> Path:
    node = recurrent_node(kind, HIDDEN, name="rnn", **attrs)
    return save(model_of([node], onnx_weights(module, kind)), tmp_path / f"{kind}.onnx")


# --- GRU: linear_before_reset ---------------------------------------------------------------------


def test_gru_with_linear_before_reset_1_is_torch_gru(tmp_path):
    module = torch_module("GRU", bidirectional=True)
    path = single_node_file(
        tmp_path, "GRU", module, linear_before_reset=1, direction="bidirectional"
    )
    x = random_input(INPUT)
    np.testing.assert_allclose(
        torch_layout(run(path, X=x)), torch_output(loaded(path, module), x), atol=1e-5
    )
    with open_checkpoint(path) as checkpoint:
        (layer,) = discover(checkpoint).layers
        assert layer.pytorch_differences == ()
        assert verify_checkpoint(checkpoint).ok


def test_gru_with_linear_before_reset_0_sums_the_new_gate_biases(tmp_path, run_cli):
    module = torch_module("GRU")
    path = single_node_file(tmp_path, "GRU", module)  # ONNX's default: linear_before_reset=0
    with open_checkpoint(path) as checkpoint:
        (layer,) = discover(checkpoint).layers
        assert "linear_before_reset=0" in layer.pytorch_differences[0]
        verification = verify_checkpoint(checkpoint)
    assert verification.ok  # run by onnxruntime alone, the difference noted
    assert "linear_before_reset=0" in verification.layers[0].notes[0]
    shown = run_cli("inspect", path, env={"COLUMNS": "200", "NO_COLOR": "1"}).stdout
    assert "PyTorch cannot compute: linear_before_reset=0" in shown
    assert "b_in + b_hn is the effective bias" in shown
    report = json.loads(run_cli("inspect", path, "--json").stdout)
    new = report["layers"][0]["cells"][0]["gates"][2]
    assert new["gate"] == "new" and new["effective"] is not None  # Wbh + Rbh

    output = tmp_path / "edited.onnx"
    result = run_cli(
        "set-gate-bias", path, "--gate", "new", "--value", "0.7", "-o", output, "--yes"
    )
    assert result.exit_code == 0, result.stderr
    # At zero input and state ONNX's GRU gives h1 = (1 - z) * tanh(Wbh + Rbh): the new gate sees V.
    bias = numpy_helper.to_array(onnx.load(str(output)).graph.initializer[2])[0]
    z = sigmoid(bias[:HIDDEN] + bias[3 * HIDDEN : 4 * HIDDEN])
    y = run(output, X=np.zeros((1, 1, INPUT), np.float32))[0, 0, 0]
    np.testing.assert_allclose(y, (1 - z) * np.tanh(0.7), atol=1e-6)


# --- LSTM with peepholes, and other things torch cannot compute ------------------------------------


def test_peepholes_are_reported_and_verified_by_onnxruntime_alone(tmp_path, run_cli):
    module = torch_module("LSTM")
    weights = onnx_weights(module, "LSTM")
    weights["P"] = np.linspace(-0.5, 0.5, 3 * HIDDEN, dtype=np.float32).reshape(1, -1)
    inputs = ("X", "W", "R", "B", "", "", "", "P")
    node = recurrent_node("LSTM", HIDDEN, name="peep", inputs=inputs, clip=5.0)
    path = save(model_of([node], weights), tmp_path / "peep.onnx")
    with open_checkpoint(path) as checkpoint:
        (layer,) = discover(checkpoint).layers
    assert layer.attributes["peepholes"] is True and layer.attributes["clip"] == 5.0
    assert [d.split(" ")[0] for d in layer.pytorch_differences] == ["peepholes", "clip=5.0:"]
    result = run_cli("verify", path, "--json")
    assert result.exit_code == 0, result.stderr
    assert len(json.loads(result.stdout)["layers"][0]["notes"]) == 2
    edited = tmp_path / "edited.onnx"
    assert run_cli("set-forget-bias", path, "-o", edited, "--yes").exit_code == 0
    after = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(edited)).graph.initializer}
    np.testing.assert_array_equal(after["P"], weights["P"])
    np.testing.assert_array_equal(after["B"][0, 2 * HIDDEN : 3 * HIDDEN], 1.0)  # Wbf
    np.testing.assert_array_equal(after["B"][0, 6 * HIDDEN : 7 * HIDDEN], 0.0)  # Rbf
    assert np.isfinite(run(edited, X=random_input(INPUT))).all()


# --- Where the weights are: Constant nodes, subgraphs, views, external data -------------------------


def constant(name: str, value: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value, name))


def test_weights_in_constant_nodes_are_edited_in_place(tmp_path, run_cli):
    module = torch_module("LSTM", seed=1)
    nodes = [constant(k, v) for k, v in onnx_weights(module, "LSTM").items()]
    path = save(model_of([*nodes, recurrent_node("LSTM", HIDDEN)], {}), tmp_path / "c.onnx")
    x = random_input(INPUT)
    np.testing.assert_allclose(
        torch_layout(run(path, X=x)), torch_output(loaded(path, module), x), atol=1e-5
    )
    result = run_cli("set-forget-bias", path, "--value", "1.25", "--in-place", "--yes")
    assert result.exit_code == 0, result.stderr
    expected = torch_output(with_forget_bias(module, 1.25), x)
    np.testing.assert_allclose(torch_layout(run(path, X=x)), expected, atol=1e-5)
    onnx.checker.check_model(onnx.load(str(path)))


def if_model(weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    """An If whose two branches each run an LSTM on the same stored W, R, B (2-D and 1-D in the
    main graph, made 3-D/2-D by Unsqueeze nodes inside each branch)."""
    axes = numpy_helper.from_array(np.array([0], np.int64), "axes")
    flat = {k: v[0] for k, v in weights.items()}

    def branch(name: str) -> onnx.GraphProto:
        unsqueezed = [
            helper.make_node("Unsqueeze", [k, "axes"], [f"{k}_{name}"], name=f"u{k}")
            for k in ("W", "R", "B")
        ]
        inputs = ["X", f"W_{name}", f"R_{name}", f"B_{name}"]
        lstm = helper.make_node("LSTM", inputs, [f"Y_{name}"], hidden_size=HIDDEN)
        out = value(f"Y_{name}", 4)
        return helper.make_graph([*unsqueezed, lstm], name, [], [out], [axes])

    node = helper.make_node(
        "If", ["cond"], ["Y"], then_branch=branch("then"), else_branch=branch("else")
    )
    inputs = [value("cond", 0, TensorProto.BOOL), value("X", 3)]
    return model_of([node], flat, inputs=inputs)


def test_lstm_in_if_branches_through_unsqueeze_sharing_one_weight(tmp_path, run_cli):
    module = torch_module("LSTM", seed=2)
    path = save(if_model(onnx_weights(module, "LSTM")), tmp_path / "if.onnx")
    names = ["If_0/else_branch/LSTM_3", "If_0/then_branch/LSTM_3"]
    with open_checkpoint(path) as checkpoint:
        layers = discover(checkpoint).layers
    assert sorted(layer.name for layer in layers) == names
    x = random_input(INPUT)
    for cond in (True, False):
        ort = torch_layout(run(path, cond=np.array(cond), X=x))
        np.testing.assert_allclose(ort, torch_output(loaded(path, module, names[0]), x), atol=1e-5)

    refused = run_cli("set-forget-bias", path, "--layer", "*then*", "-o", tmp_path / "o.onnx")
    line = assert_clean_failure(refused.stderr, refused.exit_code)
    assert "'If_0/else_branch/LSTM_3'" in line and not (tmp_path / "o.onnx").exists()

    result = run_cli("set-forget-bias", path, "--in-place", "--yes", "--json")
    assert result.exit_code == 0, result.stderr
    assert any("share" in note for note in json.loads(result.stdout)["plan"]["notes"])
    expected = torch_output(with_forget_bias(module, 1.0), x)
    for cond in (True, False):
        ort = torch_layout(run(path, cond=np.array(cond), X=x))
        np.testing.assert_allclose(ort, expected, atol=1e-5)


def test_lstm_in_a_loop_body_reads_the_outer_weights(tmp_path, run_cli):
    module = torch_module("LSTM", seed=7)
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("LSTM", ["X", "W", "R", "B"], ["Y_step"], hidden_size=HIDDEN),
        ],
        "body",
        [value("i", 0, TensorProto.INT64), value("cond_in", 0, TensorProto.BOOL)],
        [value("cond_out", 0, TensorProto.BOOL), value("Y_step", 4)],
    )
    loop = helper.make_node("Loop", ["trips", ""], ["Y"], body=body)
    weights = {**onnx_weights(module, "LSTM"), "trips": np.array(1, np.int64)}
    path = save(model_of([loop], weights, output_rank=5), tmp_path / "loop.onnx")
    with open_checkpoint(path) as checkpoint:
        (layer,) = discover(checkpoint).layers
    assert layer.name == "Loop_0/body/LSTM_1"
    result = run_cli("set-forget-bias", path, "--value", "-1", "--in-place", "--yes")
    assert result.exit_code == 0, result.stderr
    x = random_input(INPUT)
    expected = torch_output(with_forget_bias(module, -1.0), x)
    np.testing.assert_allclose(torch_layout(run(path, X=x)[0]), expected, atol=1e-5)


def test_a_transposed_weight_is_edited_through_its_view(tmp_path, run_cli):
    module = torch_module("LSTM", seed=3)
    weights = onnx_weights(module, "LSTM")
    weights["Wt"] = np.ascontiguousarray(weights.pop("W").transpose(0, 2, 1))  # [1, I, 4H]
    transpose = helper.make_node("Transpose", ["Wt"], ["W"], perm=[0, 2, 1])
    path = save(model_of([transpose, recurrent_node("LSTM", HIDDEN)], weights), tmp_path / "t.onnx")
    result = run_cli("zero-input", path, "--features", "1", "--in-place", "--yes")
    assert result.exit_code == 0, result.stderr
    x = random_input(INPUT)
    shifted = x.copy()
    shifted[..., 1] += 10.0
    np.testing.assert_allclose(run(path, X=x), run(path, X=shifted), atol=1e-6)
    stored = numpy_helper.to_array(onnx.load(str(path)).graph.initializer[-1])
    assert not stored[0, 1].any() and stored[0, 0].all()


def with_external_data(tmp_path: Path, module: nn.Module) -> tuple[Path, Path]:
    """A GRU model whose tensors lie in `weights.bin` beside it."""
    path = single_node_file(tmp_path, "GRU", module, linear_before_reset=1)
    model = onnx.load(str(path))
    save(model, path, save_as_external_data=True, location="weights.bin", size_threshold=0)
    return path, tmp_path / "weights.bin"


def test_external_data_is_edited_in_its_own_file(tmp_path, run_cli):
    module = torch_module("GRU", seed=4)
    path, data = with_external_data(tmp_path, module)
    model_bytes, data_bytes = path.read_bytes(), data.read_bytes()
    refused = run_cli(
        "set-gate-bias", path, "--gate", "update", "--value", "1", "-o", tmp_path / "out.onnx"
    )
    assert "--in-place" in assert_clean_failure(refused.stderr, refused.exit_code)

    result = run_cli(
        "set-gate-bias", path, "--gate", "update", "--value", "1", "--in-place", "--yes"
    )
    assert result.exit_code == 0, result.stderr
    assert path.read_bytes() == model_bytes
    new = np.frombuffer(data.read_bytes(), np.uint8) != np.frombuffer(data_bytes, np.uint8)
    with open_checkpoint(path) as checkpoint:
        (layer,) = discover(checkpoint).layers
        bias = layer.cells[0].tensor("bias_ih").storage
    assert new.any() and not new[: bias.offset].any() and not new[bias.offset + bias.nbytes :].any()
    state = {k: v.clone() for k, v in module.state_dict().items()}
    state["bias_ih_l0"][HIDDEN : 2 * HIDDEN], state["bias_hh_l0"][HIDDEN : 2 * HIDDEN] = 1.0, 0.0
    module.load_state_dict(state)
    x = random_input(INPUT)
    np.testing.assert_allclose(torch_layout(run(path, X=x)), torch_output(module, x), atol=1e-5)


def test_an_interrupted_edit_of_external_data_is_named_and_recovered(tmp_path, run_cli, surgeon):
    path, data = with_external_data(tmp_path, torch_module("GRU", seed=5))
    before = data.read_bytes()
    edit = ("set-gate-bias", path, "--gate", "update", "--value", "1", "--in-place", "--yes")
    killed = surgeon(*edit, env={"LSTM_SURGEON_FAULT": "mid-patch"})
    assert killed.returncode != 0 and data.read_bytes() != before
    refused = run_cli("inspect", path)
    assert f"lstm-surgeon recover {data}" in assert_clean_failure(refused.stderr, refused.exit_code)
    assert run_cli("recover", data).exit_code == 0
    assert data.read_bytes() == before
    assert run_cli("inspect", path).exit_code == 0


# --- Refused and unreadable -------------------------------------------------------------------------


@pytest.mark.parametrize("location", ["../outside.bin", "/etc/hostname", "sub/../../outside.bin"])
def test_external_data_outside_the_models_folder_is_refused(tmp_path, run_cli, location):
    folder = tmp_path / "model"
    folder.mkdir()
    canary = tmp_path / "outside.bin"
    canary.write_bytes(bytes(4096))
    model = model_of([recurrent_node("RNN", HIDDEN)], onnx_weights(torch_module("RNN"), "RNN"))
    tensor = model.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value=location)
    path = save(model, folder / "model.onnx")
    result = run_cli("inspect", path)
    line = assert_clean_failure(result.stderr, result.exit_code)
    assert "outside the model's folder" in line
    assert canary.read_bytes() == bytes(4096)


def test_packed_float_data_is_edited_where_it_lies(tmp_path, run_cli):
    module = torch_module("RNN", seed=6)
    weights = onnx_weights(module, "RNN")
    model = model_of([recurrent_node("RNN", HIDDEN)], weights)
    typed = helper.make_tensor("W", TensorProto.FLOAT, [1, HIDDEN, INPUT], weights["W"].ravel())
    model.graph.initializer[0].CopyFrom(typed)  # float_data, not raw_data
    path = save(model, tmp_path / "typed.onnx")
    result = run_cli("zero-input", path, "--features", "2", "--in-place", "--yes")
    assert result.exit_code == 0, result.stderr
    edited = onnx.load(str(path))
    onnx.checker.check_model(edited)
    assert not edited.graph.initializer[0].HasField("raw_data")
    weights["W"][0, :, 2] = 0.0
    np.testing.assert_array_equal(numpy_helper.to_array(edited.graph.initializer[0]), weights["W"])
    with torch.no_grad():
        module.weight_ih_l0[:, 2] = 0.0
    x = random_input(INPUT)
    np.testing.assert_allclose(torch_layout(run(path, X=x)), torch_output(module, x), atol=1e-5)


def test_values_that_do_not_lie_as_bytes_are_named_as_not_editable(tmp_path, run_cli):
    weights = onnx_weights(torch_module("RNN"), "RNN")
    model = model_of([recurrent_node("RNN", HIDDEN)], weights)
    half = weights["W"].astype(np.float16)
    model.graph.initializer[0].CopyFrom(  # float16 as int32_data: one varint per value
        helper.make_tensor("W", TensorProto.FLOAT16, half.shape, half.ravel())
    )
    path = save(model, tmp_path / "typed.onnx")
    result = run_cli("inspect", path, "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["layers"] == []
    assert any("int32_data" in w and "cannot be edited" in w for w in report["warnings"])
    edit = run_cli("set-gate-bias", path, "--gate", "hidden", "--value", "1", "-o", tmp_path / "o")
    assert "no recurrent layers" in assert_clean_failure(edit.stderr, edit.exit_code)


def test_an_unrolled_recurrence_has_no_recurrent_node_and_says_so(tmp_path, run_cli):
    weight = np.ones((INPUT, HIDDEN), np.float32)
    nodes = [
        helper.make_node("MatMul", ["X", "K"], ["M"]),
        helper.make_node("Sigmoid", ["M"], ["Y"]),
    ]
    path = save(model_of(nodes, {"K": weight}, output_rank=3), tmp_path / "unrolled.onnx")
    report = json.loads(run_cli("inspect", path, "--json").stdout)
    assert report["layers"] == []
    assert any("no LSTM, GRU or RNN node" in warning for warning in report["warnings"])
