"""`trend`: series across a run checked against torch, run order by step, epoch or natural name."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from gate_oracle import cell_suffix, oracle_gates
from hypothesis import given
from hypothesis import strategies as st

from lstm_surgeon.trend import (
    ORDER_EPOCH,
    ORDER_NAME,
    ORDER_STEP,
    follow_run,
    natural_key,
    run_order,
)


def lstm_state(seed: int, hidden: int = 6) -> dict[str, torch.Tensor]:
    """A bidirectional LSTM named `encoder` and a GRU named `gru`, with random biases."""
    generator = torch.Generator().manual_seed(seed)
    lstm = torch.nn.LSTM(3, hidden, bidirectional=True)
    gru = torch.nn.GRU(3, hidden)
    state = {f"encoder.{k}": v.detach() for k, v in lstm.state_dict().items()}
    state |= {f"gru.{k}": v.detach() for k, v in gru.state_dict().items()}
    for name in state:
        if ".bias_" in name:
            state[name] = torch.randn(state[name].shape, generator=generator) + seed / 4
    return state


def write_run(folder: Path, names: list[str], metadata: list[dict[str, str] | None] | None = None):
    """One safetensors file per name (with its metadata), each with other biases."""
    from safetensors.torch import save_file

    paths = []
    for index, name in enumerate(names):
        path = folder / name
        meta = metadata[index] if metadata else None
        save_file(lstm_state(index), str(path), metadata=meta)
        paths.append(path)
    return paths


def run_json(run_cli, *args):
    result = run_cli("trend", *args, "--json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


# --- Series against torch -----------------------------------------------------------------------


def test_series_are_torchs_mean_and_percentiles_of_each_file(run_cli, tmp_path):
    paths = []
    for index in range(4):
        path = tmp_path / f"epoch{index}.pt"
        torch.save({"model": lstm_state(index), "epoch": index}, path)
        paths.append(path)
    document = run_json(run_cli, *paths)
    assert [Path(point["path"]) for point in document["checkpoints"]] == paths
    states = [torch.load(path, weights_only=True) for path in paths]
    layers = {"model.encoder": ("LSTM", 6), "model.gru": ("GRU", 6)}
    followed = set()
    for series in document["series"]:
        kind, hidden = layers[series["layer"]]
        cell = series["cell"]
        suffix = cell_suffix(kind, cell["layer"], cell["direction"])
        for index, state in enumerate(states):
            flat = {f"model.{key}": value for key, value in state["model"].items()}
            gates = oracle_gates(flat, f"{series['layer']}.", suffix, kind, hidden)
            gate = next(gate for gate in gates if gate.name == series["gate"])
            values = {"effective": gate.effective, "bias_ih": gate.b_in, "bias_hh": gate.b_hn}
            units = torch.from_numpy(values[series["bias"]])
            p10, p90 = torch.quantile(units, torch.tensor([0.1, 0.9], dtype=torch.float64))
            assert series["mean"][index] == pytest.approx(float(units.mean()), rel=1e-12)
            assert series["p10"][index] == pytest.approx(float(p10), rel=1e-12)
            assert series["p90"][index] == pytest.approx(float(p90), rel=1e-12)
        followed.add((series["layer"], cell["direction"], series["gate"], series["bias"]))
    lstm_gates = ("input", "forget", "cell", "output")
    expected = {
        ("model.encoder", direction, gate, "effective")
        for direction in ("forward", "reverse")
        for gate in lstm_gates
    }
    expected |= {("model.gru", "forward", gate, "effective") for gate in ("reset", "update")}
    expected |= {("model.gru", "forward", "new", bias) for bias in ("bias_ih", "bias_hh")}
    assert followed == expected


def test_json_has_the_keys_the_issue_names(run_cli, tmp_path):
    paths = write_run(tmp_path, ["a.safetensors", "b.safetensors"])
    document = run_json(run_cli, *paths, "--gate", "f")
    assert set(document) == {"order", "checkpoints", "series"}
    assert all(set(point) == {"path", "step"} for point in document["checkpoints"])
    assert [series["gate"] for series in document["series"]] == ["forget", "forget"]
    for series in document["series"]:
        assert set(series) == {"layer", "cell", "gate", "bias", "mean", "p10", "p90"}
        assert set(series["cell"]) == {"layer", "direction"}
        assert len(series["mean"]) == len(series["p10"]) == len(series["p90"]) == 2
        assert all(
            lo <= mean <= hi
            for lo, mean, hi in zip(series["p10"], series["mean"], series["p90"], strict=True)
        )


def test_a_layer_glob_narrows_the_series(run_cli, tmp_path):
    paths = write_run(tmp_path, ["a.safetensors", "b.safetensors"])
    document = run_json(run_cli, *paths, "--layer", "gru", "--gate", "new")
    assert [(s["gate"], s["bias"]) for s in document["series"]] == [
        ("new", "bias_ih"),
        ("new", "bias_hh"),
    ]


def test_a_series_missing_from_a_checkpoint_has_gaps(tmp_path):
    from safetensors.torch import save_file

    full = lstm_state(0)
    only_lstm = {k: v for k, v in lstm_state(1).items() if k.startswith("encoder.")}
    save_file(full, str(tmp_path / "ep1.safetensors"))
    save_file(only_lstm, str(tmp_path / "ep2.safetensors"))
    trend = follow_run([tmp_path / "ep2.safetensors", tmp_path / "ep1.safetensors"], ["reset"])
    assert [s.mean[1] for s in trend.series] == [None]
    assert trend.series[0].mean[0] is not None


# --- Run order ------------------------------------------------------------------------------------


def test_natural_name_order_without_counters(run_cli, tmp_path):
    names = ["ep10.safetensors", "ep2.safetensors", "ep1.safetensors", "EP3.safetensors"]
    document = run_json(run_cli, *write_run(tmp_path, names))
    assert document["order"] == ORDER_NAME
    assert [Path(p["path"]).name for p in document["checkpoints"]] == [
        "ep1.safetensors",
        "ep2.safetensors",
        "EP3.safetensors",
        "ep10.safetensors",
    ]
    assert [p["step"] for p in document["checkpoints"]] == [None] * 4


def test_the_stored_step_orders_the_run_over_names(run_cli, tmp_path):
    names = ["a.safetensors", "b.safetensors", "c.safetensors"]
    steps = [{"global_step": "300"}, {"global_step": "20", "epoch": "9"}, {"step": "100"}]
    document = run_json(run_cli, *write_run(tmp_path, names, steps))
    assert document["order"] == ORDER_STEP
    order = [(Path(p["path"]).name, p["step"]) for p in document["checkpoints"]]
    assert order == [("b.safetensors", 20), ("c.safetensors", 100), ("a.safetensors", 300)]
    # the series follow the same order: b was written from seed 1, c from 2, a from 0
    first = run_json(run_cli, tmp_path / "b.safetensors")["series"][0]["mean"][0]
    assert document["series"][0]["mean"][0] == first


def test_epochs_order_the_run_when_a_step_is_missing(run_cli, tmp_path):
    names = ["x1.safetensors", "x2.safetensors", "x3.safetensors"]
    counters = [{"epoch": "2", "global_step": "10"}, {"epoch": "1"}, {"epoch": "0"}]
    document = run_json(run_cli, *write_run(tmp_path, names, counters))
    assert document["order"] == ORDER_EPOCH
    assert [Path(p["path"]).name for p in document["checkpoints"]] == names[::-1]
    assert [p["step"] for p in document["checkpoints"]] == [0, 1, 2]


def test_a_lightning_global_step_in_a_pt_orders_the_run(run_cli, tmp_path):
    """Lightning stores `epoch` and `global_step` at the top of the container: the step wins."""
    paths = []
    for name, epoch, step in (("last.ckpt", 2, 900), ("early.ckpt", 0, 10), ("mid.ckpt", 1, 450)):
        state = {f"model.{k}": v for k, v in lstm_state(step).items()}
        torch.save({"state_dict": state, "epoch": epoch, "global_step": step}, tmp_path / name)
        paths.append(tmp_path / name)
    document = run_json(run_cli, *paths, "--gate", "forget", "--layer", "*encoder")
    assert document["order"] == ORDER_STEP
    order = [(Path(p["path"]).name, p["step"]) for p in document["checkpoints"]]
    assert order == [("early.ckpt", 10), ("mid.ckpt", 450), ("last.ckpt", 900)]


def test_the_epoch_of_a_training_loop_checkpoint_orders_the_run(run_cli, tmp_path):
    paths = []
    for name, epoch in (("b.pt", 7), ("a.pt", 3), ("c.pt", 5)):
        torch.save({"model_state_dict": lstm_state(epoch), "epoch": epoch}, tmp_path / name)
        paths.append(tmp_path / name)
    document = run_json(run_cli, *paths)
    assert document["order"] == ORDER_EPOCH
    assert [Path(p["path"]).name for p in document["checkpoints"]] == ["a.pt", "c.pt", "b.pt"]


def test_the_fixtures_counters_are_read(fixtures_dir, make_fixtures):
    """training.pt stores epoch 3; lightning.ckpt stores an epoch and a global step."""
    from lstm_surgeon.formats import open_checkpoint
    from lstm_surgeon.trend import training_counters

    lightning = make_fixtures.build_payload("lightning.ckpt")
    training = make_fixtures.build_payload("training.pt")
    with open_checkpoint(fixtures_dir / "lightning.ckpt") as checkpoint:
        counters = training_counters(checkpoint)
    assert counters == {"epoch": lightning["epoch"], "global_step": lightning["global_step"]}
    with open_checkpoint(fixtures_dir / "training.pt") as checkpoint:
        assert training_counters(checkpoint) == {"epoch": training["epoch"]}


def test_a_counter_that_is_not_a_whole_number_does_not_count(run_cli, tmp_path):
    names = ["r2.safetensors", "r10.safetensors"]
    document = run_json(run_cli, *write_run(tmp_path, names, [{"step": "5"}, {"step": "1.5"}]))
    assert document["order"] == ORDER_NAME


@given(st.lists(st.integers(0, 10_000), min_size=1, max_size=30, unique=True), st.randoms())
def test_natural_order_sorts_numbers_by_value_whatever_the_input_order(numbers, rng):
    names = [f"run/ckpt-ep{n}.pt" for n in numbers]
    rng.shuffle(names)
    order = run_order([(name, {}) for name in names])
    ordered = [names[i] for i in order.positions]
    assert ordered == [f"run/ckpt-ep{n}.pt" for n in sorted(numbers)]


@given(
    st.lists(
        st.tuples(st.integers(0, 50), st.sampled_from(["global_step", "step"])),
        min_size=1,
        max_size=20,
    ),
    st.randoms(),
)
def test_step_order_is_by_step_then_name_whatever_the_input_order(steps, rng):
    counted = [(f"f{index}", {key: step}) for index, (step, key) in enumerate(steps)]
    shuffled = counted[:]
    rng.shuffle(shuffled)
    order = run_order(shuffled)
    assert order.order == ORDER_STEP
    result = [shuffled[i][0] for i in order.positions]
    assert result == [
        name for name, _ in sorted(counted, key=lambda c: (*c[1].values(), natural_key(c[0])))
    ]
    assert list(order.steps) == sorted(step for step, _ in steps)


def test_global_step_wins_over_step():
    order = run_order([("a", {"global_step": 1, "step": 9}), ("b", {"global_step": 2, "step": 0})])
    assert order.positions == (0, 1) and order.steps == (1, 2)


# --- Errors ---------------------------------------------------------------------------------------


def test_an_unknown_gate_is_a_clear_error(run_cli, tmp_path):
    paths = write_run(tmp_path, ["a.safetensors"])
    result = run_cli("trend", *paths, "--gate", "forgot", "--json")
    assert result.exit_code == 2
    assert "unknown gate 'forgot'" in json.loads(result.stdout)["error"]["message"]


def test_a_gate_no_layer_has_is_a_clear_error(run_cli, tmp_path):
    paths = write_run(tmp_path, ["a.safetensors"])
    result = run_cli("trend", *paths, "--layer", "gru", "--gate", "forget")
    assert result.exit_code == 2
    assert "no gate forget to follow" in result.stderr


def test_a_glob_that_matches_nothing_names_the_layers(run_cli, tmp_path):
    paths = write_run(tmp_path, ["a.safetensors"])
    result = run_cli("trend", *paths, "--layer", "decoder*")
    assert result.exit_code == 2
    assert "'encoder'" in result.stderr and "'gru'" in result.stderr


def test_a_file_that_is_not_a_checkpoint_fails_cleanly(surgeon, tmp_path):
    paths = write_run(tmp_path, ["a.safetensors"])
    junk = tmp_path / "notes.txt"
    junk.write_text("not a checkpoint")
    result = surgeon("trend", *paths, junk)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and "notes.txt" in result.stderr


# --- Terminal chart -------------------------------------------------------------------------------


def test_the_chart_says_the_order_and_labels_the_ends(surgeon, tmp_path):
    names = [f"ck{i}.safetensors" for i in range(5)]
    steps = [{"global_step": str(100 * i)} for i in range(5)]
    random.Random(0).shuffle(names)
    result = surgeon("trend", *write_run(tmp_path, names, steps), "--gate", "forget")
    assert result.returncode == 0, result.stderr
    assert "step 0" in result.stdout and "step 400" in result.stdout
    assert "in order by the step each checkpoint stores" in result.stdout
    assert result.stdout.count("encoder [0 ") == 2


def test_a_run_longer_than_the_terminal_is_wide_fits_it(tmp_path):
    from rich.console import Console

    from lstm_surgeon.render_trend import HEIGHT, LABEL_WIDTH, TrendView

    paths = write_run(tmp_path, [f"s{i}.safetensors" for i in range(200)])
    trend = follow_run(paths, ["forget"], ["encoder"])
    buffer = io.StringIO()
    Console(file=buffer, width=60, color_system=None).print(TrendView(trend))
    lines = buffer.getvalue().splitlines()
    room = 60 - LABEL_WIDTH - 3  # one column per 4 or 5 checkpoints, averaged
    assert lines.count(" " * (LABEL_WIDTH + 1) + "└" + "─" * (room + 1)) == 2  # not wrapped
    rows = [line for line in lines if "┤" in line or line.startswith(" " * LABEL_WIDTH + " │")]
    assert len(rows) == 2 * HEIGHT
    assert max(len(row) for row in rows) <= 60
    legend = " ".join(buffer.getvalue().split())  # the legend wraps at 60 columns
    assert f"200 checkpoints (a column averages {200 / room:.1f}) in order by file name" in legend
    assert np.isfinite(np.array(trend.series[0].mean, dtype=float)).all()
