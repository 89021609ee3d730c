"""Just enough of protobuf's wire format to say where each ONNX tensor's `raw_data` lies in the file.

The `onnx` package parses a model but forgets byte positions; an in-place edit needs them. This walker
reads the same messages in the same order (initializers, `Constant` values, subgraphs of `If`, `Loop`
and `Scan`), decodes nothing it does not need, and reports each `TensorProto.raw_data` (or a packed
run of `float_data`/`double_data`, whose bytes are laid out the same way) by its path in the model, e.g. `("graph", "initializer", 3)` or
`("graph", "node", 7, "attribute", 0, "g", "initializer", 0)`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from lstm_surgeon.errors import CheckpointError

VARINT, FIXED64, LENGTH, FIXED32 = 0, 1, 2, 5
MAX_DEPTH = 64  # subgraphs nested deeper than any real model: a hostile file, not a model

# Field numbers (onnx/onnx.proto3).
MODEL_GRAPH = 7
GRAPH_NODE, GRAPH_INITIALIZER = 1, 5
NODE_ATTRIBUTE = 5
ATTRIBUTE_TENSOR, ATTRIBUTE_GRAPH, ATTRIBUTE_TENSORS, ATTRIBUTE_GRAPHS = 5, 6, 10, 11
TENSOR_RAW_DATA = 9
PACKED_FLOATS = (4, 10)  # TensorProto.float_data, double_data

Path = tuple[str | int, ...]


@dataclass(frozen=True)
class Field:
    """One field of a message: its number, wire type, and where its payload lies."""

    number: int
    wire_type: int
    start: int  # first byte of the payload (after the length prefix for LENGTH fields)
    end: int


def _varint(buffer: bytes | memoryview, position: int, end: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if position >= end or shift > 63:
            raise CheckpointError("truncated or malformed protobuf (bad varint)")
        byte = buffer[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, position
        shift += 7


def fields(buffer: bytes | memoryview, start: int, end: int) -> Iterator[Field]:
    """The fields of the message in `buffer[start:end]`, in order."""
    position = start
    while position < end:
        key, position = _varint(buffer, position, end)
        number, wire_type = key >> 3, key & 7
        if wire_type == VARINT:
            _, after = _varint(buffer, position, end)
        elif wire_type == FIXED64:
            after = position + 8
        elif wire_type == FIXED32:
            after = position + 4
        elif wire_type == LENGTH:
            length, position = _varint(buffer, position, end)
            after = position + length
        else:
            raise CheckpointError(f"malformed protobuf (wire type {wire_type})")
        if after > end or number == 0:
            raise CheckpointError("truncated or malformed protobuf")
        yield Field(number, wire_type, position, after)
        position = after


def _messages(buffer: bytes | memoryview, start: int, end: int, number: int) -> list[Field]:
    return [f for f in fields(buffer, start, end) if f.number == number and f.wire_type == LENGTH]


def _single(buffer: bytes | memoryview, start: int, end: int, number: int) -> list[Field]:
    """A message field that occurs at most once. Protobuf would merge repeats of it; a model file
    never has them, so they are refused rather than merged."""
    found = _messages(buffer, start, end, number)
    if len(found) > 1:
        raise CheckpointError(f"malformed ONNX model (field {number} repeated)")
    return found


def raw_data_positions(buffer: bytes | memoryview) -> dict[Path, tuple[int, int]]:
    """Every TensorProto's `raw_data` in a serialised ModelProto: path -> (offset, length)."""
    found: dict[Path, tuple[int, int]] = {}
    for graph in _single(buffer, 0, len(buffer), MODEL_GRAPH):
        _graph(buffer, graph, ("graph",), found, 0)
    return found


def _graph(
    buffer: bytes | memoryview,
    graph: Field,
    path: Path,
    found: dict[Path, tuple[int, int]],
    depth: int,
) -> None:
    if depth > MAX_DEPTH:
        raise CheckpointError("malformed ONNX model (subgraphs nested too deeply)")
    for index, tensor in enumerate(_messages(buffer, graph.start, graph.end, GRAPH_INITIALIZER)):
        _tensor(buffer, tensor, (*path, "initializer", index), found)
    for index, node in enumerate(_messages(buffer, graph.start, graph.end, GRAPH_NODE)):
        attributes = _messages(buffer, node.start, node.end, NODE_ATTRIBUTE)
        for number, attribute in enumerate(attributes):
            _attribute(buffer, attribute, (*path, "node", index, "attribute", number), found, depth)


def _attribute(
    buffer: bytes | memoryview,
    attribute: Field,
    path: Path,
    found: dict[Path, tuple[int, int]],
    depth: int,
) -> None:
    for tensor in _single(buffer, attribute.start, attribute.end, ATTRIBUTE_TENSOR):
        _tensor(buffer, tensor, (*path, "t"), found)
    for index, tensor in enumerate(
        _messages(buffer, attribute.start, attribute.end, ATTRIBUTE_TENSORS)
    ):
        _tensor(buffer, tensor, (*path, "tensors", index), found)
    for graph in _single(buffer, attribute.start, attribute.end, ATTRIBUTE_GRAPH):
        _graph(buffer, graph, (*path, "g"), found, depth + 1)
    for index, graph in enumerate(
        _messages(buffer, attribute.start, attribute.end, ATTRIBUTE_GRAPHS)
    ):
        _graph(buffer, graph, (*path, "graphs", index), found, depth + 1)


def _tensor(
    buffer: bytes | memoryview, tensor: Field, path: Path, found: dict[Path, tuple[int, int]]
) -> None:
    raw = _messages(buffer, tensor.start, tensor.end, TENSOR_RAW_DATA)[-1:]  # last wins
    for data in raw or _packed_values(buffer, tensor):
        found[path] = (data.start, data.end - data.start)


def _packed_values(buffer: bytes | memoryview, tensor: Field) -> list[Field]:
    """A tensor's `float_data` or `double_data` when it is one packed run: little-endian IEEE
    values back to back, laid out as raw_data would be. Values split over several runs (or
    written unpacked) do not lie in one place, and are not reported."""
    runs = [f for f in fields(buffer, tensor.start, tensor.end) if f.number in PACKED_FLOATS]
    if len(runs) == 1 and runs[0].wire_type == LENGTH:
        return runs
    return []
