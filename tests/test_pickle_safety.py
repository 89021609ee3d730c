"""Hostile pickles inside real torch.save archives: reading one never runs its code.

Each payload is spliced next to a real LSTM state dict, as ``{"evil": <payload>, "model": <state>}``,
and the archive's ``data.pkl`` record is rewritten with it. A *control* run loads the same payload
with ``torch.load(weights_only=False)`` and checks that it really does run (creating a canary file),
so every case here is a live exploit for an ordinary unpickler. lstm-surgeon must then either read
the real tensors exactly or refuse the file with a CheckpointError, and the canary must not appear.
"""

from __future__ import annotations

import copyreg
import dataclasses
import io
import pickle
import shlex
import sys
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from lstm_surgeon import dtypes
from lstm_surgeon.errors import CheckpointError
from lstm_surgeon.formats import open_checkpoint, pickle_reader

# --- A tiny pickle assembler --------------------------------------------------------------------

MARK, TUPLE, REDUCE, BUILD, STOP = b"(", b"t", b"R", b"b", b"."
EMPTY_TUPLE, NONE, EMPTY_DICT, EMPTY_LIST = b")", b"N", b"}", b"]"
SETITEM, SETITEMS, APPENDS, STACK_GLOBAL = b"s", b"u", b"e", b"\x93"


def data(obj: Any) -> bytes:
    """Opcodes that push a plain object (no memo, so they splice anywhere)."""
    buffer = io.BytesIO()
    pickler = pickle.Pickler(buffer, protocol=2)
    pickler.fast = True
    pickler.dump(obj)
    return buffer.getvalue()[2:-1]  # without PROTO and STOP


def global_(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()


def stack_global(module: str, name: str) -> bytes:
    return data(module) + data(name) + STACK_GLOBAL


def call(function: bytes, *arguments: bytes) -> bytes:
    return function + MARK + b"".join(arguments) + TUPLE + REDUCE


def ext2(code: int) -> bytes:
    return b"\x83" + code.to_bytes(2, "little")


def shell_touch(canary: Path) -> str:
    return f"touch {shlex.quote(str(canary))}"


# --- The archive the payloads are spliced into ---------------------------------------------------


@dataclass(frozen=True)
class Base:
    path: Path
    pickle_name: str
    body: bytes  # data.pkl without its PROTO header and STOP
    state: dict[str, torch.Tensor]

    def write(self, target: Path, evil: bytes, *, key: str = "evil") -> Path:
        """The base archive with data.pkl replaced by {key: evil, "model": <state dict>}."""
        program = b"\x80\x04" + EMPTY_DICT + MARK + data(key) + evil
        program += data("model") + self.body + SETITEMS + STOP
        return self.write_pickle(target, program)

    def write_pickle(self, target: Path, program: bytes) -> Path:
        with zipfile.ZipFile(self.path) as old, zipfile.ZipFile(target, "w") as new:
            for name in old.namelist():
                new.writestr(name, program if name == self.pickle_name else old.read(name))
        return target


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Base:
    path = tmp_path_factory.mktemp("base") / "base.pt"
    torch.manual_seed(0)
    state = nn.LSTM(3, 4).state_dict()
    torch.save(state, path)
    with zipfile.ZipFile(path) as archive:
        name = next(n for n in archive.namelist() if n.endswith("/data.pkl"))
        program = archive.read(name)
    assert program[:2] == b"\x80\x02" and program[-1:] == STOP
    return Base(path, name, program[2:-1], dict(state))


def assert_safe_read(path: Path, canary: Path, state: dict[str, torch.Tensor]) -> None:
    """Opening `path` runs nothing, and either refuses it or reads the real tensors exactly."""
    try:
        checkpoint = open_checkpoint(path)
    except CheckpointError as error:
        assert str(path) in str(error)
        assert "\n" not in str(error)
    else:
        with checkpoint:
            for key, tensor in state.items():
                assert checkpoint.values(f"model.{key}").tolist() == tensor.double().tolist()
                assert checkpoint.tensors[f"model.{key}"].shape == tuple(tensor.shape)
    assert not canary.exists(), "the payload ran while lstm-surgeon read the file"


# --- The corpus -----------------------------------------------------------------------------------

Payload = Callable[[Path], bytes]  # canary path -> opcodes that create it when unpickled normally

PAYLOADS: dict[str, Payload] = {
    "reduce-os-system": lambda c: call(global_("os", "system"), data(shell_touch(c))),
    "reduce-posix-system": lambda c: call(global_("posix", "system"), data(shell_touch(c))),
    "reduce-subprocess": lambda c: call(
        global_("subprocess", "check_call"), data(["touch", str(c)])
    ),
    "builtins-exec": lambda c: call(
        global_("builtins", "exec"), data(f"open({str(c)!r}, 'w').close()")
    ),
    "builtins-eval": lambda c: call(
        global_("builtins", "eval"), data(f"__import__('os').system({shell_touch(c)!r})")
    ),
    "stack-global": lambda c: call(stack_global("os", "system"), data(shell_touch(c))),
    "stack-global-dotted-os-path": lambda c: call(
        stack_global("os.path", "os.system"), data(shell_touch(c))
    ),
    "stack-global-dotted-via-allowed-module": lambda c: call(
        stack_global("torch._utils", "torch.os.system"), data(shell_touch(c))
    ),
    "stack-global-dotted-via-torch": lambda c: call(
        stack_global("torch", "os.system"), data(shell_touch(c))
    ),
    "global-dotted-via-allowed-module": lambda c: call(
        global_("torch._utils", "torch.os.system"), data(shell_touch(c))
    ),
    "importlib-chain": lambda c: call(
        call(
            global_("builtins", "getattr"),
            call(global_("importlib", "import_module"), data("os")),
            data("system"),
        ),
        data(shell_touch(c)),
    ),
    "inst-opcode": lambda c: MARK + data(shell_touch(c)) + b"ios\nsystem\n",
    "obj-opcode": lambda c: MARK + global_("os", "system") + data(shell_touch(c)) + b"o",
    "setstate-functools-partial": lambda c: (
        call(global_("functools", "partial"), global_("builtins", "print"))
        + MARK
        + global_("os", "system")
        + data((shell_touch(c),))
        + data({})
        + NONE
        + TUPLE
        + BUILD
        + EMPTY_TUPLE
        + REDUCE
    ),
    "nested-in-containers": lambda c: (  # [1, {"k": os.system(...)}]
        EMPTY_LIST
        + MARK
        + data(1)
        + EMPTY_DICT
        + data("k")
        + call(global_("os", "system"), data(shell_touch(c)))
        + SETITEM
        + APPENDS
    ),
}


@pytest.mark.parametrize("name", sorted(PAYLOADS))
def test_hostile_pickle_runs_nothing(base, tmp_path, name):
    control = tmp_path / "control-canary"
    torch.load(base.write(tmp_path / "control.pt", PAYLOADS[name](control)), weights_only=False)
    assert control.exists(), "the payload is not live: this case would test nothing"

    canary = tmp_path / "canary"
    assert_safe_read(base.write(tmp_path / "evil.pt", PAYLOADS[name](canary)), canary, base.state)


class Exploit:
    """A hostile object as a training script might pickle it by accident or on purpose."""

    def __init__(self, canary: Path) -> None:
        self.canary = canary

    def __reduce__(self) -> tuple[Any, ...]:
        import os

        return (os.system, (shell_touch(self.canary),))


def test_hostile_object_next_to_real_tensors(tmp_path, torch_reference):
    torch.manual_seed(1)
    state = nn.GRU(2, 3).state_dict()
    payload = {
        "model": state,
        "extras": [1, {"hook": Exploit(tmp_path / "control-canary")}, torch.arange(4.0)],
        "step": torch.tensor(7),
    }
    control_path = tmp_path / "control.pt"
    torch.save(payload, control_path)
    torch.load(control_path, weights_only=False)
    assert (tmp_path / "control-canary").exists()

    canary = tmp_path / "canary"
    payload["extras"][1]["hook"] = Exploit(canary)
    path = tmp_path / "evil.pt"
    torch.save(payload, path)
    expected = torch_reference.flatten(payload)
    with open_checkpoint(path) as checkpoint:
        torch_reference.assert_matches(checkpoint, expected)
    assert not canary.exists()


def test_naming_a_module_does_not_import_it(base, tmp_path, monkeypatch):
    """An ordinary unpickler imports the module a GLOBAL names, running its top level."""
    module = "lstm_surgeon_test_side_effect_module"
    canary = tmp_path / "canary"
    (tmp_path / f"{module}.py").write_text(f"open({str(canary)!r}, 'w').close()\nthing = print\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = base.write(tmp_path / "evil.pt", call(global_(module, "thing"), data("x")))
    try:
        assert_safe_read(path, canary, base.state)
        assert module not in sys.modules
        torch.load(path, weights_only=False)  # control: an ordinary load imports it
        assert canary.exists()
    finally:
        sys.modules.pop(module, None)


# --- BUILD (__setstate__) on the reader's own objects ------------------------------------------


def snapshot_dtype_tables() -> Any:
    tables = (dtypes.BY_NAME, dtypes.BY_SAFETENSORS_CODE, dtypes.BY_TORCH_STORAGE_CLASS)
    return [
        {
            key: (id(value), dataclasses.astuple(value), dict(vars(value)))
            for key, value in t.items()
        }
        for t in tables
    ]


DTYPE_BUILDS = {
    "dtype-dict-state": global_("torch", "float32") + data({"name": "float64", "itemsize": 1}),
    "dtype-slot-state": global_("torch", "float16") + data((None, {"name": "int8"})),
    "storage-dict-state": global_("torch", "FloatStorage") + data({"dtype_name": "float64"}),
    "storage-slot-state": global_("torch", "HalfStorage") + data((None, {"dtype_name": "uint8"})),
}


@pytest.mark.parametrize("name", sorted(DTYPE_BUILDS))
def test_build_on_a_dtype_global_changes_no_shared_dtype(base, tmp_path, fixtures_dir, name):
    before = snapshot_dtype_tables()
    path = base.write(tmp_path / "evil.pt", DTYPE_BUILDS[name] + BUILD)
    assert_safe_read(path, tmp_path / "canary", base.state)
    assert snapshot_dtype_tables() == before
    assert dtypes.BY_NAME["float32"].itemsize == 4
    # A clean file read afterwards still decodes with the right element types.
    clean = fixtures_dir / "bf16.pt"
    expected = torch.load(clean, weights_only=True)
    with open_checkpoint(clean) as checkpoint:
        for key, tensor in expected.items():
            assert checkpoint.tensors[key].dtype.name == "bfloat16"
            assert checkpoint.values(key).tolist() == tensor.double().tolist()


ALLOWED_CALLABLES = [
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_tensor_v3"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._tensor", "_rebuild_from_type_v2"),
    ("torch", "Size"),
]
ALLOWED_TYPES = [
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "complex"),
]


def snapshot_allowed() -> Any:
    result = {}
    for key, value in pickle_reader._ALLOWED.items():
        attributes = {
            name: getattr(value, name, None)
            for name in ("__defaults__", "__kwdefaults__", "__name__", "__qualname__", "__doc__")
        }
        result[key] = (id(value), attributes, dict(getattr(value, "__dict__", {})))
    return result


@pytest.mark.parametrize(
    "target",
    ALLOWED_CALLABLES + ALLOWED_TYPES,
    ids=lambda target: ".".join(target),
)
def test_build_on_an_allowed_global_changes_nothing_for_later_files(base, tmp_path, target):
    before = snapshot_allowed()
    state = (None, {"__defaults__": (True, None, None), "__doc__": "owned", "marker": 1})
    evil = global_(*target) + data(state) + BUILD
    try:
        assert_safe_read(base.write(tmp_path / "evil.pt", evil), tmp_path / "canary", base.state)
    finally:
        after = snapshot_allowed()
        for key, value in pickle_reader._ALLOWED.items():  # undo, so other tests are unaffected
            if after[key] != before[key]:
                _, attributes, namespace = before[key]
                for name, original in attributes.items():
                    setattr(value, name, original)
                value.__dict__.clear()
                value.__dict__.update(namespace)
    assert after == before


# --- Malformed tensor records: refused, never a crash or a wrong shape -------------------------


def tensor_ops(
    shape: Any = (2,),
    stride: Any = (1,),
    offset: Any = 0,
    key: str = "0",
    storage: str = "FloatStorage",
    numel: int = 12,
) -> bytes:
    """`torch._utils._rebuild_tensor_v2` of storage `data/<key>`, as torch.save writes it."""
    pid = MARK + data("storage") + global_("torch", storage) + data(key) + data("cpu")
    pid += data(numel) + TUPLE + b"Q"  # BINPERSID
    arguments = [pid, data(offset), data(shape), data(stride), data(False)]
    return call(
        global_("torch._utils", "_rebuild_tensor_v2"),
        *arguments,
        call(global_("collections", "OrderedDict")),
    )


MALFORMED = [
    pytest.param(tensor_ops(offset=-1), id="negative-offset"),
    pytest.param(tensor_ops(offset=2**64), id="huge-offset"),
    pytest.param(tensor_ops(shape=(-2,)), id="negative-size"),
    pytest.param(tensor_ops(shape=(2, 2), stride=(-1, 1)), id="negative-stride"),
    pytest.param(tensor_ops(shape=(100,)), id="past-storage-end"),
    pytest.param(tensor_ops(key="99"), id="missing-storage"),
    pytest.param(tensor_ops(storage="NoSuchStorage"), id="unknown-storage-type"),
    pytest.param(tensor_ops(offset="x"), id="offset-not-int"),
    pytest.param(data("storage") + b"Q", id="persistent-id-not-tuple"),
    pytest.param(b"h\x63", id="memo-miss"),
    pytest.param(tensor_ops(shape=("a",)), id="size-not-int"),
    pytest.param(tensor_ops(shape=(2.5,)), id="size-float"),
    pytest.param(tensor_ops(shape=(2**70,)), id="size-beyond-int64"),
    pytest.param(tensor_ops(shape=(2**32, 2**32), stride=(2**32, 1)), id="numel-wraps"),
    pytest.param(tensor_ops() + data({"dtype": None}) + BUILD, id="build-dtype"),
    pytest.param(tensor_ops() + data({"shape": "ab"}) + BUILD, id="build-shape"),
    pytest.param(
        tensor_ops() + data((None, {"storage_offset": "3"})) + BUILD,
        id="build-slots",
    ),
]


@pytest.mark.parametrize("evil", MALFORMED)
def test_malformed_tensor_record_is_refused_or_read_correctly(base, tmp_path, evil):
    path = base.write(tmp_path / "malformed.pt", evil)
    try:
        checkpoint = open_checkpoint(path)
    except CheckpointError as error:
        assert str(path) in str(error)
        return
    with checkpoint:  # whatever is reported must be readable with the shape it claims
        for name, ref in checkpoint.tensors.items():
            assert all(isinstance(size, int) and size >= 0 for size in ref.shape), name
            assert checkpoint.values(name).shape == ref.shape, name
        for key, tensor in base.state.items():
            assert checkpoint.values(f"model.{key}").tolist() == tensor.double().tolist()


def test_deep_nesting_is_refused_not_a_crash(base, tmp_path):
    path = base.write(tmp_path / "deep.pt", b"]" * 50_000 + b"a" * 49_999)
    with pytest.raises(CheckpointError) as error:
        open_checkpoint(path)
    assert str(path) in str(error.value)


def test_a_cycle_is_walked_once(base, tmp_path):
    """l = []; l.append(l): torch.load accepts it, and so does the reader, visiting l once."""
    path = base.write(tmp_path / "cycle.pt", b"]q\x00h\x00a")
    with open_checkpoint(path) as checkpoint:
        assert sorted(checkpoint.tensors) == sorted(f"model.{key}" for key in base.state)


# --- EXT opcodes: the copyreg extension registry ----------------------------------------------

EXT_CODE = 0x7654


@pytest.fixture
def os_system_extension() -> Iterator[int]:
    """Register `os.system` as extension code EXT_CODE (as some library might), then clean up."""
    copyreg.add_extension("posix", "system", EXT_CODE)
    try:
        yield EXT_CODE
    finally:
        copyreg.remove_extension("posix", "system", EXT_CODE)  # also drops the cache entry
        copyreg._extension_cache.pop(EXT_CODE, None)


def test_unregistered_extension_code_is_refused(base, tmp_path):
    path = base.write(tmp_path / "ext.pt", ext2(0x7655) + data(("true",)) + REDUCE)
    with pytest.raises(CheckpointError):
        open_checkpoint(path)


def test_registered_extension_code_runs_nothing(base, tmp_path, os_system_extension):
    control = tmp_path / "control-canary"
    evil = ext2(os_system_extension) + data((shell_touch(control),)) + REDUCE
    torch.load(base.write(tmp_path / "control.pt", evil), weights_only=False)
    assert control.exists()
    copyreg._extension_cache.pop(os_system_extension, None)  # as if never loaded before

    canary = tmp_path / "canary"
    evil = ext2(os_system_extension) + data((shell_touch(canary),)) + REDUCE
    assert_safe_read(base.write(tmp_path / "evil.pt", evil), canary, base.state)


def test_cached_extension_code_runs_nothing(base, tmp_path, os_system_extension):
    pickle.loads(b"\x80\x02" + ext2(os_system_extension) + STOP)  # resolves, caches os.system
    canary = tmp_path / "canary"
    evil = ext2(os_system_extension) + data((shell_touch(canary),)) + REDUCE
    assert_safe_read(base.write(tmp_path / "evil.pt", evil), canary, base.state)


def test_reading_leaves_the_extension_cache_alone(base, tmp_path, os_system_extension):
    import os

    assert_safe_read(
        base.write(tmp_path / "ext.pt", ext2(os_system_extension)), tmp_path / "c", base.state
    )
    assert pickle.loads(b"\x80\x02" + ext2(os_system_extension) + STOP) is os.system
