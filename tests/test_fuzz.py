"""Broken files: truncated, bit-flipped, fuzzed. Refused with one clear line, or read correctly.

Whatever the bytes, reading a file either raises `CheckpointError` (a `SurgeonError`: one line, exit
2) or gives a checkpoint whose every tensor can be read, discovered and inspected, and (where the
damage cannot matter, e.g. a timestamp) the very values of the intact file. The exhaustive parts go
through the library; a sample goes through the installed command, which must not hang and must leave
no output or temporary file behind.
"""

from __future__ import annotations

import contextlib
import shutil
import struct
import tracemalloc
import warnings
import zipfile
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import make_fixtures
import pytest
import torch
from conftest import assert_clean_failure
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from lstm_surgeon.check import check_checkpoint
from lstm_surgeon.discovery import discover
from lstm_surgeon.errors import CheckpointError, SurgeonError
from lstm_surgeon.formats import open_checkpoint
from lstm_surgeon.formats.zip_records import read_records
from lstm_surgeon.inspection import inspect_checkpoint

FIXTURES_DIR = make_fixtures.FIXTURES_DIR
SMALL = [
    "nobias.pt",
    "bf16.pt",
    "gru_biased.pt",
    "nobias.safetensors",
    "compiled.safetensors",
    "half.safetensors",
]
DEBRIS_SUFFIXES = (".lstm-surgeon-tmp", ".lstm-surgeon-journal")

Snapshot = list[tuple[str, str, tuple[int, ...], bytes]]


def read_everything(path: Path, known: Snapshot | None = None) -> Snapshot:
    """Open, read every tensor's values, discover and inspect: what any command may do. Returns
    (name, dtype, shape, stored bytes) per tensor; a broken file raises CheckpointError. (When the
    tensors are exactly `known`, a sound file's, discovery and inspection are skipped: they only
    see the tensors, so they would do what they do for the sound file.)"""
    with open_checkpoint(path) as checkpoint:
        snapshot = []
        for name, ref in checkpoint.tensors.items():
            checkpoint.values(ref)
            snapshot.append((name, ref.dtype.name, ref.shape, checkpoint.raw(ref).tobytes()))
        if snapshot != known:
            discover(checkpoint)
            inspect_checkpoint(checkpoint)
    return snapshot


def original_snapshot(filename: str) -> Snapshot:
    return read_everything(FIXTURES_DIR / filename)


def outcome(path: Path, original: Snapshot) -> str:
    """ "refused", "intact" (the original values), "renamed" (same values, other names: a flipped
    name in a safetensors header), "wrong" (other values, silently) or "crash: <exception>"."""
    try:
        snapshot = read_everything(path, original)
    except CheckpointError:
        return "refused"
    except Exception as error:
        return f"crash: {type(error).__name__}: {error}"
    if snapshot == original:
        return "intact"
    if [entry[1:] for entry in snapshot] == [entry[1:] for entry in original]:
        return "renamed"
    return "wrong"


def header_ranges(path: Path) -> list[range]:
    """The structural bytes: the safetensors length and JSON header; every zip local header (with
    its name and extra field), the central directory and the end records."""
    data = path.read_bytes()
    if path.suffix == ".safetensors":
        return [range(8 + struct.unpack_from("<Q", data)[0])]
    ranges = []
    with zipfile.ZipFile(path) as archive:
        infos = archive.infolist()
        directory = archive.start_dir
    for info in infos:
        name_len, extra_len = struct.unpack_from("<HH", data, info.header_offset + 26)
        ranges.append(range(info.header_offset, info.header_offset + 30 + name_len + extra_len))
    ranges.append(range(directory, len(data)))
    return ranges


def debris(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir() if path.name.endswith(DEBRIS_SUFFIXES))


# --- Truncation -------------------------------------------------------------------------------


@pytest.mark.parametrize("filename", ["nobias.pt", "nobias.safetensors", "compiled.safetensors"])
def test_truncation_at_every_offset_is_refused(tmp_path, filename):
    data = (FIXTURES_DIR / filename).read_bytes()
    original = original_snapshot(filename)
    path = tmp_path / filename
    results = {}
    for offset in range(len(data)):
        path.write_bytes(data[:offset])
        results[offset] = outcome(path, original)
    assert {offset: result for offset, result in results.items() if result != "refused"} == {}


@pytest.mark.parametrize("filename", ["zoo.pt", "zoo.safetensors"])
def test_truncation_in_every_header_byte_and_through_the_data_is_refused(tmp_path, filename):
    source = FIXTURES_DIR / filename
    data = source.read_bytes()
    offsets = {offset for span in header_ranges(source) for offset in span}
    offsets |= set(range(0, len(data), 97))
    original = original_snapshot(filename)
    path = tmp_path / filename
    results = {}
    for offset in sorted(offsets):
        path.write_bytes(data[:offset])
        results[offset] = outcome(path, original)
    assert {offset: result for offset, result in results.items() if result != "refused"} == {}


def truncation_offsets(data: bytes, suffix: str) -> list[int]:
    header_end = 8 + struct.unpack_from("<Q", data)[0] if suffix == ".safetensors" else 64
    return sorted({0, 9, header_end // 2, header_end + 3, len(data) // 2, len(data) - 1})


@pytest.mark.parametrize("filename", ["zoo.pt", "zoo.safetensors"])
def test_truncated_files_through_the_command(surgeon, tmp_path, filename):
    """One error line, exit 2, no hang; an edit leaves no output and no temporary file."""
    data = (FIXTURES_DIR / filename).read_bytes()
    suffix = Path(filename).suffix
    runs = []
    for offset in truncation_offsets(data, suffix):
        folder = tmp_path / f"cut{offset}"
        folder.mkdir()
        path = folder / filename
        path.write_bytes(data[:offset])
        runs.append((folder, ["inspect", path]))
        runs.append((folder, ["set-forget-bias", path, "-o", folder / f"out{suffix}"]))
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda run: surgeon(*run[1], timeout=60), runs))
    for (folder, args), result in zip(runs, results, strict=True):
        line = assert_clean_failure(result.stderr, result.returncode)
        assert str(args[1]) in line, line
        assert sorted(path.name for path in folder.iterdir()) == [filename], args
        assert result.stdout == ""


# --- Bit flips in the headers -------------------------------------------------------------------


def flip_outcomes(filename: str, folder: Path, positions: Iterator[int]) -> dict[str, str]:
    """The outcome of flipping each bit at each position, keyed "offset.bit"."""
    source = FIXTURES_DIR / filename
    data = source.read_bytes()
    original = original_snapshot(filename)
    path = folder / filename
    results = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # signalling NaNs must not warn either
        for position in positions:
            for bit in range(8):
                flipped = bytearray(data)
                flipped[position] ^= 1 << bit
                path.write_bytes(bytes(flipped))
                results[f"{position}.{bit}"] = outcome(path, original)
    return results


def zip_structure_positions(path: Path) -> Iterator[int]:
    """The fixed fields and names of every local header and central directory entry, and the end
    records (not the alignment padding inside extra fields: flipping padding changes nothing)."""
    data = path.read_bytes()
    with zipfile.ZipFile(path) as archive:
        infos = archive.infolist()
        directory = archive.start_dir
    for info in infos:
        name_len = struct.unpack_from("<H", data, info.header_offset + 26)[0]
        yield from range(info.header_offset, info.header_offset + 30 + name_len)
    position = directory
    while data[position : position + 4] == b"PK\x01\x02":
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", data, position + 28)
        yield from range(position, position + 46 + name_len + extra_len + comment_len)
        position += 46 + name_len + extra_len + comment_len
    yield from range(position, len(data))


@pytest.fixture(scope="module")
def zip_flips(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("zip-flips")
    return flip_outcomes("nobias.pt", folder, zip_structure_positions(FIXTURES_DIR / "nobias.pt"))


@pytest.mark.parametrize("filename", ["nobias.safetensors", "compiled.safetensors"])
def test_safetensors_header_bit_flips_are_refused_or_harmless(tmp_path, filename):
    """Every bit of the length and JSON header: refused, or the same values (a flipped letter in a
    name or in the metadata is a different, valid file)."""
    (span,) = header_ranges(FIXTURES_DIR / filename)
    results = flip_outcomes(filename, tmp_path, iter(span))
    unexpected = {key: result for key, result in results.items() if result.startswith(("c", "w"))}
    assert unexpected == {}
    assert "refused" in results.values()


def test_zip_header_bit_flips_never_crash(zip_flips):
    crashes = {key: result for key, result in zip_flips.items() if result.startswith("crash")}
    assert crashes == {}
    assert {"refused", "intact"} <= set(zip_flips.values())


def test_zip_header_bit_flips_never_read_wrong_values(zip_flips):
    wrong = sorted(key for key, result in zip_flips.items() if result == "wrong")
    assert wrong == []


def local_header_offset(path: Path, suffix: str) -> int:
    with zipfile.ZipFile(path) as archive:
        return next(
            info for info in archive.infolist() if info.filename.endswith(suffix)
        ).header_offset


def test_local_header_that_disagrees_with_the_central_directory_is_refused(tmp_path):
    source = FIXTURES_DIR / "nobias.pt"
    data = bytearray(source.read_bytes())
    header = local_header_offset(source, "/data/0")
    name_len, extra_len = struct.unpack_from("<HH", data, header + 26)
    struct.pack_into(
        "<HH", data, header + 26, name_len - 1, extra_len
    )  # data "starts" 1 byte early
    path = tmp_path / "shifted.pt"
    path.write_bytes(bytes(data))
    assert outcome(path, original_snapshot("nobias.pt")) == "refused"


# --- Headers that are too big, compressed or misaligned zips, suffixes ------------------------


@pytest.mark.parametrize(
    "length", [2**64 - 1, 2**63, 100_000_001, 99_999_999], ids=["2^64-1", "2^63", "100MB+1", "99MB"]
)
def test_huge_safetensors_header_length_is_refused_at_once(surgeon, tmp_path, length):
    data = (FIXTURES_DIR / "nobias.safetensors").read_bytes()
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", length) + data[8:])
    result = surgeon("inspect", path, timeout=30)
    line = assert_clean_failure(result.stderr, result.returncode)
    assert "100 MB" in line or "truncated" in line


def rewrite_zip(source: Path, target: Path, compression: int, odd_extra: bool = False) -> Path:
    """Copy a torch.save zip record by record with zipfile; `odd_extra` puts an odd-sized extra
    field before each record so no storage starts on a 4-byte boundary."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w", compression) as new:
        for info in old.infolist():
            copy = zipfile.ZipInfo(info.filename, date_time=info.date_time)
            copy.compress_type = compression
            if odd_extra:
                name_len = len(info.filename.encode())
                copy.extra = struct.pack("<HH", 0xCAFE, 1 + (name_len % 2)) + b"\0" * (
                    1 + (name_len % 2)
                )
            new.writestr(copy, old.read(info.filename))
    return target


def deflated_commands(path: Path) -> list[list[Any]]:
    return [
        ["inspect", path],
        ["set-forget-bias", path, "-o", path.with_name("out.pt")],
        ["set-forget-bias", path, "--in-place", "-y"],
        ["zero-bias", "--drop", path, "-o", path.with_name("dropped.pt")],
    ]


def test_deflated_zip_is_refused_by_every_command(run_cli, tmp_path):
    path = rewrite_zip(FIXTURES_DIR / "ddp.pt", tmp_path / "deflated.pt", zipfile.ZIP_DEFLATED)
    torch.load(path, weights_only=True)  # torch reads it; lstm-surgeon cannot patch it in place
    before = path.read_bytes()
    for args in deflated_commands(path):
        result = run_cli(*args)
        assert_clean_failure(result.stderr, result.exit_code)
    result = run_cli("check", path)
    assert result.exit_code == 1
    assert path.read_bytes() == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["deflated.pt"]


def test_deflated_zip_is_refused_as_compressed(run_cli, tmp_path):
    path = rewrite_zip(FIXTURES_DIR / "ddp.pt", tmp_path / "deflated.pt", zipfile.ZIP_DEFLATED)
    for args in deflated_commands(path):
        result = run_cli(*args)
        line = assert_clean_failure(result.stderr, result.exit_code)
        assert "compressed" in line.removeprefix(f"lstm-surgeon: error: {path}: "), line


def test_misaligned_storages_read_and_edit(run_cli, tmp_path, torch_reference):
    path = rewrite_zip(FIXTURES_DIR / "ddp.pt", tmp_path / "odd.pt", zipfile.ZIP_STORED, True)
    records = read_records(path, path.read_bytes())
    assert any(record.data_offset % 4 for record in records.values())
    expected = torch.load(path, weights_only=True)
    with open_checkpoint(path) as checkpoint:
        torch_reference.assert_matches(checkpoint, expected)
    assert run_cli("inspect", path).exit_code == 0
    output = tmp_path / "edited.pt"
    result = run_cli("set-forget-bias", path, "-o", output)
    assert result.exit_code == 0, result.stderr
    with zipfile.ZipFile(output) as archive:
        assert archive.testzip() is None
    assert check_checkpoint(output).sound
    edited = torch.load(output, weights_only=True)
    hidden = expected["module.lstm.weight_hh_l0"].shape[1]
    forget = slice(hidden, 2 * hidden)
    assert torch.all(edited["module.lstm.bias_ih_l0"][forget] == 1)
    assert torch.all(edited["module.lstm.bias_hh_l0"][forget] == 0)
    for key in expected:
        if "bias" not in key:
            assert torch.equal(edited[key], expected[key]), key


@pytest.mark.parametrize(
    ("filename", "name", "content_format"),
    [
        ("zoo.pt", "model.safetensors", "pt"),
        ("zoo.safetensors", "model.pt", "safetensors"),
        ("zoo.pt", "model.weights", "pt"),
        ("zoo.safetensors", "model", "safetensors"),
    ],
)
def test_format_is_detected_by_content_not_by_suffix(
    run_cli, tmp_path, filename, name, content_format
):
    path = tmp_path / name
    shutil.copyfile(FIXTURES_DIR / filename, path)
    result = run_cli("inspect", path, "--json")
    assert result.exit_code == 0, result.stderr
    assert f'"format": "{content_format}"' in result.stdout
    assert run_cli("check", path).exit_code == 0
    # An output whose suffix names a format gets that format; any other suffix keeps the input's.
    output = tmp_path / f"out-{name}"
    result = run_cli("set-forget-bias", path, "-o", output)
    assert result.exit_code == 0, result.stderr
    with open_checkpoint(output) as checkpoint:
        wanted = {".safetensors": "safetensors", ".pt": "pt"}.get(output.suffix, content_format)
        assert checkpoint.format_name == wanted
    if output.suffix == ".safetensors":
        assert load_file(str(output))  # a real safetensors file
    assert check_checkpoint(output).sound


# --- Fuzzing both readers ---------------------------------------------------------------------

SOURCES = {name: (FIXTURES_DIR / name).read_bytes() for name in SMALL}
HOT = {name: [p for span in header_ranges(FIXTURES_DIR / name) for p in span] for name in SMALL}


@st.composite
def mutated_files(draw: st.DrawFn) -> tuple[str, bytes]:
    """A small fixture with 1-4 random overwrites, bit flips, insertions, deletions or a
    truncation, half of them aimed at the structure (header, zip records)."""
    name = draw(st.sampled_from(SMALL))
    data = bytearray(SOURCES[name])
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        if draw(st.booleans()):
            position = min(draw(st.sampled_from(HOT[name])), len(data) - 1)
        else:
            position = draw(st.integers(0, len(data) - 1))
        operation = draw(st.sampled_from(["overwrite", "flip", "insert", "delete", "truncate"]))
        if operation == "overwrite":
            new = draw(st.binary(min_size=1, max_size=8))
            data[position : position + len(new)] = new
        elif operation == "flip":
            data[position] ^= 1 << draw(st.integers(0, 7))
        elif operation == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=8))
        elif operation == "delete":
            del data[position : position + draw(st.integers(1, 8))]
        else:
            del data[position:]
    return name, bytes(data)


def assert_refused_or_readable(path: Path) -> None:
    """Refused with a SurgeonError, or every tensor, discovery, inspection and check work."""
    try:
        read_everything(path)
        event("readable")
    except SurgeonError as error:
        event(f"refused: {type(error).__name__}")
    report = check_checkpoint(path)  # never raises for an existing file: problems are the report
    assert report.sound or report.problems


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=mutated_files())
def test_mutated_files_are_refused_or_fully_readable(fuzz_dir, case):
    name, data = case
    path = fuzz_dir / name
    path.write_bytes(data)
    assert_refused_or_readable(path)


PICKLED = ["nobias.pt", "bf16.pt", "gru_biased.pt", "training.pt", "unsafe_objects.pt", "flat.pt"]
PICKLE_SOURCES = {name: (FIXTURES_DIR / name).read_bytes() for name in PICKLED}
PICKLE_RECORDS = {
    name: next(
        record
        for key, record in read_records(FIXTURES_DIR / name, data).items()
        if key.endswith("/data.pkl")
    )
    for name, data in PICKLE_SOURCES.items()
}


@st.composite
def mutated_pickles(draw: st.DrawFn) -> tuple[str, bytes]:
    """A .pt fixture whose data.pkl has 1-3 bytes changed, with its CRC-32 fixed everywhere the zip
    stores it: the damage reaches the unpickler instead of the CRC check."""
    name = draw(st.sampled_from(PICKLED))
    record = PICKLE_RECORDS[name]
    data = bytearray(PICKLE_SOURCES[name])
    body = bytearray(data[record.data_offset : record.data_offset + record.size])
    for _ in range(draw(st.integers(1, 3))):
        position = draw(st.integers(0, len(body) - 2))  # keep the final STOP
        if draw(st.booleans()):
            body[position] ^= 1 << draw(st.integers(0, 7))
        else:
            body[position] = draw(st.integers(0, 255))
    data[record.data_offset : record.data_offset + record.size] = body
    for offset in record.crc_offsets:
        struct.pack_into("<I", data, offset, zlib.crc32(body))
    return name, bytes(data)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=mutated_pickles())
def test_mutated_pickles_are_refused_or_fully_readable(fuzz_dir, case):
    name, data = case
    path = fuzz_dir / name
    path.write_bytes(data)
    assert_refused_or_readable(path)


# --- Pickles that ask for absurd amounts of memory ---------------------------------------------


def checkpoint_with_pickle(folder: Path, pickle_bytes: bytes) -> Path:
    """A torch.save-shaped zip whose data.pkl is `pickle_bytes`."""
    path = folder / "crafted.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("crafted/data.pkl", pickle_bytes)
        archive.writestr("crafted/byteorder", b"little")
        archive.writestr("crafted/version", b"3\n")
    return path


@pytest.mark.parametrize("opcode", [b"\x95", b"\x8d"], ids=["FRAME", "BINUNICODE8"])
def test_length_beyond_the_address_space_is_a_checkpoint_error(run_cli, tmp_path, opcode):
    path = checkpoint_with_pickle(tmp_path, b"\x80\x04" + opcode + struct.pack("<Q", 2**63) + b".")
    with pytest.raises(CheckpointError):
        open_checkpoint(path)
    result = run_cli("inspect", path)
    assert_clean_failure(result.stderr, result.exit_code)


def test_huge_memo_index_is_refused_without_allocating(tmp_path):
    index = 2**24  # the unpickler would allocate 2 * 2**24 * 8 bytes = 256 MB for it
    path = checkpoint_with_pickle(tmp_path, b"\x80\x02}r" + struct.pack("<I", index) + b".")
    tracemalloc.start()
    try:
        with contextlib.suppress(CheckpointError):
            read_everything(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 32 * 2**20


def test_absurd_bytearray_length_gives_one_error_line(surgeon, tmp_path):
    path = checkpoint_with_pickle(tmp_path, b"\x80\x05\x96" + struct.pack("<Q", 2**62) + b".")
    result = surgeon("inspect", path, timeout=60)
    assert_clean_failure(result.stderr, result.returncode)
