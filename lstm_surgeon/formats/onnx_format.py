"""ONNX models: the tensors that feed recurrent nodes (`LSTM`, `GRU`, `RNN`), edited where their bytes lie.

A model is one protobuf message. The `onnx` package parses it (nothing in it is run) but forgets where
each tensor's bytes are, so `protobuf_wire.raw_data_positions` walks the same messages in the same
order and gives each `raw_data`'s offset; tensors kept in external data files are mapped from those
files, which must lie inside the model's folder. Initializers and `Constant` values become tensors
(a nested graph's named by the path of the node that holds it); each recurrent node becomes an
`Operator` whose inputs are traced back through pure reshaping nodes to the bytes they view. What
cannot be traced (a weight computed by arithmetic, or stored as typed fields instead of raw bytes)
is named in a warning: that node's layer cannot be edited.
"""

from __future__ import annotations

import math
import mmap
import os
from collections import ChainMap
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, BinaryIO

from lstm_surgeon.checkpoint import (
    Buffer,
    Checkpoint,
    CheckpointFile,
    Contents,
    Entry,
    Operator,
    StorageRef,
    TensorRef,
    close_buffer,
    is_mapped,
    tensor_view,
)
from lstm_surgeon.dtypes import BY_NAME
from lstm_surgeon.errors import CheckpointError, EditError, SurgeonError
from lstm_surgeon.formats.identify import is_onnx_model, opens_like_onnx_model
from lstm_surgeon.formats.protobuf_wire import raw_data_positions
from lstm_surgeon.writing import journal_path

if TYPE_CHECKING:
    from lstm_surgeon.checkpoint import OutputTensor
    from lstm_surgeon.writing import BytePatch, Progress

INSTALL_HINT = "pip install 'lstm-surgeon[onnx]'"
RECURRENT_OPS = frozenset({"LSTM", "GRU", "RNN"})
WEIGHT_INPUTS = ("W", "R", "B", "P")  # what a layer's parameters are; X and the states are data
OPERATOR_INPUTS: dict[str, tuple[str, ...]] = {
    "LSTM": ("X", "W", "R", "B", "sequence_lens", "initial_h", "initial_c", "P"),
    "GRU": ("X", "W", "R", "B", "sequence_lens", "initial_h"),
    "RNN": ("X", "W", "R", "B", "sequence_lens", "initial_h"),
}
# Nodes whose output holds the input's elements in the same order: a view of the same bytes.
ORDER_KEEPING_OPS = frozenset({"Identity", "Unsqueeze", "Squeeze", "Reshape", "Flatten"})
# TensorProto.DataType -> lstm-surgeon's dtype names (onnx.proto3).
DTYPES: dict[int, str] = {
    1: "float32",
    2: "uint8",
    3: "int8",
    4: "uint16",
    5: "int16",
    6: "int32",
    7: "int64",
    9: "bool",
    10: "float16",
    11: "float64",
    12: "uint32",
    13: "uint64",
    14: "complex64",
    16: "bfloat16",
    17: "float8_e4m3fn",
    19: "float8_e5m2",
}
EXTERNAL = 1  # TensorProto.DataLocation
DEFAULT_DOMAINS = ("", "ai.onnx")

WirePath = tuple[str | int, ...]


def import_onnx() -> ModuleType:
    """The `onnx` package, or an error that says how to install it."""
    try:
        import onnx
    except ImportError:
        raise SurgeonError(f"reading ONNX models needs the onnx package: {INSTALL_HINT}") from None
    return onnx


@dataclass(frozen=True)
class Unstored:
    """A value that is no tensor in the file, and why (for the warning that names it)."""

    reason: str


@dataclass
class _Scope:
    """The values a graph sees: its own, then its enclosing graphs' (ONNX subgraphs see outer names)."""

    tensors: ChainMap[str, str | Unstored]  # ONNX value name -> checkpoint tensor name, or why not
    producers: ChainMap[str, Any]  # ONNX value name -> the NodeProto computing it
    prefix: str  # prepended to the names of this graph's tensors and nodes

    def child(self, prefix: str) -> _Scope:
        return _Scope(self.tensors.new_child(), self.producers.new_child(), prefix)


@dataclass
class _Reader:
    """One model being read: the tensors found so far and the files that hold their bytes."""

    path: Path
    buffer: Buffer
    positions: dict[WirePath, tuple[int, int]]
    tensors: dict[str, TensorRef] = field(default_factory=dict)
    files: list[CheckpointFile] = field(default_factory=list)
    external: dict[Path, int] = field(default_factory=dict)  # data file -> index in `files`
    operators: list[Operator] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    # --- Graphs, walked in protobuf_wire's order ------------------------------------------------

    def graph(self, graph: Any, wire: WirePath, scope: _Scope) -> None:
        for index, initializer in enumerate(graph.initializer):
            name = self.stored(initializer, initializer.name, scope, (*wire, "initializer", index))
            scope.tensors[initializer.name] = name
        for index, node in enumerate(graph.node):
            self.node(node, index, (*wire, "node", index), scope)

    def node(self, node: Any, index: int, wire: WirePath, scope: _Scope) -> None:
        label = node.name or f"{node.op_type}_{index}"
        for number, attribute in enumerate(node.attribute):
            attribute_wire = (*wire, "attribute", number)
            if node.op_type == "Constant" and attribute.name == "value" and node.output:
                value = node.output[0]
                scope.tensors[value] = self.stored(
                    attribute.t, value, scope, (*attribute_wire, "t")
                )
            if attribute.HasField("g"):
                child = scope.child(f"{scope.prefix}{label}/{attribute.name}/")
                self.graph(attribute.g, (*attribute_wire, "g"), child)
            for position, graph in enumerate(attribute.graphs):
                child = scope.child(f"{scope.prefix}{label}/{attribute.name}/{position}/")
                self.graph(graph, (*attribute_wire, "graphs", position), child)
        for output in node.output:
            scope.producers[output] = node
            if node.op_type != "Constant":
                scope.tensors.pop(output, None)  # a later node computes a name shadowing a tensor
        if node.op_type in RECURRENT_OPS and node.domain in DEFAULT_DOMAINS:
            self.operators.append(self.operator(node, f"{scope.prefix}{label}", scope))

    # --- Tensors --------------------------------------------------------------------------------

    def stored(self, tensor: Any, value: str, scope: _Scope, wire: WirePath) -> str | Unstored:
        """Register a TensorProto as a checkpoint tensor; its name, or why it has no bytes to edit."""
        name = self.unique(f"{scope.prefix}{value}")
        dtype = DTYPES.get(tensor.data_type)
        if dtype is None:
            return Unstored(
                f"has ONNX element type {tensor.data_type}, which lstm-surgeon does not read"
            )
        shape = tuple(int(dim) for dim in tensor.dims)
        if tensor.data_location == EXTERNAL:
            storage = self.external_storage(tensor, name, shape, dtype)
        elif wire in self.positions and _laid_out_as_raw(tensor, dtype):
            offset, length = self.positions[wire]
            storage = StorageRef(name, offset, length)
        else:
            return Unstored(
                "is stored as typed values (int32_data, int64_data...) that do not lie in the "
                "file as their bytes; lstm-surgeon edits raw_data, packed float_data/double_data "
                "and external data (onnx.numpy_helper.from_array writes raw_data)"
            )
        ref = TensorRef(name, BY_NAME[dtype], shape, storage)
        if storage.nbytes != ref.nbytes:
            raise CheckpointError(
                f"{self.path}: tensor {value!r} holds {storage.nbytes} bytes, not the "
                f"{ref.nbytes} its shape {list(shape)} needs"
            )
        self.tensors[name] = ref
        return name

    def unique(self, name: str) -> str:
        candidate, number = name, 1
        while candidate in self.tensors:
            number += 1
            candidate = f"{name}#{number}"
        return candidate

    def external_storage(
        self, tensor: Any, name: str, shape: tuple[int, ...], dtype: str
    ) -> StorageRef:
        """Where an external tensor's bytes lie: a file inside the model's folder, mapped read-only."""
        entries = {entry.key: entry.value for entry in tensor.external_data}
        location = entries.get("location", "")
        target = self.external_path(location, name)
        index = self.external.get(target)
        if index is None:
            index = self.external[target] = len(self.files)
            self.files.append(CheckpointFile(target, _map_read_only(target)))
        nbytes = BY_NAME[dtype].itemsize * math.prod(shape)
        try:
            offset = int(entries.get("offset", 0))
            length = int(entries.get("length", nbytes))
        except ValueError:
            raise CheckpointError(
                f"{self.path}: tensor {name!r} has a malformed external offset"
            ) from None
        if offset < 0 or offset + length > self.files[index].size:
            raise CheckpointError(
                f"{self.path}: tensor {name!r} lies past the end of its external data file {location!r}"
            )
        return StorageRef(name, offset, length, index)

    def external_path(self, location: str, name: str) -> Path:
        """The data file an external location names, refused when it leads outside the folder."""
        folder = self.path.parent.resolve()
        target = (folder / location).resolve()
        if not location or Path(location).is_absolute() or not target.is_relative_to(folder):
            raise CheckpointError(
                f"{self.path}: tensor {name!r} names external data {location!r} outside the "
                "model's folder; lstm-surgeon reads external data only beside the model"
            )
        if not target.is_file():
            raise CheckpointError(
                f"{self.path}: tensor {name!r}: external data {location!r} is missing"
            )
        if journal_path(target).exists():  # its journal lies beside it, not beside the model
            raise CheckpointError(
                f"{self.path}: an in-place edit of its external data {location!r} was interrupted; "
                f"run `lstm-surgeon recover {target}` to roll it back"
            )
        return target

    # --- Recurrent nodes ------------------------------------------------------------------------

    def operator(self, node: Any, name: str, scope: _Scope) -> Operator:
        inputs: dict[str, str] = {}
        for input_name, value in zip(OPERATOR_INPUTS[node.op_type], node.input, strict=False):
            if not value:
                continue  # an omitted optional input
            resolved = self.resolve(value, scope)
            if isinstance(resolved, Unstored):
                if input_name in WEIGHT_INPUTS:
                    self.warnings.append(
                        f"{name} ({node.op_type}): its {input_name} input {value!r} "
                        f"{resolved.reason}; this layer cannot be edited"
                    )
                inputs[input_name] = f"{scope.prefix}{value}"  # a name no tensor has
            else:
                inputs[input_name] = resolved
        attributes = {attribute.name: _plain(attribute) for attribute in node.attribute}
        return Operator(node.op_type, name, inputs, attributes)

    def resolve(self, value: str, scope: _Scope, depth: int = 0) -> str | Unstored:
        """The checkpoint tensor whose bytes `value` holds, traced through order-keeping and
        transposing nodes (each such value becomes a view of the same bytes), or why not."""
        found = scope.tensors.get(value)
        if found is not None:
            return found
        node = scope.producers.get(value)
        if node is None:
            return Unstored("is a graph input, not a tensor in the file")
        if (node.op_type not in ORDER_KEEPING_OPS and node.op_type != "Transpose") or depth > 64:
            return Unstored(f"is computed by a {node.op_type!r} node")
        source = self.resolve(node.input[0], scope, depth + 1) if node.input else None
        if source is None or isinstance(source, Unstored):
            return source or Unstored(f"is computed by a {node.op_type!r} node")
        view = self.view(self.tensors[source], node, f"{scope.prefix}{value}", scope)
        if isinstance(view, Unstored):
            return view
        scope.tensors[value] = view.name
        return view.name

    def view(self, source: TensorRef, node: Any, name: str, scope: _Scope) -> TensorRef | Unstored:
        """`source`'s bytes as `node`'s output sees them."""
        if node.op_type == "Transpose":
            permutation = _ints_attribute(node, "perm") or list(reversed(range(len(source.shape))))
            if sorted(permutation) != list(range(len(source.shape))):
                return Unstored("is transposed by a malformed 'Transpose' node")
            strides = source.element_strides
            shape = tuple(source.shape[axis] for axis in permutation)
            ref = TensorRef(
                self.unique(name),
                source.dtype,
                shape,
                source.storage,
                source.element_offset,
                tuple(strides[axis] for axis in permutation),
            )
        else:
            shape = self.reshaped(source.shape, node, scope)
            if shape is None or math.prod(shape) != source.numel or not source.is_contiguous:
                return Unstored(f"is reshaped by a {node.op_type!r} node whose shape is not known")
            ref = TensorRef(
                self.unique(name), source.dtype, shape, source.storage, source.element_offset
            )
        self.tensors[ref.name] = ref
        return ref

    def reshaped(self, shape: tuple[int, ...], node: Any, scope: _Scope) -> tuple[int, ...] | None:
        """The output shape of an order-keeping node, from its attributes and constant inputs."""
        op = node.op_type
        if op == "Identity":
            return shape
        if op == "Flatten":
            axis = _int_attribute(node, "axis", 1) % (len(shape) + 1)
            return (math.prod(shape[:axis]), math.prod(shape[axis:]))
        operand = self.constant_ints(node, scope)
        if op == "Reshape":
            return None if operand is None else _reshape(shape, operand)
        axes = operand if operand is not None else _ints_attribute(node, "axes")
        if op == "Unsqueeze":
            return None if axes is None else _unsqueeze(shape, axes)
        if axes is None:  # Squeeze without axes drops every 1
            return tuple(size for size in shape if size != 1)
        rank = len(shape)
        dropped = {axis % rank for axis in axes}
        return tuple(size for axis, size in enumerate(shape) if axis not in dropped)

    def constant_ints(self, node: Any, scope: _Scope) -> list[int] | None:
        """The second input of a node as integers, when it is a tensor in the file."""
        if len(node.input) < 2 or not node.input[1]:
            return None
        name = scope.tensors.get(node.input[1])
        if not isinstance(name, str):
            return None
        ref = self.tensors[name]
        if ref.dtype.name not in ("int64", "int32") or ref.storage.file != 0:
            return None
        return [int(value) for value in tensor_view(self.buffer, ref).reshape(-1)]


def _reshape(shape: tuple[int, ...], target: list[int]) -> tuple[int, ...] | None:
    """ONNX Reshape's output shape (0 copies the input's size, -1 is inferred; allowzero=0)."""
    sizes = [
        shape[axis] if size == 0 and axis < len(shape) else size for axis, size in enumerate(target)
    ]
    if sizes.count(-1) > 1 or any(size < -1 for size in sizes):
        return None
    if -1 in sizes:
        known = math.prod([size for size in sizes if size != -1])
        if known == 0 or math.prod(shape) % known:
            return None
        sizes[sizes.index(-1)] = math.prod(shape) // known
    return tuple(sizes)


def _unsqueeze(shape: tuple[int, ...], axes: list[int]) -> tuple[int, ...] | None:
    rank = len(shape) + len(axes)
    inserted = {axis % rank for axis in axes}
    if len(inserted) != len(axes):
        return None
    sizes = iter(shape)
    return tuple(1 if axis in inserted else next(sizes) for axis in range(rank))


def _laid_out_as_raw(tensor: Any, dtype: str) -> bool:
    """raw_data, or the typed field whose packed values are laid out as that dtype's bytes."""
    if tensor.HasField("raw_data"):
        return True
    if dtype in ("float32", "complex64"):
        return len(tensor.float_data) > 0
    return dtype == "float64" and len(tensor.double_data) > 0


def _int_attribute(node: Any, name: str, default: int) -> int:
    return next((int(a.i) for a in node.attribute if a.name == name), default)


def _ints_attribute(node: Any, name: str) -> list[int] | None:
    return next((list(a.ints) for a in node.attribute if a.name == name), None)


def _plain(attribute: Any) -> Any:
    """An attribute's value as plain Python (strings decoded), as inspect's JSON shows it."""
    from onnx import helper

    try:
        value = helper.get_attribute_value(attribute)
    except ValueError:  # an attribute type the onnx package does not know: a broken file
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, list):
        return [
            item.decode("utf-8", "replace") if isinstance(item, bytes) else item for item in value
        ]
    if isinstance(value, (int, float, str)):
        return value
    return repr(value)


def _map_read_only(path: Path) -> Buffer:
    try:
        with open(path, "rb") as file:
            if os.fstat(file.fileno()).st_size == 0:
                return b""
            return mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as error:
        raise CheckpointError(f"{path}: cannot read: {error.strerror}") from None


class OnnxFormat:
    name = "onnx"
    suffixes = (".onnx",)

    def sniff(self, head: bytes) -> bool:
        return opens_like_onnx_model(head)

    def read(self, path: Path, buffer: mmap.mmap | bytes) -> Checkpoint:
        onnx = import_onnx()
        if not is_mapped(buffer):  # a remote file: a protobuf has no index, so read it whole
            buffer = buffer[0 : len(buffer)]
        if not is_onnx_model(buffer):
            raise CheckpointError(f"{path}: a truncated or malformed ONNX model")
        model = _parse(onnx, path, buffer)
        reader = _Reader(path, buffer, raw_data_positions(memoryview(buffer)))
        reader.files.append(CheckpointFile(path, buffer))
        try:
            reader.graph(model.graph, ("graph",), _Scope(ChainMap(), ChainMap(), ""))
        except BaseException:
            for file in reader.files[1:]:
                close_buffer(file.buffer)
            raise
        if not reader.operators:
            reader.warnings.append(
                f"{path}: no LSTM, GRU or RNN node in this ONNX model (a recurrence unrolled into "
                "MatMul/Gemm and Sigmoid nodes has no recurrent layer to show or edit)"
            )
        metadata = {prop.key: prop.value for prop in model.metadata_props} or None
        contents = Contents(
            entries=tuple(Entry(name, "tensor") for name in reader.tensors),
            metadata=metadata,
            operators=tuple(reader.operators),
        )
        return Checkpoint(
            path,
            self,
            reader.tensors,
            tuple(reader.files),
            contents,
            format_state=model,
            warnings=reader.warnings,
        )

    def checksum_patches(
        self, checkpoint: Checkpoint, storages: dict[StorageRef, bytes]
    ) -> list[BytePatch]:
        return []  # protobuf keeps no checksums

    def checksum_problems(
        self, checkpoint: Checkpoint, progress: Progress | None
    ) -> tuple[int, list[str]]:
        return 0, []

    def write(
        self,
        out: BinaryIO,
        tensors: list[OutputTensor],
        source: Checkpoint,
        drop_keys: frozenset[str] = frozenset(),
    ) -> None:
        """ONNX models are edited where their tensor bytes lie; a new graph is never written."""
        raise EditError(
            "lstm-surgeon edits an ONNX model's tensors where their bytes lie and does not write "
            "new ONNX graphs (adding or removing tensors, or writing another format as ONNX)"
        )


def _parse(onnx: ModuleType, path: Path, buffer: Buffer) -> Any:
    """The ModelProto, parsed by the onnx package (a parse only: no graph is run)."""
    try:
        return onnx.ModelProto.FromString(bytes(buffer))
    except Exception as error:  # protobuf's DecodeError has no stable import path
        raise CheckpointError(f"{path}: a truncated or malformed ONNX model ({error})") from None


FORMAT = OnnxFormat()
