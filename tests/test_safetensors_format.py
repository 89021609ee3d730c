"""Reading safetensors files: tensors exactly as the reference library loads them, and every
header the specification forbids refused (each crafted file is also refused by the reference)."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import make_fixtures
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from safetensors.torch import load as reference_load
from safetensors.torch import load_file

from lstm_surgeon.errors import CheckpointError
from lstm_surgeon.formats import open_checkpoint

SAFETENSORS_FIXTURES = [
    fixture.filename for fixture in make_fixtures.FIXTURES if fixture.format == "safetensors"
]


def encode(header: dict[str, Any] | None, data: bytes = b"", *, text: bytes | None = None) -> bytes:
    """A safetensors file: 8-byte little-endian header length, JSON header, data."""
    body = text if text is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(body)) + body + data


def open_bytes(path: Path, content: bytes) -> Any:
    path.write_bytes(content)
    return open_checkpoint(path)


def assert_refused(path: Path, content: bytes) -> str:
    """Our reader refuses `content` with a one-line CheckpointError naming the path."""
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as error:
        open_checkpoint(path).close()
    message = str(error.value)
    assert str(path) in message
    assert "\n" not in message
    return message


# A valid two-tensor file, crafted by hand.
TENSOR_A = {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}
TENSOR_B = {"dtype": "BF16", "shape": [4], "data_offsets": [24, 32]}
DATA = (
    np.arange(6, dtype="<f4").tobytes()
    + np.array([0x3F80, 0xC000, 0x7FC0, 0x0001], "<u2").tobytes()
)
GOOD = encode({"__metadata__": {"format": "pt", "note": "é"}, "a": TENSOR_A, "b": TENSOR_B}, DATA)


# --- Files that read ------------------------------------------------------------------------


@pytest.mark.parametrize("filename", SAFETENSORS_FIXTURES)
def test_fixture_reads_exactly_as_safetensors_loads_it(fixtures_dir, torch_reference, filename):
    path = fixtures_dir / filename
    with open_checkpoint(path) as checkpoint:
        assert checkpoint.format_name == "safetensors"
        assert checkpoint.metadata == make_fixtures.SAFETENSORS_METADATA
        assert not checkpoint.has_optimizer_state
        torch_reference.assert_matches(checkpoint, load_file(path), ordered=False)


@pytest.mark.parametrize("stem", ["zoo", "nobias"])
def test_safetensors_twin_holds_the_same_tensors_as_the_pt_fixture(fixtures_dir, stem):
    with (
        open_checkpoint(fixtures_dir / f"{stem}.pt") as pt,
        open_checkpoint(fixtures_dir / f"{stem}.safetensors") as safetensors,
    ):
        assert sorted(pt.tensors) == sorted(safetensors.tensors)
        for name in pt.tensors:
            assert pt.raw(name).tobytes() == safetensors.raw(name).tobytes(), name


def test_handmade_file_reads_with_metadata(tmp_path, torch_reference):
    with open_bytes(tmp_path / "good.safetensors", GOOD) as checkpoint:
        assert checkpoint.metadata == {"format": "pt", "note": "é"}
        torch_reference.assert_matches(checkpoint, reference_load(GOOD), ordered=False)
        assert list(checkpoint.tensors) == ["a", "b"]  # header order
        np.testing.assert_array_equal(checkpoint.values("b"), [1.0, -2.0, np.nan, 2.0**-133])
        assert checkpoint.raw("b").tolist() == [0x3F80, 0xC000, 0x7FC0, 0x0001]


def test_empty_and_zero_size_tensors_read(tmp_path, torch_reference):
    header = {
        "z": {"dtype": "F64", "shape": [0, 3], "data_offsets": [0, 0]},
        "a": TENSOR_A,
        "e": {"dtype": "I64", "shape": [5, 0], "data_offsets": [24, 24]},
    }
    content = encode(header, DATA[:24])
    with open_bytes(tmp_path / "zero.safetensors", content) as checkpoint:
        torch_reference.assert_matches(checkpoint, reference_load(content), ordered=False)
        assert checkpoint.metadata is None
    with open_bytes(tmp_path / "nothing.safetensors", encode({})) as checkpoint:
        assert checkpoint.tensors == {}


def test_header_padding_and_key_order_are_kept(tmp_path):
    text = json.dumps(
        {"b": TENSOR_B | {"data_offsets": [0, 8]}, "a": TENSOR_A | {"data_offsets": [8, 32]}}
    ).encode()
    text += b" " * (-len(text) % 8)
    content = encode(None, DATA[24:] + DATA[:24], text=text)
    with open_bytes(tmp_path / "padded.safetensors", content) as checkpoint:
        assert list(checkpoint.tensors) == ["b", "a"]
        assert checkpoint.raw("a").tobytes() == DATA[:24]


# --- Property: random tensors and metadata ---------------------------------------------------

DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
]
PREFIXES = ["", "module.", "_orig_mod.", "model.", "state_dict.model."]
NAMES = st.lists(st.text("abcxyz_0189", min_size=1, max_size=6), min_size=1, max_size=3).map(
    ".".join
)


@st.composite
def tensor_dicts(draw: st.DrawFn) -> dict[str, torch.Tensor]:
    prefix = draw(st.sampled_from(PREFIXES))
    names = draw(st.lists(NAMES, min_size=0, max_size=6, unique=True))
    tensors = {}
    for name in names:
        shape = tuple(draw(st.lists(st.integers(0, 5), max_size=3)))
        dtype = draw(st.sampled_from(DTYPES))
        count = int(np.prod(shape, dtype=np.int64))
        itemsize = torch.empty((), dtype=dtype).element_size()
        data = draw(st.binary(min_size=count * itemsize, max_size=count * itemsize))
        tensor = (
            torch.frombuffer(bytearray(data), dtype=dtype).reshape(shape)
            if count
            else torch.empty(shape, dtype=dtype)
        )
        tensors[f"{prefix}{name}"] = tensor
    return tensors


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    tensors=tensor_dicts(),
    metadata=st.one_of(st.none(), st.dictionaries(st.text(max_size=5), st.text(max_size=8))),
)
def test_random_save_file_reads_exactly_as_safetensors_loads_it(
    tmp_path_factory, save_checkpoint, torch_reference, tensors, metadata
):
    # safetensors 0.8 itself writes invalid JSON (`{},"__metadata__":{}}`) for this one case.
    assume(tensors or metadata != {})
    path = tmp_path_factory.mktemp("prop") / "random.safetensors"
    save_checkpoint(tensors, path, metadata)
    with open_checkpoint(path) as checkpoint:
        assert checkpoint.format_name == "safetensors"
        assert checkpoint.metadata == metadata
        torch_reference.assert_matches(checkpoint, load_file(path), ordered=False)


# --- Files the specification forbids ---------------------------------------------------------


def header_with(**changes: Any) -> dict[str, Any]:
    header: dict[str, Any] = {"a": dict(TENSOR_A), "b": dict(TENSOR_B)}
    for key, value in changes.items():
        tensor, field = key.split("_", 1)
        header[tensor][field] = value
    return header


INVALID = {
    "header-length-over-100MB": struct.pack("<Q", 100_000_001) + b'{"a":1}' + b" " * 64,
    "header-length-past-eof": struct.pack("<Q", 4096) + b'{"a": {}}',
    "header-length-2**64-1": struct.pack("<Q", 2**64 - 1) + b"{}",
    "invalid-json": encode(None, DATA, text=b'{"a": {"dtype": "F32",}}'),
    "invalid-utf8": encode(None, b"", text=b'{"\xff\xfe": {}}'),
    "unterminated-json": encode(None, b"", text=b'{"a": 1'),
    "duplicate-keys": encode(
        None,
        DATA,
        text=b'{"a":'
        + json.dumps(TENSOR_A).encode()
        + b',"a":'
        + json.dumps(TENSOR_A).encode()
        + b',"b":'
        + json.dumps(TENSOR_B).encode()
        + b"}",
    ),
    "duplicate-metadata": encode(
        None,
        DATA,
        text=(
            '{"__metadata__":{"k":"1"},"__metadata__":{"k":"2"},"a":'
            + json.dumps(TENSOR_A)
            + ',"b":'
            + json.dumps(TENSOR_B)
            + "}"
        ).encode(),
    ),
    "unknown-dtype": encode(header_with(a_dtype="F33"), DATA),
    "lowercase-dtype": encode(header_with(a_dtype="f32"), DATA),
    "missing-dtype": encode({"a": {"shape": [2, 3], "data_offsets": [0, 24]}, "b": TENSOR_B}, DATA),
    "negative-shape": encode(header_with(a_shape=[-2, -3]), DATA),
    "float-shape": encode(header_with(a_shape=[2.0, 3]), DATA),
    "string-shape": encode(header_with(a_shape=["2", 3]), DATA),
    "bool-shape": encode(header_with(a_shape=[True, 6]), DATA),
    "shape-not-list": encode(header_with(a_shape=6), DATA),
    "offsets-end-before-begin": encode(header_with(a_data_offsets=[24, 0]), DATA),
    "offsets-three-numbers": encode(header_with(a_data_offsets=[0, 24, 32]), DATA),
    "offsets-negative": encode(header_with(a_data_offsets=[-8, 16]), DATA),
    "offsets-float": encode(header_with(a_data_offsets=[0.0, 24]), DATA),
    "overlapping-offsets": encode(header_with(b_data_offsets=[20, 28], b_shape=[4]), DATA[:28]),
    "gap-between-tensors": encode(header_with(b_data_offsets=[28, 36]), DATA + b"\0" * 4),
    "bytes-after-last-tensor": encode(header_with(), DATA + b"\0"),
    "data-past-eof": encode(header_with(), DATA[:-1]),
    "shape-bigger-than-bytes": encode(header_with(a_shape=[2, 4]), DATA),
    "shape-smaller-than-bytes": encode(header_with(a_shape=[2, 2]), DATA),
    "metadata-int-value": encode({"__metadata__": {"k": 1}, **header_with()}, DATA),
    "metadata-nested": encode({"__metadata__": {"k": {"x": "y"}}, **header_with()}, DATA),
    "metadata-list": encode({"__metadata__": ["k"], **header_with()}, DATA),
    "entry-not-object": encode({"a": [1, 2], "b": TENSOR_B}, DATA),
}


# The reference implementation keeps the last of repeated keys; the format's JSON must not repeat
# them (and an inspector must not silently pick one of two tensors), so lstm-surgeon is stricter.
STRICTER_THAN_REFERENCE = {"duplicate-keys"}


@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_file_is_refused_as_the_reference_refuses_it(tmp_path, case):
    content = INVALID[case]
    if case in STRICTER_THAN_REFERENCE:
        reference_load(content)
    else:
        with pytest.raises(Exception):  # noqa: B017 - any error of the reference
            reference_load(content)
    assert_refused(tmp_path / f"{case}.safetensors", content)


def test_messages_say_what_is_wrong(tmp_path):
    expectations = {
        "header-length-over-100MB": "100 MB",
        "invalid-utf8": "UTF-8",
        "invalid-json": "JSON",
        "duplicate-keys": "'a'",
        "unknown-dtype": "F33",
        "gap-between-tensors": "gap",
        "overlapping-offsets": "overlap",
        "bytes-after-last-tensor": "after the last tensor",
        "metadata-int-value": "__metadata__",
    }
    for case, fragment in expectations.items():
        assert fragment in assert_refused(tmp_path / f"{case}.safetensors", INVALID[case]), case


def test_truncation_anywhere_in_the_header_is_refused(tmp_path):
    header_end = 8 + struct.unpack_from("<Q", GOOD)[0]
    for offset in range(header_end + 1):
        assert_refused(tmp_path / "cut.safetensors", GOOD[:offset])


def test_truncation_in_the_data_is_refused(tmp_path):
    header_end = 8 + struct.unpack_from("<Q", GOOD)[0]
    for offset in (header_end + 1, header_end + 23, header_end + 24, len(GOOD) - 1):
        with pytest.raises(Exception):  # noqa: B017
            reference_load(GOOD[:offset])
        assert_refused(tmp_path / "cut.safetensors", GOOD[:offset])


@pytest.mark.parametrize(
    ("shape", "offsets"),
    [([2**32, 2**32], [0, 0]), ([2**62, 4], [0, 0]), ([2**70], [0, 8])],
    ids=["wraps-to-zero", "wraps-to-zero-2", "beyond-int64"],
)
def test_shape_whose_size_overflows_is_refused(tmp_path, shape, offsets):
    header = {"a": {"dtype": "F32", "shape": shape, "data_offsets": offsets}}
    content = encode(header, b"\0" * offsets[1])
    with pytest.raises(Exception):  # noqa: B017
        reference_load(content)
    assert_refused(tmp_path / "overflow.safetensors", content)
