"""`diff`: matching by name across formats, gate slicing, tolerances, prefixes, layer selection.

Every checkpoint here is a real file written by torch.save or safetensors, edited with torch, so the
tests check what a user would see after editing a model by hand.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rich.console import Console
from safetensors.torch import load_file, save_file

from lstm_surgeon import diff as diff_module
from lstm_surgeon.checkpoint import Checkpoint
from lstm_surgeon.diff import DiffError, DiffResult, diff_checkpoints, strip_key
from lstm_surgeon.formats import open_checkpoint
from lstm_surgeon.gates import gates_of
from lstm_surgeon.output import json_safe
from lstm_surgeon.render_diff import diff_view

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
ZOO_TENSORS = 63


def save(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """Write `tensors` with torch.save, or with safetensors when the suffix says so."""
    if path.suffix == ".safetensors":
        save_file({k: v.detach().clone().contiguous() for k, v in tensors.items()}, str(path))
    else:
        torch.save(tensors, path)
    return path


def diff(a: Path, b: Path, **options: Any) -> DiffResult:
    with open_checkpoint(a) as left, open_checkpoint(b) as right:
        return diff_checkpoints(left, right, **options)


def zoo() -> dict[str, torch.Tensor]:
    """The tensors of zoo.pt, as a fresh state dict to edit."""
    return {k: v.clone() for k, v in torch.load(FIXTURES / "zoo.pt").items()}


def edited_zoo(tmp_path: Path, suffix: str = ".pt", **edits: Any) -> Path:
    """zoo.pt with one edit per keyword (`key=lambda t: ...`, applied in place), saved anew."""
    tensors = zoo()
    for key, edit in edits.items():
        edit(tensors[key.replace("__", ".")])
    return save(tmp_path / f"edited{suffix}", tensors)


def changed_keys(result: DiffResult) -> list[str]:
    return [entry.key for entry in result.changed]


def only_change(result: DiffResult) -> dict[str, Any]:
    """The single changed entry, as JSON; fails when anything else differs."""
    assert not result.added and not result.removed
    assert len(result.changed) == 1, changed_keys(result)
    return result.changed[0].to_dict()


def rendered(result: DiffResult) -> str:
    console = Console(record=True, width=200)
    console.print(diff_view(result))
    return console.export_text()


# --- equality -------------------------------------------------------------------------------------


def test_zoo_pt_and_safetensors_are_identical() -> None:
    result = diff(FIXTURES / "zoo.pt", FIXTURES / "zoo.safetensors")
    assert result.identical
    assert result.unchanged_count == ZOO_TENSORS
    document = result.to_dict()
    assert document["identical"] is True
    assert (document["added"], document["removed"], document["changed"]) == ([], [], [])
    assert document["a"].endswith("zoo.pt") and document["b"].endswith("zoo.safetensors")


@pytest.mark.parametrize(
    "name",
    ["bf16.pt", "half.safetensors", "double.pt", "flat.pt", "training.pt", "lightning.ckpt"],
)
def test_a_file_equals_itself(name: str) -> None:
    result = diff(FIXTURES / name, FIXTURES / name)
    assert result.identical
    assert result.unchanged_count > 0


def test_zoo_resaved_in_the_other_format_is_identical(tmp_path: Path) -> None:
    result = diff(FIXTURES / "zoo.safetensors", save(tmp_path / "zoo.pt", zoo()))
    assert result.identical


def test_non_contiguous_tensor_equals_its_contiguous_copy(tmp_path: Path) -> None:
    base = torch.arange(24.0).reshape(4, 6)
    a = save(tmp_path / "a.pt", {"w": base.t()})  # stored with strides (1, 6)
    b = save(tmp_path / "b.safetensors", {"w": base.t().contiguous()})
    with open_checkpoint(a) as opened:
        assert not opened.tensors["w"].is_contiguous
    assert diff(a, b).identical
    edited = base.t().contiguous()
    edited[5, 3] += 1
    entry = only_change(diff(a, save(tmp_path / "c.pt", {"w": edited})))
    assert entry["max_abs_diff"] == 1.0


# --- recurrent tensors, sliced by gate ------------------------------------------------------------


def test_forget_gate_bias_edit_shows_only_the_forget_gate(tmp_path: Path) -> None:
    def edit(bias: torch.Tensor) -> None:
        bias[8:16] += 1  # LSTM hidden 8: rows 8..15 are the forget gate

    result = diff(FIXTURES / "zoo.pt", edited_zoo(tmp_path, encoder__bias_ih_l0=edit))
    entry = only_change(result)
    assert entry["key"] == "encoder.bias_ih_l0"
    assert entry["gates"] == ["forget"]
    assert entry["layer"] == "encoder" and entry["kind"] == "LSTM"
    assert entry["parameter"] == "bias_ih"
    assert entry["cell"] == {"layer": 0, "direction": "forward"}
    assert entry["dtype"] is None and entry["shape"] is None
    assert [g["gate"] for g in entry["gate_diffs"]] == ["input", "forget", "cell", "output"]
    assert [g["changed"] for g in entry["gate_diffs"]] == [False, True, False, False]
    assert entry["max_abs_diff"] == pytest.approx(1.0, abs=1e-6)
    assert entry["mean_abs_diff"] == pytest.approx(0.25, abs=1e-6)
    assert result.unchanged_count == ZOO_TENSORS - 1


def test_effective_bias_before_and_after(tmp_path: Path) -> None:
    def edit(bias: torch.Tensor) -> None:
        bias[8:16] += 1

    entry = only_change(diff(FIXTURES / "zoo.pt", edited_zoo(tmp_path, encoder__bias_hh_l0=edit)))
    tensors = zoo()
    before = (tensors["encoder.bias_ih_l0"] + tensors["encoder.bias_hh_l0"]).double()[8:16]
    edit(tensors["encoder.bias_hh_l0"])
    after = (tensors["encoder.bias_ih_l0"].double() + tensors["encoder.bias_hh_l0"].double())[8:16]
    (effective,) = entry["effective"]
    assert effective["gate"] == "forget"
    assert effective["before"]["mean"] == pytest.approx(float(before.mean()), abs=1e-6)
    assert effective["before"]["min"] == pytest.approx(float(before.min()), abs=1e-6)
    assert effective["after"]["max"] == pytest.approx(float(after.max()), abs=1e-6)
    assert effective["after"]["mean"] - effective["before"]["mean"] == pytest.approx(1.0, abs=1e-5)


def test_weight_ih_edit_is_sliced_by_gate(tmp_path: Path) -> None:
    def edit(weight: torch.Tensor) -> None:
        weight[16:24, 3] -= 0.5  # rows 16..23 of a hidden-8 LSTM: the cell gate

    path = edited_zoo(tmp_path, encoder__weight_ih_l1_reverse=edit)
    entry = only_change(diff(FIXTURES / "zoo.pt", path))
    assert entry["key"] == "encoder.weight_ih_l1_reverse"
    assert entry["gates"] == ["cell"]
    assert entry["cell"] == {"layer": 1, "direction": "reverse"}
    assert entry["effective"] == []
    cell_gate = entry["gate_diffs"][2]
    assert cell_gate["max_abs_diff"] == pytest.approx(0.5, abs=1e-6)
    assert cell_gate["mean_abs_diff"] == pytest.approx(0.5 / 16, abs=1e-6)  # 8 of 8x16 elements


def test_weight_hh_edit_in_two_gates(tmp_path: Path) -> None:
    def edit(weight: torch.Tensor) -> None:
        weight[0, 0] += 1  # input gate
        weight[31, 7] += 1  # output gate

    entry = only_change(diff(FIXTURES / "zoo.pt", edited_zoo(tmp_path, encoder__weight_hh_l0=edit)))
    assert entry["gates"] == ["input", "output"]


def test_weight_hr_has_no_gates(tmp_path: Path) -> None:
    def edit(weight: torch.Tensor) -> None:
        weight[1, 2] += 2

    entry = only_change(
        diff(FIXTURES / "zoo.pt", edited_zoo(tmp_path, projected__weight_hr_l1=edit))
    )
    assert entry["gates"] == [] and entry["gate_diffs"] == [] and entry["effective"] == []
    assert entry["parameter"] == "weight_hr"
    assert entry["layer"] == "projected"
    assert entry["max_abs_diff"] == pytest.approx(2.0, abs=1e-6)


def test_gru_new_gate_has_no_effective_bias(tmp_path: Path) -> None:
    def edit(bias: torch.Tensor) -> None:
        bias[10:15] += 1  # GRU hidden 5: rows 10..14 are the new gate

    entry = only_change(diff(FIXTURES / "zoo.pt", edited_zoo(tmp_path, gru__bias_hh_l1=edit)))
    assert entry["gates"] == ["new"]
    assert entry["effective"] == []
    assert "b_hn is multiplied by the reset gate" in rendered(
        diff(FIXTURES / "zoo.pt", tmp_path / "edited.pt")
    )


def test_gru_update_gate_has_an_effective_bias(tmp_path: Path) -> None:
    def edit(bias: torch.Tensor) -> None:
        bias[5:15] += 1  # update and new gates

    entry = only_change(diff(FIXTURES / "zoo.pt", edited_zoo(tmp_path, gru__bias_ih_l0=edit)))
    assert entry["gates"] == ["update", "new"]
    assert [effective["gate"] for effective in entry["effective"]] == ["update"]


def test_cell_module_reports_its_cell(tmp_path: Path) -> None:
    def edit(bias: torch.Tensor) -> None:
        bias[12] = 7.0  # LSTMCell hidden 4: row 12 is the output gate

    entry = only_change(diff(FIXTURES / "zoo.pt", edited_zoo(tmp_path, rnn__bias_hh=edit)))
    assert entry["kind"] == "LSTMCell"
    assert entry["gates"] == ["output"]
    assert entry["cell"] == {"layer": 0, "direction": "forward"}


def test_bfloat16_gate_edit(tmp_path: Path) -> None:
    tensors = torch.load(FIXTURES / "bf16.pt")
    tensors["gru.bias_ih_l0"][0:4] += 1  # GRU hidden 4: reset gate
    entry = only_change(diff(FIXTURES / "bf16.pt", save(tmp_path / "b.safetensors", tensors)))
    assert entry["key"] == "gru.bias_ih_l0"
    assert entry["gates"] == ["reset"]
    assert [effective["gate"] for effective in entry["effective"]] == ["reset"]


def test_other_tensor_gets_one_entry(tmp_path: Path) -> None:
    def edit(weight: torch.Tensor) -> None:
        weight[3] += 0.125

    entry = only_change(diff(FIXTURES / "zoo.pt", edited_zoo(tmp_path, embedding__weight=edit)))
    assert entry["key"] == "embedding.weight"
    assert entry["gates"] == [] and entry["gate_diffs"] == []
    assert entry["layer"] is None and entry["cell"] is None and entry["parameter"] is None
    assert entry["max_abs_diff"] == pytest.approx(0.125, abs=1e-6)
    assert entry["mean_abs_diff"] == pytest.approx(0.125 * 5 / 50, abs=1e-6)


# --- tolerances -----------------------------------------------------------------------------------


def one_change(
    tmp_path: Path, before: float, after: float, dtype: torch.dtype
) -> tuple[Path, Path]:
    a = torch.full((4,), before, dtype=dtype)
    b = a.clone()
    b[2] = after
    return save(tmp_path / "a.pt", {"x": a}), save(tmp_path / "b.pt", {"x": b})


def test_atol_edges(tmp_path: Path) -> None:
    a, b = one_change(tmp_path, 0.0, 1e-3, torch.float64)
    assert not diff(a, b).identical
    assert diff(a, b, atol=1e-3).identical
    result = diff(a, b, atol=9e-4)
    assert changed_keys(result) == ["x"]
    assert result.changed[0].max_abs_diff == 1e-3


def test_rtol_edges(tmp_path: Path) -> None:
    a, b = one_change(tmp_path, 1000.0, 1001.0, torch.float32)  # |a - b| = 1e-3 * |b|, nearly
    assert diff(a, b, rtol=1e-3).identical
    assert not diff(a, b, rtol=9e-4).identical


def test_within_tolerance_counts_as_unchanged(tmp_path: Path) -> None:
    a, b = one_change(tmp_path, 0.0, 1e-3, torch.float64)
    result = diff(a, b, atol=1e-2)
    assert result.unchanged_count == 1 and result.changed == ()


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_bad_tolerance_is_an_error(tmp_path: Path, bad: float) -> None:
    a, b = one_change(tmp_path, 0.0, 1.0, torch.float32)
    with pytest.raises(DiffError):
        diff(a, b, atol=bad)
    with pytest.raises(DiffError):
        diff(a, b, rtol=bad)


def test_nan_and_signed_zero(tmp_path: Path) -> None:
    nan = float("nan")
    a = save(tmp_path / "a.pt", {"x": torch.tensor([nan, 0.0, 1.0]), "y": torch.tensor([1.0])})
    b = save(tmp_path / "b.pt", {"x": torch.tensor([nan, -0.0, 1.0]), "y": torch.tensor([nan])})
    result = diff(a, b)
    entry = only_change(result)
    assert entry["key"] == "y"
    assert np.isnan(entry["max_abs_diff"])
    document = json.loads(json.dumps(json_safe(result.to_dict()), allow_nan=False))
    assert document["changed"][0]["max_abs_diff"] == "nan"


def test_infinities(tmp_path: Path) -> None:
    inf = float("inf")
    a = save(tmp_path / "a.pt", {"x": torch.tensor([inf, -inf]), "y": torch.tensor([inf])})
    b = save(tmp_path / "b.pt", {"x": torch.tensor([inf, -inf]), "y": torch.tensor([-inf])})
    entry = only_change(diff(a, b))
    assert entry["key"] == "y" and entry["max_abs_diff"] == inf


def test_large_integers_compare_exactly(tmp_path: Path) -> None:
    a = save(tmp_path / "a.pt", {"steps": torch.tensor([2**53], dtype=torch.int64)})
    b = save(tmp_path / "b.pt", {"steps": torch.tensor([2**53 + 1], dtype=torch.int64)})
    assert changed_keys(diff(a, b)) == ["steps"]
    assert diff(a, a).identical


def test_complex_imaginary_part_counts(tmp_path: Path) -> None:
    a = save(tmp_path / "a.pt", {"z": torch.tensor([1 + 2j], dtype=torch.complex64)})
    b = save(tmp_path / "b.pt", {"z": torch.tensor([1 + 3j], dtype=torch.complex64)})
    entry = only_change(diff(a, b))
    assert entry["max_abs_diff"] == pytest.approx(1.0)


# --- names, dtypes and shapes ---------------------------------------------------------------------


def test_added_and_removed_keys(tmp_path: Path) -> None:
    tensors = zoo()
    del tensors["lstm_head.bias"]
    tensors["extra.scale"] = torch.ones(3)
    result = diff(FIXTURES / "zoo.pt", save(tmp_path / "b.safetensors", tensors))
    assert result.removed == ("lstm_head.bias",)
    assert result.added == ("extra.scale",)
    assert result.changed == ()
    assert result.unchanged_count == ZOO_TENSORS - 1
    assert not result.identical


def test_dtype_change_is_a_change(tmp_path: Path) -> None:
    tensors = zoo()
    tensors["lstm_head.weight"] = tensors["lstm_head.weight"].double()  # same values
    tensors["embedding.weight"] = tensors["embedding.weight"].half()  # rounded values
    result = diff(FIXTURES / "zoo.pt", save(tmp_path / "b.pt", tensors))
    by_key = {entry.key: entry.to_dict() for entry in result.changed}
    assert set(by_key) == {"lstm_head.weight", "embedding.weight"}
    assert by_key["lstm_head.weight"]["dtype"] == ["float32", "float64"]
    assert by_key["lstm_head.weight"]["max_abs_diff"] == 0.0
    assert by_key["embedding.weight"]["dtype"] == ["float32", "float16"]
    assert by_key["embedding.weight"]["max_abs_diff"] > 0


def test_shape_change_is_a_change(tmp_path: Path) -> None:
    tensors = zoo()
    tensors["lstm_head.bias"] = torch.zeros(3)
    entry = only_change(diff(FIXTURES / "zoo.pt", save(tmp_path / "b.pt", tensors)))
    assert entry["shape"] == [[2], [3]]
    assert entry["max_abs_diff"] is None and entry["mean_abs_diff"] is None
    assert entry["gates"] == []


def test_recurrent_shape_change_has_no_gates(tmp_path: Path) -> None:
    tensors = zoo()
    tensors["encoder.bias_ih_l0"] = torch.zeros(36)
    entry = only_change(diff(FIXTURES / "zoo.pt", save(tmp_path / "b.pt", tensors)))
    assert entry["shape"] == [[32], [36]]
    assert entry["gates"] == [] and entry["gate_diffs"] == [] and entry["effective"] == []


# --- prefixes -------------------------------------------------------------------------------------


def test_strip_key() -> None:
    assert strip_key("module._orig_mod.lstm.bias", ("_orig_mod.", "module.")) == "lstm.bias"
    assert strip_key("model.lstm", ("module.",)) == "model.lstm"
    assert strip_key("module.", ("module.",)) == "module."


def unprefixed(path: Path, prefix: str, out: Path) -> Path:
    """The state dict in `path` saved again to `out` with `prefix` removed from its keys."""
    tensors = torch.load(path) if path.suffix == ".pt" else load_file(path)
    return save(out, {k.removeprefix(prefix): v for k, v in tensors.items()})


@pytest.mark.parametrize("prefix", ["module.", "module"])
def test_strip_prefixes_matches_ddp_with_plain(tmp_path: Path, prefix: str) -> None:
    plain = unprefixed(FIXTURES / "ddp.pt", "module.", tmp_path / "plain.safetensors")
    unstripped = diff(FIXTURES / "ddp.pt", plain)
    assert len(unstripped.added) == len(unstripped.removed) == 6
    result = diff(FIXTURES / "ddp.pt", plain, strip_prefixes=[prefix])
    assert result.identical and result.unchanged_count == 6


def test_strip_prefixes_keeps_gate_slicing(tmp_path: Path) -> None:
    tensors = torch.load(FIXTURES / "ddp.pt")
    plain = {k.removeprefix("module."): v.clone() for k, v in tensors.items()}
    plain["lstm.bias_hh_l0"][18:24] -= 3  # LSTM hidden 6: output gate
    result = diff(
        FIXTURES / "ddp.pt",
        save(tmp_path / "plain.pt", plain),
        strip_prefixes=["module.", "_orig_mod."],
    )
    entry = only_change(result)
    assert entry["key"] == "lstm.bias_hh_l0"
    assert entry["layer"] == "lstm"
    assert entry["gates"] == ["output"]


def test_compiled_prefix(tmp_path: Path) -> None:
    plain = unprefixed(FIXTURES / "compiled.safetensors", "_orig_mod.", tmp_path / "plain.pt")
    assert diff(plain, FIXTURES / "compiled.safetensors", strip_prefixes=["_orig_mod."]).identical


def test_names_that_clash_once_stripped_are_an_error(tmp_path: Path) -> None:
    path = save(tmp_path / "a.pt", {"module.x": torch.zeros(1), "x": torch.zeros(1)})
    with pytest.raises(DiffError, match=r"module\.x"):
        diff(path, path, strip_prefixes=["module."])


# --- layer selection ------------------------------------------------------------------------------


def test_layer_globs_restrict_to_matching_layers(tmp_path: Path) -> None:
    tensors = zoo()
    tensors["encoder.bias_ih_l1"][0] += 1
    tensors["gru.bias_ih_l0"][0] += 1
    tensors["embedding.weight"][0] += 1
    del tensors["elman.bias_hh_l0"]
    tensors["extra"] = torch.zeros(1)
    path = save(tmp_path / "b.pt", tensors)
    everything = diff(FIXTURES / "zoo.pt", path)
    assert len(everything.changed) == 3 and everything.added and everything.removed
    result = diff(FIXTURES / "zoo.pt", path, layer_globs=["enc*"])
    assert changed_keys(result) == ["encoder.bias_ih_l1"]
    assert result.added == () and result.removed == ()
    assert result.unchanged_count == 15  # 16 encoder tensors, one changed
    several = diff(FIXTURES / "zoo.pt", path, layer_globs=["gru", "elman"])
    assert changed_keys(several) == ["gru.bias_ih_l0"]
    assert several.removed == ("elman.bias_hh_l0",)


def test_layer_glob_matching_nothing_is_an_error() -> None:
    with pytest.raises(DiffError, match="no recurrent layer"):
        diff(FIXTURES / "zoo.pt", FIXTURES / "zoo.pt", layer_globs=["decoder*"])


def test_layer_glob_matches_stripped_name() -> None:
    result = diff(
        FIXTURES / "ddp.pt", FIXTURES / "ddp.pt", layer_globs=["lstm"], strip_prefixes=["module."]
    )
    assert result.identical and result.unchanged_count == 4


# --- bounded reading ------------------------------------------------------------------------------


def test_reads_only_tensors_on_both_sides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tensors = zoo()
    del tensors["embedding.weight"]
    tensors["extra"] = torch.zeros(2)
    path = save(tmp_path / "b.pt", tensors)
    read: list[str] = []
    original = Checkpoint.raw

    def recording_raw(self: Checkpoint, ref: Any) -> np.ndarray:
        read.append(ref if isinstance(ref, str) else ref.name)
        return original(self, ref)

    monkeypatch.setattr(Checkpoint, "raw", recording_raw)
    result = diff(FIXTURES / "zoo.pt", path)
    assert result.removed == ("embedding.weight",) and result.added == ("extra",)
    assert "embedding.weight" not in read and "extra" not in read


def test_chunked_comparison_gives_the_same_answer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def edit(weight: torch.Tensor) -> None:
        weight[8:16] += torch.linspace(-1, 1, 16)  # every element of the forget gate moves

    path = edited_zoo(tmp_path, encoder__weight_ih_l1=edit)
    whole = only_change(diff(FIXTURES / "zoo.pt", path))
    monkeypatch.setattr(diff_module, "CHUNK_ELEMENTS", 7)
    chunked = only_change(diff(FIXTURES / "zoo.pt", path))
    assert chunked["gates"] == whole["gates"] == ["forget"]
    assert chunked["max_abs_diff"] == whole["max_abs_diff"]
    assert chunked["mean_abs_diff"] == pytest.approx(whole["mean_abs_diff"], rel=1e-12)
    for left, right in zip(chunked["gate_diffs"], whole["gate_diffs"], strict=True):
        assert left["max_abs_diff"] == right["max_abs_diff"]
        assert left["mean_abs_diff"] == pytest.approx(right["mean_abs_diff"], rel=1e-12)


# --- JSON and rendering ---------------------------------------------------------------------------


ENTRY_KEYS = {
    "key",
    "gates",
    "max_abs_diff",
    "mean_abs_diff",
    "layer",
    "kind",
    "parameter",
    "cell",
    "dtype",
    "shape",
    "gate_diffs",
    "effective",
}


def test_json_keys_are_stable(tmp_path: Path) -> None:
    tensors = zoo()
    tensors["encoder.bias_ih_l0"][9] += 1
    tensors["lstm_head.bias"] = torch.zeros(3)
    result = diff(FIXTURES / "zoo.pt", save(tmp_path / "b.pt", tensors))
    document = json.loads(json.dumps(json_safe(result.to_dict()), allow_nan=False))
    assert set(document) >= {
        "identical",
        "a",
        "b",
        "added",
        "removed",
        "changed",
        "unchanged_count",
    }
    for entry in document["changed"]:
        assert set(entry) == ENTRY_KEYS
    for effective in document["changed"][0]["effective"]:
        assert set(effective) == {"gate", "before", "after"}
        assert set(effective["before"]) == {"mean", "min", "max"}


def test_render_shows_changes_and_summary(tmp_path: Path) -> None:
    tensors = zoo()
    tensors["encoder.bias_ih_l0"][8:16] += 1
    tensors["gru.weight_hh_l0"][0] += 1
    del tensors["embedding.weight"]
    tensors["extra.scale"] = torch.ones(1)
    text = rendered(diff(FIXTURES / "zoo.pt", save(tmp_path / "b.pt", tensors)))
    assert "encoder.bias_ih_l0" in text and "forget" in text
    assert "gru.weight_hh_l0" in text and "reset" in text
    assert "effective bias" in text
    assert "- embedding.weight" in text and "+ extra.scale" in text
    assert f"{ZOO_TENSORS - 3} tensors identical" in text
    assert "different: 2 changed, 1 added, 1 removed" in text


def test_render_identical() -> None:
    text = rendered(diff(FIXTURES / "zoo.pt", FIXTURES / "zoo.safetensors"))
    assert "identical" in text and f"{ZOO_TENSORS} tensors identical" in text


def test_render_does_not_interpret_markup_in_names(tmp_path: Path) -> None:
    a = save(tmp_path / "a.pt", {"[bold]x[/bold]": torch.zeros(1), "esc\x1b[31m": torch.zeros(1)})
    b = save(tmp_path / "b.pt", {"[bold]x[/bold]": torch.ones(1), "[red]new": torch.zeros(1)})
    text = rendered(diff(a, b))
    assert "[bold]x[/bold]" in text
    assert "+ [red]new" in text
    assert "- esc\\x1b[31m" in text
    assert "\x1b" not in text


# --- property: one perturbed gate is reported as exactly that gate --------------------------------


@st.composite
def perturbations(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(["LSTM", "GRU"]))
    hidden = draw(st.integers(1, 5))
    config = {
        "kind": kind,
        "input_size": draw(st.integers(1, 4)),
        "hidden": hidden,
        "num_layers": draw(st.integers(1, 2)),
        "bidirectional": draw(st.booleans()),
        "proj": draw(st.integers(0, hidden - 1)) if kind == "LSTM" else 0,
        "seed": draw(st.integers(0, 2**16)),
    }
    config["layer"] = draw(st.integers(0, config["num_layers"] - 1))
    config["reverse"] = config["bidirectional"] and draw(st.booleans())
    config["parameter"] = draw(st.sampled_from(["weight_ih", "weight_hh", "bias_ih", "bias_hh"]))
    config["gate"] = draw(st.integers(0, (4 if kind == "LSTM" else 3) - 1))
    config["row"] = draw(st.integers(0, hidden - 1))
    config["column"] = draw(st.integers(0, 64))  # reduced modulo the weight's width
    config["delta"] = draw(st.sampled_from([-2.0, -0.5, 0.25, 3.0]))
    config["suffix"] = draw(st.sampled_from([".pt", ".safetensors"]))
    return config


def build(config: dict[str, Any]) -> dict[str, torch.Tensor]:
    torch.manual_seed(config["seed"])
    options = {"num_layers": config["num_layers"], "bidirectional": config["bidirectional"]}
    if config["kind"] == "LSTM":
        module = torch.nn.LSTM(
            config["input_size"], config["hidden"], proj_size=config["proj"], **options
        )
    else:
        module = torch.nn.GRU(config["input_size"], config["hidden"], **options)
    return {f"net.rnn.{k}": v.detach().clone() for k, v in module.state_dict().items()}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(perturbations())
def test_a_perturbed_gate_is_reported_exactly(config: dict[str, Any]) -> None:
    tensors = build(config)
    original = {key: tensor.clone() for key, tensor in tensors.items()}  # one init, not two
    suffix = "_reverse" if config["reverse"] else ""
    key = f"net.rnn.{config['parameter']}_l{config['layer']}{suffix}"
    row = config["gate"] * config["hidden"] + config["row"]
    with torch.no_grad():
        target = tensors[key]
        if target.dim() == 1:
            target[row] += config["delta"]
        else:
            target[row, config["column"] % target.shape[1]] += config["delta"]
    gate = gates_of(config["kind"])[config["gate"]]
    with tempfile.TemporaryDirectory() as folder:
        a = save(Path(folder) / "a.pt", original)
        b = save(Path(folder) / f"b{config['suffix']}", tensors)
        result = diff(a, b)
    entry = only_change(result)
    assert (entry["key"], entry["gates"]) == (key, [gate.name])
    assert entry["layer"] == "net.rnn"
    expected_direction = "reverse" if config["reverse"] else "forward"
    assert entry["cell"] == {"layer": config["layer"], "direction": expected_direction}
    assert entry["max_abs_diff"] == pytest.approx(abs(config["delta"]), rel=1e-5)
    is_bias = config["parameter"].startswith("bias")
    expected_effective = [gate.name] if is_bias and gate.biases_sum else []
    assert [effective["gate"] for effective in entry["effective"]] == expected_effective
    for effective in entry["effective"]:
        shift = effective["after"]["mean"] - effective["before"]["mean"]
        assert shift == pytest.approx(config["delta"] / config["hidden"], abs=1e-5)


# --- command line (skipped until `diff` is wired into cli.py) -------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lstm_surgeon", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "LSTM_SURGEON_DEBUG": "0"},
        check=False,
    )


@pytest.fixture(scope="module")
def cli() -> Iterator[None]:
    if run_cli("diff", "--help").returncode != 0:
        pytest.skip("the diff command is not wired into the CLI yet")
    yield


@pytest.mark.usefixtures("cli")
def test_cli_identical_exits_0() -> None:
    done = run_cli("diff", str(FIXTURES / "zoo.pt"), str(FIXTURES / "zoo.safetensors"))
    assert done.returncode == 0, done.stderr
    assert f"{ZOO_TENSORS} tensors identical" in done.stdout


@pytest.mark.usefixtures("cli")
def test_cli_different_exits_1(tmp_path: Path) -> None:
    def edit(bias: torch.Tensor) -> None:
        bias[8:16] += 1

    path = edited_zoo(tmp_path, encoder__bias_ih_l0=edit)
    done = run_cli("diff", str(FIXTURES / "zoo.pt"), str(path))
    assert done.returncode == 1, done.stderr
    assert "encoder.bias_ih_l0" in done.stdout and "forget" in done.stdout


@pytest.mark.usefixtures("cli")
def test_cli_json_is_the_only_stdout(tmp_path: Path) -> None:
    def edit(bias: torch.Tensor) -> None:
        bias[8:16] += 1

    path = edited_zoo(tmp_path, encoder__bias_ih_l0=edit)
    done = run_cli("diff", str(FIXTURES / "zoo.pt"), str(path), "--json")
    assert done.returncode == 1, done.stderr
    document = json.loads(done.stdout)
    assert document["identical"] is False
    assert [(c["key"], c["gates"]) for c in document["changed"]] == [
        ("encoder.bias_ih_l0", ["forget"])
    ]


@pytest.mark.usefixtures("cli")
def test_cli_options(tmp_path: Path) -> None:
    a, b = one_change(tmp_path, 0.0, 1e-3, torch.float64)
    assert run_cli("diff", str(a), str(b)).returncode == 1
    assert run_cli("diff", str(a), str(b), "--atol", "1e-3").returncode == 0
    plain = unprefixed(FIXTURES / "ddp.pt", "module.", tmp_path / "plain.pt")
    ddp = str(FIXTURES / "ddp.pt")
    assert run_cli("diff", ddp, str(plain)).returncode == 1
    assert run_cli("diff", ddp, str(plain), "--strip-prefix", "module.").returncode == 0
    done = run_cli(
        "diff", ddp, str(plain), "--strip-prefix", "module.", "--layer", "lstm", "--json"
    )
    assert done.returncode == 0 and json.loads(done.stdout)["unchanged_count"] == 4


@pytest.mark.usefixtures("cli")
def test_cli_errors_exit_2(tmp_path: Path) -> None:
    done = run_cli("diff", str(FIXTURES / "zoo.pt"), str(tmp_path / "missing.pt"))
    assert done.returncode == 2
    assert "no such file" in done.stderr
    done = run_cli("diff", str(FIXTURES / "zoo.pt"), str(FIXTURES / "zoo.pt"), "--layer", "nope")
    assert done.returncode == 2 and done.stdout == ""
