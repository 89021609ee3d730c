"""Pre-1.6 torch.save files (`_use_new_zipfile_serialization=False`): read natively, patched in place.

Files are made here by torch.save; torch.load(map_location="cpu") is the oracle for what they hold
and for what an edited file holds.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_clean_failure
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from torch import nn

from lstm_surgeon.discovery import discover
from lstm_surgeon.errors import CheckpointError
from lstm_surgeon.formats import open_checkpoint
from lstm_surgeon.formats.torch_legacy import MAGIC


def legacy_save(obj: object, path: Path) -> Path:
    torch.save(obj, path, _use_new_zipfile_serialization=False)
    return path


def lstm_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {key: value.detach() for key, value in nn.LSTM(2, 3).state_dict().items()}


def load(path: Path) -> object:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture
def legacy(tmp_path) -> Path:
    return legacy_save(lstm_state(), tmp_path / "legacy.pt")


def legacy_file_saved_from_a_gpu(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A pre-1.6 torch.save file whose storages say `cuda:0`, made without a GPU: saved from the
    CPU, then the pickled location string rewritten (BINUNICODE: 'X', 4-byte length, text; the
    format has no offsets, so the longer string shifts nothing that matters)."""
    state = lstm_state()
    data = legacy_save(state, tmp_path / "cpu.pt").read_bytes()
    cpu, cuda = b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0"
    assert data.count(cpu) == 1  # pickled once, then referenced through the memo
    path = tmp_path / "gpu_legacy.pt"
    path.write_bytes(data.replace(cpu, cuda))
    return path, state


# --- Reading --------------------------------------------------------------------------------------


def mixed_checkpoint() -> dict[str, object]:
    """A training checkpoint: a GRU's state dict nested under a key, a float16 and a bfloat16
    tensor, views sharing one storage, and plain values."""
    torch.manual_seed(1)
    gru = nn.GRU(3, 4, num_layers=2, bidirectional=True)
    base = torch.arange(12, dtype=torch.float32)
    return {
        "model": gru.state_dict(),
        "half": torch.linspace(-1, 1, 5, dtype=torch.float16),
        "brain": torch.linspace(-2, 2, 7).to(torch.bfloat16),
        "views": [base[2:6], base.view(3, 4).t()],
        "epoch": 7,
        "note": "legacy",
    }


def test_read_equals_torch_load(tmp_path, torch_reference):
    obj = mixed_checkpoint()
    path = legacy_save(obj, tmp_path / "mixed.pt")
    with open_checkpoint(path) as checkpoint:
        assert checkpoint.format_name == "pt-legacy"
        torch_reference.assert_matches(checkpoint, torch_reference.flatten(load(path)))
        assert checkpoint.contents.counters == {"epoch": 7}
        layers = discover(checkpoint).layers
    assert [(layer.name, layer.kind, layer.num_layers) for layer in layers] == [("model", "GRU", 2)]


def test_views_share_their_storage(tmp_path):
    path = legacy_save(mixed_checkpoint(), tmp_path / "mixed.pt")
    with open_checkpoint(path) as checkpoint:
        first, second = checkpoint.tensors["views.0"], checkpoint.tensors["views.1"]
        assert first.storage == second.storage
        assert (first.element_offset, second.element_strides) == (2, (1, 4))


def test_a_file_saved_from_a_gpu_reads_without_one(tmp_path, torch_reference):
    path, state = legacy_file_saved_from_a_gpu(tmp_path)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(path, weights_only=True)  # what torch does without map_location
    with open_checkpoint(path) as checkpoint:
        torch_reference.assert_matches(checkpoint, load(path))
        torch_reference.assert_matches(checkpoint, state)


DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.uint8)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.dictionaries(
        st.text("abcxyz_", min_size=1, max_size=6),
        st.tuples(st.sampled_from(DTYPES), st.lists(st.integers(0, 4), max_size=3)),
        min_size=1,
        max_size=5,
    )
)
def test_property_read_equals_torch_load(tmp_path, torch_reference, specs):
    state = {
        name: (torch.arange(int(np.prod(shape)), dtype=torch.float64) - 3).to(dtype).reshape(shape)
        for name, (dtype, shape) in specs.items()
    }
    path = legacy_save(state, tmp_path / "random.pt")
    with open_checkpoint(path) as checkpoint:
        torch_reference.assert_matches(checkpoint, load(path))


# --- Editing --------------------------------------------------------------------------------------


def assert_only_storage_bytes_changed(before: Path, after: Path, tensor_names: list[str]) -> None:
    """Every differing byte lies in the storages of `tensor_names` (no checksum to refresh)."""
    with open_checkpoint(before) as checkpoint:
        spans = [
            (ref.storage.offset, ref.storage.offset + ref.storage.nbytes)
            for name, ref in checkpoint.tensors.items()
            if name in tensor_names
        ]
    old = np.frombuffer(before.read_bytes(), np.uint8)
    new = np.frombuffer(after.read_bytes(), np.uint8)
    assert old.size == new.size
    differing = np.flatnonzero(old != new)
    assert differing.size > 0
    assert all(any(start <= offset < end for start, end in spans) for offset in differing)


def forget(state: dict[str, torch.Tensor]) -> torch.Tensor:
    """The effective forget-gate bias, by torch's gate order [i, f, g, o]."""
    return (state["bias_ih_l0"] + state["bias_hh_l0"]).chunk(4)[1]


@pytest.mark.parametrize("in_place", [False, True], ids=["copy", "in-place"])
def test_edit_keeps_the_format_and_touches_only_the_biases(legacy, tmp_path, run_cli, in_place):
    original = tmp_path / "original.pt"
    original.write_bytes(legacy.read_bytes())
    out = legacy if in_place else tmp_path / "out.pt"
    target = ["--in-place"] if in_place else ["-o", out]
    result = run_cli("set-forget-bias", legacy, "--value", "1.5", *target, "-y", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["result"]["method"] == "patch"
    assert out.read_bytes().startswith(MAGIC)
    edited = load(out)
    torch.testing.assert_close(forget(edited), torch.full((3,), 1.5))
    before = lstm_state()
    for name in ("weight_ih_l0", "weight_hh_l0"):
        assert torch.equal(edited[name], before[name])
    assert_only_storage_bytes_changed(original, out, ["bias_ih_l0", "bias_hh_l0"])


def test_edit_of_a_gpu_file_stays_loadable_on_the_gpu_path(tmp_path, run_cli):
    path, _ = legacy_file_saved_from_a_gpu(tmp_path)
    out = tmp_path / "out.pt"
    result = run_cli("zero-bias", path, "-o", out, "-y")
    assert result.exit_code == 0, result.stderr
    edited = load(out)
    assert not edited["bias_ih_l0"].any() and not edited["bias_hh_l0"].any()
    assert out.read_bytes().count(b"cuda:0") == 1


def test_conversion_to_safetensors(legacy, tmp_path, run_cli):
    out = tmp_path / "out.safetensors"
    result = run_cli("set-forget-bias", legacy, "-o", out, "-y")
    assert result.exit_code == 0, result.stderr
    written, expected = load_file(out), load(legacy)
    assert sorted(written) == sorted(expected)
    torch.testing.assert_close(forget(written), torch.ones(3))
    assert torch.equal(written["weight_hh_l0"], expected["weight_hh_l0"])


def test_diff_against_the_converted_file(legacy, tmp_path, run_cli):
    out = tmp_path / "same.safetensors"
    assert run_cli("zero-bias", legacy, "--gate", "input", "-o", out, "-y").exit_code == 0
    result = run_cli("diff", legacy, out, "--json")
    assert result.exit_code == 1
    assert not json.loads(result.stdout)["identical"]


@pytest.mark.parametrize("command", [["zero-bias", "--drop"], ["add-bias"]])
def test_structure_changes_name_the_way_out(tmp_path, run_cli, command):
    state = nn.LSTM(2, 3, bias=command == ["zero-bias", "--drop"]).state_dict()
    path = legacy_save(state, tmp_path / "legacy.pt")
    out = tmp_path / "out.pt"
    result = run_cli(*command, path, "-o", out, "-y")
    assert "safetensors" in assert_clean_failure(result.stderr, result.exit_code)
    assert not out.exists()


# --- check: the structure against the file ---------------------------------------------------------


def test_check_a_sound_file(legacy, run_cli):
    result = run_cli("check", legacy, "--json")
    report = json.loads(result.stdout)
    assert result.exit_code == 0 and report["sound"], report
    assert report["records_checked"] == len(lstm_state())  # one storage per tensor


def test_check_names_trailing_bytes(legacy, run_cli):
    with open(legacy, "ab") as file:
        file.write(b"\0" * 10)
    load(legacy)  # torch ignores them
    result = run_cli("check", legacy, "--json")
    report = json.loads(result.stdout)
    assert result.exit_code == 1
    assert report["problems"] == ["10 bytes after the last storage (not part of the checkpoint)"]


@pytest.mark.parametrize("cut", [1, 8, 30])
def test_a_truncated_file_is_refused_in_one_line(legacy, run_cli, cut):
    legacy.write_bytes(legacy.read_bytes()[:-cut])
    with pytest.raises(CheckpointError, match="truncated"):
        open_checkpoint(legacy)
    result = run_cli("inspect", legacy)
    assert "truncated" in assert_clean_failure(result.stderr, result.exit_code)


def test_a_storage_count_that_disagrees_is_refused(legacy):
    with open_checkpoint(legacy) as checkpoint:
        offset = next(iter(checkpoint.storages())).offset - 8
    data = bytearray(legacy.read_bytes())
    data[offset] += 1
    legacy.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="elements where the pickle says"):
        open_checkpoint(legacy)


# --- Safety ----------------------------------------------------------------------------------------


class Touch:
    def __init__(self, canary: Path) -> None:
        self.canary = canary

    def __reduce__(self) -> tuple[object, tuple[str]]:
        import os

        return os.system, (f"touch {self.canary}",)


def test_a_reduce_payload_runs_nothing(tmp_path, run_cli, torch_reference):
    canary = tmp_path / "canary"
    path = legacy_save({"evil": Touch(canary), "model": lstm_state()}, tmp_path / "evil.pt")
    torch.load(path, weights_only=False)  # control: torch's unpickler runs it
    assert canary.exists()
    canary.unlink()
    for command in (["inspect", path], ["check", path], ["set-forget-bias", path, "--dry-run"]):
        result = run_cli(*command)
        assert result.exit_code in (0, 1), result.stderr
    assert not canary.exists()
    with open_checkpoint(path) as checkpoint:
        torch_reference.assert_matches(
            checkpoint, {f"model.{name}": tensor for name, tensor in lstm_state().items()}
        )


def test_a_payload_in_the_header_pickles_runs_nothing(tmp_path, run_cli):
    """The system-information pickle replaced by a payload: refused, nothing run."""
    canary = tmp_path / "canary"
    legacy = legacy_save(lstm_state(), tmp_path / "legacy.pt").read_bytes()
    header_end = legacy.index(b".", len(MAGIC)) + 1  # the protocol-version pickle's STOP
    info_end = legacy.index(b"u.", header_end) + 2
    evil = pickle.dumps(Touch(canary), protocol=2)
    path = tmp_path / "evil.pt"
    path.write_bytes(legacy[:header_end] + evil + legacy[info_end:])
    result = run_cli("inspect", path)
    assert_clean_failure(result.stderr, result.exit_code)
    assert not canary.exists()
