"""Edits judged by torch itself: outputs are loaded into real torch modules (strict) and run.

The oracles are `nn.LSTM`/`nn.GRU`/`nn.RNN` and their cells, and torch's own slicing on a clone of the
state dict (`expected[b_ih][rows] = V`), never lstm-surgeon's slicing. Gate openings are measured with
forward passes: with every weight zeroed and zero input, one step of an LSTM from c0 = 1 and from c0 = 0
gives `c1 = f + i*g` and `i*g`, so `f` is their difference; a GRU step from h and from 0 gives
`h1(h) - h1(0) = z*h` and `h1(0) = (1 - z)*n`.
"""

from __future__ import annotations

import copy
import math
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import make_fixtures
import pytest
import torch
from conftest import TorchReference
from hypothesis import given, settings
from hypothesis import strategies as st
from make_fixtures import ExpectedLayer
from safetensors.torch import load_file, save_file
from torch import nn

from lstm_surgeon.apply import Destination, edit_checkpoint
from lstm_surgeon.checkpoint import Checkpoint
from lstm_surgeon.errors import EditError
from lstm_surgeon.formats import open_checkpoint
from lstm_surgeon.plan import EditPlan
from lstm_surgeon.surgery import (
    MODES,
    Selection,
    parse_features,
    plan_add_bias,
    plan_chrono,
    plan_set_forget_bias,
    plan_set_gate_bias,
    plan_zero_bias,
    plan_zero_input,
)

# torch's gate order (torch/nn/modules/rnn.py docstrings): LSTM [i, f, g, o], GRU [r, z, n].
GATE_INDEX = {
    "LSTM": {"input": 0, "forget": 1, "cell": 2, "output": 3},
    "GRU": {"reset": 0, "update": 1, "new": 2},
    "RNN": {"hidden": 0},
}
TORCH_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
Planner = Callable[[Checkpoint], EditPlan]


# --- Oracle helpers ---------------------------------------------------------------------------


def family(layer: ExpectedLayer) -> str:
    return layer.kind.removesuffix("Cell")


def is_cell(layer: ExpectedLayer) -> bool:
    return layer.kind.endswith("Cell")


def fixture_layers(filename: str, *families: str) -> tuple[ExpectedLayer, ...]:
    layers = make_fixtures.get_fixture(filename).layers
    return tuple(layer for layer in layers if not families or family(layer) in families)


def fixtures_with(*families: str, bias: bool = True) -> list[str]:
    return [
        fixture.filename
        for fixture in make_fixtures.FIXTURES
        if any(family(layer) in families and layer.bias == bias for layer in fixture.layers)
    ]


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint by dotted name, in file order, as torch loads it."""
    if path.suffix == ".safetensors":
        return load_file(str(path))
    return TorchReference.flatten(torch.load(path, map_location="cpu", weights_only=False))


def raw_bytes(tensor: torch.Tensor) -> bytes:
    tensor = tensor.detach().contiguous()
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.view(torch.int16)
    return tensor.numpy().tobytes()


def assert_same_tensors(actual: Mapping[str, torch.Tensor], expected: Mapping[str, Any]) -> None:
    """Same names in the same order, and every tensor identical bit for bit."""
    assert list(actual) == list(expected)
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype, name
        assert actual[name].shape == tensor.shape, name
        assert raw_bytes(actual[name]) == raw_bytes(tensor), name


def cells_of(layer: ExpectedLayer) -> list[tuple[str, int, str]]:
    """(name suffix, sub-layer, direction) of every cell, as torch names the parameters."""
    if is_cell(layer):
        return [("", 0, "forward")]
    directions = ("forward", "reverse") if layer.bidirectional else ("forward",)
    return [
        (f"_l{k}" + ("_reverse" if direction == "reverse" else ""), k, direction)
        for k in range(layer.num_layers)
        for direction in directions
    ]


def tensor_name(layer: ExpectedLayer, parameter: str) -> str:
    return f"{layer.name}.{parameter}" if layer.name else parameter


def gate_rows(layer: ExpectedLayer, gate: str) -> slice:
    index = GATE_INDEX[family(layer)][gate]
    return slice(index * layer.hidden_size, (index + 1) * layer.hidden_size)


def set_bias(b_ih: torch.Tensor, b_hh: torch.Tensor, rows: slice, value: float, mode: str) -> None:
    """What each mode means, written with torch's own indexing."""
    with torch.no_grad():
        if mode == "add":
            b_ih[rows] += value
        if mode in ("effective", "both", "ih"):
            b_ih[rows] = value
        if mode in ("both", "hh"):
            b_hh[rows] = value
        if mode == "effective":
            b_hh[rows] = 0.0


def cloned(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in tensors.items()}


def expected_gate_edit(
    tensors: Mapping[str, torch.Tensor],
    layers: Iterable[ExpectedLayer],
    gate: str,
    value: float,
    mode: str,
    sublayers: tuple[int, ...] = (),
    directions: tuple[str, ...] = (),
) -> dict[str, torch.Tensor]:
    expected = cloned(tensors)
    for layer in layers:
        if gate not in GATE_INDEX[family(layer)] or not layer.bias:
            continue
        for suffix, k, direction in cells_of(layer):
            if (sublayers and k not in sublayers) or (directions and direction not in directions):
                continue
            b_ih = expected[tensor_name(layer, f"bias_ih{suffix}")]
            b_hh = expected[tensor_name(layer, f"bias_hh{suffix}")]
            set_bias(b_ih, b_hh, gate_rows(layer, gate), value, mode)
    return expected


def build(layer: ExpectedLayer, bias: bool | None = None, batch_first: bool = False) -> nn.Module:
    """The torch module `layer` describes (the oracle's own description, not discovery's)."""
    bias = layer.bias if bias is None else bias
    extra: dict[str, Any] = {"nonlinearity": layer.nonlinearity} if family(layer) == "RNN" else {}
    if is_cell(layer):
        cell_class = {"LSTM": nn.LSTMCell, "GRU": nn.GRUCell, "RNN": nn.RNNCell}[family(layer)]
        return cell_class(layer.input_size, layer.hidden_size, bias=bias, **extra)
    if layer.proj_size:
        extra["proj_size"] = layer.proj_size
    layer_class = {"LSTM": nn.LSTM, "GRU": nn.GRU, "RNN": nn.RNN}[family(layer)]
    return layer_class(
        layer.input_size,
        layer.hidden_size,
        num_layers=layer.num_layers,
        bias=bias,
        bidirectional=layer.bidirectional,
        batch_first=batch_first,
        **extra,
    )


def module_state(layer: ExpectedLayer, tensors: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    prefix = f"{layer.name}." if layer.name else ""
    return {
        name[len(prefix) :]: tensor
        for name, tensor in tensors.items()
        if name.startswith(prefix) and "." not in name[len(prefix) :]
    }


def load_module(
    layer: ExpectedLayer,
    tensors: Mapping[str, torch.Tensor],
    bias: bool | None = None,
    batch_first: bool = False,
) -> nn.Module:
    """A fresh torch module loaded (strict) with the layer's tensors, in the layer's dtype."""
    module = build(layer, bias, batch_first).to(TORCH_DTYPES[layer.dtype])
    module.load_state_dict(module_state(layer, tensors), strict=True)
    return module


def zeroed_weights(module: nn.Module) -> nn.Module:
    module = copy.deepcopy(module).double()
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if name.startswith("weight"):
                parameter.zero_()
    return module


def lstm_forget_gates(module: nn.Module) -> torch.Tensor:
    """f at zero input and zero hidden state for every cell (rows in h_n order: sub-layer, then
    direction), measured by two forward steps of the weight-free module (c0 = 1 and c0 = 0)."""
    probe = zeroed_weights(module)
    hidden = probe.hidden_size
    options = {"dtype": torch.float64}
    if isinstance(probe, nn.LSTMCell):
        x, h0 = torch.zeros(1, probe.input_size, **options), torch.zeros(1, hidden, **options)
        c_shape: tuple[int, ...] = (1, hidden)

        def cell_state(c0: torch.Tensor) -> torch.Tensor:
            return probe(x, (h0, c0))[1]
    else:
        cells = probe.num_layers * (2 if probe.bidirectional else 1)
        x = torch.zeros(1, 1, probe.input_size, **options)
        h0 = torch.zeros(cells, 1, probe.proj_size or hidden, **options)
        c_shape = (cells, 1, hidden)

        def cell_state(c0: torch.Tensor) -> torch.Tensor:
            return probe(x, (h0, c0))[1][1]

    with torch.no_grad():
        gates = cell_state(torch.ones(c_shape, **options)) - cell_state(
            torch.zeros(c_shape, **options)
        )
    return gates.reshape(-1, hidden)


def gru_update_and_new(module: nn.Module, reset_shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(z, n) at zero input for every cell, from forward steps of the weight-free module whose reset
    biases b_ir were shifted by `reset_shift` (so r varies while z and the biases of n do not)."""
    probe = zeroed_weights(module)
    hidden = probe.hidden_size
    with torch.no_grad():
        for name, parameter in probe.named_parameters():
            if name.startswith("bias_ih"):
                parameter[:hidden] += reset_shift
    options = {"dtype": torch.float64}
    if isinstance(probe, nn.GRUCell):
        x = torch.zeros(1, probe.input_size, **options)
        shape: tuple[int, ...] = (1, hidden)

        def step(h0: torch.Tensor) -> torch.Tensor:
            return probe(x, h0)
    else:
        cells = probe.num_layers * (2 if probe.bidirectional else 1)
        x = torch.zeros(1, 1, probe.input_size, **options)
        shape = (cells, 1, hidden)

        def step(h0: torch.Tensor) -> torch.Tensor:
            return probe(x, h0)[1]

    with torch.no_grad():
        from_zero = step(torch.zeros(shape, **options))
        z = (step(torch.full(shape, 0.5, **options)) - from_zero) / 0.5
        n = from_zero / (1 - z)
    return z.reshape(-1, hidden), n.reshape(-1, hidden)


def as_dtype(value: float, dtype: str) -> torch.Tensor:
    """`value` rounded as torch rounds it into `dtype`, widened to float64."""
    return torch.tensor(value, dtype=TORCH_DTYPES[dtype]).double()


def layer_biases(
    layer: ExpectedLayer, tensors: Mapping[str, torch.Tensor], parameter: str
) -> torch.Tensor:
    """One bias of every cell stacked in h_n order, as float64."""
    return torch.stack(
        [
            tensors[tensor_name(layer, f"{parameter}{suffix}")].double()
            for suffix, *_ in cells_of(layer)
        ]
    )


def flattened(value: Any) -> list[torch.Tensor]:
    if isinstance(value, (tuple, list)):
        return [tensor for item in value for tensor in flattened(item)]
    return [value]


def run(module: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Every output of the module (output, then h_n and c_n) for input `x`."""
    with torch.no_grad():
        return flattened(module(x.to(next(module.parameters()).dtype)))


def sample_input(layer: ExpectedLayer, batch_first: bool, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if is_cell(layer):
        return torch.randn(3, layer.input_size, generator=generator)
    shape = (3, 4, layer.input_size) if batch_first else (4, 3, layer.input_size)
    return torch.randn(*shape, generator=generator)


def edit(source: Path, planner: Planner, output: Path) -> EditPlan:
    plan, result = edit_checkpoint(source, planner, Destination(output=output))
    assert result is not None and result.written
    return plan


# --- set-forget-bias: the forget gate is sigmoid(V) in torch ----------------------------------


@pytest.mark.parametrize("value", [1.0, 0.7])
@pytest.mark.parametrize("filename", fixtures_with("LSTM"))
def test_forget_gate_opens_at_sigmoid_of_value(fixtures_dir, tmp_path, filename, value):
    source = fixtures_dir / filename
    suffix = ".safetensors" if filename.endswith(".safetensors") else ".pt"
    output = tmp_path / f"out{suffix}"
    edit(source, lambda ck: plan_set_forget_bias(ck, value), output)

    before, after = load_tensors(source), load_tensors(output)
    lstms = fixture_layers(filename, "LSTM")
    assert_same_tensors(after, expected_gate_edit(before, lstms, "forget", value, "effective"))
    for layer in lstms:
        module = load_module(layer, after)
        cells = len(cells_of(layer))
        rows = gate_rows(layer, "forget")
        ih, hh = layer_biases(layer, after, "bias_ih"), layer_biases(layer, after, "bias_hh")
        assert torch.equal(
            ih[:, rows], as_dtype(value, layer.dtype).expand(cells, rows.stop - rows.start)
        )
        assert torch.equal(hh[:, rows], torch.zeros(cells, layer.hidden_size, dtype=torch.float64))
        expected_gate = torch.sigmoid(as_dtype(value, layer.dtype)).expand(cells, layer.hidden_size)
        torch.testing.assert_close(lstm_forget_gates(module), expected_gate, atol=1e-12, rtol=0)


def test_forget_gate_before_the_edit_was_not_already_sigmoid_one(fixtures_dir):
    """The measurement above is not vacuous: the fixtures' own forget gates are elsewhere."""
    layer = fixture_layers("zoo.pt", "LSTM")[0]
    module = load_module(layer, load_tensors(fixtures_dir / "zoo.pt"))
    gates = lstm_forget_gates(module)
    assert not torch.allclose(gates, torch.full_like(gates, 1 / (1 + math.exp(-1))), atol=1e-3)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "filename", ["zoo.pt", "half.safetensors", "bf16.pt", "double.pt", "flat.pt"]
)
def test_every_mode_matches_torch_slicing_bit_for_bit(fixtures_dir, tmp_path, filename, mode):
    value = 0.3  # not representable: every dtype rounds it its own way
    source = fixtures_dir / filename
    output = tmp_path / ("out" + source.suffix)
    edit(source, lambda ck: plan_set_forget_bias(ck, value, mode), output)

    before, after = load_tensors(source), load_tensors(output)
    lstms = fixture_layers(filename, "LSTM")
    expected = expected_gate_edit(before, lstms, "forget", value, mode)
    assert_same_tensors(after, expected)
    for layer in lstms:
        rows = gate_rows(layer, "forget")
        effective = layer_biases(layer, expected, "bias_ih") + layer_biases(
            layer, expected, "bias_hh"
        )
        gates = lstm_forget_gates(load_module(layer, after))
        torch.testing.assert_close(gates, torch.sigmoid(effective[:, rows]), atol=1e-12, rtol=0)
        if mode == "both":  # the popular recipe: the gate sees 2V
            doubled = torch.sigmoid(2 * as_dtype(value, layer.dtype)).expand_as(gates)
            torch.testing.assert_close(gates, doubled, atol=1e-12, rtol=0)
        if mode == "add":  # the effective bias moved by exactly V (rounded once per dtype)
            old = layer_biases(layer, before, "bias_ih") + layer_biases(layer, before, "bias_hh")
            shift = (effective - old)[:, rows]
            tolerance = {"float64": 1e-15, "float32": 1e-6}.get(layer.dtype, 1e-2)
            torch.testing.assert_close(shift, torch.full_like(shift, value), atol=tolerance, rtol=0)


# --- GRU's new gate: b_hn is scaled by r -----------------------------------------------------


@pytest.mark.parametrize("filename", ["gru_biased.pt", "zoo.pt", "bf16.pt"])
def test_gru_new_gate_is_tanh_of_value_whatever_the_reset_gate(fixtures_dir, tmp_path, filename):
    value = -0.8
    source = fixtures_dir / filename
    output = tmp_path / "out.pt"
    edit(source, lambda ck: plan_set_gate_bias(ck, "new", value), output)

    before, after = load_tensors(source), load_tensors(output)
    grus = fixture_layers(filename, "GRU")
    assert_same_tensors(after, expected_gate_edit(before, grus, "new", value, "effective"))
    for layer in grus:
        module = load_module(layer, after)
        target = torch.tanh(as_dtype(value, layer.dtype))
        for shift in (-3.0, 0.0, 3.0):
            _, new_gate = gru_update_and_new(module, shift)
            torch.testing.assert_close(
                new_gate, torch.full_like(new_gate, float(target)), atol=1e-9, rtol=0
            )


def test_gru_new_gate_of_the_original_depends_on_the_reset_gate(fixtures_dir):
    """gru_biased.pt has b_hn in [0.5, 1.5]: there, n moves with r (what `effective` removes)."""
    (layer,) = fixture_layers("gru_biased.pt", "GRU")
    module = load_module(layer, load_tensors(fixtures_dir / "gru_biased.pt"))
    _, low = gru_update_and_new(module, -3.0)
    _, high = gru_update_and_new(module, 3.0)
    assert (high - low).abs().min() > 0.05


def test_gru_new_gate_mode_both_is_not_tanh_of_twice_the_value(fixtures_dir, tmp_path):
    """With b_in = b_hn = V the new gate sees V + r*V, not 2V: r scales b_hn."""
    value = 0.5
    output = tmp_path / "out.pt"
    edit(
        fixtures_dir / "gru_biased.pt",
        lambda ck: plan_set_gate_bias(ck, "n", value, "both"),
        output,
    )
    (layer,) = fixture_layers("gru_biased.pt", "GRU")
    after = load_tensors(output)
    module = load_module(layer, after)
    ih, hh = layer_biases(layer, after, "bias_ih"), layer_biases(layer, after, "bias_hh")
    reset_rows = gate_rows(layer, "reset")
    for shift in (-2.0, 0.0, 2.0):
        _, new_gate = gru_update_and_new(module, shift)
        reset = torch.sigmoid(ih[:, reset_rows] + shift + hh[:, reset_rows])
        torch.testing.assert_close(new_gate, torch.tanh(value + reset * value), atol=1e-9, rtol=0)
        assert (new_gate - math.tanh(2 * value)).abs().min() > 1e-3


def test_gru_update_gate_sees_the_sum_of_both_biases(fixtures_dir, tmp_path):
    """For r and z the two biases add up: `effective` gives sigmoid(V) exactly."""
    output = tmp_path / "out.pt"
    edit(fixtures_dir / "gru_biased.pt", lambda ck: plan_set_gate_bias(ck, "z", 2.0), output)
    (layer,) = fixture_layers("gru_biased.pt", "GRU")
    update, _ = gru_update_and_new(load_module(layer, load_tensors(output)), 0.0)
    torch.testing.assert_close(update, torch.full_like(update, 1 / (1 + math.exp(-2.0))))


# --- Chrono initialisation --------------------------------------------------------------------


def test_chrono_draws_effective_forget_bias_and_opposite_input_bias(fixtures_dir, tmp_path):
    t_max = 10.0
    output = tmp_path / "out.pt"
    edit(fixtures_dir / "zoo.pt", lambda ck: plan_chrono(ck, t_max, seed=0), output)
    after = load_tensors(output)
    forget_draws = []
    for layer in fixture_layers("zoo.pt", "LSTM"):
        forget, input_rows = gate_rows(layer, "forget"), gate_rows(layer, "input")
        for suffix, *_ in cells_of(layer):
            b_ih = after[tensor_name(layer, f"bias_ih{suffix}")]
            b_hh = after[tensor_name(layer, f"bias_hh{suffix}")]
            assert torch.count_nonzero(b_hh[forget]) == 0
            assert torch.count_nonzero(b_hh[input_rows]) == 0
            assert torch.equal(b_ih[input_rows], -b_ih[forget])
            draw = b_ih[forget].double()
            assert draw.min() >= 0.0
            assert draw.max() <= math.log(t_max - 1) + 1e-6
            assert len(set(draw.tolist())) == layer.hidden_size  # one draw per unit
            forget_draws.append(draw)
        module = load_module(layer, after)
        gates = lstm_forget_gates(module)
        expected = torch.sigmoid(layer_biases(layer, after, "bias_ih")[:, forget])
        torch.testing.assert_close(gates, expected, atol=1e-12, rtol=0)
    for index, first in enumerate(forget_draws):
        for second in forget_draws[index + 1 :]:
            assert first.shape != second.shape or not torch.equal(first, second)


def test_chrono_same_seed_same_bytes_other_seed_other_bytes(fixtures_dir, tmp_path):
    source = fixtures_dir / "zoo.pt"
    outputs = {}
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        outputs[name] = tmp_path / f"{name}.pt"
        edit(source, lambda ck, seed=seed: plan_chrono(ck, 50.0, seed=seed), outputs[name])
    assert outputs["a"].read_bytes() == outputs["b"].read_bytes()
    assert outputs["a"].read_bytes() != outputs["c"].read_bytes()
    assert outputs["a"].read_bytes() != source.read_bytes()


def test_chrono_refuses_small_t_max_and_doubling_modes(fixtures_dir, tmp_path):
    with pytest.raises(EditError, match="greater than 2"):
        edit(fixtures_dir / "zoo.pt", lambda ck: plan_chrono(ck, 2.0), tmp_path / "a.pt")
    with pytest.raises(EditError, match="both"):
        edit(
            fixtures_dir / "zoo.pt",
            lambda ck: plan_chrono(ck, 10.0, mode="both"),
            tmp_path / "b.pt",
        )
    assert not list(tmp_path.iterdir())


# --- zero-bias, --drop, add-bias ---------------------------------------------------------------


def test_zero_bias_zeroes_every_recurrent_bias_and_nothing_else(fixtures_dir, tmp_path):
    output = tmp_path / "out.pt"
    edit(fixtures_dir / "zoo.pt", lambda ck: plan_zero_bias(ck), output)
    before = load_tensors(fixtures_dir / "zoo.pt")
    expected = cloned(before)
    for layer in fixture_layers("zoo.pt"):
        for suffix, *_ in cells_of(layer):
            for parameter in ("bias_ih", "bias_hh"):
                expected[tensor_name(layer, parameter + suffix)].zero_()
    assert_same_tensors(load_tensors(output), expected)
    assert torch.count_nonzero(expected["lstm_head.bias"]) > 0  # a Linear's bias is not touched


def test_zero_bias_of_some_gates_zeroes_their_rows_only(fixtures_dir, tmp_path):
    output = tmp_path / "out.pt"
    plan = edit(fixtures_dir / "zoo.pt", lambda ck: plan_zero_bias(ck, ["f", "input"]), output)
    before = load_tensors(fixtures_dir / "zoo.pt")
    expected = cloned(before)
    lstms = fixture_layers("zoo.pt", "LSTM")
    for gate in ("forget", "input"):
        expected = expected_gate_edit(expected, lstms, gate, 0.0, "both")
    assert_same_tensors(load_tensors(output), expected)
    assert sorted(entry.split(":")[0] for entry in plan.skipped) == sorted(
        layer.name for layer in fixture_layers("zoo.pt", "GRU", "RNN")
    )


def test_zero_bias_gates_of_different_families_apply_to_each_family(fixtures_dir, tmp_path):
    output = tmp_path / "out.pt"
    edit(fixtures_dir / "zoo.pt", lambda ck: plan_zero_bias(ck, ["forget", "update"]), output)
    expected = expected_gate_edit(
        load_tensors(fixtures_dir / "zoo.pt"), fixture_layers("zoo.pt"), "forget", 0.0, "both"
    )
    expected = expected_gate_edit(expected, fixture_layers("zoo.pt"), "update", 0.0, "both")
    assert_same_tensors(load_tensors(output), expected)


@pytest.mark.parametrize("filename", ["zoo.pt", "zoo.safetensors", "bf16.pt", "lightning.ckpt"])
def test_dropped_biases_load_into_bias_free_modules_and_compute_the_same(
    fixtures_dir, tmp_path, filename
):
    source = fixtures_dir / filename
    output = tmp_path / ("out" + source.suffix)
    edit(source, lambda ck: plan_zero_bias(ck, drop=True), output)
    after = load_tensors(output)
    originals = make_fixtures.build_modules(filename)
    for layer in fixture_layers(filename):
        original = copy.deepcopy(originals[layer.name])
        with torch.no_grad():
            for name, parameter in original.named_parameters():
                if name.startswith("bias"):
                    parameter.zero_()
        batch_first = bool(getattr(original, "batch_first", False))
        bias_free = load_module(layer, after, bias=False, batch_first=batch_first)
        x = sample_input(layer, batch_first)
        for ours, theirs in zip(run(bias_free.double(), x), run(original.double(), x), strict=True):
            torch.testing.assert_close(ours, theirs, atol=1e-12, rtol=0)  # two modules
        assert not any(name.startswith(tensor_name(layer, "bias")) for name in after)
    expected = {
        name: tensor
        for name, tensor in load_tensors(source).items()
        if not any(
            name.startswith(tensor_name(layer, "bias_")) for layer in fixture_layers(filename)
        )
    }
    assert_same_tensors(after, expected)


@pytest.mark.parametrize("filename", ["nobias.pt", "nobias.safetensors"])
def test_added_biases_load_into_biased_modules_and_compute_the_same(
    fixtures_dir, tmp_path, filename
):
    source = fixtures_dir / filename
    output = tmp_path / ("out" + source.suffix)
    edit(source, lambda ck: plan_add_bias(ck), output)
    after = load_tensors(output)
    originals = make_fixtures.build_modules(filename)
    for layer in fixture_layers(filename):
        biased = load_module(layer, after, bias=True)
        for suffix, *_ in cells_of(layer):
            for parameter in ("bias_ih", "bias_hh"):
                bias = after[tensor_name(layer, parameter + suffix)]
                assert bias.dtype == TORCH_DTYPES[layer.dtype]
                assert torch.count_nonzero(bias) == 0
        x = sample_input(layer, batch_first=False)
        for ours, theirs in zip(run(biased, x), run(originals[layer.name], x), strict=True):
            torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)  # two modules


def test_add_bias_skips_layers_that_have_biases(fixtures_dir, tmp_path):
    output = tmp_path / "out.pt"
    plan = edit(fixtures_dir / "zoo.pt", lambda ck: plan_add_bias(ck), output)
    assert sorted(entry.split(":")[0] for entry in plan.skipped) == sorted(
        layer.name for layer in fixture_layers("zoo.pt")
    )
    assert all("already has biases" in entry for entry in plan.skipped)
    assert not plan.additions and not plan.changes_anything
    assert output.read_bytes() == (fixtures_dir / "zoo.pt").read_bytes()


# --- zero-input -------------------------------------------------------------------------------


def test_zero_input_makes_the_encoder_ignore_those_features(fixtures_dir, tmp_path):
    output = tmp_path / "out.pt"
    selection = Selection(layer_globs=("encoder",))
    edit(fixtures_dir / "zoo.pt", lambda ck: plan_zero_input(ck, [1, 2], selection), output)
    before, after = load_tensors(fixtures_dir / "zoo.pt"), load_tensors(output)

    expected = cloned(before)
    for name in ("encoder.weight_ih_l0", "encoder.weight_ih_l0_reverse"):
        expected[name][:, [1, 2]] = 0.0
    assert_same_tensors(after, expected)  # sub-layer 1 and every other layer untouched

    (layer,) = [layer for layer in fixture_layers("zoo.pt") if layer.name == "encoder"]
    module = load_module(layer, after, batch_first=True)
    x = sample_input(layer, batch_first=True)
    other_features = x.clone()
    other_features[..., 1:3] = torch.randn(other_features[..., 1:3].shape) * 10
    for ours, theirs in zip(run(module, x), run(module, other_features), strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)  # two float32 forward passes
    kept_feature = x.clone()
    kept_feature[..., 0] += 1.0
    assert (run(module, x)[0] - run(module, kept_feature)[0]).abs().max() > 1e-3


def test_zero_input_skips_layers_without_the_feature(fixtures_dir, tmp_path):
    with open_checkpoint(fixtures_dir / "zoo.pt") as checkpoint:
        plan = plan_zero_input(checkpoint, [3])
    edited = {edit.layer for edit in plan.edits}
    assert edited == {"encoder", "projected", "gru"}  # input sizes 5, 4, 4
    skipped = {line.split(":")[0] for line in plan.skipped}
    assert skipped == {"elman", "rnn", "gru_cell", "rnn_cell"}  # input size 3
    with pytest.raises(EditError, match="no selected layer can take this edit"):
        edit(fixtures_dir / "zoo.pt", lambda ck: plan_zero_input(ck, [5]), tmp_path / "out.pt")
    with pytest.raises(EditError, match="at least one"):
        edit(fixtures_dir / "zoo.pt", lambda ck: plan_zero_input(ck, []), tmp_path / "out.pt")


def test_parse_features():
    assert parse_features("2,5,7-9") == [2, 5, 7, 8, 9]
    for text in ("7-5", "-1", "a"):
        with pytest.raises(EditError):
            parse_features(text)
    assert parse_features(" 1 , 3 ") == [1, 3]
    with pytest.raises(EditError, match="expected indices"):
        parse_features("1,x")


# --- What an edit refuses, skips and selects --------------------------------------------------


def test_gate_no_selected_layer_has_is_an_error(fixtures_dir, tmp_path):
    with pytest.raises(EditError, match="no selected layer can take this edit"):
        edit(
            fixtures_dir / "compiled.safetensors",
            lambda ck: plan_set_forget_bias(ck),
            tmp_path / "o",
        )
    with pytest.raises(EditError, match="no forget gate"):
        selection = Selection(layer_globs=("gru*",))
        edit(
            fixtures_dir / "zoo.pt",
            lambda ck: plan_set_forget_bias(ck, 1.0, "effective", selection),
            tmp_path / "o",
        )
    with pytest.raises(EditError, match="unknown gate"):
        edit(
            fixtures_dir / "zoo.pt", lambda ck: plan_set_gate_bias(ck, "bogus", 1.0), tmp_path / "o"
        )
    assert not list(tmp_path.iterdir())


def test_layer_without_biases_points_to_add_bias(fixtures_dir, tmp_path):
    with pytest.raises(EditError, match="add-bias"):
        edit(fixtures_dir / "nobias.pt", lambda ck: plan_set_forget_bias(ck), tmp_path / "out.pt")


def test_skipped_layers_are_listed_in_the_plan(fixtures_dir, tmp_path):
    plan = edit(fixtures_dir / "zoo.pt", lambda ck: plan_set_forget_bias(ck), tmp_path / "out.pt")
    skipped = {entry.split(":")[0]: entry for entry in plan.skipped}
    assert set(skipped) == {"gru", "elman", "gru_cell", "rnn_cell"}
    assert all("no forget gate" in entry for entry in skipped.values())


def test_selection_by_sublayer_and_direction_touches_only_those_cells(fixtures_dir, tmp_path):
    output = tmp_path / "out.pt"
    selection = Selection(sublayers=(1,), directions=("reverse",))
    plan = edit(
        fixtures_dir / "zoo.pt",
        lambda ck: plan_set_gate_bias(ck, "output", 2.5, "both", selection),
        output,
    )
    before = load_tensors(fixtures_dir / "zoo.pt")
    expected = expected_gate_edit(
        before, fixture_layers("zoo.pt", "LSTM"), "output", 2.5, "both", (1,), ("reverse",)
    )
    assert_same_tensors(load_tensors(output), expected)
    changed = {name for name in before if raw_bytes(before[name]) != raw_bytes(expected[name])}
    assert changed == {
        f"{layer}.{parameter}_l1_reverse"
        for layer in ("encoder", "projected")
        for parameter in ("bias_ih", "bias_hh")
    }
    assert any(entry.startswith("rnn:") and "sub-layer" in entry for entry in plan.skipped)


def test_selection_by_layer_glob(fixtures_dir, tmp_path):
    output = tmp_path / "out.pt"
    selection = Selection(layer_globs=("proj*",))
    edit(
        fixtures_dir / "zoo.pt", lambda ck: plan_set_forget_bias(ck, -1.0, "ih", selection), output
    )
    projected = [layer for layer in fixture_layers("zoo.pt") if layer.name == "projected"]
    expected = expected_gate_edit(
        load_tensors(fixtures_dir / "zoo.pt"), projected, "forget", -1.0, "ih"
    )
    assert_same_tensors(load_tensors(output), expected)


def test_drop_cannot_be_combined_with_gates_or_cells(fixtures_dir, tmp_path):
    with pytest.raises(EditError, match="--drop"):
        edit(
            fixtures_dir / "zoo.pt", lambda ck: plan_zero_bias(ck, ["f"], drop=True), tmp_path / "o"
        )
    with pytest.raises(EditError, match="--drop"):
        selection = Selection(sublayers=(0,))
        edit(
            fixtures_dir / "zoo.pt",
            lambda ck: plan_zero_bias(ck, (), True, selection),
            tmp_path / "o",
        )


# --- Property: random layers, containers, prefixes and formats --------------------------------


@st.composite
def gate_edits(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(["LSTM", "GRU"]))
    hidden = draw(st.integers(1, 5))
    container = draw(st.sampled_from(["plain", "training", "lightning"]))
    return {
        "kind": kind,
        "input_size": draw(st.integers(1, 4)),
        "hidden": hidden,
        "num_layers": draw(st.integers(1, 3)),
        "bidirectional": draw(st.booleans()),
        "proj": draw(st.integers(0, hidden - 1)) if kind == "LSTM" else 0,
        "dtype": draw(st.sampled_from(sorted(TORCH_DTYPES))),
        "container": container,
        "prefix": draw(st.sampled_from(["", "module.", "_orig_mod."])),
        "format": draw(st.sampled_from(["pt", "safetensors"])) if container == "plain" else "pt",
        "gate": draw(st.sampled_from(sorted(GATE_INDEX[kind]))),
        "value": draw(
            st.one_of(
                st.floats(-50, 50, allow_nan=False),
                st.sampled_from([0.0, -0.0, 1.0, 1 / 3, 1e-8, 1 + 2**-11 + 2**-40]),
            )
        ),
        "mode": draw(st.sampled_from(MODES)),
        "seed": draw(st.integers(0, 2**16)),
        "in_place": draw(st.booleans()),
    }


def build_checkpoint(case: dict[str, Any]) -> tuple[Any, ExpectedLayer]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(case["seed"])
        options: dict[str, Any] = {
            "num_layers": case["num_layers"],
            "bidirectional": case["bidirectional"],
        }
        if case["proj"]:
            options["proj_size"] = case["proj"]
        layer_class = nn.LSTM if case["kind"] == "LSTM" else nn.GRU
        rnn = layer_class(case["input_size"], case["hidden"], **options)
        head = nn.Linear(case["proj"] or case["hidden"], 2)
    dtype = TORCH_DTYPES[case["dtype"]]
    state = {
        f"{case['prefix']}rnn.{key}": value.to(dtype) for key, value in rnn.state_dict().items()
    }
    state |= {
        f"{case['prefix']}head.{key}": value.to(dtype) for key, value in head.state_dict().items()
    }
    name = f"{case['prefix']}rnn"
    if case["container"] == "training":
        first_bias = next(value for key, value in state.items() if "bias_ih" in key)
        payload: Any = {
            "model_state_dict": state,
            "optimizer_state_dict": {
                "state": {0: {"step": torch.tensor(1.0), "exp_avg": torch.ones_like(first_bias)}},
                "param_groups": [{"lr": 0.01, "params": [0]}],
            },
            "epoch": 4,
            "loss": 0.125,
        }
        name = f"model_state_dict.{name}"
    elif case["container"] == "lightning":
        payload = {
            "epoch": 1,
            "global_step": 9,
            "state_dict": {f"model.{key}": value for key, value in state.items()},
            "hyper_parameters": {"hidden": case["hidden"]},
        }
        name = f"state_dict.model.{name}"
    else:
        payload = state
    layer = ExpectedLayer(
        name=name,
        kind=case["kind"],
        input_size=case["input_size"],
        hidden_size=case["hidden"],
        proj_size=case["proj"],
        num_layers=case["num_layers"],
        bidirectional=case["bidirectional"],
        bias=True,
        dtype=case["dtype"],
        nonlinearity="",
    )
    return payload, layer


def skeleton(node: Any) -> Any:
    """Everything but the tensors' values (containers, keys, plain values)."""
    if isinstance(node, torch.Tensor):
        return ("tensor", node.dtype, tuple(node.shape))
    if isinstance(node, Mapping):
        return [(key, skeleton(value)) for key, value in node.items()]
    if isinstance(node, (list, tuple)):
        return [skeleton(item) for item in node]
    return node


@settings(max_examples=40, deadline=None)
@given(case=gate_edits())
def test_set_gate_bias_changes_exactly_what_torch_slicing_changes(case):
    """Any LSTM/GRU stack, dtype, container, prefix and format, with -o or --in-place: the output
    holds exactly the input's tensors, with torch's slicing of the edit applied and nothing else."""
    payload, layer = build_checkpoint(case)
    with tempfile.TemporaryDirectory() as folder:
        suffix = ".safetensors" if case["format"] == "safetensors" else ".pt"
        source, output = Path(folder) / f"in{suffix}", Path(folder) / f"out{suffix}"
        if case["format"] == "safetensors":
            save_file({k: v.contiguous() for k, v in payload.items()}, str(source))
        else:
            torch.save(payload, source)

        def planner(checkpoint: Checkpoint) -> EditPlan:
            return plan_set_gate_bias(checkpoint, case["gate"], case["value"], case["mode"])

        if case["in_place"]:
            shutil.copyfile(source, output)
            plan, _ = edit_checkpoint(output, planner, Destination(in_place=True))
        else:
            plan = edit(source, planner, output)
        before, after = load_tensors(source), load_tensors(output)
        expected = expected_gate_edit(before, [layer], case["gate"], case["value"], case["mode"])
        assert_same_tensors(after, expected)
        if case["format"] == "pt":
            loaded = torch.load(output, weights_only=True)
            assert skeleton(loaded) == skeleton(torch.load(source, weights_only=True))
        module = load_module(layer, after)  # strict: nothing renamed, nothing lost
        assert run(module, sample_input(layer, batch_first=False))
    assert {edit.tensor for edit in plan.edits} <= set(expected)
    assert plan.changes_anything == any(
        raw_bytes(before[name]) != raw_bytes(expected[name]) for name in expected
    )


def test_chrono_refuses_modes_that_distort_the_effective_draw(fixtures_dir):
    with open_checkpoint(fixtures_dir / "zoo.pt") as checkpoint:
        for mode in ("ih", "hh", "both", "add"):
            with pytest.raises(EditError, match="effective"):
                plan_chrono(checkpoint, 50, 0, mode)


def test_layers_without_biases_are_skipped_when_others_can_take_the_edit(tmp_path):
    state = {
        **{f"plain.{k}": v for k, v in torch.nn.LSTM(3, 4, bias=False).state_dict().items()},
        **{f"biased.{k}": v for k, v in torch.nn.LSTM(3, 4).state_dict().items()},
    }
    torch.save(state, tmp_path / "mixed.pt")
    with open_checkpoint(tmp_path / "mixed.pt") as checkpoint:
        plan = plan_set_forget_bias(checkpoint, 1.0)
    assert {edit.layer for edit in plan.edits} == {"biased"}
    assert any(line.startswith("plain:") and "add-bias" in line for line in plan.skipped)
    torch.save(
        {f"plain.{k}": v for k, v in state.items() if k.startswith("plain.")}, tmp_path / "p.pt"
    )
    with (
        open_checkpoint(tmp_path / "p.pt") as checkpoint,
        pytest.raises(EditError, match="add-bias"),
    ):
        plan_set_forget_bias(checkpoint, 1.0)


def test_drop_optimizer_state_without_optimizer_state_changes_no_structure(fixtures_dir):
    with open_checkpoint(fixtures_dir / "ddp.pt") as checkpoint:
        plan = plan_zero_bias(checkpoint, ["forget"], drop_optimizer_state=True)
    assert not plan.changes_structure
