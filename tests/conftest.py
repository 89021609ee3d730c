"""Shared test helpers: fixture paths, the fixture oracle, writing checkpoints, torch as reference.

* ``fixtures_dir`` -- the directory of the committed fixture files.
* ``make_fixtures`` -- the ``fixtures/make_fixtures.py`` oracle (``FIXTURES``, ``build_modules``).
* ``save_checkpoint(obj, path, metadata=None)`` -- session-scoped writer (safe in hypothesis tests):
  ``bytes`` are written as is, ``*.safetensors`` via ``safetensors.torch.save_file``, anything else
  via ``torch.save``.
* ``tmp_checkpoint(obj, name="checkpoint.pt", metadata=None)`` -- the same, into ``tmp_path``.
* ``torch_reference`` -- torch as the oracle: ``flatten`` (dotted names like the reader's),
  ``raw`` (a tensor's stored elements as numpy) and ``assert_matches`` (a checkpoint vs torch).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
FIXTURES_DIR = REPO_ROOT / "fixtures"

for _entry in (REPO_ROOT, FIXTURES_DIR):
    if str(_entry) not in sys.path:
        sys.path.insert(0, str(_entry))

SaveCheckpoint = Callable[..., Path]


def save_checkpoint(obj: Any, path: Path, metadata: Mapping[str, str] | None = None) -> Path:
    """Write `obj` to `path`: raw bytes, a safetensors file (by suffix) or a torch.save zip."""
    path = Path(path)
    if isinstance(obj, (bytes, bytearray)):
        path.write_bytes(bytes(obj))
    elif path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(dict(obj), str(path), metadata=dict(metadata) if metadata is not None else None)
    else:
        assert metadata is None, "only safetensors files carry metadata"
        torch.save(obj, path)
    return path


class TorchReference:
    """What torch itself says a checkpoint holds; the tests compare the reader against this."""

    class AmbiguousName(ValueError):
        """Two different tensors have the same dotted path ({"a.b": t1, "a": {"b": t2}}): no
        reader can name both, and the reader refuses such a file."""

    @classmethod
    def flatten(cls, obj: Any, prefix: str = "") -> dict[str, torch.Tensor]:
        """Every tensor below `obj` by dotted path (dict keys, list/tuple indices), first
        occurrence only (a tensor object reached twice is reported once), depth first.
        Raises `AmbiguousName` rather than silently dropping one of two tensors."""
        found: dict[str, torch.Tensor] = {}
        seen: set[int] = set()

        def walk(node: Any, path: str) -> None:
            if isinstance(node, torch.Tensor):
                if id(node) not in seen:
                    seen.add(id(node))
                    if path in found:
                        raise cls.AmbiguousName(path)
                    found[path] = node
                return
            if isinstance(node, Mapping):
                children = list(node.items())
            elif isinstance(node, (list, tuple)):
                children = list(enumerate(node))
            else:
                return
            for key, value in children:
                walk(value, f"{path}.{key}" if path else str(key))

        walk(obj, prefix)
        return found

    @staticmethod
    def raw(tensor: torch.Tensor) -> np.ndarray:
        """The tensor's stored elements as numpy (bfloat16 as uint16, float8 as uint8)."""
        tensor = tensor.detach().cpu()
        if tensor.dtype == torch.bfloat16:
            return tensor.view(torch.int16).numpy().view(np.uint16)
        if tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            return tensor.view(torch.uint8).numpy()
        return tensor.numpy()

    @staticmethod
    def dtype_name(tensor: torch.Tensor) -> str:
        return str(tensor.dtype).removeprefix("torch.")

    @classmethod
    def assert_tensor_matches(cls, checkpoint: Any, name: str, tensor: torch.Tensor) -> None:
        """Same dtype, shape, stored bits and (for floats) exact float64 values as torch."""
        ref = checkpoint.tensors[name]
        assert ref.dtype.name == cls.dtype_name(tensor), name
        assert ref.shape == tuple(tensor.shape), name
        ours, theirs = checkpoint.raw(name), cls.raw(tensor)
        assert ours.dtype == theirs.dtype, name
        assert ours.shape == theirs.shape, name
        assert np.ascontiguousarray(ours).tobytes() == np.ascontiguousarray(theirs).tobytes(), name
        if tensor.dtype.is_floating_point:
            expected = tensor.detach().to(torch.float64).numpy()
            np.testing.assert_array_equal(checkpoint.values(name), expected, err_msg=name)

    @classmethod
    def assert_matches(
        cls, checkpoint: Any, tensors: Mapping[str, torch.Tensor], *, ordered: bool = True
    ) -> None:
        """The checkpoint holds exactly `tensors` (same names, in the same order unless
        `ordered` is False), bit for bit."""
        if ordered:
            assert list(checkpoint.tensors) == list(tensors)
        else:
            assert sorted(checkpoint.tensors) == sorted(tensors)
        for name, tensor in tensors.items():
            cls.assert_tensor_matches(checkpoint, name, tensor)


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES_DIR


@pytest.fixture(scope="session")
def make_fixtures() -> ModuleType:
    import make_fixtures as module

    return module


@pytest.fixture(scope="session", name="save_checkpoint")
def save_checkpoint_fixture() -> SaveCheckpoint:
    return save_checkpoint


@pytest.fixture
def tmp_checkpoint(tmp_path: Path) -> SaveCheckpoint:
    """Factory: `tmp_checkpoint(obj, name="checkpoint.pt", metadata=None)` -> path in tmp_path."""

    def make(
        obj: Any, name: str = "checkpoint.pt", metadata: Mapping[str, str] | None = None
    ) -> Path:
        return save_checkpoint(obj, tmp_path / name, metadata)

    return make


@pytest.fixture(scope="session")
def torch_reference() -> type[TorchReference]:
    return TorchReference


# --- Editing and the command line (used by test_surgery/apply/cli/verify) ----------------------


@pytest.fixture
def fixture_copy(tmp_path: Path) -> Callable[..., Path]:
    """Factory: `fixture_copy("zoo.pt", name=None)` -> a private copy in tmp_path (to edit)."""
    import shutil

    def copy(filename: str, name: str | None = None) -> Path:
        target = tmp_path / (name or filename)
        shutil.copyfile(FIXTURES_DIR / filename, target)
        return target

    return copy


@pytest.fixture
def run_cli() -> Callable[..., Any]:
    """`run_cli(*args, env=None)`: run the `lstm-surgeon` app in-process with typer's CliRunner.
    The result has `exit_code`, `stdout` and `stderr` (kept apart); unexpected exceptions raise."""
    from typer.testing import CliRunner

    from lstm_surgeon.cli import app

    runner = CliRunner()

    def invoke(*args: Any, env: Mapping[str, str] | None = None) -> Any:
        return runner.invoke(app, [str(arg) for arg in args], env=env, catch_exceptions=False)

    return invoke


@pytest.fixture(scope="session")
def surgeon_command() -> list[str]:
    """The installed `lstm-surgeon` command for subprocess runs (else `python -m lstm_surgeon`)."""
    import shutil

    found = shutil.which("lstm-surgeon") or shutil.which(
        "lstm-surgeon", path=str(Path(sys.executable).parent)
    )
    return [found] if found else [sys.executable, "-m", "lstm_surgeon"]


# --- Subprocess runs and clean failures (used by test_faults/test_fuzz/test_check) -----------

SURGEON_TIMEOUT = 120  # seconds: a run that takes longer is a hang, and fails the test


def clean_environment(**extra: str) -> dict[str, str]:
    """os.environ for a subprocess run: no fault injection, no debug tracebacks, no progress bars,
    plus `extra`."""
    import os

    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("LSTM_SURGEON_FAULT", "LSTM_SURGEON_DEBUG")
    }
    env.update(CI="1", NO_COLOR="1", COLUMNS="120")
    env.update(extra)
    return env


def assert_clean_failure(stderr: str, exit_code: int, expected: int = 2) -> str:
    """Exit `expected`, exactly one line on stderr, `lstm-surgeon: error: ...`, no traceback; the
    line is returned."""
    lines = stderr.strip().splitlines()
    assert exit_code == expected, stderr
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1, stderr
    assert lines[0].startswith("lstm-surgeon: error: "), stderr
    return lines[0]


@pytest.fixture(scope="session")
def surgeon(surgeon_command: list[str]) -> Callable[..., Any]:
    """`surgeon(*args, env=None, timeout=SURGEON_TIMEOUT, **popen_options)`: run the installed
    command in a subprocess (stdin closed, text output, `clean_environment(**env)`) and return the
    CompletedProcess; a hang fails the test instead of blocking the run."""
    import subprocess

    def run(
        *args: Any,
        env: Mapping[str, str] | None = None,
        timeout: float = SURGEON_TIMEOUT,
        **options: Any,
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*surgeon_command, *(str(arg) for arg in args)],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            env=clean_environment(**(env or {})),
            timeout=timeout,
            check=False,
            **options,
        )

    return run
