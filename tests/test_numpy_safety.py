"""Hostile numpy files: object arrays with payloads (allow_pickle), zip bombs, pickles of arrays with a
payload beside them or inside numpy's own reconstruction calls. Each payload really runs when numpy or
pickle loads the file (the control), and never when lstm-surgeon reads it: the file's tensors are read,
or it is refused with one clear line (exit 2), never a traceback."""

from __future__ import annotations

import io
import json
import os
import pickle
import shlex
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_clean_failure
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lstm_surgeon import open_checkpoint
from lstm_surgeon.errors import CheckpointError
from lstm_surgeon.formats import numpy_format

STATE = {
    "rnn.weight_ih_l0": np.arange(24, dtype=np.float32).reshape(8, 3) / 10,
    "rnn.weight_hh_l0": np.arange(16, dtype=np.float32).reshape(8, 2) / 10,
    "rnn.bias_ih_l0": np.ones(8, dtype=np.float32),
    "rnn.bias_hh_l0": np.zeros(8, dtype=np.float32),
}


class Exploit:
    """Unpickling this runs a shell command that creates `canary`."""

    def __init__(self, canary: Path) -> None:
        self.canary = canary

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return (os.system, (f"touch {shlex.quote(str(self.canary))}",))


def refused_cleanly(run_cli, path: Path, canary: Path) -> str:
    result = run_cli("inspect", path)
    line = assert_clean_failure(result.stderr, result.exit_code)
    assert not canary.exists(), "the payload ran while lstm-surgeon read the file"
    return line


def test_npy_object_array_is_refused_and_never_unpickled(run_cli, tmp_path):
    control, canary = tmp_path / "control", tmp_path / "canary"
    path = tmp_path / "evil.npy"
    np.save(path, np.array([Exploit(control)], dtype=object), allow_pickle=True)
    np.load(path, allow_pickle=True)
    assert control.exists()  # the payload is real
    np.save(path, np.array([Exploit(canary)], dtype=object), allow_pickle=True)
    assert "array of Python objects" in refused_cleanly(run_cli, path, canary)


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_npz_object_member_is_refused(run_cli, tmp_path, save):
    canary = tmp_path / "canary"
    path = tmp_path / "evil.npz"
    save(path, **STATE, evil=np.array([Exploit(canary)], dtype=object))
    assert "array of Python objects" in refused_cleanly(run_cli, path, canary)


@pytest.mark.parametrize("protocol", [3, 4, 5])
def test_pickle_of_arrays_with_a_payload_reads_the_arrays_only(run_cli, tmp_path, protocol):
    control, canary = tmp_path / "control", tmp_path / "canary"
    path = tmp_path / "evil.pkl"
    with open(path, "wb") as file:
        pickle.dump({"model": STATE, "hook": Exploit(control)}, file, protocol=protocol)
    with open(path, "rb") as file:
        pickle.load(file)
    assert control.exists()  # the payload is real
    with open(path, "wb") as file:
        pickle.dump({"model": STATE, "hook": Exploit(canary)}, file, protocol=protocol)
    with open_checkpoint(path) as checkpoint:
        for name, array in STATE.items():
            assert np.array_equal(checkpoint.raw(f"model.{name}"), array)
    result = run_cli("set-forget-bias", path, "--value", "2", "-o", tmp_path / "out.pkl", "--json")
    assert json.loads(result.stdout)["result"]["method"] == "patch"  # the payload's bytes kept
    assert not canary.exists()


class Disguised:
    """A payload that names numpy's own reconstruction globals with hostile arguments."""

    def __init__(self, reduce: tuple[object, ...]) -> None:
        self.reduce = reduce

    def __reduce__(self) -> tuple[object, ...]:
        return self.reduce


def disguised_payloads(canary: Path) -> dict[str, tuple[object, ...]]:
    from numpy._core import multiarray, numeric

    command = f"touch {shlex.quote(str(canary))}"
    return {
        "reconstruct_subtype": (multiarray._reconstruct, (os.system, (0,), command)),
        "reconstruct_state": (
            multiarray._reconstruct,
            (np.ndarray, (0,), b"b"),
            (1, (1,), Exploit(canary), False, b"\0" * 4),
        ),
        "frombuffer_dtype": (numeric._frombuffer, (b"\0" * 4, Exploit(canary), (1,), "C")),
        "dtype_code": (np.dtype, (Exploit(canary), False, True)),
    }


@pytest.mark.parametrize("name", ["reconstruct_subtype", "reconstruct_state", "frombuffer_dtype"])
def test_numpy_globals_with_hostile_arguments_run_nothing(run_cli, tmp_path, name):
    canary = tmp_path / "canary"
    path = tmp_path / "evil.pkl"
    with open(path, "wb") as file:
        pickle.dump({**STATE, "x": Disguised(disguised_payloads(canary)[name])}, file, protocol=4)
    result = run_cli("inspect", path)
    assert not canary.exists()
    assert "Traceback" not in result.stderr
    assert result.exit_code in (0, 2)


def test_a_hostile_dtype_code_runs_nothing(tmp_path):
    canary = tmp_path / "canary"
    path = tmp_path / "evil.pkl"
    with open(path, "wb") as file:
        pickle.dump(Disguised(disguised_payloads(canary)["dtype_code"]), file, protocol=4)
    with pytest.raises(CheckpointError):
        open_checkpoint(path)
    assert not canary.exists()


# --- Zip bombs ------------------------------------------------------------------------------------


def set_uncompressed_size(path: Path, member: str, size: int) -> None:
    """Make the archive claim `size` inflated bytes for `member` (local header and directory)."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(member)
    struct.pack_into("<I", data, info.header_offset + 22, size)
    central = data.index(b"PK\x01\x02")
    while data[central + 46 : central + 46 + len(member)] != member.encode():
        central = data.index(b"PK\x01\x02", central + 4)
    struct.pack_into("<I", data, central + 24, size)
    path.write_bytes(bytes(data))


def test_a_member_claiming_an_absurd_size_is_refused(run_cli, tmp_path):
    path = tmp_path / "bomb.npz"
    np.savez_compressed(path, **STATE)
    set_uncompressed_size(path, "rnn.bias_ih_l0.npy", 0xFFFFFFF0)
    line = refused_cleanly(run_cli, path, tmp_path / "canary")
    assert "zip bomb" in line


def test_a_member_inflating_past_its_claim_is_refused(run_cli, tmp_path):
    path = tmp_path / "bomb.npz"
    header = np.lib.format.header_data_from_array_1_0(np.zeros(4, np.float32))
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, header)
    claimed = len(buffer.getvalue()) + 16
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("w.npy", buffer.getvalue() + bytes(8 << 20))  # inflates to 8 MB
    set_uncompressed_size(path, "w.npy", claimed)
    assert "inflates to more than" in refused_cleanly(run_cli, path, tmp_path / "canary")


def test_the_inflation_budget_is_per_archive(tmp_path, monkeypatch):
    path = tmp_path / "many.npz"
    np.savez_compressed(path, **STATE)
    monkeypatch.setattr(numpy_format, "MAX_INFLATED_BYTES", 300)
    with pytest.raises(CheckpointError, match="more than lstm-surgeon inflates"):
        open_checkpoint(path)


# --- Any corruption: read or refused, never another exception --------------------------------------


def small_files(folder: Path) -> dict[str, bytes]:
    files = {}
    for name, save in (("a.npz", np.savez), ("b.npz", np.savez_compressed)):
        save(folder / name, **STATE)
    for protocol in (4, 5):
        with open(folder / f"p{protocol}.pkl", "wb") as file:
            pickle.dump(STATE, file, protocol=protocol)
    np.save(folder / "c.npy", STATE["rnn.weight_ih_l0"])
    for path in folder.iterdir():
        files[path.name] = path.read_bytes()
    return files


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_corrupted_files_are_read_or_refused(tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("fuzz")
    files = small_files(folder)
    name = data.draw(st.sampled_from(sorted(files)))
    content = bytearray(files[name])
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(content) - 1))
        content[position] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        content = content[: data.draw(st.integers(1, len(content)))]
    path = folder / f"fuzzed-{name}"
    path.write_bytes(bytes(content))
    try:
        with open_checkpoint(path) as checkpoint:
            for ref in checkpoint.tensors.values():
                checkpoint.values(ref)
    except CheckpointError as error:
        assert "\n" not in str(error)


def test_a_payload_blocks_a_rewrite_of_its_pickle_and_never_runs(run_cli, tmp_path):
    canary = tmp_path / "canary"
    path = tmp_path / "evil.pkl"
    state = {key: value for key, value in STATE.items() if "bias" not in key}
    with open(path, "wb") as file:
        pickle.dump({"model": state, "hook": Exploit(canary)}, file, protocol=4)
    result = run_cli("add-bias", path, "-o", tmp_path / "out.pkl")
    line = assert_clean_failure(result.stderr, result.exit_code)
    assert "never re-creates" in line
    assert not (tmp_path / "out.pkl").exists()
    assert run_cli("add-bias", path, "-o", tmp_path / "out.npz").exit_code == 0
    assert not canary.exists()
