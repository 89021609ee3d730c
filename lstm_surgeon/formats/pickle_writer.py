"""Write the tree `pickle_reader` reads back into a pickle, without torch and without importing a global.

`pickle.Pickler` cannot do this: it imports every global it writes to check that the name resolves, so
writing `torch._utils._rebuild_tensor_v2` would import torch, and writing an inert stand-in for a class
of the user's own code would fail. This writer emits the opcodes itself (protocol 2, as torch.save
does): plain data as pickle writes it, tensor stubs as the call that built them with their storage as a
persistent id, and inert `Opaque` objects as the same GLOBAL, REDUCE/NEWOBJ, items and BUILD they came
from. Objects reached twice (the reader keeps the pickle's sharing) are written once and then fetched
from the memo, so shared containers and tensors stay shared.
"""

from __future__ import annotations

import _compat_pickle
import pickle
import struct
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

from lstm_surgeon.formats.pickle_reader import (
    Call,
    DTypeName,
    Opaque,
    StorageStub,
    StorageType,
    TensorStub,
    TorchSize,
    _Global,
)

PROTOCOL = 2
BATCH = 1000  # items per SETITEMS / APPENDS, as pickle writes them


class PickleWriter:
    """Serialise one tree; `storage_keys` lists the storages it refers to, in order of first use."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.memo: dict[int, tuple[int, Any]] = {}  # id -> (memo index, the object, kept alive)
        self.storage_keys: list[str] = []

    def dumps(self, root: Any) -> bytes:
        self.out += pickle.PROTO + bytes([PROTOCOL])
        self.save(root)
        self.out += pickle.STOP
        return bytes(self.out)

    def save(self, value: Any) -> None:
        """Append the opcodes that rebuild `value`."""
        if self._save_atom(value):
            return
        if id(value) in self.memo:
            self._get(value)
            return
        if isinstance(value, TensorStub):
            self._save_tensor(value)
        elif isinstance(value, Opaque):
            self._save_opaque(value)
        elif type(value) is tuple or isinstance(value, TorchSize):
            self._save_tuple(value)
        elif type(value) is list:
            self.out += pickle.EMPTY_LIST
            self._put(value)
            self._save_appends(value)
        elif type(value) is dict or type(value) is OrderedDict:
            self._save_dict(value)
        elif type(value) in (set, frozenset):
            self._save_call("builtins", type(value).__name__, (list(value),), value)
        else:
            raise pickle.PicklingError(f"cannot write a {type(value).__name__} into a checkpoint")

    # --- values without identity ----------------------------------------------------------------

    def _save_atom(self, value: Any) -> bool:
        """Write a value that needs no memo (None, numbers, strings, globals); False if it is none."""
        if value is None:
            self.out += pickle.NONE
        elif value is True or value is False:
            self.out += pickle.NEWTRUE if value else pickle.NEWFALSE
        elif type(value) is int:
            self._save_int(value)
        elif type(value) is float:
            self.out += pickle.BINFLOAT + struct.pack(">d", value)
        elif type(value) is complex:
            self._save_call("builtins", "complex", (value.real, value.imag))
        elif type(value) is str:
            encoded = value.encode("utf-8", "surrogatepass")
            self.out += pickle.BINUNICODE + struct.pack("<I", len(encoded)) + encoded
        elif type(value) is bytes:
            self.out += pickle.BINBYTES + struct.pack("<I", len(value)) + value
        elif (name := _global_name(value)) is not None:
            self._global(*name)
        elif isinstance(value, StorageStub):
            self._save_storage(value)
        else:
            return False
        return True

    def _save_int(self, value: int) -> None:
        if 0 <= value < 0x100:
            self.out += pickle.BININT1 + bytes([value])
        elif 0 <= value < 0x10000:
            self.out += pickle.BININT2 + struct.pack("<H", value)
        elif -0x80000000 <= value < 0x80000000:
            self.out += pickle.BININT + struct.pack("<i", value)
        else:
            encoded = _encode_long(value)
            if len(encoded) < 0x100:
                self.out += pickle.LONG1 + bytes([len(encoded)]) + encoded
            else:
                self.out += pickle.LONG4 + struct.pack("<i", len(encoded)) + encoded

    def _global(self, module: str, name: str) -> None:
        """GLOBAL with the Python 2 spelling protocol 2 uses (as pickle's `fix_imports` writes it,
        so that loading maps it back to exactly the name the reader saw)."""
        if (module, name) in _compat_pickle.REVERSE_NAME_MAPPING:
            module, name = _compat_pickle.REVERSE_NAME_MAPPING[(module, name)]
        else:
            module = _compat_pickle.REVERSE_IMPORT_MAPPING.get(module, module)
        if "\n" in module or "\n" in name:  # possible through STACK_GLOBAL, not in a GLOBAL line
            raise pickle.PicklingError(f"a global named {module!r}.{name!r}")
        self.out += pickle.GLOBAL + f"{module}\n{name}\n".encode()

    def _save_storage(self, storage: StorageStub) -> None:
        """A storage is a persistent id `('storage', type, key, location, numel)`, as torch writes it."""
        if storage.storage_type is None:
            raise pickle.PicklingError(f"storage {storage.key!r} has no storage type")
        if storage.key not in self.storage_keys:
            self.storage_keys.append(storage.key)
        pid = ("storage", storage.storage_type, storage.key, storage.location, storage.numel)
        self._save_tuple(pid)
        self.out += pickle.BINPERSID

    # --- objects with identity (memoised) -------------------------------------------------------

    def _put(self, value: Any) -> None:
        index = len(self.memo)
        self.memo[id(value)] = (index, value)
        if index < 0x100:
            self.out += pickle.BINPUT + bytes([index])
        else:
            self.out += pickle.LONG_BINPUT + struct.pack("<I", index)

    def _get(self, value: Any) -> None:
        index = self.memo[id(value)][0]
        if index < 0x100:
            self.out += pickle.BINGET + bytes([index])
        else:
            self.out += pickle.LONG_BINGET + struct.pack("<I", index)

    def _save_tuple(self, value: tuple[Any, ...]) -> None:
        """A tuple's items go first; if one of them refers back to the tuple (only possible through
        a mutable container), the tuple is already in the memo when they are done, as in pickle."""
        if isinstance(value, TorchSize):
            self._save_call("torch", "Size", (tuple(value),), value)
            return
        self.out += pickle.MARK
        for item in value:
            self.save(item)
        if id(value) in self.memo:
            self.out += pickle.POP_MARK
            self._get(value)
            return
        self.out += pickle.TUPLE
        self._put(value)

    def _save_dict(self, value: dict[Any, Any]) -> None:
        if type(value) is OrderedDict:
            self._global("collections", "OrderedDict")
            self.out += pickle.EMPTY_TUPLE + pickle.REDUCE
        else:
            self.out += pickle.EMPTY_DICT
        self._put(value)
        self._save_setitems(value.items())
        attributes = getattr(value, "__dict__", None)  # a state dict's `_metadata`
        if attributes:
            self.save(dict(attributes))
            self.out += pickle.BUILD

    def _save_setitems(self, items: Iterable[tuple[Any, Any]]) -> None:
        pairs = list(items)
        for start in range(0, len(pairs), BATCH):
            self.out += pickle.MARK
            for key, item in pairs[start : start + BATCH]:
                self.save(key)
                self.save(item)
            self.out += pickle.SETITEMS

    def _save_appends(self, items: Iterable[Any]) -> None:
        values = list(items)
        for start in range(0, len(values), BATCH):
            self.out += pickle.MARK
            for item in values[start : start + BATCH]:
                self.save(item)
            self.out += pickle.APPENDS

    def _save_call(
        self, module: str, name: str, args: tuple[Any, ...], result: Any | None = None
    ) -> None:
        """`module.name(*args)`; memoised as `result` when that is an object with identity."""
        self._global(module, name)
        self._save_tuple(args)
        self.out += pickle.REDUCE
        if result is not None:
            self._put(result)

    def _save_tensor(self, tensor: TensorStub) -> None:
        call = tensor.built_by
        if not isinstance(call, Call):
            raise pickle.PicklingError("a tensor without the call that builds it")
        self._save_call(call.module, call.name, call.args, tensor)

    def _save_opaque(self, value: Opaque) -> None:
        """The same creation (a call, or a bare `__new__`), items and state the pickle gave it."""
        self._global(value.module, value.name)
        if value.called:
            self._save_tuple(value.args)
            self.out += pickle.REDUCE
        elif value.kwargs:
            self._save_tuple(value.args)
            self.save(dict(value.kwargs))
            self.out += pickle.NEWOBJ_EX
        else:
            self._save_tuple(value.args)
            self.out += pickle.NEWOBJ
        self._put(value)
        self._save_opaque_items(value)
        if value.state is not None:
            self.save(value.state)
            self.out += pickle.BUILD

    def _save_opaque_items(self, value: Opaque) -> None:
        """Runs of set items and appended items, in the order they came."""
        run: list[tuple[Any, Any]] = []
        appending = False
        for (key, item), appended in zip(value.items, value.appended, strict=True):
            if run and appended != appending:
                self._flush_run(run, appending)
                run = []
            run.append((key, item))
            appending = appended
        if run:
            self._flush_run(run, appending)

    def _flush_run(self, run: list[tuple[Any, Any]], appending: bool) -> None:
        if appending:
            self._save_appends(item for _, item in run)
        else:
            self._save_setitems(run)


def _global_name(value: Any) -> tuple[str, str] | None:
    """The (module, name) of a global that the reader gave a stand-in for (a class it keeps inert,
    an allowed function, a dtype, a storage type), or None for any other value."""
    if isinstance(value, (_Global, DTypeName)) or (
        isinstance(value, type) and issubclass(value, Opaque)
    ):
        return value.module, value.name
    if isinstance(value, StorageType):
        return value.module, value.qualname
    return None


def _encode_long(value: int) -> bytes:
    """Two's complement, little-endian, as few bytes as pickle's LONG1 uses."""
    length = (value.bit_length() >> 3) + 1
    return value.to_bytes(length, "little", signed=True)


def dumps(root: Any) -> tuple[bytes, list[str]]:
    """The pickle of `root`, and the keys of the storages it refers to (in order of first use)."""
    writer = PickleWriter()
    return writer.dumps(root), writer.storage_keys
