"""Read the pickle inside a torch.save file without executing anything from it.

`pickle` only runs code through the globals it resolves (`find_class`). This unpickler never resolves a
real global: tensor rebuilders become `TensorStub` records, storages become `StorageStub` records, a few
plain containers (OrderedDict, set) are allowed, and every other global becomes an inert `Opaque` type that
remembers its name and arguments. A payload that would call `os.system` gets an `Opaque` object instead.

The tree keeps what a writer needs to write it back unchanged (`pickle_writer`): each tensor stub the call
that built it, each storage its type, each inert object how it was created and filled.
"""

from __future__ import annotations

import io
import pickle
import pickletools
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from lstm_surgeon.dtypes import BY_NAME, BY_TORCH_STORAGE_CLASS, DType

# What a malformed or hostile pickle makes the never-executing unpickler raise: a corrupt file.
READ_ERRORS: tuple[type[BaseException], ...] = (
    pickle.UnpicklingError,
    EOFError,
    ValueError,
    TypeError,
    AttributeError,
    IndexError,
    KeyError,
    MemoryError,
    RecursionError,
    UnicodeDecodeError,
    OverflowError,
)


class StorageType:
    """What `torch.FloatStorage` (and friends) resolve to: the name of an element type ("" untyped),
    and the global it was named by (`module`, `qualname`)."""

    def __init__(self, dtype_name: str, module: str = "torch", qualname: str = "") -> None:
        self.dtype_name = dtype_name
        self.module = module
        self.qualname = qualname


class DTypeName:
    """What `torch.float16` (and friends) resolve to when a pickle names a dtype."""

    module = "torch"

    def __init__(self, name: str) -> None:
        self.name = name


class TorchSize(tuple):  # type: ignore[type-arg]
    """What `torch.Size(dims)` resolves to: a tuple that remembers it was a `torch.Size`."""


@dataclass(frozen=True)
class Call:
    """A call the pickle made to an allowed function, kept so that a writer can make the same one."""

    module: str
    name: str
    args: tuple[Any, ...]


def _canonical_dtype(marker: Any) -> DType | None:
    """The shared `DType` a marker names. Markers are fresh objects per lookup, so a hostile pickle
    that mutates one (BUILD can set attributes) changes nothing outside its own tensors."""
    name = getattr(marker, "dtype_name", None) or getattr(marker, "name", None)
    return BY_NAME.get(name) if isinstance(name, str) else None


@dataclass(frozen=True)
class StorageStub:
    """A persistent id `('storage', type, key, location, numel)`: the storage lives in `data/<key>`."""

    key: str
    dtype: DType | None
    location: str
    numel: int
    storage_type: StorageType | None = None  # the type the persistent id named


@dataclass
class TensorStub:
    """A tensor the pickle would rebuild: a view of a storage, and the call that built it."""

    storage: StorageStub
    storage_offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: DType
    requires_grad: bool = False
    built_by: Call | None = None  # the outermost call (a Parameter's, or the rebuilder's)


class Opaque:
    """An instance of a class lstm-surgeon does not re-create: it keeps what made and filled it.

    `called` tells a call (`REDUCE`: `cls(*args)`) from a bare `cls.__new__(cls, *args)` (`NEWOBJ`);
    `items` are the (key, value) pairs set or appended, `appended` says which were appended."""

    module = "?"
    name = "?"
    qualname = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> Opaque:
        instance = super().__new__(cls)
        instance.args = args
        instance.kwargs = kwargs
        instance.called = False
        instance.state = None
        instance.items = []
        instance.appended = []
        return instance

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args
        self.called = True

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.items.append((key, value))
        self.appended.append(False)

    def append(self, value: Any) -> None:
        self.items.append((len(self.items), value))
        self.appended.append(True)

    def extend(self, values: Any) -> None:
        for value in values:
            self.append(value)

    def __repr__(self) -> str:
        return f"<{self.qualname}>"


def _opaque_type(module: str, name: str) -> type[Opaque]:
    return type(name, (Opaque,), {"module": module, "name": name, "qualname": f"{module}.{name}"})


def _tensor_stub(
    storage: Any,
    storage_offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any,
    dtype: DType | None,
) -> TensorStub | None:
    """The record of a tensor view (None when it is not a storage view lstm-surgeon reads); the
    fields are checked later, when the tensor is named."""
    if not isinstance(storage, StorageStub) or dtype is None:
        return None
    return TensorStub(
        storage, storage_offset, tuple(size), tuple(stride), dtype, bool(requires_grad)
    )


def _rebuild_tensor_v2(
    storage: Any, storage_offset: Any, size: Any, stride: Any, requires_grad: Any = False, *_: Any
) -> TensorStub | None:
    dtype = storage.dtype if isinstance(storage, StorageStub) else None
    return _tensor_stub(storage, storage_offset, size, stride, requires_grad, dtype)


def _rebuild_tensor_v3(
    storage: Any,
    storage_offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any = False,
    backward_hooks: Any = None,
    dtype: Any = None,
    *_: Any,
) -> TensorStub | None:
    element_type = _canonical_dtype(dtype) if isinstance(dtype, DTypeName) else None
    return _tensor_stub(storage, storage_offset, size, stride, requires_grad, element_type)


def _rebuild_parameter(data: Any, requires_grad: Any = False, *rest: Any) -> TensorStub | None:
    return data if isinstance(data, TensorStub) else None  # read as the tensor it wraps


def _rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> TensorStub | None:
    if isinstance(func, _Global) and func.function in _TENSOR_REBUILDERS:
        result = func(*args)
        return result if isinstance(result, TensorStub) else None
    return None


def _torch_size(dims: Any = ()) -> TorchSize:
    return TorchSize(dims)


_ALLOWED: dict[tuple[str, str], Callable[..., Any] | type] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "complex"): complex,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Size"): _torch_size,
}
_UNTYPED_STORAGES = {("torch.storage", "UntypedStorage"), ("torch", "UntypedStorage")}


_TENSOR_REBUILDERS = (_rebuild_tensor_v2, _rebuild_tensor_v3, _rebuild_parameter)
_EXTENSION_OPCODES = frozenset({"EXT1", "EXT2", "EXT4"})
_MEMO_OPCODES = frozenset({"PUT", "BINPUT", "LONG_BINPUT", "GET", "BINGET", "LONG_BINGET"})


class _Global:
    """A fresh, immutable stand-in for an allowed function, one per lookup: a pickle can BUILD on
    what `find_class` returns, and must not be able to change this module's functions.

    A call whose arguments are not a tensor lstm-surgeon reads gives an inert `Opaque` that keeps
    them all; a tensor stub remembers the call that built it."""

    __slots__ = ("function", "module", "name")

    def __init__(self, module: str, name: str, function: Callable[..., Any]) -> None:
        object.__setattr__(self, "function", function)
        object.__setattr__(self, "module", module)
        object.__setattr__(self, "name", name)

    def __setattr__(self, name: str, value: Any) -> None:
        raise pickle.UnpicklingError("a pickle tried to modify a global")

    def __call__(self, *args: Any) -> Any:
        result = self.function(*args)
        if result is None:
            return _opaque_type(self.module, self.name)(*args)
        if isinstance(result, TensorStub):
            return replace(result, built_by=Call(self.module, self.name, args))
        return result


def resolve_global(
    module: str, name: str, extra: dict[tuple[str, str], Callable[..., Any]] | None = None
) -> Any:
    """What a pickle's global resolves to: an allowed container type, a stand-in for an allowed
    function (`extra` adds some), a storage or dtype marker, or else an inert `Opaque` type."""
    allowed = _ALLOWED.get((module, name)) or (extra or {}).get((module, name))
    if isinstance(allowed, type):
        return allowed  # builtin container types: immutable
    if allowed is not None:
        return _Global(module, name, allowed)
    if (module, name) in _UNTYPED_STORAGES:
        return StorageType("", module, name)
    if module == "torch" and name in BY_TORCH_STORAGE_CLASS:
        return StorageType(BY_TORCH_STORAGE_CLASS[name].name, module, name)
    if module == "torch" and name in BY_NAME:
        return DTypeName(name)
    return _opaque_type(module, name)


class SafeUnpickler(pickle.Unpickler):
    """Builds stubs and inert objects; resolves no real global, so nothing in the file can run."""

    def find_class(self, module: str, name: str) -> Any:
        return resolve_global(module, name)

    def persistent_load(self, pid: Any) -> Any:
        if (
            isinstance(pid, tuple)
            and len(pid) in (5, 6)
            and pid[0] == "storage"
            and isinstance(pid[1], StorageType)
            and pid[5:] in ((), (None,))  # pre-1.6 files add view metadata, None unless a view
        ):
            _, storage_type, key, location, numel = pid[:5]
            dtype = _canonical_dtype(storage_type)
            return StorageStub(str(key), dtype, str(location), int(numel), storage_type)
        raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")


def load_safely(data: bytes) -> Any:
    """The object tree of a pickle, with stubs in place of tensors, storages and foreign objects."""
    _prescan(data)
    return SafeUnpickler(io.BytesIO(data)).load()


def _prescan(data: bytes) -> None:
    """Refuse, before the C unpickler sees them, opcodes a torch.save pickle never holds and that
    could harm: EXT codes resolve through `copyreg`'s process-wide cache *before* `find_class`;
    a memo index far beyond the pickle's size makes the unpickler allocate a memo that large; a
    length beyond the data left is truncation. (`pickletools.genops` reads, it never builds.)"""
    for opcode, argument, _ in pickletools.genops(data):
        if opcode.name in _EXTENSION_OPCODES:
            raise pickle.UnpicklingError(
                f"the pickle uses {opcode.name} (never written by torch.save)"
            )
        if opcode.name in _MEMO_OPCODES and int(argument) > len(data):
            raise pickle.UnpicklingError(f"{opcode.name} memo index {argument} is out of range")
