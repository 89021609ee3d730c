"""Reading torch.save zip files: every tensor as torch sees it, and every broken file refused."""

from __future__ import annotations

import random
import struct
import subprocess
import sys
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import make_fixtures
import numpy as np
import pytest
import torch
from conftest import TorchReference
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st
from torch import nn

from lstm_surgeon.checkpoint import Checkpoint, OutputTensor
from lstm_surgeon.errors import CheckpointError, UnsupportedCheckpointError
from lstm_surgeon.formats import open_checkpoint, torch_zip

TORCH_ZIP = torch_zip.FORMAT
PT_FIXTURES = [fixture.filename for fixture in make_fixtures.FIXTURES if fixture.format == "pt"]
OPTIMIZER_FIXTURES = {"training.pt", "lightning.ckpt"}


def assert_one_line_error(error: pytest.ExceptionInfo[BaseException], path: Path) -> str:
    message = str(error.value)
    assert str(path) in message
    assert "\n" not in message
    return message


def assert_same_storages(checkpoint: Any, tensors: dict[str, torch.Tensor]) -> None:
    """Tensors share a storage in the checkpoint exactly when they share one in torch, and each
    starts at the same element offset with the same strides."""
    names = [name for name, tensor in tensors.items() if tensor.untyped_storage().nbytes() > 0]
    for name in names:
        ref, tensor = checkpoint.tensors[name], tensors[name]
        assert ref.element_offset == tensor.storage_offset(), name
        assert ref.element_strides == tensor.stride(), name
        assert ref.storage.nbytes == tensor.untyped_storage().nbytes(), name
    for first in names:
        for second in names:
            ours = checkpoint.tensors[first].storage.key == checkpoint.tensors[second].storage.key
            theirs = (
                tensors[first].untyped_storage().data_ptr()
                == tensors[second].untyped_storage().data_ptr()
            )
            assert ours == theirs, (first, second)


# --- The fixtures read exactly as torch loads them ------------------------------------------


@pytest.mark.parametrize("filename", PT_FIXTURES)
def test_fixture_reads_exactly_as_torch_loads_it(fixtures_dir, torch_reference, filename):
    path = fixtures_dir / filename
    expected = torch_reference.flatten(torch.load(path, map_location="cpu", weights_only=False))
    with open_checkpoint(path) as checkpoint:
        assert checkpoint.format_name == "pt"
        assert checkpoint.metadata is None
        assert checkpoint.has_optimizer_state == (filename in OPTIMIZER_FIXTURES)
        torch_reference.assert_matches(checkpoint, expected)
        assert_same_storages(checkpoint, expected)


def test_flat_fixture_tensors_all_view_one_storage(fixtures_dir, torch_reference):
    path = fixtures_dir / "flat.pt"
    expected = torch_reference.flatten(torch.load(path, weights_only=True))
    assert len({tensor.untyped_storage().data_ptr() for tensor in expected.values()}) == 1
    with open_checkpoint(path) as checkpoint:
        assert len({ref.storage.key for ref in checkpoint.tensors.values()}) == 1
        assert len(list(checkpoint.storages())) == 1
        offsets = sorted(ref.element_offset for ref in checkpoint.tensors.values())
        assert offsets == sorted(tensor.storage_offset() for tensor in expected.values())
        assert len(set(offsets)) == len(offsets)  # distinct slices of the one flat buffer


def test_unsafe_objects_fixture_tensors_are_readable(fixtures_dir, torch_reference):
    path = fixtures_dir / "unsafe_objects.pt"
    with pytest.raises(Exception):  # noqa: B017 - torch's error type varies by version
        torch.load(path, weights_only=True)
    payload = torch.load(path, weights_only=False)
    with open_checkpoint(path) as checkpoint:
        torch_reference.assert_matches(checkpoint, torch_reference.flatten(payload))
        assert set(checkpoint.tensors) == {f"model.{key}" for key in payload["model"]}


def test_module_oracle_agrees_with_file(fixtures_dir, make_fixtures):
    """build_modules() is the discovery oracle: check it describes the committed files."""
    with open_checkpoint(fixtures_dir / "zoo.pt") as checkpoint:
        for layer_name, module in make_fixtures.build_modules("zoo.pt").items():
            for key, tensor in module.state_dict().items():
                np.testing.assert_array_equal(
                    checkpoint.values(f"{layer_name}.{key}"), tensor.double().numpy()
                )


# --- Property: random containers, dtypes, shapes and views ----------------------------------

DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int8,
    torch.uint8,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
]
PREFIXES = ["", "module.", "_orig_mod.", "state_dict.model.", "model."]
KEYS = st.one_of(
    st.lists(st.text("abwxyz_019", min_size=1, max_size=5), min_size=1, max_size=3).map(".".join),
    st.integers(0, 12),
)


def random_tensor(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """A tensor of random *bits* (NaNs, infinities, subnormals included for floats)."""
    count = int(np.prod(shape, dtype=np.int64))
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    itemsize = torch.empty((), dtype=dtype).element_size()
    data = np.random.default_rng(seed).bytes(count * itemsize)
    return torch.frombuffer(bytearray(data), dtype=dtype).reshape(shape)


def viewed(draw: st.DrawFn, tensor: torch.Tensor) -> torch.Tensor:
    """Up to two random views: transpose, stepped slice, narrow, select, expand, flat slice."""
    for _ in range(draw(st.integers(0, 2))):
        ndim = tensor.dim()
        op = draw(st.sampled_from(["transpose", "step", "narrow", "select", "expand", "flat"]))
        if op == "transpose" and ndim >= 2:
            first, second = draw(st.permutations(range(ndim)))[:2]
            tensor = tensor.transpose(first, second)
        elif op in ("step", "narrow", "select") and ndim >= 1:
            dim = draw(st.integers(0, ndim - 1))
            size = tensor.shape[dim]
            start = draw(st.integers(0, size))
            if op == "step":
                index = [slice(None)] * ndim
                index[dim] = slice(start, None, draw(st.integers(1, 3)))
                tensor = tensor[tuple(index)]
            elif op == "narrow":
                tensor = tensor.narrow(dim, start, draw(st.integers(0, size - start)))
            elif size > 0:
                tensor = tensor.select(dim, min(start, size - 1))
        elif op == "expand" and ndim <= 3:
            tensor = tensor.unsqueeze(0).expand(draw(st.integers(1, 3)), *tensor.shape)
        elif op == "flat" and tensor.is_contiguous():
            flat = tensor.reshape(-1)
            start = draw(st.integers(0, flat.numel()))
            tensor = flat[start : draw(st.integers(start, flat.numel()))]
    return tensor


@st.composite
def leaves(draw: st.DrawFn) -> list[Any]:
    """Tensors (some sharing storages, some the same object twice) and a little non-tensor data."""
    bases = [
        random_tensor(
            tuple(draw(st.lists(st.integers(0, 5), max_size=3))),
            draw(st.sampled_from(DTYPES)),
            draw(st.integers(0, 2**32 - 1)),
        )
        for _ in range(draw(st.integers(1, 3)))
    ]
    items: list[Any] = []
    for _ in range(draw(st.integers(1, 6))):
        choice = draw(st.integers(0, 9))
        if choice == 0:
            items.append(draw(st.one_of(st.none(), st.integers(), st.text(max_size=3))))
        elif choice == 1 and any(isinstance(item, torch.Tensor) for item in items):
            items.append(draw(st.sampled_from([i for i in items if isinstance(i, torch.Tensor)])))
        else:
            tensor = viewed(draw, draw(st.sampled_from(bases)))
            if tensor.dtype in (torch.float32, torch.float64) and draw(st.booleans()):
                tensor = nn.Parameter(tensor, requires_grad=draw(st.booleans()))
            items.append(tensor)
    return items


def nest(draw: st.DrawFn, items: list[Any], depth: int = 0) -> Any:
    """Spread `items` over random nested dicts, OrderedDicts, lists and tuples."""
    groups: list[list[Any]] = []
    for item in items:
        if groups and draw(st.booleans()):
            groups[-1].append(item)
        else:
            groups.append([item])
    children = [
        group[0] if len(group) == 1 or depth >= 3 else nest(draw, group, depth + 1)
        for group in groups
    ]
    kind = draw(st.sampled_from(["dict", "ordered", "list", "tuple"]))
    if kind in ("list", "tuple"):
        return children if kind == "list" else tuple(children)
    keys = draw(st.lists(KEYS, min_size=len(children), max_size=len(children), unique=True))
    pairs = list(zip(keys, children, strict=True))
    return OrderedDict(pairs) if kind == "ordered" else dict(pairs)


@st.composite
def payloads(draw: st.DrawFn) -> Any:
    items = draw(leaves())
    if len(items) == 1 and isinstance(items[0], torch.Tensor) and draw(st.booleans()):
        return items[0]  # a bare tensor at the root: its name is ""
    prefix = draw(st.sampled_from(PREFIXES))
    tree = nest(draw, items)
    if isinstance(tree, dict):  # a state dict: keys carry the DDP / compile / Lightning prefix
        return type(tree)((f"{prefix}{key}", value) for key, value in tree.items())
    return {f"{prefix}root": tree}


@settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(payload=payloads())
def test_random_torch_save_reads_exactly_as_torch_loads_it(
    tmp_path_factory, save_checkpoint, torch_reference, payload
):
    try:
        expected = torch_reference.flatten(payload)
    except torch_reference.AmbiguousName:
        reject()  # refused by the reader: test_colliding_dotted_names_are_not_silently_merged
    path = save_checkpoint(payload, tmp_path_factory.mktemp("prop") / "random.pt")
    loaded = torch_reference.flatten(torch.load(path, weights_only=False))
    assert list(loaded) == list(expected)  # the oracle's own naming is consistent
    with open_checkpoint(path) as checkpoint:
        torch_reference.assert_matches(checkpoint, loaded)
        assert_same_storages(checkpoint, loaded)


def torch_slots(obj: Any) -> dict[str, tuple[Any, Any]]:
    """Every tensor's (container, key) by the reader's dotted name: first occurrence only, each
    container walked once (as the reader walks the pickle)."""
    slots: dict[str, tuple[Any, Any]] = {}
    seen: set[int] = set()

    def walk(node: Any, path: str) -> None:
        if id(node) in seen:
            return
        seen.add(id(node))
        children = list(node.items()) if isinstance(node, Mapping) else list(enumerate(node))
        for key, value in children:
            name = f"{path}.{key}" if path else str(key)
            if isinstance(value, torch.Tensor):
                if id(value) not in seen:
                    seen.add(id(value))
                    slots[name] = (node, key)
            elif isinstance(value, (Mapping, list, tuple)):
                walk(value, name)

    if isinstance(obj, (Mapping, list, tuple)):
        walk(obj, "")
    return slots


def assert_same_objects(actual: Any, expected: Any, where: str = "root") -> None:
    """Same types (Parameter, OrderedDict, torch.Size...), keys in order, attributes (a state
    dict's `_metadata`), plain values, and tensors with the same layout and bits."""
    assert type(actual) is type(expected), where
    if isinstance(expected, torch.Tensor):
        layout = (expected.dtype, expected.shape, expected.stride(), expected.storage_offset())
        assert (actual.dtype, actual.shape, actual.stride(), actual.storage_offset()) == layout
        assert actual.requires_grad == expected.requires_grad, where
        assert actual.untyped_storage().nbytes() == expected.untyped_storage().nbytes(), where
        ours, theirs = TorchReference.raw(actual), TorchReference.raw(expected)
        assert ours.tobytes() == theirs.tobytes(), where
    elif isinstance(expected, Mapping):
        assert list(actual) == list(expected), where
        assert getattr(actual, "__dict__", {}) == getattr(expected, "__dict__", {}), where
        for key, value in expected.items():
            assert_same_objects(actual[key], value, f"{where}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), where
        for index, (ours, theirs) in enumerate(zip(actual, expected, strict=True)):
            assert_same_objects(ours, theirs, f"{where}.{index}")
    else:
        assert actual == expected, where


def assert_same_sharing(actual: Any, expected: Any) -> None:
    """Two tensors share a storage in the output exactly when they do in the expected tree."""
    ours, theirs = TorchReference.flatten(actual), TorchReference.flatten(expected)
    assert list(ours) == list(theirs)
    pointers = {name: t.untyped_storage().data_ptr() for name, t in ours.items() if t.numel()}
    expected_pointers = {
        name: t.untyped_storage().data_ptr() for name, t in theirs.items() if t.numel()
    }
    for first in pointers:
        for second in pointers:
            same = pointers[first] == pointers[second]
            assert same == (expected_pointers[first] == expected_pointers[second]), (first, second)


def rewrite(checkpoint: Checkpoint, tensors: list[OutputTensor], target: Path) -> Path:
    with open(target, "wb") as out:
        TORCH_ZIP.write(out, tensors, checkpoint)
    return target


@settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(payload=payloads(), data=st.data())
def test_rewrite_equals_torch_load_of_the_source_with_the_change(
    tmp_path_factory, save_checkpoint, payload, data
):
    """Remove some tensors and give others new elements: torch.load of the output is the source
    as torch loads it with the same change, every non-tensor value, type and view kept."""
    folder = tmp_path_factory.mktemp("rewrite")
    path = save_checkpoint(payload, folder / "random.pt")
    expected = torch.load(path, weights_only=False)
    slots = torch_slots(expected)
    with open_checkpoint(path) as checkpoint:
        assert list(slots) == [name for name in checkpoint.tensors if name in slots]
        removable = [name for name, (parent, _) in slots.items() if not isinstance(parent, tuple)]
        removed = data.draw(st.sets(st.sampled_from(removable)) if removable else st.just(set()))
        editable = [
            name
            for name, ref in checkpoint.tensors.items()
            if name in slots and name not in removed and ref.is_contiguous and ref.numel
        ]
        edited = data.draw(st.sets(st.sampled_from(editable)) if editable else st.just(set()))
        tensors = []
        for name, ref in checkpoint.tensors.items():
            if name in edited and ref.dtype.name in ("float32", "float64", "int64", "int32"):
                new = np.arange(ref.numel, dtype=ref.dtype.storage).reshape(ref.shape)
                tensors.append(OutputTensor(ref, data=new))
            elif name not in removed:
                tensors.append(OutputTensor(ref, source=ref))
        rewrite(checkpoint, tensors, folder / "out.pt")
    objects = {name: parent[key] for name, (parent, key) in slots.items()}
    by_index = sorted(removed, key=lambda n: slots[n][1] if type(slots[n][1]) is int else -1)
    for name in reversed(by_index):  # highest list index first: the others stay valid
        parent, key = slots[name]
        del parent[key]
    with torch.no_grad():
        for tensor in tensors:
            if tensor.data is not None:
                objects[tensor.ref.name].copy_(torch.from_numpy(tensor.data))
    loaded = torch.load(folder / "out.pt", weights_only=True)
    assert_same_objects(loaded, expected)
    assert_same_sharing(loaded, expected)


def test_colliding_dotted_names_are_not_silently_merged(tmp_checkpoint):
    """{'a.b': t1, 'a': {'b': t2}}: both are 'a.b'; dropping t1 without a word loses a tensor."""
    path = tmp_checkpoint({"a.b": torch.ones(2), "a": {"b": torch.zeros(3)}})
    try:
        checkpoint = open_checkpoint(path)
    except CheckpointError:
        return
    with checkpoint:
        assert len(checkpoint.tensors) == 2 or checkpoint.warnings


# --- Broken and foreign files ----------------------------------------------------------------


@pytest.fixture
def small_pt(tmp_path) -> Path:
    path = tmp_path / "small.pt"
    torch.manual_seed(0)
    torch.save(nn.LSTM(3, 4, num_layers=2).state_dict(), path)
    return path


def test_truncated_files_are_refused(small_pt, tmp_path):
    data = small_pt.read_bytes()
    offsets = set(range(max(1, len(data) - 200), len(data)))
    offsets |= set(random.Random(1234).sample(range(1, len(data)), 50))
    target = tmp_path / "cut.pt"
    for offset in sorted(offsets):
        target.write_bytes(data[:offset])
        with pytest.raises(CheckpointError) as error:
            open_checkpoint(target).close()
        assert_one_line_error(error, target)


def rewrite_zip(
    source: Path,
    target: Path,
    replace: dict[str, bytes] | None = None,
    compression: int = zipfile.ZIP_STORED,
) -> Path:
    """Copy a zip record by record (zipfile's own layout), replacing records by name suffix."""
    replace = replace or {}
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w", compression) as new:
        for info in old.infolist():
            data = next(
                (
                    new_data
                    for suffix, new_data in replace.items()
                    if info.filename.endswith(suffix)
                ),
                old.read(info.filename),
            )
            new.writestr(info.filename, data)
    return target


def test_zipfile_rewritten_copy_still_reads(small_pt, tmp_path, torch_reference):
    """Control for the tests below: a plain zipfile copy (no alignment, no data descriptors)."""
    copy = rewrite_zip(small_pt, tmp_path / "copy.pt")
    expected = torch_reference.flatten(torch.load(copy, weights_only=True))
    with open_checkpoint(copy) as checkpoint:
        torch_reference.assert_matches(checkpoint, expected)


def test_compressed_records_are_refused(small_pt, tmp_path):
    target = rewrite_zip(small_pt, tmp_path / "deflated.pt", compression=zipfile.ZIP_DEFLATED)
    torch.load(target, weights_only=True)  # torch itself reads it
    with pytest.raises(CheckpointError) as error:
        open_checkpoint(target)
    assert "compressed" in assert_one_line_error(error, target)


def local_data_offset(path: Path, name_suffix: str) -> tuple[int, int]:
    """Where a record's bytes start in the file, and how many there are."""
    data = path.read_bytes()
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(name_suffix))
    name_len, extra_len = struct.unpack_from("<HH", data, info.header_offset + 26)
    return info.header_offset + 30 + name_len + extra_len, info.file_size


def test_flipped_bit_in_data_pkl_is_refused(small_pt, tmp_path):
    start, size = local_data_offset(small_pt, "/data.pkl")
    data = bytearray(small_pt.read_bytes())
    data[start + size // 2] ^= 0x10
    target = tmp_path / "flipped.pt"
    target.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as error:
        open_checkpoint(target)
    assert "CRC" in assert_one_line_error(error, target)


def test_zip_without_data_pkl_is_refused(tmp_path):
    target = tmp_path / "plain.zip"
    with zipfile.ZipFile(target, "w") as archive:
        archive.writestr("notes.txt", "hello")
        archive.writestr("archive/data/0", b"\0" * 16)
    with pytest.raises(CheckpointError) as error:
        open_checkpoint(target)
    assert "data.pkl" in assert_one_line_error(error, target)


def test_big_endian_archive_is_refused(small_pt, tmp_path):
    target = rewrite_zip(small_pt, tmp_path / "big.pt", {"/byteorder": b"big"})
    with pytest.raises(UnsupportedCheckpointError) as error:
        open_checkpoint(target)
    assert "big-endian" in assert_one_line_error(error, target)


def test_missing_storage_record_is_refused(small_pt, tmp_path):
    target = tmp_path / "missing.pt"
    with zipfile.ZipFile(small_pt) as old, zipfile.ZipFile(target, "w") as new:
        for info in old.infolist():
            if not info.filename.endswith("/data/1"):
                new.writestr(info.filename, old.read(info.filename))
    with pytest.raises(CheckpointError) as error:
        open_checkpoint(target)
    assert "storage" in assert_one_line_error(error, target)


def test_short_storage_record_is_refused(small_pt, tmp_path):
    """A storage record shorter than the tensors that view it (a half-written file)."""
    with zipfile.ZipFile(small_pt) as archive:
        name = next(n for n in archive.namelist() if n.endswith("/data/0"))
        short = archive.read(name)[:-4]
    target = rewrite_zip(small_pt, tmp_path / "short.pt", {"/data/0": short})
    with pytest.raises(CheckpointError) as error:
        open_checkpoint(target)
    assert_one_line_error(error, target)


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"\x00",
        b"PK\x03\x04",
        b"PK\x05\x06" + b"\x00" * 18,
        b"not a checkpoint at all, just text\n",
        random.Random(7).randbytes(4096),
        b"PK\x03\x04" + random.Random(8).randbytes(4096),
    ],
    ids=["empty", "one-byte", "zip-magic", "empty-zip", "text", "random", "zip-magic-random"],
)
def test_non_checkpoint_files_are_refused(tmp_path, content):
    target = tmp_path / "file.pt"
    target.write_bytes(content)
    with pytest.raises(CheckpointError) as error:
        open_checkpoint(target)
    assert_one_line_error(error, target)


def test_directory_and_missing_path_are_refused(tmp_path):
    for target in (tmp_path, tmp_path / "does-not-exist.pt"):
        with pytest.raises(CheckpointError) as error:
            open_checkpoint(target)
        assert_one_line_error(error, target)


def test_shared_containers_are_walked_once(fixtures_dir, tmp_path):
    """A 400-byte pickle of lists that each hold the previous one twice (via the memo) names 2**59
    paths; the reader must visit each object once instead of hanging."""
    ops = b"\x80\x02]q\x00"
    for level in range(1, 60):
        previous = (level - 1).to_bytes(4, "little")
        ops += b"]r" + level.to_bytes(4, "little") + b"(j" + previous + b"j" + previous + b"e"
    ops += b"."
    source = zipfile.ZipFile(fixtures_dir / "nobias.pt")
    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_STORED) as archive:
        for info in source.infolist():
            is_pickle = info.filename.endswith("data.pkl")
            archive.writestr(info.filename, ops if is_pickle else source.read(info))
    code = (
        "import sys; from lstm_surgeon import open_checkpoint; "
        "print(len(open_checkpoint(sys.argv[1]).tensors))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(bomb)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "0"
