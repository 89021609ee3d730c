"""Discovery: every recurrent layer described as its torch constructor would be, from shapes alone,
and a warning (not a wrong layer) for parameters that fit no recurrent module."""

from __future__ import annotations

from typing import Any

import make_fixtures
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from lstm_surgeon.discovery import discover
from lstm_surgeon.formats import open_checkpoint
from lstm_surgeon.layouts import pytorch as pytorch_layout

PARAMETERS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")


def describe(layer: Any) -> tuple[Any, ...]:
    """The constructor facts of a discovered layer or an ExpectedLayer, comparable."""
    return (
        layer.name,
        layer.kind,
        layer.input_size,
        layer.hidden_size,
        layer.proj_size,
        layer.num_layers,
        layer.bidirectional,
        layer.bias,
        layer.dtype,
    )


def describe_module(name: str, module: nn.Module) -> tuple[Any, ...]:
    """The same facts, read from a real torch module."""
    kind = type(module).__name__
    dtype = str(next(module.parameters()).dtype).removeprefix("torch.")
    if kind.endswith("Cell"):
        return (name, kind, module.input_size, module.hidden_size, 0, 1, False, module.bias, dtype)
    return (
        name,
        kind,
        module.input_size,
        module.hidden_size,
        module.proj_size,
        module.num_layers,
        module.bidirectional,
        module.bias,
        dtype,
    )


def assert_layer_is_module(checkpoint: Any, layer: Any, module: nn.Module) -> None:
    """Each cell of `layer` holds exactly the module's parameters of that sub-layer/direction."""
    expected = module.state_dict()
    assigned = []
    for cell in layer.cells:
        suffix = (
            ""
            if layer.is_cell
            else f"_l{cell.layer}" + ("_reverse" * (cell.direction == "reverse"))
        )
        for parameter in PARAMETERS:
            ref = cell.tensor(parameter)
            key = f"{parameter}{suffix}"
            if ref is None:
                assert key not in expected
                continue
            assert ref.name == pytorch_layout.tensor_name(layer, parameter, cell)
            assert ref.name == (f"{layer.name}.{key}" if layer.name else key)
            np.testing.assert_array_equal(
                checkpoint.values(ref), expected[key].to(torch.float64).numpy(), err_msg=ref.name
            )
            assigned.append(key)
    assert sorted(assigned) == sorted(expected)


# --- The fixtures -----------------------------------------------------------------------------


@pytest.mark.parametrize("fixture", make_fixtures.FIXTURES, ids=lambda fixture: fixture.filename)
def test_fixture_layers_are_exactly_the_oracle(fixtures_dir, fixture):
    with open_checkpoint(fixtures_dir / fixture.filename) as checkpoint:
        found = discover(checkpoint)
        assert found.warnings == []
        assert sorted(map(describe, found.layers)) == sorted(map(describe, fixture.layers))
        modules = make_fixtures.build_modules(fixture.filename)
        assert {layer.name for layer in found.layers} == set(modules)
        for layer in found.layers:
            assert describe(layer) == describe_module(layer.name, modules[layer.name])
            assert_layer_is_module(checkpoint, layer, modules[layer.name])


def test_non_recurrent_lookalikes_are_not_layers(fixtures_dir):
    with open_checkpoint(fixtures_dir / "zoo.pt") as checkpoint:
        names = {layer.name for layer in discover(checkpoint).layers}
    assert "lstm_head" not in names
    assert "embedding" not in names
    with open_checkpoint(fixtures_dir / "plain_tensor.pt") as checkpoint:
        assert discover(checkpoint).layers == []
    with open_checkpoint(fixtures_dir / "training.pt") as checkpoint:  # Adam moments
        assert [layer.name for layer in discover(checkpoint).layers] == ["model_state_dict.lstm"]


def test_an_lstm_cell_named_rnn_is_an_lstm_cell(fixtures_dir, tmp_checkpoint):
    with open_checkpoint(fixtures_dir / "zoo.safetensors") as checkpoint:
        (layer,) = discover(checkpoint, ["rnn"]).layers
        assert (layer.kind, layer.is_cell, len(layer.cells)) == ("LSTMCell", True, 1)
    misleading = {
        **{f"rnn.{k}": v for k, v in nn.LSTMCell(2, 3).state_dict().items()},
        **{f"lstm.{k}": v for k, v in nn.GRU(2, 3).state_dict().items()},
        **{f"gru.{k}": v for k, v in nn.RNN(2, 3).state_dict().items()},
    }
    with open_checkpoint(tmp_checkpoint(misleading)) as checkpoint:
        kinds = {layer.name: layer.kind for layer in discover(checkpoint).layers}
    assert kinds == {"rnn": "LSTMCell", "lstm": "GRU", "gru": "RNN"}


@pytest.mark.parametrize(
    ("filename", "globs", "expected"),
    [
        ("zoo.pt", ["enc*"], {"encoder"}),
        ("zoo.pt", ["rnn"], {"rnn"}),
        ("zoo.pt", ["*gru*"], {"gru", "gru_cell"}),
        ("zoo.pt", ["*_cell"], {"gru_cell", "rnn_cell"}),
        ("zoo.pt", ["elman", "proj*"], {"elman", "projected"}),
        ("zoo.pt", ["lstm*"], set()),
        ("zoo.pt", ["nothing"], set()),
        ("zoo.safetensors", ["e*"], {"encoder", "elman"}),
        (
            "lightning.ckpt",
            ["state_dict.model.*"],
            {"state_dict.model.lstm", "state_dict.model.rnn"},
        ),
        ("lightning.ckpt", ["*.rnn"], {"state_dict.model.rnn"}),
        ("ddp.pt", ["module.lstm"], {"module.lstm"}),
        ("double.pt", ["*"], {""}),
    ],
)
def test_layer_globs_filter_by_name(fixtures_dir, filename, globs, expected):
    with open_checkpoint(fixtures_dir / filename) as checkpoint:
        everything = discover(checkpoint)
        found = discover(checkpoint, globs)
    assert {layer.name for layer in found.layers} == expected
    kept = [describe(layer) for layer in everything.layers if layer.name in expected]
    assert sorted(map(describe, found.layers)) == sorted(kept)


# --- Property: real torch modules, any configuration, both formats ----------------------------

KINDS = ["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell"]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
NAMES = st.lists(
    st.sampled_from(["enc", "dec", "rnn", "lstm", "gru", "cell", "0", "_x"]), min_size=1, max_size=2
).map(".".join)
PREFIXES = ["", "module.", "_orig_mod.", "model."]
CONTAINERS = [None, "state_dict", "model_state_dict", "model"]


@st.composite
def recurrent_modules(draw: st.DrawFn) -> nn.Module:
    kind = draw(st.sampled_from(KINDS))
    input_size, hidden_size = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    bias = draw(st.booleans())
    if kind.endswith("Cell"):
        module = getattr(nn, kind)(input_size, hidden_size, bias=bias)
    else:
        extra: dict[str, Any] = {}
        if kind == "LSTM" and hidden_size > 1 and draw(st.booleans()):
            extra["proj_size"] = draw(st.integers(1, hidden_size - 1))
        module = getattr(nn, kind)(
            input_size,
            hidden_size,
            num_layers=draw(st.integers(1, 3)),
            bidirectional=draw(st.booleans()),
            bias=bias,
            **extra,
        )
    return module.to(draw(st.sampled_from(DTYPES)))


@st.composite
def models(draw: st.DrawFn) -> dict[str, nn.Module]:
    """Recurrent modules by dotted name (one unnamed module at the root, sometimes)."""
    if draw(st.integers(0, 5)) == 0:
        return {"": draw(recurrent_modules())}
    names = draw(st.lists(NAMES, min_size=1, max_size=4, unique=True))
    return {name: draw(recurrent_modules()) for name in names}


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    modules=models(),
    prefix=st.sampled_from(PREFIXES),
    container=st.sampled_from(CONTAINERS),
    distractor=st.booleans(),
)
def test_random_modules_are_discovered_as_built(
    tmp_path_factory, save_checkpoint, modules, prefix, container, distractor
):
    if "" in modules:
        prefix = ""
    state: dict[str, torch.Tensor] = {}
    for name, module in modules.items():
        for key, tensor in module.state_dict().items():
            state[f"{prefix}{name}.{key}" if name else key] = tensor
    if distractor:  # a Linear with an LSTM-like (4H, H) weight, and an optimizer-like moment
        state[f"{prefix}head.weight"] = torch.zeros(16, 4)
        state[f"{prefix}head.exp_avg"] = torch.zeros(16, 4)
    directory = tmp_path_factory.mktemp("discover")
    for path, names_prefix in (
        (save_checkpoint(state, directory / "flat.safetensors"), ""),
        (
            save_checkpoint(state if container is None else {container: state}, directory / "m.pt"),
            "" if container is None else container,
        ),
    ):
        with open_checkpoint(path) as checkpoint:
            found = discover(checkpoint)
            assert found.warnings == []
            expected = {
                ".".join(part for part in (names_prefix, f"{prefix}{name}") if part): module
                for name, module in modules.items()
            }
            assert sorted(map(describe, found.layers)) == sorted(
                describe_module(name, module) for name, module in expected.items()
            )
            for layer in found.layers:
                assert_layer_is_module(checkpoint, layer, expected[layer.name])


# --- Inconsistent shapes: a warning naming the tensor, and no layer ---------------------------


def lstm_state(**kwargs: Any) -> dict[str, torch.Tensor]:
    return dict(nn.LSTM(3, 4, **kwargs).state_dict())


def corrupt(state: dict[str, torch.Tensor], **changes: Any) -> dict[str, torch.Tensor]:
    """Replace (a tensor) or drop (None) entries of a state dict."""
    result = dict(state)
    for key, value in changes.items():
        if value is None:
            result.pop(key)
        else:
            result[key] = value
    return result


H = 4
BROKEN: dict[str, tuple[dict[str, torch.Tensor], str]] = {
    "weight_hh-5x-rows": (
        corrupt(lstm_state(num_layers=2), weight_hh_l0=torch.zeros(5 * H, H)),
        "weight_hh_l0",
    ),
    "weight_hh-1d": (corrupt(lstm_state(), weight_hh_l0=torch.zeros(4 * H)), "weight_hh_l0"),
    "bias-wrong-length": (
        corrupt(lstm_state(num_layers=2), bias_ih_l1=torch.zeros(4 * H + 1)),
        "bias_ih_l1",
    ),
    "weight_ih-wrong-input-in-layer-1": (
        corrupt(lstm_state(num_layers=2, bidirectional=True), weight_ih_l1=torch.zeros(4 * H, H)),
        "weight_ih_l1",
    ),
    "weight_hh-other-hidden-in-layer-1": (
        corrupt(lstm_state(num_layers=2), weight_hh_l1=torch.zeros(4 * H, H + 1)),
        "weight_hh_l1",
    ),
    "reverse-weight-wrong": (
        corrupt(lstm_state(bidirectional=True), weight_hh_l0_reverse=torch.zeros(3 * H, H)),
        "weight_hh_l0_reverse",
    ),
    "missing-reverse-sub-layer": (
        {
            k: v
            for k, v in lstm_state(num_layers=2, bidirectional=True).items()
            if not k.endswith("_l1_reverse")
        },
        "reverse",
    ),
    "reverse-only-in-layer-1": (
        {
            k: v
            for k, v in lstm_state(num_layers=2, bidirectional=True).items()
            if not k.endswith("_l0_reverse")
        },
        "reverse",
    ),
    "missing-middle-layer": (
        {k: v for k, v in lstm_state(num_layers=3).items() if "_l1" not in k},
        "1",
    ),
    "missing-weight_hh-of-layer-1": (corrupt(lstm_state(num_layers=2), weight_hh_l1=None), "_l1"),
    "one-bias-missing": (corrupt(lstm_state(num_layers=2), bias_hh_l1=None), "bias"),
    "missing-weight_hr-in-layer-1": (
        corrupt(lstm_state(proj_size=2, num_layers=2), weight_hr_l1=None),
        "_l1",
    ),
    "weight_hr-wrong-shape": (
        corrupt(lstm_state(proj_size=2), weight_hr_l0=torch.zeros(2, H + 1)),
        "_l0",  # names weight_hr_l0, or weight_hh_l0 that no longer fits it
    ),
    "projection-on-a-gru": (
        {**nn.GRU(3, H).state_dict(), "weight_hr_l0": torch.zeros(2, H)},
        "weight_hr_l0",
    ),
    "cell-weight_hh-5x-rows": (
        corrupt(dict(nn.LSTMCell(3, H).state_dict()), weight_hh=torch.zeros(5 * H, H)),
        "weight_hh",
    ),
    "cell-weight_ih-rows-differ": (
        corrupt(dict(nn.GRUCell(3, H).state_dict()), weight_ih=torch.zeros(4 * H, 3)),
        "weight_ih",
    ),
    "cell-bias-wrong-length": (
        corrupt(dict(nn.RNNCell(3, H).state_dict()), bias_hh=torch.zeros(H + 1)),
        "bias_hh",
    ),
    "cell-one-bias-missing": (corrupt(dict(nn.GRUCell(3, H).state_dict()), bias_ih=None), "bias"),
    "cell-and-layer-parameters-mixed": (
        {**lstm_state(), "weight_ih": torch.zeros(4 * H, 3)},
        "weight_ih",
    ),
}


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
@pytest.mark.parametrize("case", sorted(BROKEN))
def test_inconsistent_layer_gives_a_warning_and_no_layer(tmp_checkpoint, case, suffix):
    broken, fragment = BROKEN[case]
    state = {f"bad.{key}": value.contiguous() for key, value in broken.items()}
    state.update({f"good.{key}": value for key, value in nn.GRU(2, 3).state_dict().items()})
    with open_checkpoint(tmp_checkpoint(state, f"broken{suffix}")) as checkpoint:
        found = discover(checkpoint)
    assert [layer.name for layer in found.layers] == ["good"]
    assert len(found.warnings) == 1
    (warning,) = found.warnings
    assert "\n" not in warning
    assert "bad" in warning
    assert fragment in warning
    named = [name for name in state if name in warning]
    assert named, f"the warning names no tensor: {warning}"
    assert all(name.startswith("bad.") for name in named)


@pytest.mark.parametrize("missing", ["weight_ih_l0", "weight_hh_l0"])
def test_stacked_layer_missing_first_weight_gives_a_warning(tmp_checkpoint, missing):
    state = {
        f"bad.{key}": value for key, value in lstm_state(num_layers=2).items() if key != missing
    }
    with open_checkpoint(tmp_checkpoint(state, "broken.safetensors")) as checkpoint:
        found = discover(checkpoint)
    assert found.layers == []
    assert any("bad" in warning for warning in found.warnings)
