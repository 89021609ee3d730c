"""Writing edits: patches touch only the patched bytes, rewrites keep everything else, inputs are safe.

The zip layout is read here with `zipfile` and `struct` (not lstm-surgeon's reader), and values are
compared with what torch loads.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import pickle
import stat
import struct
import zipfile
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import TorchReference
from safetensors.torch import load_file
from torch import nn

from lstm_surgeon.apply import Destination, WriteResult, edit_checkpoint
from lstm_surgeon.checkpoint import Checkpoint
from lstm_surgeon.errors import EditError, OutputError
from lstm_surgeon.plan import EditPlan
from lstm_surgeon.surgery import (
    plan_add_bias,
    plan_set_forget_bias,
    plan_set_gate_bias,
    plan_zero_bias,
)

Planner = Callable[[Checkpoint], EditPlan]
# LSTM biases of zoo.pt with their hidden sizes (torch gate order [i, f, g, o]: f is rows H:2H).
ZOO_LSTM_BIASES = {
    **{
        f"encoder.{p}_l{k}{d}": 8
        for p in ("bias_ih", "bias_hh")
        for k in (0, 1)
        for d in ("", "_reverse")
    },
    **{
        f"projected.{p}_l{k}{d}": 6
        for p in ("bias_ih", "bias_hh")
        for k in (0, 1)
        for d in ("", "_reverse")
    },
    "rnn.bias_ih": 4,
    "rnn.bias_hh": 4,
}


# --- Helpers ----------------------------------------------------------------------------------


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_edit(
    source: Path,
    planner: Planner,
    output: Path | None = None,
    **destination: Any,
) -> tuple[EditPlan, WriteResult]:
    plan, result = edit_checkpoint(source, planner, Destination(output=output, **destination))
    assert result is not None
    return plan, result


def load(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=False)


def raw_bytes(tensor: torch.Tensor) -> bytes:
    tensor = tensor.detach().contiguous()
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.view(torch.int16)
    return tensor.numpy().tobytes()


def assert_same_tree(actual: Any, expected: Any, where: str = "") -> None:
    """Same containers, keys in the same order, equal plain values, bit-identical tensors."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), where
        assert (actual.dtype, actual.shape) == (expected.dtype, expected.shape), where
        assert raw_bytes(actual) == raw_bytes(expected), where
    elif isinstance(expected, Mapping):
        assert list(actual) == list(expected), where
        for key, value in expected.items():
            assert_same_tree(actual[key], value, f"{where}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert type(actual) is type(expected) and len(actual) == len(expected), where
        for index, (ours, theirs) in enumerate(zip(actual, expected, strict=True)):
            assert_same_tree(ours, theirs, f"{where}.{index}")
    else:
        assert actual == expected, where


def with_forget_set(tensors: Mapping[str, torch.Tensor], biases: Mapping[str, int], value: float):
    """Torch's own slicing: b_ih[f] = value, b_hh[f] = 0 (the `effective` mode)."""
    expected = {name: tensor.clone() for name, tensor in tensors.items()}
    with torch.no_grad():
        for name, hidden in biases.items():
            expected[name][hidden : 2 * hidden] = (
                value if name.rpartition(".")[2].startswith("bias_ih") else 0.0
            )
    return expected


@dataclass(frozen=True)
class ZipEntry:
    data_start: int
    size: int
    crc_fields: tuple[int, ...]  # local header, central directory, data descriptor (if any)


def zip_entries(data: bytes) -> dict[str, ZipEntry]:
    """Each record's data span and every place its CRC-32 is stored, read with zipfile/struct."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        infos = archive.infolist()
        position = archive.start_dir
    central: dict[str, int] = {}
    while data[position : position + 4] == b"PK\x01\x02":
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", data, position + 28)
        central[data[position + 46 : position + 46 + name_len].decode()] = position + 16
        position += 46 + name_len + extra_len + comment_len
    entries = {}
    for info in infos:
        name_len, extra_len = struct.unpack_from("<HH", data, info.header_offset + 26)
        start = info.header_offset + 30 + name_len + extra_len
        fields = [info.header_offset + 14, central[info.filename]]
        if info.flag_bits & 0x08:
            descriptor = start + info.compress_size
            if data[descriptor : descriptor + 4] == b"PK\x07\x08":
                descriptor += 4
            fields.append(descriptor)
        entries[info.filename] = ZipEntry(start, info.file_size, tuple(fields))
    return entries


def zip_records(data: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def differing_offsets(before: bytes, after: bytes) -> np.ndarray:
    assert len(before) == len(after)
    return np.flatnonzero(np.frombuffer(before, np.uint8) != np.frombuffer(after, np.uint8))


def storage_records(path: Path, names: set[str]) -> set[str]:
    """The zip records holding the storages of tensors `names`, matched by content with torch."""
    tensors = TorchReference.flatten(load(path))
    records = zip_records(path.read_bytes())
    found = set()
    for name in names:
        storage = bytes(tensors[name].untyped_storage())
        matches = [record for record, content in records.items() if content == storage]
        assert len(matches) == 1, name
        found.add(matches[0])
    return found


def assert_patched_only(before: bytes, after: bytes, patched: set[str]) -> None:
    """Only the data of the `patched` records and their CRC-32 fields differ; the rest of the zip
    is byte-identical, and every stored CRC-32 is right."""
    entries_before, entries_after = zip_entries(before), zip_entries(after)
    assert entries_after == entries_before
    records_before, records_after = zip_records(before), zip_records(after)
    assert list(records_after) == list(records_before)
    changed = {name for name in records_before if records_before[name] != records_after[name]}
    assert changed == patched
    allowed = np.zeros(len(before), dtype=bool)
    for name in patched:
        entry = entries_after[name]
        allowed[entry.data_start : entry.data_start + entry.size] = True
        for field in entry.crc_fields:
            allowed[field : field + 4] = True
    assert allowed[differing_offsets(before, after)].all()
    with zipfile.ZipFile(io.BytesIO(after)) as archive:
        assert archive.testzip() is None
    for name, entry in entries_after.items():
        crc = zlib.crc32(records_after[name])
        for field in entry.crc_fields[1:]:  # the local header's is 0 (flag 0x08: descriptor used)
            assert struct.unpack_from("<I", after, field)[0] == crc, name


def safetensors_header(data: bytes) -> tuple[int, dict[str, Any]]:
    (length,) = struct.unpack_from("<Q", data)
    return 8 + length, json.loads(data[8 : 8 + length])


# --- Same-structure edits are patches ---------------------------------------------------------


def test_pt_patch_changes_only_the_patched_storages_and_their_crcs(fixtures_dir, tmp_path):
    source, output = fixtures_dir / "zoo.pt", tmp_path / "out.pt"
    _, result = run_edit(source, lambda ck: plan_set_forget_bias(ck, 1.0), output)
    assert (result.method, result.format, result.written) == ("patch", "pt", True)
    before, after = source.read_bytes(), output.read_bytes()
    assert len(after) == len(before)
    patched = storage_records(source, set(ZOO_LSTM_BIASES))
    assert len(patched) == len(ZOO_LSTM_BIASES)
    assert not any(name.endswith("data.pkl") for name in patched)
    assert_patched_only(before, after, patched)
    expected = with_forget_set(TorchReference.flatten(load(source)), ZOO_LSTM_BIASES, 1.0)
    assert_same_tree(load(output), expected)


def test_shared_storage_stays_shared_after_a_patch(fixtures_dir, tmp_path):
    source, output = fixtures_dir / "flat.pt", tmp_path / "out.pt"
    run_edit(source, lambda ck: plan_set_forget_bias(ck, 1.0), output)
    loaded = torch.load(output, weights_only=True)
    assert len({tensor.untyped_storage().data_ptr() for tensor in loaded.values()}) == 1
    biases = {name: 4 for name in loaded if ".bias_" in name}
    assert len(biases) == 8
    assert_same_tree(loaded, with_forget_set(torch.load(source, weights_only=True), biases, 1.0))
    assert_patched_only(
        source.read_bytes(), output.read_bytes(), storage_records(source, {"lstm.bias_ih_l0"})
    )


@pytest.mark.parametrize(
    "planner",
    [lambda ck: plan_set_forget_bias(ck, 1.0), lambda ck: plan_zero_bias(ck, drop=True)],
    ids=["patch", "rewrite"],
)
def test_output_keeps_the_input_file_mode(fixture_copy, tmp_path, planner):
    source = fixture_copy("zoo.pt")
    source.chmod(0o640)
    output = tmp_path / "out.pt"
    run_edit(source, planner, output)
    assert stat.S_IMODE(output.stat().st_mode) == 0o640


def test_patch_works_on_files_weights_only_refuses(fixtures_dir, tmp_path):
    source, output = fixtures_dir / "unsafe_objects.pt", tmp_path / "out.pt"
    with pytest.raises(pickle.UnpicklingError):
        torch.load(source, weights_only=True)
    _, result = run_edit(source, lambda ck: plan_set_forget_bias(ck, 1.0), output)
    assert result.method == "patch"
    original, edited = load(source), load(output)
    assert edited["args"] == argparse.Namespace(lr=0.1, hidden=4)
    assert edited["note"] == "x"
    expected = dict(original)
    expected["model"] = with_forget_set(original["model"], {"bias_ih_l0": 4, "bias_hh_l0": 4}, 1.0)
    assert_same_tree(edited, expected)
    patched = storage_records(source, {"model.bias_ih_l0", "model.bias_hh_l0"})
    assert_patched_only(source.read_bytes(), output.read_bytes(), patched)


def forget_spans(data: bytes, biases: Mapping[str, int]) -> np.ndarray:
    """A mask of the bytes of each bias's forget rows in a safetensors file."""
    data_start, header = safetensors_header(data)
    mask = np.zeros(len(data), dtype=bool)
    for name, hidden in biases.items():
        begin = data_start + header[name]["data_offsets"][0]
        itemsize = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}[header[name]["dtype"]]
        mask[begin + hidden * itemsize : begin + 2 * hidden * itemsize] = True
    return mask


def test_safetensors_patch_changes_only_the_target_rows(fixtures_dir, tmp_path):
    source, output = fixtures_dir / "zoo.safetensors", tmp_path / "out.safetensors"
    _, result = run_edit(source, lambda ck: plan_set_forget_bias(ck, 1.0), output)
    assert result.method == "patch"
    before, after = source.read_bytes(), output.read_bytes()
    header_end, _ = safetensors_header(before)
    assert after[:header_end] == before[:header_end]
    spans = forget_spans(before, ZOO_LSTM_BIASES)
    differ = differing_offsets(before, after)
    assert spans[differ].all()
    bias_ih_spans = forget_spans(before, {k: v for k, v in ZOO_LSTM_BIASES.items() if "ih" in k})
    assert bias_ih_spans[differ].sum() > 0
    assert_same_tree(
        load_file(str(output)), with_forget_set(load_file(str(source)), ZOO_LSTM_BIASES, 1.0)
    )


def test_in_place_patch_of_pt_with_backup(fixture_copy, fixtures_dir, tmp_path):
    path = fixture_copy("zoo.pt")
    original = path.read_bytes()
    _, result = run_edit(path, lambda ck: plan_set_forget_bias(ck, 1.0), in_place=True, backup=True)
    assert (result.method, result.in_place) == ("patch", True)
    backup = Path(result.backup)
    assert backup == path.with_name("zoo.pt.bak")
    assert backup.read_bytes() == original
    after = path.read_bytes()
    assert len(after) == len(original)
    assert_patched_only(original, after, storage_records(backup, set(ZOO_LSTM_BIASES)))
    expected = with_forget_set(TorchReference.flatten(load(backup)), ZOO_LSTM_BIASES, 1.0)
    assert_same_tree(load(path), expected)
    assert sorted(item.name for item in tmp_path.iterdir()) == ["zoo.pt", "zoo.pt.bak"]


def test_in_place_patch_of_safetensors(fixture_copy, tmp_path):
    path = fixture_copy("zoo.safetensors")
    original = path.read_bytes()
    run_edit(path, lambda ck: plan_set_forget_bias(ck, 1.0), in_place=True)
    after = path.read_bytes()
    header_end, _ = safetensors_header(original)
    assert after[:header_end] == original[:header_end]
    assert forget_spans(original, ZOO_LSTM_BIASES)[differing_offsets(original, after)].all()
    assert [item.name for item in tmp_path.iterdir()] == ["zoo.safetensors"]


def test_backup_is_not_overwritten_without_force(fixture_copy):
    path = fixture_copy("zoo.pt")
    old_backup = path.with_name("zoo.pt.bak")
    old_backup.write_bytes(b"an older backup")
    original = path.read_bytes()
    with pytest.raises(OutputError, match="--force"):
        run_edit(path, lambda ck: plan_set_forget_bias(ck, 1.0), in_place=True, backup=True)
    assert old_backup.read_bytes() == b"an older backup"
    assert path.read_bytes() == original


def test_in_place_edit_keeps_the_file_format_whatever_its_suffix(fixture_copy, fixtures_dir):
    path = fixture_copy("zoo.safetensors", name="model.pt")
    run_edit(path, lambda ck: plan_set_forget_bias(ck, 1.0), in_place=True)
    data = path.read_bytes()
    assert not data.startswith(b"PK")
    original = (fixtures_dir / "zoo.safetensors").read_bytes()
    header_end, _ = safetensors_header(original)
    assert data[:header_end] == original[:header_end]


# --- Structure-changing edits keep metadata, order and containers ----------------------------


def test_drop_keeps_safetensors_metadata_and_key_order(fixtures_dir, tmp_path):
    source, output = fixtures_dir / "zoo.safetensors", tmp_path / "out.safetensors"
    _, result = run_edit(source, lambda ck: plan_zero_bias(ck, drop=True), output)
    assert result.method == "rewrite"
    _, before = safetensors_header(source.read_bytes())
    _, after = safetensors_header(output.read_bytes())
    assert after["__metadata__"] == before["__metadata__"] == {"format": "pt"}
    recurrent = ("encoder.", "projected.", "gru.", "elman.", "rnn.", "gru_cell.", "rnn_cell.")
    kept = [k for k in before if not (k.startswith(recurrent) and ".bias_" in k)]
    assert list(after) == kept
    tensors_before = load_file(str(source))
    assert_same_tree(load_file(str(output)), {k: tensors_before[k] for k in kept[1:]})


def test_add_bias_places_biases_after_weight_hh_in_safetensors(fixtures_dir, tmp_path):
    source, output = fixtures_dir / "nobias.safetensors", tmp_path / "out.safetensors"
    run_edit(source, lambda ck: plan_add_bias(ck), output)
    _, header = safetensors_header(output.read_bytes())
    assert header["__metadata__"] == {"format": "pt"}
    keys = list(header)
    for weight_hh in ("cell.weight_hh", "lstm.weight_hh_l0"):
        bias_ih = weight_hh.replace("weight_hh", "bias_ih")
        bias_hh = weight_hh.replace("weight_hh", "bias_hh")
        position = keys.index(weight_hh)
        assert keys[position + 1 : position + 3] == [bias_ih, bias_hh]
    assert len(keys) == 1 + 8


def test_add_bias_in_pt_follows_torch_key_order(fixtures_dir, tmp_path):
    source, output = fixtures_dir / "nobias.pt", tmp_path / "out.pt"
    run_edit(source, lambda ck: plan_add_bias(ck), output)
    loaded = torch.load(output, weights_only=True)
    expected_keys = [f"lstm.{k}" for k in nn.LSTM(3, 4).state_dict()] + [
        f"cell.{k}" for k in nn.GRUCell(3, 4).state_dict()
    ]
    assert list(loaded) == expected_keys
    original = torch.load(source, weights_only=True)
    for name, tensor in original.items():
        assert raw_bytes(loaded[name]) == raw_bytes(tensor)


def test_add_bias_to_projected_bidirectional_stack_follows_torch_order(tmp_checkpoint, tmp_path):
    torch.manual_seed(0)
    bias_free = nn.LSTM(3, 4, proj_size=2, num_layers=2, bidirectional=True, bias=False)
    head = nn.Linear(4, 1)
    state = {f"module.rnn.{k}": v for k, v in bias_free.state_dict().items()}
    state |= {f"module.head.{k}": v for k, v in head.state_dict().items()}
    source = tmp_checkpoint(state, "in.pt")
    output = tmp_path / "out.pt"
    run_edit(source, lambda ck: plan_add_bias(ck), output)
    loaded = torch.load(output, weights_only=True)
    biased = nn.LSTM(3, 4, proj_size=2, num_layers=2, bidirectional=True)
    expected_order = [f"module.rnn.{k}" for k in biased.state_dict()] + [
        "module.head.weight",
        "module.head.bias",
    ]
    assert list(loaded) == expected_order
    biased.load_state_dict(
        {k.removeprefix("module.rnn."): v for k, v in loaded.items() if ".rnn." in k}, strict=True
    )
    x = torch.randn(5, 2, 3)
    for ours, theirs in zip(biased(x)[0], bias_free(x)[0], strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)  # two modules


def test_drop_keeps_the_training_container(fixtures_dir, tmp_path):
    source, output = fixtures_dir / "training.pt", tmp_path / "out.pt"
    plan, _ = run_edit(source, lambda ck: plan_zero_bias(ck, drop=True), output)
    assert any("no longer matches" in note for note in plan.notes)
    original, edited = load(source), load(output)
    expected = dict(original)
    expected["model_state_dict"] = {
        k: v for k, v in original["model_state_dict"].items() if not k.startswith("lstm.bias")
    }
    assert_same_tree(edited, expected)
    assert (edited["epoch"], edited["loss"]) == (3, 0.25)


def test_drop_keeps_every_lightning_key(fixtures_dir, tmp_path):
    source, output = fixtures_dir / "lightning.ckpt", tmp_path / "out.ckpt"
    run_edit(source, lambda ck: plan_zero_bias(ck, drop=True), output)
    original, edited = load(source), load(output)
    expected = dict(original)
    expected["state_dict"] = {
        k: v
        for k, v in original["state_dict"].items()
        if not k.startswith(("model.lstm.bias", "model.rnn.bias"))
    }
    assert_same_tree(edited, expected)
    assert edited["hyper_parameters"] == {"hidden": 6}
    assert "model.head.bias" in edited["state_dict"]


def test_structure_change_of_a_file_with_foreign_objects_keeps_them(fixtures_dir, tmp_path):
    source, output = fixtures_dir / "unsafe_objects.pt", tmp_path / "out.pt"
    run_edit(source, lambda ck: plan_zero_bias(ck, drop=True), output)
    original, edited = load(source), load(output)
    expected = dict(original)
    expected["model"] = {k: v for k, v in original["model"].items() if not k.startswith("bias")}
    assert_same_tree(edited, expected)
    assert edited["args"] == argparse.Namespace(lr=0.1, hidden=4)
    with pytest.raises(pickle.UnpicklingError):  # still refused by weights_only, as the source is
        torch.load(output, weights_only=True)


def test_drop_optimizer_state_removes_it_and_keeps_the_rest(fixtures_dir, tmp_path):
    source, output = fixtures_dir / "training.pt", tmp_path / "out.pt"
    plan, _ = run_edit(
        source, lambda ck: plan_zero_bias(ck, drop=True, drop_optimizer_state=True), output
    )
    assert any("removed" in note for note in plan.notes)
    edited = torch.load(output, weights_only=True)
    assert list(edited) == ["model_state_dict", "epoch", "loss"]
    assert (edited["epoch"], edited["loss"]) == (3, 0.25)


def test_same_structure_edit_notes_stale_optimizer_moments(fixtures_dir, tmp_path):
    plan, result = run_edit(
        fixtures_dir / "training.pt", lambda ck: plan_set_forget_bias(ck, 1.0), tmp_path / "o.pt"
    )
    assert result.method == "patch"
    assert len(plan.notes) == 1 and "unchanged" in plan.notes[0]
    edited = torch.load(tmp_path / "o.pt", weights_only=True)
    original = torch.load(fixtures_dir / "training.pt", weights_only=True)
    assert_same_tree(edited["optimizer_state_dict"], original["optimizer_state_dict"])


# --- Converting between formats ---------------------------------------------------------------


def test_pt_state_dict_converts_to_safetensors(fixtures_dir, tmp_path):
    source, output = fixtures_dir / "zoo.pt", tmp_path / "out.safetensors"
    _, result = run_edit(source, lambda ck: plan_set_forget_bias(ck, 1.0), output)
    assert (result.format, result.method) == ("safetensors", "rewrite")
    original = torch.load(source, weights_only=True)
    expected = with_forget_set(original, ZOO_LSTM_BIASES, 1.0)
    converted = load_file(str(output))
    assert sorted(converted) == sorted(expected)
    for name, tensor in expected.items():
        assert raw_bytes(converted[name]) == raw_bytes(tensor), name
    _, header = safetensors_header(output.read_bytes())
    assert [k for k in header if k != "__metadata__"] == list(original)


def test_training_checkpoint_does_not_convert_to_safetensors(fixtures_dir, tmp_path):
    output = tmp_path / "out.safetensors"
    with pytest.raises(EditError, match="plain state dict"):
        run_edit(fixtures_dir / "training.pt", lambda ck: plan_set_forget_bias(ck), output)
    assert list(tmp_path.iterdir()) == []


def test_safetensors_converts_to_pt(fixtures_dir, tmp_path):
    source, output = fixtures_dir / "zoo.safetensors", tmp_path / "out.pt"
    run_edit(source, lambda ck: plan_set_gate_bias(ck, "update", -2.0), output)
    converted = torch.load(output, weights_only=True)
    expected = {name: tensor.clone() for name, tensor in load_file(str(source)).items()}
    with torch.no_grad():
        for layer, hidden in (("gru", 5), ("gru_cell", 4)):
            for name in expected:
                if name.startswith(f"{layer}.bias_ih"):
                    expected[name][hidden : 2 * hidden] = -2.0
                elif name.startswith(f"{layer}.bias_hh"):
                    expected[name][hidden : 2 * hidden] = 0.0
    assert_same_tree(converted, expected)


# --- The input is never harmed; outputs are checked before writing -----------------------------


@pytest.mark.parametrize(
    "planner",
    [lambda ck: plan_set_forget_bias(ck, 1.0), lambda ck: plan_zero_bias(ck, drop=True)],
    ids=["patch", "rewrite"],
)
def test_output_never_modifies_the_input(fixture_copy, tmp_path, planner):
    source = fixture_copy("zoo.pt")
    digest, mtime = sha256(source), source.stat().st_mtime_ns
    run_edit(source, planner, tmp_path / "out.pt")
    assert sha256(source) == digest
    assert source.stat().st_mtime_ns == mtime


def test_existing_output_needs_force(fixtures_dir, tmp_path):
    output = tmp_path / "out.pt"
    output.write_bytes(b"precious")
    with pytest.raises(OutputError, match="--force"):
        run_edit(fixtures_dir / "zoo.pt", lambda ck: plan_set_forget_bias(ck), output)
    assert output.read_bytes() == b"precious"
    run_edit(fixtures_dir / "zoo.pt", lambda ck: plan_set_forget_bias(ck), output, force=True)
    assert output.read_bytes().startswith(b"PK")


def test_directory_output_is_refused_even_with_force(fixtures_dir, tmp_path):
    folder = tmp_path / "out.pt"
    folder.mkdir()
    with pytest.raises(OutputError, match="not a regular file"):
        run_edit(fixtures_dir / "zoo.pt", lambda ck: plan_set_forget_bias(ck), folder, force=True)
    assert folder.is_dir() and not list(folder.iterdir())


def test_output_equal_to_input_is_refused(fixture_copy):
    source = fixture_copy("zoo.pt")
    digest = sha256(source)
    for alias in (source, source.parent / "." / source.name):
        with pytest.raises(OutputError, match="--in-place"):
            run_edit(source, lambda ck: plan_set_forget_bias(ck), alias, force=True)
    link = source.with_name("link.pt")
    link.symlink_to(source)
    with pytest.raises(OutputError, match="--in-place"):
        run_edit(source, lambda ck: plan_set_forget_bias(ck), link, force=True)
    assert sha256(source) == digest


def test_destination_needs_exactly_one_target():
    with pytest.raises(OutputError, match="exactly one"):
        Destination()
    with pytest.raises(OutputError, match="exactly one"):
        Destination(output=Path("x.pt"), in_place=True)


def test_missing_output_folder_is_refused(fixtures_dir, tmp_path):
    with pytest.raises(OutputError, match="does not exist"):
        run_edit(
            fixtures_dir / "zoo.pt", lambda ck: plan_set_forget_bias(ck), tmp_path / "no" / "o.pt"
        )


# --- Nothing to change ------------------------------------------------------------------------


def test_no_op_in_place_writes_nothing(fixture_copy, tmp_path):
    once = tmp_path / "once.pt"
    run_edit(fixture_copy("zoo.pt"), lambda ck: plan_set_forget_bias(ck, 1.0), once)
    digest, mtime = sha256(once), once.stat().st_mtime_ns
    plan, result = run_edit(
        once, lambda ck: plan_set_forget_bias(ck, 1.0), in_place=True, backup=True
    )
    assert not plan.changes_anything
    assert all(not edit.changes_anything for edit in plan.edits) and plan.edits
    assert (result.written, result.method, result.backup) == (False, "none", None)
    assert sha256(once) == digest and once.stat().st_mtime_ns == mtime
    assert not once.with_name("once.pt.bak").exists()


def test_no_op_cli_exits_zero_and_says_so(fixture_copy, run_cli):
    path = fixture_copy("zoo.pt")
    first = run_cli("set-forget-bias", path, "--in-place")
    assert first.exit_code == 0, first.output
    mtime = path.stat().st_mtime_ns
    again = run_cli("set-forget-bias", path, "--in-place")
    assert again.exit_code == 0
    assert "nothing to change" in again.stdout
    assert path.stat().st_mtime_ns == mtime
    document = json.loads(run_cli("set-forget-bias", path, "--in-place", "--json").stdout)
    assert document["plan"]["changes_anything"] is False
    assert document["result"]["written"] is False


def test_failed_write_leaves_no_temporary_file(fixtures_dir, tmp_path, monkeypatch):
    """A writer failing midway removes its temporary file and leaves no output."""
    from lstm_surgeon.formats import safetensors_format

    def broken(*args: Any, **kwargs: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors_format.SafetensorsFormat, "write", broken)
    with pytest.raises(OutputError, match="No space left"):
        run_edit(
            fixtures_dir / "zoo.safetensors",
            lambda ck: plan_zero_bias(ck, drop=True),
            tmp_path / "out.safetensors",
        )
    assert os.listdir(tmp_path) == []
