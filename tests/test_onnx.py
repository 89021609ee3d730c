"""Models exported by `torch.onnx.export`: every recurrent node found, its gates read as ONNX lays them
out, edits patched into the file's bytes.

Oracles: onnxruntime running the file, against torch's own module loaded from what `module_state`
gathers (or from the exported module's parameters with the expected biases); onnx's numpy_helper for
the values inspect reports; onnx.checker for the edited file.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import assert_clean_failure
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import numpy_helper
from onnx_models import ONNX_ORDER, export, random_input, run
from torch import nn

from lstm_surgeon.apply import Destination, edit_checkpoint
from lstm_surgeon.discovery import discover
from lstm_surgeon.errors import SurgeonError
from lstm_surgeon.formats import open_checkpoint
from lstm_surgeon.inspection import inspect_checkpoint
from lstm_surgeon.layouts.pytorch import module_state
from lstm_surgeon.surgery import plan_set_forget_bias
from lstm_surgeon.verify import verify_checkpoint

INPUT, HIDDEN = 3, 4
pytestmark = pytest.mark.filterwarnings(
    "ignore::UserWarning", "ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning"
)
MODULES = {
    "lstm_stacked_bidirectional": lambda: nn.LSTM(INPUT, HIDDEN, num_layers=2, bidirectional=True),
    "lstm": lambda: nn.LSTM(INPUT, HIDDEN),
    "gru_bidirectional": lambda: nn.GRU(INPUT, HIDDEN, bidirectional=True),
    "gru_stacked": lambda: nn.GRU(INPUT, HIDDEN, num_layers=2),
    "rnn": lambda: nn.RNN(INPUT, HIDDEN),
    "rnn_bidirectional": lambda: nn.RNN(INPUT, HIDDEN, bidirectional=True),
}


def exported(tmp_path: Path, key: str) -> tuple[nn.Module, Path]:
    torch.manual_seed(sum(map(ord, key)))
    module = MODULES[key]().eval()
    return module, export(module, tmp_path / f"{key}.onnx", INPUT)


def module_from(path: Path, like: nn.Module) -> nn.Module:
    """torch's module of `like`'s configuration, loaded strictly from what `module_state` gathers
    from the file: ONNX's one-layer nodes become the sub-layers `_l0`, `_l1`, ... in file order."""
    state = {}
    with open_checkpoint(path) as checkpoint:
        for index, layer in enumerate(discover(checkpoint).layers):
            for name, raw in module_state(checkpoint, layer).items():
                state[name.replace("_l0", f"_l{index}")] = torch.from_numpy(raw.copy())
    module = type(like)(INPUT, HIDDEN, num_layers=like.num_layers, bidirectional=like.bidirectional)
    module.load_state_dict(state, strict=True)
    return module.eval()


def torch_output(module: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return module(torch.from_numpy(x))[0].numpy()


@pytest.mark.parametrize("key", sorted(MODULES))
def test_onnxruntime_computes_what_torch_loaded_from_module_state_computes(tmp_path, key):
    module, path = exported(tmp_path, key)
    x = random_input(INPUT)
    loaded = module_from(path, module)
    np.testing.assert_allclose(run(path, X=x), torch_output(loaded, x), atol=1e-5)
    for name, value in module.state_dict().items():  # the exporter's own source of the weights
        torch.testing.assert_close(loaded.state_dict()[name], value)


@pytest.mark.parametrize("key", sorted(MODULES))
def test_verify_runs_each_node_in_onnxruntime(tmp_path, key):
    _, path = exported(tmp_path, key)
    with open_checkpoint(path) as checkpoint:
        result = verify_checkpoint(checkpoint)
    assert result.ok
    assert all(layer.runtime_max_abs_diff < 1e-5 for layer in result.layers)
    assert {layer.framework for layer in result.layers} == {"onnx"}


def test_layers_are_named_by_their_nodes_and_report_onnx_attributes(tmp_path):
    _, path = exported(tmp_path, "lstm_stacked_bidirectional")
    with open_checkpoint(path) as checkpoint:
        layers = discover(checkpoint).layers
        nodes = [n.name for n in onnx.load(str(path)).graph.node if n.op_type == "LSTM"]
    assert [layer.name for layer in layers] == nodes
    assert [(layer.kind, layer.input_size, layer.bidirectional) for layer in layers] == [
        ("LSTM", INPUT, True),
        ("LSTM", 2 * HIDDEN, True),
    ]
    assert layers[0].attributes == {
        "direction": "bidirectional",
        "activations": ["Sigmoid", "Tanh", "Tanh"] * 2,
        "clip": None,
        "input_forget": 0,
        "peepholes": False,
    }
    assert layers[0].pytorch_differences == ()


def test_inspect_json_reports_wb_and_rb_as_the_two_biases_in_canonical_gates(run_cli, tmp_path):
    _, path = exported(tmp_path, "gru_bidirectional")
    result = run_cli("inspect", path, "--json")
    assert result.exit_code == 0, result.stderr
    (layer,) = json.loads(result.stdout)["layers"]
    assert (layer["framework"], layer["kind"]) == ("onnx", "GRU")
    assert layer["attributes"]["linear_before_reset"] == 1  # torch's GRU exports as ONNX's 1
    model = onnx.load(str(path))
    node = next(n for n in model.graph.node if n.op_type == "GRU")
    bias = numpy_helper.to_array(
        next(t for t in model.graph.initializer if t.name == node.input[3])
    )
    for direction, cell in enumerate(layer["cells"]):
        gates = {gate["gate"]: gate for gate in cell["gates"]}
        assert list(gates) == ["reset", "update", "new"]
        for torch_block, gate in enumerate(gates.values()):
            block = ONNX_ORDER["GRU"].index(torch_block)
            wb = bias[direction, block * HIDDEN : (block + 1) * HIDDEN]
            rb = bias[direction, (3 + block) * HIDDEN : (4 + block) * HIDDEN]
            assert gate["bias_ih"]["mean"] == pytest.approx(float(wb.mean()), abs=1e-7)
            assert gate["bias_hh"]["mean"] == pytest.approx(float(rb.mean()), abs=1e-7)
        assert gates["new"]["effective"] is None  # Rbh is scaled by r, as in PyTorch


def expected_with_forget_bias(module: nn.Module, value: float) -> nn.Module:
    """The exported module with every forget gate's biases set as `--mode effective` sets them."""
    state = {name: tensor.clone() for name, tensor in module.state_dict().items()}
    for name, tensor in state.items():
        if name.startswith("bias_"):
            tensor[HIDDEN : 2 * HIDDEN] = value if name.startswith("bias_ih") else 0.0
    expected = type(module)(INPUT, HIDDEN, num_layers=module.num_layers, bidirectional=True)
    expected.load_state_dict(state)
    return expected.eval()


def test_set_forget_bias_patches_only_b_and_onnxruntime_sees_the_new_gate(tmp_path):
    module, path = exported(tmp_path, "lstm_stacked_bidirectional")
    output = tmp_path / "edited.onnx"
    _, result = edit_checkpoint(path, lambda ck: plan_set_forget_bias(ck, 1.5), Destination(output))
    assert result is not None and result.method == "patch"
    x = random_input(INPUT)
    expected = torch_output(expected_with_forget_bias(module, 1.5), x)
    np.testing.assert_allclose(run(output, X=x), expected, atol=1e-5)
    onnx.checker.check_model(onnx.load(str(output)))
    before, after = path.read_bytes(), output.read_bytes()
    assert len(before) == len(after)
    with open_checkpoint(path) as checkpoint:
        biases = [layer.cells[0].tensor("bias_ih") for layer in discover(checkpoint).layers]
    allowed = np.zeros(len(before), bool)
    for ref in biases:
        allowed[ref.storage.offset : ref.storage.offset + ref.storage.nbytes] = True
    differs = np.frombuffer(before, np.uint8) != np.frombuffer(after, np.uint8)
    assert differs.any() and not (differs & ~allowed).any()


def test_in_place_edit_through_the_command(run_cli, tmp_path):
    module, path = exported(tmp_path, "lstm_stacked_bidirectional")
    result = run_cli("set-forget-bias", path, "--value", "2", "--in-place", "--yes", "--json")
    assert result.exit_code == 0, result.stderr
    x = random_input(INPUT)
    expected = torch_output(expected_with_forget_bias(module, 2.0), x)
    np.testing.assert_allclose(run(path, X=x), expected, atol=1e-5)


def test_a_truncated_model_is_a_clear_error(run_cli, tmp_path):
    _, path = exported(tmp_path, "lstm")
    data = path.read_bytes()
    for cut in (len(data) // 2, len(data) - 3, 40):
        broken = tmp_path / f"cut{cut}.onnx"
        broken.write_bytes(data[:cut])
        result = run_cli("inspect", broken)
        line = assert_clean_failure(result.stderr, result.exit_code)
        assert "truncated or malformed ONNX model" in line, line


def test_without_the_onnx_package_the_error_names_the_extra(run_cli, tmp_path, monkeypatch):
    _, path = exported(tmp_path, "lstm")
    monkeypatch.setitem(__import__("sys").modules, "onnx", None)
    result = run_cli("inspect", path)
    line = assert_clean_failure(result.stderr, result.exit_code)
    assert "pip install 'lstm-surgeon[onnx]'" in line


# --- Broken bytes: refused with one clear line, or read -------------------------------------------


@pytest.fixture(scope="module")
def exported_bytes(tmp_path_factory) -> bytes:
    _, path = exported(tmp_path_factory.mktemp("fuzz"), "gru_bidirectional")
    return path.read_bytes()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_flipped_and_cut_bytes_are_refused_or_read(exported_bytes, tmp_path_factory, data):
    damaged = bytearray(exported_bytes)
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(damaged) - 1))
        damaged[position] ^= 1 << data.draw(st.integers(0, 7))
    damaged = damaged[: data.draw(st.integers(1, len(damaged)))]
    path = tmp_path_factory.mktemp("damaged") / "model.onnx"
    path.write_bytes(bytes(damaged))
    try:
        checkpoint = open_checkpoint(path)
    except SurgeonError as error:
        assert "\n" not in str(error)
        return
    with checkpoint:
        for ref in checkpoint.tensors.values():
            checkpoint.raw(ref)
        inspect_checkpoint(checkpoint).to_dict()
