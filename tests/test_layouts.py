"""Layouts are data: every command reaches a gate through a layout's regions, never by slicing rows.

A layout unlike PyTorch's is registered here: transposed kernels (`[input, gates * hidden]`), gates in
ONNX's order `[i, o, f, c]`, and one bias per gate (what the gate sees). Its tensors are made from a
real `nn.LSTM` by the documented relation, and every result is checked against torch's own module
loaded from `module_state`, never against the regions' own slicing.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_surgery import lstm_forget_gates
from torch import nn

from lstm_surgeon import layouts
from lstm_surgeon.apply import Destination, edit_checkpoint
from lstm_surgeon.checkpoint import Checkpoint, TensorRef
from lstm_surgeon.convert import plan_conversion, write_conversion
from lstm_surgeon.diff import diff_checkpoints
from lstm_surgeon.discovery import NoLayerSelected, discover
from lstm_surgeon.errors import EditError
from lstm_surgeon.formats import open_checkpoint
from lstm_surgeon.gates import gates_of
from lstm_surgeon.inspection import inspect_checkpoint
from lstm_surgeon.layer_diff import MatchError
from lstm_surgeon.layers import BIAS_IH, WEIGHT_HH, WEIGHT_IH, Cell, RecurrentLayer, Region
from lstm_surgeon.layouts import Found, NewTensor
from lstm_surgeon.layouts.pytorch import module_state
from lstm_surgeon.surgery import plan_set_forget_bias, plan_set_gate_bias, plan_zero_input
from lstm_surgeon.verify import verify_checkpoint
from lstm_surgeon.vocabulary import FORWARD

STORED_ORDER = ("input", "output", "forget", "cell")  # ONNX's LSTM order
TORCH_BLOCK = {"input": 0, "forget": 1, "cell": 2, "output": 3}  # PyTorch's rows, per gate
INPUT, HIDDEN = 3, 4


class TransposedOneBiasLayout:
    """`<name>/kernel` [I, 4H], `<name>/recurrent_kernel` [H, 4H], `<name>/bias` [4H]."""

    framework = "transposed"

    def find_layers(self, checkpoint: Checkpoint) -> Found:
        found, tensors = Found(), checkpoint.tensors
        for name, kernel in tensors.items():
            if not name.endswith("/kernel"):
                continue
            module = name.removesuffix("/kernel")
            recurrent = tensors[f"{module}/recurrent_kernel"]
            bias = tensors.get(f"{module}/bias")
            hidden = recurrent.shape[0]
            regions = self._regions(kernel, recurrent, bias, hidden)
            refs = tuple(ref for ref in (kernel, recurrent, bias) if ref is not None)
            cell = Cell(0, FORWARD, regions, refs)
            found.layers.append(
                RecurrentLayer(
                    module,
                    "LSTM",
                    kernel.shape[0],
                    hidden,
                    0,
                    1,
                    False,
                    bias is not None,
                    kernel.dtype.name,
                    (cell,),
                    gates_of("LSTM"),
                    self.framework,
                )
            )
        return found

    @staticmethod
    def _regions(
        kernel: TensorRef, recurrent: TensorRef, bias: TensorRef | None, hidden: int
    ) -> dict[tuple[str, str | None], Region]:
        regions: dict[tuple[str, str | None], Region] = {}
        for role, ref in ((WEIGHT_IH, kernel), (WEIGHT_HH, recurrent), (BIAS_IH, bias)):
            if ref is None:
                continue
            inputs = (range(0, ref.shape[0]),) if len(ref.shape) == 2 else ()
            unit_axis, input_axis = (1, 0) if inputs else (0, None)
            regions[(role, None)] = Region(
                ref, (*inputs, range(0, ref.shape[-1])), unit_axis, input_axis
            )
            for block, gate in enumerate(STORED_ORDER):
                units = range(block * hidden, (block + 1) * hidden)
                regions[(role, gate)] = Region(ref, (*inputs, units), unit_axis, input_axis)
        return regions

    def missing_biases(self, layer: RecurrentLayer, cell: Cell) -> list[NewTensor]:
        return [NewTensor(f"{layer.name}/bias", (4 * layer.hidden_size,), f"{layer.name}/kernel")]


@pytest.fixture(autouse=True)
def transposed_layout(monkeypatch: pytest.MonkeyPatch) -> None:
    registered = (*layouts._layouts(), TransposedOneBiasLayout())
    monkeypatch.setattr(layouts, "_layouts", lambda: registered)


def reordered(stacked: torch.Tensor) -> torch.Tensor:
    """PyTorch's gate blocks (rows) in STORED_ORDER."""
    blocks = stacked.reshape(4, HIDDEN, *stacked.shape[1:])
    return torch.cat([blocks[TORCH_BLOCK[gate]] for gate in STORED_ORDER])


@pytest.fixture
def torch_lstm() -> nn.LSTM:
    torch.manual_seed(3)
    return nn.LSTM(INPUT, HIDDEN)


@pytest.fixture
def transposed_file(tmp_path: Path, torch_lstm: nn.LSTM) -> Path:
    """The torch module's weights as the transposed layout stores them."""
    state = torch_lstm.state_dict()
    tensors = {
        "enc/kernel": reordered(state["weight_ih_l0"]).T.contiguous(),
        "enc/recurrent_kernel": reordered(state["weight_hh_l0"]).T.contiguous(),
        "enc/bias": reordered(state["bias_ih_l0"] + state["bias_hh_l0"]),
    }
    path = tmp_path / "transposed.safetensors"
    save_file(tensors, str(path))
    return path


def module_from(path: Path) -> nn.LSTM:
    """torch's own module, loaded strictly from what `module_state` gathers through the regions."""
    with open_checkpoint(path) as checkpoint:
        (layer,) = discover(checkpoint).layers
        state = {
            name: torch.from_numpy(raw.copy())
            for name, raw in module_state(checkpoint, layer).items()
        }
    module = nn.LSTM(layer.input_size, layer.hidden_size)
    module.load_state_dict(state, strict=True)
    return module


def edited(path: Path, planner, tmp_path: Path) -> Path:
    output = tmp_path / "edited.safetensors"
    edit_checkpoint(path, planner, Destination(output=output))
    return output


def test_the_layout_is_found_and_computes_what_the_torch_module_computes(
    transposed_file, torch_lstm
):
    with open_checkpoint(transposed_file) as checkpoint:
        (layer,) = discover(checkpoint).layers
    assert (layer.framework, layer.kind, layer.input_size, layer.hidden_size) == (
        "transposed",
        "LSTM",
        INPUT,
        HIDDEN,
    )
    assert layer.bias_roles == (BIAS_IH,)
    x = torch.randn(5, 2, INPUT, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(module_from(transposed_file)(x)[0], torch_lstm(x)[0])


def test_inspect_reports_the_bias_each_gate_sees(transposed_file, torch_lstm):
    with open_checkpoint(transposed_file) as checkpoint:
        report = inspect_checkpoint(checkpoint).to_dict()
    (layer,) = report["layers"]
    assert layer["framework"] == "transposed"
    gates = {gate["gate"]: gate for gate in layer["cells"][0]["gates"]}
    assert list(gates) == ["input", "forget", "cell", "output"]  # canonical order
    state = torch_lstm.state_dict()
    summed = (state["bias_ih_l0"] + state["bias_hh_l0"]).double().reshape(4, HIDDEN)
    for gate, block in TORCH_BLOCK.items():
        assert gates[gate]["bias_hh"] is None  # one bias per gate
        assert gates[gate]["effective"]["mean"] == pytest.approx(float(summed[block].mean()))


def test_set_forget_bias_gives_sigmoid_of_the_value_in_torch(transposed_file, tmp_path):
    output = edited(transposed_file, lambda ck: plan_set_forget_bias(ck, 1.5), tmp_path)
    forget = lstm_forget_gates(module_from(output).double())
    torch.testing.assert_close(forget, torch.full_like(forget, 1 / (1 + np.exp(-1.5))))
    before, after = load_file(str(transposed_file)), load_file(str(output))
    for name in ("enc/kernel", "enc/recurrent_kernel"):
        assert torch.equal(before[name], after[name])
    changed = torch.nonzero(before["enc/bias"] != after["enc/bias"]).flatten()
    stored_forget = STORED_ORDER.index("forget")
    assert set(changed.tolist()) <= set(range(stored_forget * HIDDEN, (stored_forget + 1) * HIDDEN))


def test_modes_that_need_two_biases_are_refused(transposed_file, tmp_path):
    for mode in ("both", "ih", "hh"):
        with pytest.raises(EditError, match="one bias per gate"):
            edited(transposed_file, lambda ck, m=mode: plan_set_forget_bias(ck, 1.0, m), tmp_path)


def test_add_mode_shifts_what_the_gate_sees(transposed_file, tmp_path):
    output = edited(transposed_file, lambda ck: plan_set_gate_bias(ck, "o", 0.5, "add"), tmp_path)
    with open_checkpoint(transposed_file) as a, open_checkpoint(output) as b:
        gates = [
            {
                g["gate"]: g
                for g in inspect_checkpoint(ck).to_dict()["layers"][0]["cells"][0]["gates"]
            }
            for ck in (a, b)
        ]
    assert gates[1]["output"]["effective"]["mean"] == pytest.approx(
        gates[0]["output"]["effective"]["mean"] + 0.5, abs=1e-6
    )
    assert gates[1]["forget"] == gates[0]["forget"]


def test_zero_input_makes_torch_ignore_the_feature(transposed_file, tmp_path):
    output = edited(transposed_file, lambda ck: plan_zero_input(ck, [1]), tmp_path)
    module = module_from(output)
    x = torch.randn(4, 1, INPUT, generator=torch.Generator().manual_seed(1))
    shifted = x.clone()
    shifted[..., 1] += 10.0
    with torch.no_grad():
        torch.testing.assert_close(module(x)[0], module(shifted)[0])
    kernel = load_file(str(output))["enc/kernel"]
    assert torch.count_nonzero(kernel[1]) == 0 and torch.count_nonzero(kernel[0]) > 0


def test_diff_names_the_gate_a_transposed_edit_changed(transposed_file, tmp_path):
    output = edited(transposed_file, lambda ck: plan_set_gate_bias(ck, "cell", -0.25), tmp_path)
    with open_checkpoint(transposed_file) as a, open_checkpoint(output) as b:
        result = diff_checkpoints(a, b).to_dict()
    (entry,) = result["changed"]
    assert (entry["key"], entry["parameter"], entry["gates"]) == ("enc/bias", "bias_ih", ["cell"])
    assert [effective["gate"] for effective in entry["effective"]] == ["cell"]
    assert entry["effective"][0]["after"]["mean"] == pytest.approx(-0.25)


def test_verify_loads_the_layout_into_torch(transposed_file):
    with open_checkpoint(transposed_file) as checkpoint:
        verification = verify_checkpoint(checkpoint)
    assert verification.ok
    assert json.dumps(verification.to_dict())


# --- Selections that match nothing -------------------------------------------------------------


def test_inspect_and_verify_name_the_layers_when_a_glob_matches_nothing(fixtures_dir):
    with open_checkpoint(fixtures_dir / "zoo.pt") as checkpoint:
        for call in (inspect_checkpoint, verify_checkpoint):
            with pytest.raises(NoLayerSelected, match=r"--layer 'nope\*'.*'encoder'"):
                call(checkpoint, ["nope*"])


@pytest.mark.parametrize("command", ["inspect", "verify"])
def test_cli_exits_2_when_a_glob_matches_nothing(surgeon, fixtures_dir, command):
    result = surgeon(command, fixtures_dir / "zoo.pt", "--layer", "nope*")
    assert result.returncode == 2, result.stderr
    assert "no recurrent layer matches --layer 'nope*'" in result.stderr
    assert result.stdout == ""


def test_convert_writes_what_torch_loads_and_computes_the_same(
    transposed_file, torch_lstm, tmp_path
):
    output = tmp_path / "converted.safetensors"
    with open_checkpoint(transposed_file) as checkpoint:
        conversion = plan_conversion(checkpoint)
        write_conversion(conversion, checkpoint, output)
    module = nn.LSTM(INPUT, HIDDEN)
    module.load_state_dict({k.removeprefix("enc."): v for k, v in load_file(str(output)).items()})
    x = torch.randn(6, 3, INPUT, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(module(x)[0], torch_lstm(x)[0])
    targets = {target["target"]: target for target in conversion.to_dict()["tensors"]}
    assert targets["enc.bias_hh_l0"]["zeros"] is True
    gates = [part["gate"] for part in targets["enc.weight_ih_l0"]["parts"]]
    assert gates == ["input", "forget", "cell", "output"]
    assert {part["source"] for part in targets["enc.weight_ih_l0"]["parts"]} == {"enc/kernel"}


def test_convert_refuses_a_cell_torch_cannot_compute(transposed_file, monkeypatch):
    layout = layouts._layouts()[-1]
    found = layout.find_layers

    def with_peepholes(checkpoint):
        result = found(checkpoint)
        result.layers = [
            replace(layer, pytorch_differences=("peepholes",)) for layer in result.layers
        ]
        return result

    monkeypatch.setattr(layout, "find_layers", with_peepholes)
    with (
        open_checkpoint(transposed_file) as checkpoint,
        pytest.raises(EditError, match=r"enc: torch's LSTM cannot compute this cell \(peepholes\)"),
    ):
        plan_conversion(checkpoint)


@pytest.fixture
def pytorch_file(tmp_path: Path, torch_lstm: nn.LSTM) -> Path:
    path = tmp_path / "torch.safetensors"
    save_file({f"enc.{k}": v.contiguous() for k, v in torch_lstm.state_dict().items()}, str(path))
    return path


def test_diff_across_layouts_matches_layers_and_compares_what_each_gate_sees(
    pytorch_file, transposed_file, tmp_path
):
    with open_checkpoint(pytorch_file) as a, open_checkpoint(transposed_file) as b:
        exact = diff_checkpoints(a, b).to_dict()
        close = diff_checkpoints(a, b, atol=1e-6).to_dict()
    assert exact["matched"] == close["matched"] == [{"a": "enc", "b": "enc"}]
    assert close["identical"], close  # b_ih + b_hh (float32 sum in the file) against the one bias
    assert {entry["parameter"] for entry in exact["changed"]} <= {"bias_ih"}
    edited_file = edited(transposed_file, lambda ck: plan_set_forget_bias(ck, 2.0), tmp_path)
    with open_checkpoint(pytorch_file) as a, open_checkpoint(edited_file) as b:
        result = diff_checkpoints(a, b, atol=1e-6).to_dict()
    (entry,) = result["changed"]
    assert (entry["key"], entry["parameter"], entry["gates"]) == (
        "enc.bias_ih_l0",
        "bias_ih",
        ["forget"],
    )
    assert entry["cell"] == {"layer": 0, "direction": "forward"}


def test_diff_match_names_the_pairs_and_refuses_unknown_layers(
    surgeon, pytorch_file, tmp_path, torch_lstm
):
    renamed = tmp_path / "renamed.safetensors"
    save_file(
        {k.replace("enc.", "other."): v for k, v in load_file(str(pytorch_file)).items()},
        str(renamed),
    )
    with open_checkpoint(pytorch_file) as a, open_checkpoint(renamed) as b:
        assert diff_checkpoints(a, b, matches=[("enc", "other")]).to_dict()["matched"] == [
            {"a": "enc", "b": "other"}
        ]
        with pytest.raises(MatchError, match="no layer 'nope'"):
            diff_checkpoints(a, b, matches=[("enc", "nope")])
    result = surgeon("diff", pytorch_file, renamed, "--match", "enc=other", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["identical"] is True
