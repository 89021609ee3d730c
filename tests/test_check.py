"""`check`: exit 0 on sound files, exit 1 naming every problem, exit 2 when there is nothing to check.

The problems `check` exists for are the ones other tools miss: a flipped bit in a storage record
(torch.load loads it silently: the zip CRC-32 is never verified), NaN/Inf in a recurrent layer, and a
broken or truncated file.
"""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path
from typing import Any

import make_fixtures
import pytest
import torch
from conftest import assert_clean_failure
from safetensors.torch import save_file
from torch import nn

from lstm_surgeon.check import check_checkpoint
from lstm_surgeon.discovery import discover
from lstm_surgeon.formats import open_checkpoint

FIXTURES = [fixture.filename for fixture in make_fixtures.FIXTURES]
REPORT_KEYS = {"path", "format", "sound", "problems", "records_checked", "tensors_scanned"}


def record_span(path: Path, name: str) -> tuple[int, int]:
    """Where the bytes of zip record `name` start in the file, and how many there are."""
    data = path.read_bytes()
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(name)
    name_len, extra_len = struct.unpack_from("<HH", data, info.header_offset + 26)
    return info.header_offset + 30 + name_len + extra_len, info.file_size


def flip_bit(path: Path, target: Path, offset: int, bit: int = 2) -> Path:
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    target.write_bytes(bytes(data))
    return target


def recurrent_tensor_count(path: Path) -> int:
    with open_checkpoint(path) as checkpoint:
        return sum(
            len(cell.tensors()) for layer in discover(checkpoint).layers for cell in layer.cells
        )


def check_json(run_cli: Any, path: Path) -> tuple[int, dict[str, Any]]:
    result = run_cli("check", path, "--json")
    return result.exit_code, json.loads(result.stdout)


# --- Sound files ------------------------------------------------------------------------------


@pytest.mark.parametrize("filename", FIXTURES)
def test_every_fixture_is_sound(run_cli, fixtures_dir, filename):
    result = run_cli("check", fixtures_dir / filename)
    assert result.exit_code == 0, result.stdout + result.stderr
    assert "sound" in result.stdout
    assert result.stderr == ""


@pytest.mark.parametrize("filename", ["zoo.pt", "zoo.safetensors"])
def test_json_report_shape(surgeon, fixtures_dir, filename):
    path = fixtures_dir / filename
    result = surgeon("check", path, "--json")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    report = json.loads(result.stdout)
    assert set(report) == REPORT_KEYS
    assert report["path"] == str(path)
    assert report["format"] == ("pt" if filename.endswith(".pt") else "safetensors")
    assert report["sound"] is True
    assert report["problems"] == []
    if filename.endswith(".pt"):
        with zipfile.ZipFile(path) as archive:
            assert report["records_checked"] == len(archive.infolist())
    else:
        assert report["records_checked"] == 0
    assert report["tensors_scanned"] == recurrent_tensor_count(path) > 0


def test_edited_files_are_sound(run_cli, fixture_copy, tmp_path):
    """Patches refresh every CRC-32 they invalidate; rewrites and conversions write sound files."""
    edits = {
        "patch": ("set-forget-bias", "--value", "2"),
        "rewrite": ("zero-bias", "--drop"),
    }
    for filename in ("zoo.pt", "training.pt", "lightning.ckpt", "flat.pt", "zoo.safetensors"):
        for name, edit in edits.items():
            output = tmp_path / f"{name}-{filename}"
            result = run_cli(*edit, fixture_copy(filename), "-o", output)
            assert result.exit_code == 0, result.stderr
            assert check_checkpoint(output).sound, (filename, name)
        in_place = fixture_copy(filename, name=f"in-place-{filename}")
        assert run_cli(*edits["patch"], in_place, "--in-place", "-y").exit_code == 0
        report = check_checkpoint(in_place)
        assert report.sound, report.problems


# --- Corrupt storage records: torch.load does not notice, check does ------------------------


def storage_records(path: Path) -> list[str]:
    with zipfile.ZipFile(path) as archive:
        return [name for name in archive.namelist() if "/data/" in name]


def test_flipped_bit_in_any_storage_is_named_by_its_crc(fixtures_dir, tmp_path):
    source = fixtures_dir / "ddp.pt"
    clean = torch.load(source, weights_only=True)
    for record in storage_records(source):
        start, size = record_span(source, record)
        corrupt = flip_bit(source, tmp_path / "corrupt.pt", start + size // 2)
        # Documented behaviour of torch: the CRC-32 is not verified, the bad value loads silently.
        loaded = torch.load(corrupt, weights_only=True)
        changed = [key for key in clean if not torch.equal(clean[key], loaded[key])]
        assert len(changed) == 1, record
        # Opening does not read every byte either (that is check's job) ...
        open_checkpoint(corrupt).close()
        # ... and check names the record.
        report = check_checkpoint(corrupt)
        assert report.problems == [f"zip record {record}: CRC-32 mismatch (corrupt data)"]
        assert not report.sound


def test_check_command_reports_a_storage_crc_mismatch(surgeon, fixtures_dir, tmp_path):
    source = fixtures_dir / "zoo.pt"
    record = storage_records(source)[3]
    start, size = record_span(source, record)
    corrupt = flip_bit(source, tmp_path / "corrupt.pt", start + size - 1, bit=7)
    result = surgeon("check", corrupt)
    assert result.returncode == 1, result.stderr
    assert result.stderr == ""
    assert f"zip record {record}: CRC-32 mismatch" in result.stdout
    result = surgeon("check", corrupt, "--json")
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert set(report) == REPORT_KEYS
    assert report["sound"] is False
    assert report["format"] == "pt"
    assert report["problems"] == [f"zip record {record}: CRC-32 mismatch (corrupt data)"]


def test_flipped_bit_in_other_records_is_reported(fixtures_dir, tmp_path):
    """Every record is checked, including the ones lstm-surgeon itself never reads."""
    source = fixtures_dir / "ddp.pt"
    with zipfile.ZipFile(source) as archive:
        names = [name for name in archive.namelist() if "/data/" not in name]
    for record in names:
        start, _ = record_span(source, record)
        corrupt = flip_bit(source, tmp_path / "corrupt.pt", start, bit=0)
        report = check_checkpoint(corrupt)
        assert not report.sound, record
        if record.endswith("data.pkl"):  # the object tree: the file cannot be read at all
            assert report.format is None
            assert "CRC-32 mismatch" in report.problems[0]
        elif not record.endswith("byteorder"):  # ("little" changed: refused as big-endian)
            assert report.problems == [f"zip record {record}: CRC-32 mismatch (corrupt data)"]


def test_crc_is_checked_in_a_zip_without_data_descriptors(fixtures_dir, tmp_path):
    """zipfile's own layout (CRC in the local header, storages not aligned)."""
    source = tmp_path / "rewritten.pt"
    with (
        zipfile.ZipFile(fixtures_dir / "ddp.pt") as old,
        zipfile.ZipFile(source, "w", zipfile.ZIP_STORED) as new,
    ):
        for info in old.infolist():
            new.writestr(info.filename, old.read(info.filename))
    assert check_checkpoint(source).sound
    record = storage_records(source)[0]
    start, _ = record_span(source, record)
    report = check_checkpoint(flip_bit(source, tmp_path / "corrupt.pt", start))
    assert report.problems == [f"zip record {record}: CRC-32 mismatch (corrupt data)"]


# --- NaN and Inf in recurrent layers --------------------------------------------------------


def lstm_with(value: float, dtype: torch.dtype, tensor: str = "bias_hh_l0") -> dict[str, Any]:
    torch.manual_seed(0)
    state = {key: value.detach().to(dtype) for key, value in nn.LSTM(3, 4).state_dict().items()}
    state[tensor].view(-1)[5] = value
    return state


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_nan_or_inf_in_a_recurrent_bias_is_named(run_cli, tmp_path, suffix, value, dtype):
    path = tmp_path / f"model{suffix}"
    state = lstm_with(value, dtype)
    if suffix == ".pt":
        torch.save(state, path)
    else:
        save_file(state, str(path))
    nan, inf = (1, 0) if value != value else (0, 1)
    expected = f"bias_hh_l0: {nan} NaN and {inf} Inf values"
    result = run_cli("check", path)
    assert result.exit_code == 1, result.stdout + result.stderr
    assert expected in result.stdout
    exit_code, report = check_json(run_cli, path)
    assert exit_code == 1
    assert report["problems"] == [expected]
    assert report["sound"] is False


def test_nan_in_a_gru_weight_is_named(surgeon, tmp_path):
    torch.manual_seed(0)
    state = {f"encoder.{k}": v.detach() for k, v in nn.GRU(3, 4, num_layers=2).state_dict().items()}
    state["encoder.weight_hh_l1"][2, 3] = float("nan")
    state["encoder.weight_ih_l0"][0, 0] = float("inf")
    path = tmp_path / "gru.safetensors"
    save_file(state, str(path))
    result = surgeon("check", path, "--json")
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    assert sorted(report["problems"]) == [
        "encoder.weight_hh_l1: 1 NaN and 0 Inf values",
        "encoder.weight_ih_l0: 0 NaN and 1 Inf values",
    ]


def signalling_nan_checkpoint(folder: Path) -> Path:
    state = lstm_with(0.0, torch.float32, "bias_ih_l0")
    state["bias_ih_l0"].view(torch.int32)[5] = 0x7F800001  # a signalling NaN
    path = folder / "snan.pt"
    torch.save(state, path)
    return path


def test_signalling_nan_is_reported(surgeon, tmp_path):
    result = surgeon("check", signalling_nan_checkpoint(tmp_path))
    assert result.returncode == 1
    assert "bias_ih_l0: 1 NaN and 0 Inf values" in result.stdout


def test_signalling_nan_prints_no_python_warning(surgeon, tmp_path):
    path = signalling_nan_checkpoint(tmp_path)
    for command in ("check", "inspect"):
        result = surgeon(command, path)
        assert "Warning" not in result.stderr, (command, result.stderr)


# --- Broken and missing files ------------------------------------------------------------------


@pytest.mark.parametrize("filename", ["zoo.pt", "zoo.safetensors"])
def test_truncated_file_exits_1_with_the_problem(surgeon, fixtures_dir, tmp_path, filename):
    data = (fixtures_dir / filename).read_bytes()
    path = tmp_path / filename
    path.write_bytes(data[: len(data) // 2])
    result = surgeon("check", path)
    assert result.returncode == 1, result.stderr
    assert f"{path}: truncated" in result.stdout
    result = surgeon("check", path, "--json")
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert set(report) == REPORT_KEYS
    assert report["sound"] is False
    assert report["format"] is None
    assert len(report["problems"]) == 1
    assert report["problems"][0].startswith(f"{path}: truncated")


@pytest.mark.parametrize("filename", ["nobias.pt", "nobias.safetensors"])
def test_truncation_anywhere_is_a_problem_never_a_crash(fixtures_dir, tmp_path, filename):
    data = (fixtures_dir / filename).read_bytes()
    path = tmp_path / filename
    for offset in range(1, len(data), 7):
        path.write_bytes(data[:offset])
        report = check_checkpoint(path)
        assert not report.sound, offset
        assert report.problems, offset


def test_broken_header_is_a_problem(run_cli, fixtures_dir, tmp_path):
    data = bytearray((fixtures_dir / "nobias.safetensors").read_bytes())
    data[8 + 1] = ord("!")  # the first key's opening quote
    path = tmp_path / "broken.safetensors"
    path.write_bytes(bytes(data))
    exit_code, report = check_json(run_cli, path)
    assert exit_code == 1
    assert report["problems"] and "not valid JSON" in report["problems"][0]


@pytest.mark.parametrize("kind", ["missing", "directory"])
def test_nothing_to_check_exits_2(surgeon, tmp_path, kind):
    path = tmp_path / "missing.pt" if kind == "missing" else tmp_path
    result = surgeon("check", path)
    line = assert_clean_failure(result.stderr, result.returncode)
    assert str(path) in line
    assert result.stdout == ""
    result = surgeon("check", path, "--json")
    assert_clean_failure(result.stderr, result.returncode)
