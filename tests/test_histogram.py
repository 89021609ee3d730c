"""Histograms of per-unit gate biases: counts, shared ranges, glyphs, and `inspect`/`diff --hist`.

Counts are checked against numpy on values torch reads from the files; the range of a table against
the smallest and largest value of its gates.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from gate_oracle import cell_suffix, oracle_gates
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from lstm_surgeon.histogram import (
    ASCII_LEVELS,
    BINS,
    BLOCKS,
    EMPTY_BIN,
    bars,
    histogram_of,
    shared_range,
)

finite_floats = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False, width=32)
value_arrays = hnp.arrays(np.float64, st.integers(1, 200), elements=finite_floats)


def bin_of_each(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """The bin of each value, counted the slow way: half-open bins, the last one closed."""
    bins = np.searchsorted(edges, values, side="right") - 1
    return np.minimum(bins, len(edges) - 2)


# --- The histogram record -------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(value_arrays, st.integers(1, 40))
def test_counts_are_the_values_per_bin(values, bins):
    histogram = histogram_of(values, shared_range([values]), bins)
    edges = np.array(histogram.edges)
    assert len(histogram.edges) == len(histogram.counts) + 1 == bins + 1
    assert sum(histogram.counts) == values.size
    expected = np.bincount(bin_of_each(values, edges), minlength=bins)
    assert list(histogram.counts) == expected.tolist()
    assert np.all(np.diff(edges) > 0)


@given(st.lists(value_arrays, min_size=1, max_size=5))
def test_a_shared_range_holds_every_value(arrays):
    low, high = shared_range(arrays)
    everything = np.concatenate(arrays)
    assert low < high
    assert low <= everything.min() and everything.max() <= high
    if everything.min() < everything.max():
        assert (low, high) == (everything.min(), everything.max())


def test_one_repeated_value_sits_in_a_middle_bin():
    histogram = histogram_of(np.full(8, 1.0), shared_range([np.full(8, 1.0)]), 16)
    assert histogram.value_range == (0.5, 1.5)
    assert histogram.counts[8] == 8 and sum(histogram.counts) == 8


def test_non_finite_values_are_left_out_of_counts_and_range():
    values = np.array([np.nan, np.inf, -np.inf, 0.0, 2.0])
    value_range = shared_range([values, None])
    assert value_range == (0.0, 2.0)
    assert sum(histogram_of(values, value_range, 4).counts) == 2


# --- Glyphs -------------------------------------------------------------------------------------


def test_bar_heights_follow_the_counts():
    assert bars([0, 1, 4, 8], peak=8) == EMPTY_BIN + "▁▄█"
    assert bars([0, 1, 4, 8], peak=8, levels=ASCII_LEVELS) == " .=@"


@given(st.lists(st.integers(0, 1000), min_size=1, max_size=40))
def test_bars_are_one_glyph_per_bin_and_never_hide_a_unit(counts):
    peak = max(counts) or 1
    drawn = bars(counts, peak)
    assert len(drawn) == len(counts)
    for count, glyph in zip(counts, drawn, strict=True):
        assert (glyph == EMPTY_BIN) == (count == 0)
    heights = [BLOCKS.index(g) for g in drawn if g != EMPTY_BIN]
    nonzero = [c for c in counts if c]
    order = np.argsort(nonzero, kind="stable")
    assert [heights[i] for i in order] == sorted(heights)  # more units, never a lower bar
    if max(counts):
        assert BLOCKS[-1] in drawn


# --- inspect --hist --json ----------------------------------------------------------------------


def inspect_json(run_cli, path, *extra):
    result = run_cli("inspect", path, "--hist", "--json", *extra)
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def test_inspect_histograms_match_numpy_on_torch_values(run_cli, fixtures_dir):
    """Every gate of every cell of the zoo: counts are numpy's over the gate's values as torch
    reads them, the counts add up to the hidden size, and each table's range is its extremes."""
    path = fixtures_dir / "zoo.pt"
    state = torch.load(path, weights_only=True)
    document = inspect_json(run_cli, path)
    checked = 0
    for layer in document["layers"]:
        hidden, kind = layer["hidden_size"], layer["kind"]
        for cell in layer["cells"]:
            suffix = cell_suffix(kind, cell["layer"], cell["direction"])
            oracle = list(oracle_gates(state, f"{layer['name']}.", suffix, kind, hidden))
            everything = np.concatenate([a for gate in oracle for a in gate.arrays()])
            for gate, expected in zip(cell["gates"], oracle, strict=True):
                assert gate["gate"] == expected.name
                drawn = {
                    "histogram": expected.effective,
                    "histogram_ih": expected.b_in,
                    "histogram_hh": expected.b_hn,
                }
                for key, values in drawn.items():
                    if values is None:
                        assert gate[key] is None
                        continue
                    edges, counts = gate[key]["edges"], gate[key]["counts"]
                    assert len(edges) == len(counts) + 1 == BINS + 1
                    assert sum(counts) == hidden
                    assert (edges[0], edges[-1]) == (everything.min(), everything.max())
                    assert counts == np.histogram(values, bins=np.array(edges))[0].tolist()
                    checked += 1
    assert checked == 4 * 4 + 4 * 4 + 2 * 4 + 1 + 4 + 4 + 1  # new gates count twice


def test_inspect_without_hist_has_no_histogram_keys(run_cli, fixtures_dir):
    result = run_cli("inspect", fixtures_dir / "gru_biased.pt", "--json")
    gate = json.loads(result.stdout)["layers"][0]["cells"][0]["gates"][0]
    assert not any(key.startswith("histogram") for key in gate)


def test_a_gru_new_gate_gets_b_in_and_b_hn_apart(run_cli, fixtures_dir):
    document = inspect_json(run_cli, fixtures_dir / "gru_biased.pt")
    new = document["layers"][0]["cells"][0]["gates"][2]
    assert new["gate"] == "new"
    assert new["histogram"] is None
    assert sum(new["histogram_ih"]["counts"]) == sum(new["histogram_hh"]["counts"]) == 4
    reset = document["layers"][0]["cells"][0]["gates"][0]
    assert reset["histogram_ih"] is None and reset["histogram_hh"] is None


def test_a_layer_without_biases_has_no_histograms(run_cli, fixtures_dir):
    document = inspect_json(run_cli, fixtures_dir / "nobias.pt")
    for layer in document["layers"]:
        for gate in layer["cells"][0]["gates"]:
            assert gate["histogram"] is gate["histogram_ih"] is gate["histogram_hh"] is None


# --- Terminal: blocks, or ASCII where they cannot be encoded --------------------------------------


def test_inspect_hist_draws_blocks_in_utf8(surgeon, fixtures_dir):
    result = surgeon("inspect", fixtures_dir / "gru_biased.pt", "--hist")
    assert result.returncode == 0, result.stderr
    assert "distribution" in result.stdout
    assert any(block in result.stdout for block in BLOCKS)
    assert "b_in" in result.stdout and "b_hn" in result.stdout


def test_inspect_hist_falls_back_to_ascii(surgeon, fixtures_dir):
    result = surgeon(
        "inspect", fixtures_dir / "gru_biased.pt", "--hist", env={"PYTHONIOENCODING": "ascii"}
    )
    assert result.returncode == 0, result.stderr
    result.stdout.encode("ascii")  # nothing outside ASCII reached the stream
    assert any(level in result.stdout for level in ASCII_LEVELS[1:])


# --- diff --hist -----------------------------------------------------------------------------------


@pytest.fixture
def forget_set_to_one(fixture_copy, surgeon):
    """zoo.pt and a copy whose encoder forget gates see exactly 1."""
    source = fixture_copy("zoo.pt")
    edited = source.with_name("edited.pt")
    result = surgeon("set-forget-bias", source, "--layer", "encoder", "-o", edited)
    assert result.returncode == 0, result.stderr
    return source, edited


def test_diff_histograms_before_and_after_match_torch(run_cli, forget_set_to_one):
    source, edited = forget_set_to_one
    result = run_cli("diff", source, edited, "--hist", "--json")
    assert result.exit_code == 1, result.stderr
    document = json.loads(result.stdout)
    before = torch.load(source, weights_only=True)
    after = torch.load(edited, weights_only=True)
    effective_entries = [e for c in document["changed"] for e in c["effective"]]
    assert {entry["gate"] for entry in effective_entries} == {"forget"}
    for changed in document["changed"]:
        cell = changed["cell"]
        suffix = cell_suffix("LSTM", cell["layer"], cell["direction"])
        sides = [list(oracle_gates(s, "encoder.", suffix, "LSTM", 8)) for s in (before, after)]
        everything = np.concatenate([gate.effective for side in sides for gate in side])
        for entry in changed["effective"]:
            for name, side in zip(("before", "after"), sides, strict=True):
                histogram = entry["histogram"][name]
                edges = np.array(histogram["edges"])
                assert (edges[0], edges[-1]) == (everything.min(), everything.max())
                values = side[1].effective  # the forget gate
                assert histogram["counts"] == np.histogram(values, bins=edges)[0].tolist()
        after_counts = changed["effective"][0]["histogram"]["after"]["counts"]
        assert sorted(after_counts)[-1] == 8  # every unit sees exactly 1: one full bin


def test_diff_hist_draws_before_and_after_columns(surgeon, forget_set_to_one):
    source, edited = forget_set_to_one
    result = surgeon("diff", source, edited, "--hist")
    assert result.returncode == 1, result.stderr
    assert "before (hist)" in result.stdout and "after (hist)" in result.stdout
    plain = surgeon("diff", source, edited)
    assert "(hist)" not in plain.stdout
