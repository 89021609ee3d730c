"""`verify`: every layer loads strictly into the real torch module and runs; openings match torch."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import make_fixtures
import pytest
import torch
from conftest import TorchReference
from safetensors.torch import load_file

from lstm_surgeon.formats import open_checkpoint
from lstm_surgeon.verify import verify_checkpoint

FIXTURES_WITH_LAYERS = [fixture.filename for fixture in make_fixtures.FIXTURES if fixture.layers]
GATES = {
    "LSTM": [("input", "sigmoid"), ("forget", "sigmoid"), ("cell", "tanh"), ("output", "sigmoid")],
    "GRU": [("reset", "sigmoid"), ("update", "sigmoid"), ("new", "tanh")],
    "RNN": [("hidden", "tanh")],
}


def torch_tensors(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    return TorchReference.flatten(torch.load(path, map_location="cpu", weights_only=False))


def verify_json(run_cli: Any, path: Path, *args: str) -> tuple[int, dict[str, Any]]:
    result = run_cli("verify", path, "--json", *args)
    return result.exit_code, json.loads(result.stdout)


def expected_openings(
    layer: make_fixtures.ExpectedLayer, tensors: dict[str, torch.Tensor]
) -> dict[tuple[int, str, str], float]:
    """Each gate's mean output at zero input and zero state, from torch's activations of the
    biases torch loaded (GRU's new gate: tanh(b_in + r * b_hn), r = sigmoid(b_ir + b_hr))."""
    family = layer.kind.removesuffix("Cell")
    hidden = layer.hidden_size
    prefix = f"{layer.name}." if layer.name else ""
    directions = ("forward", "reverse") if layer.bidirectional else ("forward",)
    openings = {}
    for k in range(layer.num_layers):
        for direction in directions:
            suffix = "" if layer.kind.endswith("Cell") else f"_l{k}"
            suffix += "_reverse" if direction == "reverse" else ""
            b_ih = tensors[f"{prefix}bias_ih{suffix}"].float().double()
            b_hh = tensors[f"{prefix}bias_hh{suffix}"].float().double()
            for index, (gate, activation) in enumerate(GATES[family]):
                rows = slice(index * hidden, (index + 1) * hidden)
                if gate == "new":
                    reset = torch.sigmoid(b_ih[:hidden] + b_hh[:hidden])
                    pre = b_ih[rows] + reset * b_hh[rows]
                else:
                    pre = b_ih[rows] + b_hh[rows]
                value = torch.sigmoid(pre) if activation == "sigmoid" else torch.tanh(pre)
                openings[(k, direction, gate)] = float(value.mean())
    return openings


@pytest.mark.parametrize("filename", FIXTURES_WITH_LAYERS)
def test_every_fixture_layer_loads_and_runs(run_cli, fixtures_dir, filename):
    path = fixtures_dir / filename
    code, document = verify_json(run_cli, path)
    assert code == 0
    assert document["ok"] is True
    fixture = make_fixtures.get_fixture(filename)
    assert sorted(layer["name"] for layer in document["layers"]) == sorted(
        layer.name for layer in fixture.layers
    )
    tensors = torch_tensors(path)
    by_name = {layer.name: layer for layer in fixture.layers}
    for reported in document["layers"]:
        assert (reported["loaded"], reported["finite"], reported["error"]) == (True, True, None)
        expected_layer = by_name[reported["name"]]
        assert reported["kind"] == expected_layer.kind
        if not expected_layer.bias:
            assert reported["openings"] == []
            continue
        expected = expected_openings(expected_layer, tensors)
        measured = {
            (opening["layer"], opening["direction"], opening["gate"]): opening["opening"]
            for opening in reported["openings"]
        }
        assert measured.keys() == expected.keys()
        for key, value in expected.items():
            assert measured[key] == pytest.approx(value, abs=1e-9), key


def test_forget_opening_after_set_forget_bias_is_sigmoid_of_the_value(
    run_cli, fixtures_dir, tmp_path
):
    output = tmp_path / "out.pt"
    assert (
        run_cli("set-forget-bias", fixtures_dir / "zoo.pt", "--value", "2", "-o", output).exit_code
        == 0
    )
    code, document = verify_json(run_cli, output)
    assert code == 0
    forget = [
        opening["opening"]
        for layer in document["layers"]
        for opening in layer["openings"]
        if opening["gate"] == "forget"
    ]
    assert len(forget) == 4 + 4 + 1  # encoder and projected cells, and the LSTMCell `rnn`
    assert forget == pytest.approx([1 / (1 + math.exp(-2))] * len(forget), abs=1e-12)
    before = verify_json(run_cli, fixtures_dir / "zoo.pt")[1]
    assert [layer["openings"] for layer in before["layers"]] != [
        layer["openings"] for layer in document["layers"]
    ]


def test_new_gate_opening_after_set_gate_bias_is_tanh_of_the_value(run_cli, fixtures_dir, tmp_path):
    output = tmp_path / "out.pt"
    args = ("--gate", "new", "--value", "0.5", "-o", output)
    assert run_cli("set-gate-bias", fixtures_dir / "gru_biased.pt", *args).exit_code == 0
    _, document = verify_json(run_cli, output)
    new = [o["opening"] for o in document["layers"][0]["openings"] if o["gate"] == "new"]
    assert new == pytest.approx([math.tanh(0.5)] * 2, abs=1e-7)


def test_nan_bias_fails_verification(run_cli, tmp_checkpoint):
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(3, 4, num_layers=2)
    state = {f"lstm.{k}": v.clone() for k, v in lstm.state_dict().items()}
    state["lstm.bias_ih_l1"][5] = float("nan")
    code, document = verify_json(run_cli, tmp_checkpoint(state))
    assert code == 1
    assert document["ok"] is False
    (layer,) = document["layers"]
    assert (layer["loaded"], layer["finite"], layer["ok"]) == (True, False, False)
    assert "NaN" in layer["error"]


def test_inf_weight_fails_verification_and_check(run_cli, tmp_checkpoint):
    torch.manual_seed(0)
    cell = torch.nn.GRUCell(3, 4)
    state = {f"cell.{k}": v.clone() for k, v in cell.state_dict().items()}
    state["cell.weight_hh"][0, 0] = float("inf")
    path = tmp_checkpoint(state, "inf.safetensors")
    code, document = verify_json(run_cli, path)
    assert code == 1 and document["layers"][0]["finite"] is False
    check = run_cli("check", path, "--json")
    assert check.exit_code == 1
    assert any("cell.weight_hh" in problem for problem in json.loads(check.stdout)["problems"])


def test_checkpoint_without_layers_does_not_verify(run_cli, fixtures_dir):
    code, document = verify_json(run_cli, fixtures_dir / "plain_tensor.pt")
    assert code == 1
    assert document == {
        "path": str(fixtures_dir / "plain_tensor.pt"),
        "ok": False,
        "layers": [],
        "warnings": [],
    }


def test_layer_glob_selects_what_is_verified(run_cli, fixtures_dir):
    code, document = verify_json(run_cli, fixtures_dir / "zoo.pt", "--layer", "gru*")
    assert code == 0
    assert [layer["name"] for layer in document["layers"]] == ["gru", "gru_cell"]


def test_library_call_matches_the_command(run_cli, fixtures_dir):
    path = fixtures_dir / "bf16.pt"
    with open_checkpoint(path) as checkpoint:
        verification = verify_checkpoint(checkpoint)
    assert verification.ok
    assert verification.to_dict() == verify_json(run_cli, path)[1]


@pytest.mark.parametrize("dtype", [torch.int64, torch.complex64])
def test_layer_torch_cannot_load_is_reported_not_crashed(run_cli, tmp_checkpoint, dtype):
    torch.manual_seed(0)
    cell = torch.nn.LSTMCell(3, 4)
    state = {f"cell.{k}": (v * 10).to(dtype) for k, v in cell.state_dict().items()}
    result = run_cli("verify", tmp_checkpoint(state), "--json")
    assert "internal error" not in result.stderr
    assert result.exit_code == 1
    assert json.loads(result.stdout)["layers"][0]["ok"] is False
