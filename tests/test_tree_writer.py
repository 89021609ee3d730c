"""Structure-changing edits of .pt files write the reader's own tree back; the neutral `Contents` record.

The oracle is torch itself: `torch.load` of the output equals `torch.load` of the source with the planned
change, every non-tensor value, type and container order included. Files holding objects of other
classes are written by these tests (classes defined here), so loading them with weights_only=False
runs only this file's code.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from test_torch_zip_format import assert_same_objects, assert_same_sharing
from torch import nn

from lstm_surgeon.apply import Destination, edit_checkpoint
from lstm_surgeon.checkpoint import OutputTensor
from lstm_surgeon.errors import EditError
from lstm_surgeon.formats import open_checkpoint, zip_writer
from lstm_surgeon.formats.pickle_reader import load_safely
from lstm_surgeon.formats.pickle_writer import dumps
from lstm_surgeon.formats.torch_zip import FORMAT as TORCH_ZIP
from lstm_surgeon.formats.zip_records import read_records
from lstm_surgeon.surgery import plan_add_bias, plan_set_forget_bias, plan_zero_bias

# --- Objects of classes torch.load(weights_only=True) refuses ---------------------------------


class Config:
    """Pickled by NEWOBJ (`cls.__new__`) plus BUILD with its __dict__."""

    def __init__(self, lr: float, layers: list[int]) -> None:
        self.lr = lr
        self.layers = layers

    def __eq__(self, other: object) -> bool:
        return type(other) is Config and vars(self) == vars(other)


class Registry(dict):  # type: ignore[type-arg]
    """A dict subclass: NEWOBJ, then SETITEMS, then BUILD."""

    def __eq__(self, other: object) -> bool:
        return type(other) is Registry and dict.__eq__(self, other) and vars(self) == vars(other)


class History(list):  # type: ignore[type-arg]
    """A list subclass: NEWOBJ, then APPENDS."""

    def __eq__(self, other: object) -> bool:
        return type(other) is History and list.__eq__(self, other)


class Point:
    """Pickled by REDUCE: `Point(x, y)` is called again when loading."""

    def __init__(self, x: int, y: int) -> None:
        self.x, self.y = x, y

    def __reduce__(self) -> tuple[Any, ...]:
        return (Point, (self.x, self.y))

    def __eq__(self, other: object) -> bool:
        return type(other) is Point and (self.x, self.y) == (other.x, other.y)


def foreign_payload() -> dict[str, Any]:
    """A training checkpoint full of things a plain state dict does not hold."""
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 4)
    shared = {"kept": [1, 2]}
    registry = Registry(a=1, b=Point(2, 3))
    registry.tag = "r"
    tagged = torch.arange(4.0)
    tagged.note = "a tensor with a Python attribute"  # saved through _rebuild_from_type_v2
    history = History([0.5, 0.25])
    cyclic: list[Any] = ["self"]
    cyclic.append(cyclic)
    return {
        "model": lstm.state_dict(),
        "weights": nn.Parameter(torch.ones(2, 3), requires_grad=True),
        "frozen": nn.Parameter(torch.zeros(2), requires_grad=False),
        "tagged": tagged,
        "config": Config(0.1, [3, 4]),
        "registry": registry,
        "history": history,
        "point": Point(-1, 2**40),
        "values": (None, True, 2**70, -3, 1.5, "é", b"\x00\xff", {1, 2}, frozenset({3}), 1 + 2j),
        "size": torch.Size([2, 3]),
        "dtype": torch.bfloat16,
        "shared": (shared, shared),
        "cyclic": cyclic,
    }


def lstm_state() -> dict[str, torch.Tensor]:
    """A small LSTM's parameters, so that the editing commands have a layer to plan for."""
    torch.manual_seed(0)
    return {f"lstm.{key}": value for key, value in nn.LSTM(2, 3).state_dict().items()}


def without_biases(state: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in state.items() if not key.startswith("lstm.bias")}


def load_unsafe(path: Path) -> Any:
    """torch.load running this module's classes: only for files these tests wrote."""
    return torch.load(path, map_location="cpu", weights_only=False)


def edit(source: Path, planner: Any, output: Path) -> Any:
    plan, _ = edit_checkpoint(source, planner, Destination(output=output))
    return plan


def test_foreign_objects_survive_a_structure_change(tmp_path):
    source, output = tmp_path / "foreign.pt", tmp_path / "out.pt"
    torch.save(foreign_payload(), source)
    edit(source, lambda ck: plan_zero_bias(ck, drop=True), output)
    expected = load_unsafe(source)
    for key in ("bias_ih_l0", "bias_hh_l0"):
        del expected["model"][key]
    edited = load_unsafe(output)
    assert_same_objects(edited["model"], expected["model"])
    assert_same_objects(edited["weights"], expected["weights"])  # a Parameter, requires_grad kept
    assert_same_objects(edited["frozen"], expected["frozen"])
    assert edited["tagged"].note == expected["tagged"].note
    assert vars(edited["registry"]) == {"tag": "r"}
    for key in ("config", "registry", "history", "point", "values", "size", "dtype", "shared"):
        assert edited[key] == expected[key], key
        assert type(edited[key]) is type(expected[key]), key
    assert edited["shared"][0] is edited["shared"][1]  # sharing kept, not copied
    assert edited["cyclic"][1] is edited["cyclic"]


def test_state_dict_metadata_and_key_order_survive_add_bias(fixtures_dir, tmp_path):
    source, output = fixtures_dir / "nobias.pt", tmp_path / "out.pt"
    edit(source, plan_add_bias, output)
    original = torch.load(source, weights_only=True)
    edited = torch.load(output, weights_only=True)
    assert edited._metadata == original._metadata  # module versions load_state_dict reads
    expected_order = []
    for name in original:  # torch's order: each cell's biases right after its weight_hh
        expected_order.append(name)
        if "weight_hh" in name:
            expected_order += [name.replace("weight_hh", bias) for bias in ("bias_ih", "bias_hh")]
    assert list(edited) == expected_order
    assert len(expected_order) > len(original)
    for name, tensor in original.items():
        assert torch.equal(edited[name], tensor), name
    assert all(not edited[name].any() for name in edited if ".bias" in name)


def test_untouched_storages_keep_their_exact_bytes(fixtures_dir, tmp_path):
    source, output = fixtures_dir / "training.pt", tmp_path / "out.pt"
    plan = edit(source, lambda ck: plan_zero_bias(ck, drop=True), output)
    with open_checkpoint(source) as old, open_checkpoint(output) as new:
        assert set(new.tensors) == set(old.tensors) - {r.tensor for r in plan.removals}
        for name, ref in new.tensors.items():
            before = old.tensors[name]
            start, size = before.storage.offset, before.storage.nbytes
            assert bytes(new.buffer[ref.storage.offset :][:size]) == bytes(
                old.buffer[start : start + size]
            ), name
        problems = new.format.checksum_problems(new, None)[1]
        assert problems == []


def test_edited_view_of_a_shared_storage_stays_a_view(fixtures_dir, tmp_path):
    """flat.pt's parameters view one buffer; dropping some and editing others keeps the rest views
    of that buffer (torch.save of the edited state dict would do the same)."""
    source, output = fixtures_dir / "flat.pt", tmp_path / "out.pt"
    edit(source, lambda ck: plan_set_forget_bias(ck, 2.0), tmp_path / "patched.pt")
    edit(tmp_path / "patched.pt", lambda ck: plan_zero_bias(ck, drop=True), output)
    expected = torch.load(tmp_path / "patched.pt", weights_only=True)
    for name in [name for name in expected if ".bias" in name]:
        del expected[name]
    edited = torch.load(output, weights_only=True)
    assert_same_objects(edited, expected)
    assert_same_sharing(edited, expected)
    assert len({tensor.untyped_storage().data_ptr() for tensor in edited.values()}) == 1


def test_record_layout_is_what_torch_save_writes(tmp_path):
    source, output = tmp_path / "model.pt", tmp_path / "out.pt"
    torch.save(nn.LSTM(3, 4, bias=False).state_dict(), source)
    edit(source, plan_add_bias, output)
    with zipfile.ZipFile(source) as theirs, zipfile.ZipFile(output) as ours:
        assert ours.testzip() is None  # every CRC-32 right
        names = [info.filename for info in ours.infolist()]
        expected_names = {info.filename for info in theirs.infolist()}
        expected_names |= {"model/data/2", "model/data/3"}  # the two new biases
        assert set(names) == expected_names
        assert names[0] == "model/data.pkl"
        data = output.read_bytes()
        for info in ours.infolist():
            assert info.compress_type == zipfile.ZIP_STORED
            assert info.flag_bits == 0x0808
            name_len, extra_len = (
                int.from_bytes(data[info.header_offset + 26 :][:2], "little"),
                (int.from_bytes(data[info.header_offset + 28 :][:2], "little")),
            )
            assert (info.header_offset + 30 + name_len + extra_len) % 64 == 0, info.filename
        for name in (".format_version", ".storage_alignment", "byteorder", "version"):
            assert ours.read(f"model/{name}") == theirs.read(f"model/{name}")


def test_structure_change_needs_no_torch(fixtures_dir, tmp_path):
    """add-bias on a .pt in an interpreter where importing torch fails."""
    output = tmp_path / "out.pt"
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from pathlib import Path\n"
        "from lstm_surgeon.apply import Destination, edit_checkpoint\n"
        "from lstm_surgeon.surgery import plan_add_bias\n"
        "source, output = map(Path, sys.argv[1:])\n"
        "edit_checkpoint(source, plan_add_bias, Destination(output=output))\n"
    )
    subprocess.run(
        [sys.executable, "-c", code, str(fixtures_dir / "nobias.pt"), str(output)],
        check=True,
        timeout=120,
        env={key: value for key, value in os.environ.items() if key != "LSTM_SURGEON_FAULT"},
    )
    edited = torch.load(output, weights_only=True)
    assert {"lstm.bias_hh_l0", "cell.bias_ih"} <= set(edited)


@pytest.mark.parametrize(
    "dtype", [torch.bfloat16, torch.float16, torch.uint16, torch.float8_e4m3fn, torch.bool]
)
def test_safetensors_converts_to_pt_in_every_dtype(tmp_path, dtype):
    """New storages: typed ones for dtypes with a storage class, untyped (_v3) for the others."""
    source, output = tmp_path / "in.safetensors", tmp_path / "out.pt"
    data = np.random.default_rng(0).bytes(24)
    tensor = torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype).reshape(2, -1)
    weights = {**lstm_state(), "extra": tensor, "empty": torch.empty(0, 2)}
    save_file(weights, str(source), metadata={"format": "pt"})
    edit(source, lambda ck: plan_zero_bias(ck, drop=True), output)
    loaded = torch.load(output, weights_only=True)
    with open_checkpoint(source) as checkpoint:  # the order of the source's header
        assert list(loaded) == list(without_biases(checkpoint.tensors))
    for name, expected in without_biases(weights).items():
        assert loaded[name].dtype == expected.dtype
        assert loaded[name].shape == expected.shape
        assert loaded[name].view(torch.uint8).tolist() == expected.view(torch.uint8).tolist()


# --- What each writer cannot carry --------------------------------------------------------------


def test_pt_output_refuses_metadata_it_cannot_carry(tmp_path):
    source, output = tmp_path / "in.safetensors", tmp_path / "out.pt"
    save_file(lstm_state(), str(source), metadata={"format": "pt", "step": "12"})
    with pytest.raises(EditError, match="'step'"):
        edit(source, lambda ck: plan_zero_bias(ck, drop=True), output)
    assert not output.exists()


def test_safetensors_output_refuses_a_tensor_named_like_its_metadata(tmp_path):
    source, output = tmp_path / "in.pt", tmp_path / "out.safetensors"
    torch.save({"__metadata__": torch.ones(2), **lstm_state()}, source)
    with pytest.raises(EditError, match="__metadata__"):
        edit(source, lambda ck: plan_zero_bias(ck, drop=True), output)
    assert not output.exists()


def test_safetensors_output_refuses_objects(tmp_path):
    source, output = tmp_path / "in.pt", tmp_path / "out.safetensors"
    torch.save({**lstm_state(), "config": Config(0.1, [])}, source)
    with pytest.raises(EditError, match="'config'"):
        edit(source, lambda ck: plan_zero_bias(ck, drop=True), output)


def test_a_tensor_inside_a_tuple_cannot_be_removed(tmp_path):
    source = tmp_path / "in.pt"
    torch.save({"pair": (torch.ones(2), torch.zeros(2))}, source)
    with open_checkpoint(source) as checkpoint, open(tmp_path / "out.pt", "wb") as out:
        kept = checkpoint.tensors["pair.0"]
        with pytest.raises(EditError, match="tuple"):
            TORCH_ZIP.write(out, [OutputTensor(kept, source=kept)], checkpoint)


# --- The neutral record of what a file holds ----------------------------------------------------


def test_contents_of_a_training_checkpoint(fixtures_dir):
    with open_checkpoint(fixtures_dir / "training.pt") as checkpoint:
        kinds = {entry.key: entry.kind for entry in checkpoint.contents.entries}
        assert kinds == {
            "model_state_dict": "container",
            "optimizer_state_dict": "container",
            "epoch": "value",
            "loss": "value",
        }
        assert checkpoint.optimizer_keys() == {"optimizer_state_dict"}
        assert dict(checkpoint.contents.counters) == {"epoch": 3}
        assert checkpoint.metadata is None


def test_contents_of_a_lightning_checkpoint(fixtures_dir):
    with open_checkpoint(fixtures_dir / "lightning.ckpt") as checkpoint:
        assert checkpoint.optimizer_keys() == {"optimizer_states"}  # a list of optimizer states
        assert dict(checkpoint.contents.counters) == {"epoch": 0, "global_step": 1}
        assert checkpoint.top_level_keys[:3] == (
            "epoch",
            "global_step",
            "pytorch-lightning_version",
        )


def test_optimizer_state_is_known_by_its_shape_not_its_name(tmp_path):
    source = tmp_path / "in.pt"
    optimizer = torch.optim.SGD([nn.Parameter(torch.ones(2))], lr=0.1)
    torch.save(
        {
            "w": torch.ones(2),
            "optimizer_config": {"lr": 0.1},  # "optim" in the name, not optimizer state
            "opt": optimizer.state_dict(),
            "step": True,  # a bool is not a counter
        },
        source,
    )
    with open_checkpoint(source) as checkpoint:
        assert checkpoint.optimizer_keys() == {"opt"}
        assert checkpoint.has_optimizer_state
        assert dict(checkpoint.contents.counters) == {}


def test_foreign_objects_are_objects_in_the_contents(fixtures_dir):
    with open_checkpoint(fixtures_dir / "unsafe_objects.pt") as checkpoint:
        kinds = {entry.key: entry.kind for entry in checkpoint.contents.entries}
        assert kinds == {"model": "container", "args": "object", "note": "value"}


def test_safetensors_contents_are_tensors_and_metadata(fixtures_dir, make_fixtures):
    with open_checkpoint(fixtures_dir / "zoo.safetensors") as checkpoint:
        assert {entry.kind for entry in checkpoint.contents.entries} == {"tensor"}
        assert checkpoint.top_level_keys == tuple(checkpoint.tensors)
        assert checkpoint.metadata == make_fixtures.SAFETENSORS_METADATA
        assert not checkpoint.has_optimizer_state


def test_the_pickle_writer_refuses_what_it_cannot_write():
    with pytest.raises(pickle.PicklingError):
        dumps({"x": object()})
    # STACK_GLOBAL can name a global with a newline, which a GLOBAL line cannot hold
    stack_global = b"\x80\x04\x8c\x02os\x8c\x0bsystem\ncos\n\x93)R."
    with pytest.raises(pickle.PicklingError, match="global"):
        dumps(load_safely(stack_global))
    assert pickle.loads(dumps(OrderedDict(a=[1, (2, 3)]))[0]) == OrderedDict(a=[1, (2, 3)])


# --- The zip writer -------------------------------------------------------------------------------


@pytest.mark.parametrize("zip64_from", [zip_writer.ZIP64_FROM, 0], ids=["plain", "all-zip64"])
def test_zip_writer_output_reads_back_everywhere(tmp_path, monkeypatch, zip64_from):
    """Python's zipfile and lstm-surgeon's reader agree on every record's bytes, offset and CRC;
    with the zip64 threshold at 0, every size and offset goes through the zip64 fields."""
    monkeypatch.setattr(zip_writer, "ZIP64_FROM", zip64_from)
    payloads = {"a/data.pkl": b"\x80\x02.", "a/data/0": bytes(range(200)) * 3, "a/empty": b""}
    target = tmp_path / "out.zip"
    with open(target, "wb") as out:
        writer = zip_writer.ZipWriter(out)
        for name, data in payloads.items():
            writer.add(name, [data[:7], memoryview(data)[7:]])
        writer.close()
    buffer = target.read_bytes()
    records = read_records(target, buffer)
    with zipfile.ZipFile(target) as archive:
        assert archive.testzip() is None
        assert {info.filename: archive.read(info) for info in archive.infolist()} == payloads
    for name, data in payloads.items():
        record = records[name]
        assert buffer[record.data_offset : record.data_offset + record.size] == data
        assert record.check_crc(buffer) and record.data_offset % 64 == 0


def test_installed_command_drops_biases_of_a_file_with_objects_in_place(surgeon, tmp_path):
    """The real command, in place: the objects of the file are still there afterwards."""
    path = tmp_path / "foreign.pt"
    torch.save(foreign_payload(), path)
    expected = load_unsafe(path)
    result = surgeon("zero-bias", path, "--drop", "--in-place", "--yes", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["result"]["method"] == "rewrite"
    edited = load_unsafe(path)
    assert list(edited["model"]) == ["weight_ih_l0", "weight_hh_l0"]
    assert list(edited) == list(expected)
    for key in ("config", "registry", "history", "point", "values"):
        assert edited[key] == expected[key], key


# --- The pickle writer on its own -------------------------------------------------------------------

HASHABLE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False),
    st.text(max_size=5),
    st.binary(max_size=5),
    st.complex_numbers(allow_nan=False),
)
PLAIN_DATA = st.recursive(
    HASHABLE,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=4).map(tuple),
        st.dictionaries(HASHABLE, children, max_size=4),
        st.dictionaries(st.text(max_size=3), children, max_size=4).map(OrderedDict),
        st.sets(HASHABLE, max_size=4),
        st.frozensets(HASHABLE, max_size=4),
    ),
    max_leaves=20,
)


def same_value(actual: Any, expected: Any) -> bool:
    """Equal, and of the same type all the way down (True == 1 would hide a lost bool)."""
    if type(actual) is not type(expected):
        return False
    if isinstance(expected, dict):
        return list(actual) == list(expected) and all(
            same_value(actual[key], value) for key, value in expected.items()
        )
    if isinstance(expected, (list, tuple)):
        return len(actual) == len(expected) and all(map(same_value, actual, expected))
    return bool(actual == expected)


@settings(max_examples=200, deadline=None)
@given(value=PLAIN_DATA, protocol=st.sampled_from([2, 4]))
def test_plain_data_round_trips_through_reader_and_writer(value, protocol):
    written, storages = dumps(load_safely(pickle.dumps(value, protocol=protocol)))
    assert storages == []
    assert same_value(pickle.loads(written), value)


def test_optimizer_state_is_dropped_from_a_list_root(tmp_path):
    source, output = tmp_path / "in.pt", tmp_path / "out.pt"
    optimizer = torch.optim.Adam([nn.Parameter(torch.ones(2))])
    torch.save([lstm_state(), optimizer.state_dict(), "note"], source)
    plan = edit(source, lambda ck: plan_zero_bias(ck, drop=True, drop_optimizer_state=True), output)
    assert plan.drop_optimizer_state
    edited = torch.load(output, weights_only=True)
    assert len(edited) == 2 and edited[1] == "note"
    assert list(edited[0]) == list(without_biases(lstm_state()))
