"""Say what a file is when it is not a checkpoint lstm-surgeon reads, judged from its bytes alone.

A user who passes a Keras `.h5` file or a numpy archive learns more from "an HDF5 file" than from "not
a checkpoint". Only magic numbers and framing are read; nothing in the file is executed or unpickled.
The ONNX tests live here too (they walk the top-level protobuf fields without decoding them): the ONNX
format module claims a file by them.
"""

from __future__ import annotations

import mmap
from collections.abc import Callable, Iterable

READABLE = "lstm-surgeon reads torch.save and safetensors files"
UNKNOWN = "not a checkpoint lstm-surgeon can read (expected a torch.save zip file or safetensors)"

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
NPY_MAGIC = b"\x93NUMPY"
GGUF_MAGIC = b"GGUF"
PICKLE_PROTOCOLS = range(2, 6)  # the PROTO opcode (0x80) opens every pickle of protocol 2 to 5

# ModelProto's fields (onnx.proto) and their wire types: 0 = varint, 2 = length-delimited.
ONNX_MODEL_FIELDS = {1: 0, 2: 2, 3: 2, 4: 2, 5: 0, 6: 2, 7: 2, 8: 2, 14: 2, 20: 2, 25: 2, 26: 2}
ONNX_IR_VERSION, ONNX_GRAPH = 1, 7
MAX_PROTOBUF_FIELDS = 100_000  # a model has a handful of top-level fields; more means not ONNX

Buffer = mmap.mmap | bytes


def unreadable_message(path: object, buffer: Buffer) -> str:
    """The one-line error for a file that no format module claims: what it is, when its bytes say."""
    what = describe(buffer)
    return f"{path}: {UNKNOWN}" if what is None else _not_a_checkpoint(path, what)


def unreadable_zip_message(path: object, names: Iterable[str]) -> str:
    """The one-line error for a zip archive without a torch.save pickle: what it holds, if known."""
    what = describe_zip(names)
    if what is None:
        return f"{path}: a zip file, but not a torch.save checkpoint (no data.pkl)"
    return _not_a_checkpoint(path, what)


def _not_a_checkpoint(path: object, what: str) -> str:
    return f"{path}: {what}, not a checkpoint; {READABLE}"


def describe(buffer: Buffer) -> str | None:
    """What the file is ("an ONNX model (protobuf)", ...), or None when its bytes match nothing known."""
    for matches, description in SIGNATURES:
        if matches(buffer):
            return description
    return None


def describe_zip(names: Iterable[str]) -> str | None:
    """What a zip archive is, from its member names (None when they say nothing known)."""
    names = list(names)
    if names and all(name.endswith(".npy") for name in names):
        return "a numpy .npz archive (np.savez)"
    return None


def starts_with(magic: bytes) -> Callable[[Buffer], bool]:
    """A test for files that open with `magic`."""
    return lambda buffer: buffer[: len(magic)] == magic


def is_hdf5(buffer: Buffer) -> bool:
    """HDF5's signature, at offset 0 or after a user block (512 bytes, or a power of two above)."""
    offset = 0
    while offset + len(HDF5_SIGNATURE) <= len(buffer):
        if buffer[offset : offset + len(HDF5_SIGNATURE)] == HDF5_SIGNATURE:
            return True
        offset = max(512, offset * 2)
    return False


def is_plain_pickle(buffer: Buffer) -> bool:
    """A pickle of protocol 2 or later that ends with its STOP opcode. (Pre-1.6 torch.save files are
    pickles too, but the torch format module claims them first and says how to re-save them.)"""
    return (
        len(buffer) >= 3
        and buffer[0] == 0x80
        and buffer[1] in PICKLE_PROTOCOLS
        and buffer[len(buffer) - 1 :] == b"."
    )


def is_onnx_model(buffer: Buffer) -> bool:
    """A protobuf message made only of ModelProto's fields, with the right wire types, opening with
    ir_version (protobuf writes fields in number order) and holding a graph."""
    fields = _protobuf_fields(buffer)
    if not fields or fields[0] != (ONNX_IR_VERSION, 0) or (ONNX_GRAPH, 2) not in fields:
        return False
    return all(ONNX_MODEL_FIELDS.get(number) == wire for number, wire in fields)


def opens_like_onnx_model(head: Buffer) -> bool:
    """The first bytes of a file open like an ONNX model: ir_version first, then only ModelProto's
    fields with the right wire types, as far as `head` reaches (the last field may run past it).
    The whole file is checked by `is_onnx_model` once it is read."""
    fields = _protobuf_fields(head, partial=True)
    if not fields or fields[0] != (ONNX_IR_VERSION, 0):
        return False
    return all(ONNX_MODEL_FIELDS.get(number) == wire for number, wire in fields)


def _protobuf_fields(buffer: Buffer, partial: bool = False) -> list[tuple[int, int]] | None:
    """The (field number, wire type) of each top-level field, or None unless the file is a clean
    sequence of varint and length-delimited fields that ends exactly where the file does (or, if
    `partial`, where `buffer` ends: a prefix of the file)."""
    fields: list[tuple[int, int]] = []
    position = 0
    while position < len(buffer):
        tag, position = _varint(buffer, position)
        if tag is None or tag & 7 not in (0, 2) or len(fields) == MAX_PROTOBUF_FIELDS:
            return fields if tag is None and partial and position >= len(buffer) else None
        fields.append((tag >> 3, tag & 7))
        value, position = _varint(buffer, position)
        if value is None:
            return fields if partial and position >= len(buffer) else None
        if tag & 7 == 2:
            position += value
    return fields if position == len(buffer) or (partial and position > len(buffer)) else None


def _varint(buffer: Buffer, position: int) -> tuple[int | None, int]:
    """A protobuf varint at `position` and the position after it (None if cut off or over 10 bytes)."""
    value = 0
    for shift in range(0, 70, 7):
        if position >= len(buffer):
            return None, position
        byte = buffer[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, position
    return None, position


SIGNATURES: tuple[tuple[Callable[[Buffer], bool], str], ...] = (
    (starts_with(NPY_MAGIC), "a numpy array file (.npy, np.save)"),
    (is_hdf5, "an HDF5 file (such as a Keras .h5 model)"),
    (starts_with(GGUF_MAGIC), "a GGUF file (llama.cpp)"),
    (is_plain_pickle, "a plain pickle file (pickle.dump)"),
)
