"""A checkpoint split over several files: read as one, edited in place all or nothing.

The checkpoint is built here from two safetensors files written by `safetensors.numpy`: every LSTM
has its input-side tensors in one file and its hidden-side tensors in the other, so each forget-gate
edit touches both files. The edit is `set-forget-bias 1.5` in the `effective` mode (b_ih = 1.5,
b_hh = 0 in the forget rows), so the expected new files are written directly, without arithmetic.
Faults are real: `kill -9` at every named step (and at random times) of a run in a subprocess, and
Ctrl-C; afterwards both files are old or both are new, never one of each.
"""

from __future__ import annotations

import fcntl
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import clean_environment
from safetensors.numpy import save_file

from lstm_surgeon.apply import Destination, edit_checkpoint
from lstm_surgeon.errors import CheckpointError, EditError, OutputError
from lstm_surgeon.formats import open_checkpoint, open_checkpoint_files
from lstm_surgeon.surgery import plan_set_forget_bias, plan_zero_bias
from lstm_surgeon.writing import journal_path, recover_interrupted_edit

HIDDEN, INPUT, LAYERS = 4, 3, 6
FORGET = slice(HIDDEN, 2 * HIDDEN)  # PyTorch's [i, f, g, o]
VALUE = 1.5
SIDES = {"ih": ("weight_ih_l0", "bias_ih_l0"), "hh": ("weight_hh_l0", "bias_hh_l0")}
FAULT_POINTS = [
    "after-journal",
    "between-journals",
    "mid-patch",
    "between-files",
    "before-journal-removal",
    "mid-journal-removal",
]
EDIT_SCRIPT = """
import sys
from pathlib import Path
from lstm_surgeon.apply import Destination, edit_checkpoint
from lstm_surgeon.surgery import plan_set_forget_bias

paths = [Path(arg) for arg in sys.argv[2:]]
value = float(sys.argv[1])
edit_checkpoint(paths, lambda c: plan_set_forget_bias(c, value), Destination(in_place=True))
"""


@dataclass(frozen=True)
class Split:
    """The two files of the checkpoint, with their bytes before and after the edit."""

    paths: list[Path]
    old: tuple[bytes, bytes]
    new: tuple[bytes, bytes]

    def now(self) -> tuple[bytes, bytes]:
        first, second = self.paths
        return first.read_bytes(), second.read_bytes()

    def reset(self) -> None:
        for path, data in zip(self.paths, self.old, strict=True):
            path.write_bytes(data)


def lstm_tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    tensors = {}
    for layer in range(LAYERS):
        for name, shape in (
            ("weight_ih_l0", (4 * HIDDEN, INPUT)),
            ("weight_hh_l0", (4 * HIDDEN, HIDDEN)),
            ("bias_ih_l0", (4 * HIDDEN,)),
            ("bias_hh_l0", (4 * HIDDEN,)),
        ):
            tensors[f"lstm{layer}.{name}"] = rng.standard_normal(shape).astype(np.float32)
    return tensors


def edited(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What set-forget-bias 1.5 (effective) makes of the tensors: values set, nothing computed."""
    result = {name: array.copy() for name, array in tensors.items()}
    for name, array in result.items():
        if name.endswith("bias_ih_l0"):
            array[FORGET] = VALUE
        elif name.endswith("bias_hh_l0"):
            array[FORGET] = 0.0
    return result


def side(tensors: dict[str, np.ndarray], which: str) -> dict[str, np.ndarray]:
    return {name: array for name, array in tensors.items() if name.endswith(SIDES[which])}


def write_split(folder: Path, tensors: dict[str, np.ndarray]) -> list[Path]:
    folder.mkdir(exist_ok=True)
    paths = [folder / "model-ih.safetensors", folder / "model-hh.safetensors"]
    for path, which in zip(paths, SIDES, strict=True):
        save_file(side(tensors, which), str(path))
    return paths


@pytest.fixture
def split(tmp_path: Path) -> Split:
    tensors = lstm_tensors()
    expected = write_split(tmp_path / "expected", edited(tensors))
    new = (expected[0].read_bytes(), expected[1].read_bytes())
    paths = write_split(tmp_path / "model", tensors)
    return Split(paths, (paths[0].read_bytes(), paths[1].read_bytes()), new)


def debris(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir() if path.name.startswith("."))


def run_edit(paths: list[Path], **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", EDIT_SCRIPT, str(VALUE), *map(str, paths)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=clean_environment(**env),
        timeout=120,
        check=False,
    )


def set_forget(checkpoint: Any) -> Any:
    return plan_set_forget_bias(checkpoint, VALUE)


# --- Reading ---------------------------------------------------------------------------------


def test_every_tensor_reads_from_its_own_file(split):
    tensors = lstm_tensors()
    with open_checkpoint_files(split.paths) as checkpoint:
        assert checkpoint.path == split.paths[0]
        assert [file.path for file in checkpoint.files] == split.paths
        assert checkpoint.size == sum(len(data) for data in split.old)
        names, first = list(checkpoint.tensors), len(side(tensors, "ih"))
        assert set(names[:first]) == set(side(tensors, "ih"))  # file by file, in file order
        assert set(names[first:]) == set(side(tensors, "hh"))
        for name, array in tensors.items():
            ref = checkpoint.tensors[name]
            assert ref.storage.file == (0 if name in side(tensors, "ih") else 1)
            np.testing.assert_array_equal(checkpoint.raw(name), array)
        assert len(list(checkpoint.storages())) == len(tensors)


def test_a_file_given_twice_or_a_name_in_both_files_is_refused(split, tmp_path):
    with pytest.raises(CheckpointError, match="given twice"):
        open_checkpoint_files([split.paths[0], split.paths[0]])
    clash = tmp_path / "clash.safetensors"
    save_file(side(lstm_tensors(), "ih"), str(clash))
    with pytest.raises(CheckpointError, match="also in another file"):
        open_checkpoint_files([split.paths[0], clash])


def test_only_files_that_stand_alone_are_joined(split, fixtures_dir):
    with pytest.raises(CheckpointError, match="must be of one format"):
        open_checkpoint_files([split.paths[0], fixtures_dir / "ddp.pt"])


# --- Editing ---------------------------------------------------------------------------------


def test_in_place_edit_patches_both_files(split):
    plan, result = edit_checkpoint(split.paths, set_forget, Destination(in_place=True))
    assert result is not None and result.method == "patch"
    assert {edit.tensor for edit in plan.edits} == {
        name for name in lstm_tensors() if "bias" in name
    }
    assert split.now() == split.new
    assert debris(split.paths[0].parent) == []


def test_dry_run_reads_both_files_and_writes_nothing(split):
    plan, result = edit_checkpoint(split.paths, set_forget, None)
    assert result is None and plan.changes_anything
    assert split.now() == split.old


def test_what_several_files_cannot_do_yet_is_refused_before_asking(split, tmp_path):
    asked = []

    def ask(plan: Any) -> bool:
        asked.append(plan)
        return True

    with pytest.raises(OutputError, match="-o writes one file"):
        edit_checkpoint(split.paths, set_forget, Destination(tmp_path / "out.safetensors"), ask)
    with pytest.raises(OutputError, match="--backup"):
        edit_checkpoint(split.paths, set_forget, Destination(in_place=True, backup=True), ask)
    with pytest.raises(EditError, match="several files"):
        edit_checkpoint(
            split.paths,
            lambda checkpoint: plan_zero_bias(checkpoint, drop=True),
            Destination(in_place=True),
            ask,
        )
    assert asked == []
    assert split.now() == split.old


def locked_elsewhere(path: Path) -> bool:
    """True while some open file (in this process too) holds the edit lock of `path`."""
    with open(path, "rb") as file:
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(file.fileno(), fcntl.LOCK_UN)
        return False


def test_the_question_is_asked_with_no_file_locked(split):
    seen = []

    def ask(plan: Any) -> bool:
        seen.append([locked_elsewhere(path) for path in split.paths])
        return True

    edit_checkpoint(split.paths, set_forget, Destination(in_place=True), ask)
    assert seen == [[False, False]]
    assert split.now() == split.new


def test_a_file_changed_while_the_user_decides_is_not_written(split):
    """Another editor changes the checkpoint while the question is open: the plan the user saw no
    longer holds, so nothing of it is written."""

    def ask_while_another_edits(plan: Any) -> bool:
        other = lambda checkpoint: plan_set_forget_bias(checkpoint, -2.0)  # noqa: E731
        edit_checkpoint(split.paths, other, Destination(in_place=True))
        return True

    with pytest.raises(EditError, match="changed after this edit was planned"):
        edit_checkpoint(
            split.paths, set_forget, Destination(in_place=True), ask_while_another_edits
        )
    with open_checkpoint_files(split.paths) as checkpoint:  # the other edit, untouched
        for name in checkpoint.tensors:
            if name.endswith("bias_ih_l0"):
                assert (checkpoint.raw(name)[FORGET] == -2.0).all()
    assert debris(split.paths[0].parent) == []


# --- kill -9 and Ctrl-C -----------------------------------------------------------------------


def assert_reads_as_old(split: Split) -> None:
    """A reading open shows the old checkpoint, and writes nothing (the bytes left stay)."""
    left = split.now()
    tensors = lstm_tensors()
    with open_checkpoint_files(split.paths) as checkpoint:
        for name, array in tensors.items():
            np.testing.assert_array_equal(checkpoint.raw(name), array)
    assert split.now() == left


@pytest.mark.parametrize("order", ["first-file-first", "last-file-first"])
@pytest.mark.parametrize("fault", FAULT_POINTS)
def test_kill_at_each_step_leaves_every_file_old(split, fault, order):
    result = run_edit(split.paths, LSTM_SURGEON_FAULT=fault)
    assert result.returncode == -signal.SIGKILL, result.stderr
    journals = [journal_path(path).exists() for path in split.paths]
    assert any(journals)  # every fault point lies after the first journal is durable
    if fault == "mid-journal-removal":
        assert journals == [False, True]
    assert_reads_as_old(split)
    for path in split.paths if order == "first-file-first" else reversed(split.paths):
        recover_interrupted_edit(path)
    assert split.now() == split.old
    assert debris(split.paths[0].parent) == []
    assert run_edit(split.paths).returncode == 0  # and the checkpoint edits as if never touched
    assert split.now() == split.new


def test_recovery_from_either_file_rolls_back_both(split):
    assert run_edit(split.paths, LSTM_SURGEON_FAULT="between-files").returncode == -signal.SIGKILL
    first, second = split.now()
    assert first == split.new[0] and second == split.old[1]  # the mix a kill leaves on disk
    assert recover_interrupted_edit(split.paths[1])  # the untouched file's journal rolls back both
    assert split.now() == split.old
    assert not recover_interrupted_edit(split.paths[0])
    assert debris(split.paths[0].parent) == []


def test_a_single_file_of_the_set_reads_as_the_rollback_leaves_it(split):
    assert run_edit(split.paths, LSTM_SURGEON_FAULT="between-files").returncode == -signal.SIGKILL
    with open_checkpoint(split.paths[0]) as checkpoint:
        assert checkpoint.files[0].pending_rollback
        for name, array in side(lstm_tensors(), "ih").items():
            np.testing.assert_array_equal(checkpoint.raw(name), array)
        assert any("interrupted" in warning for warning in checkpoint.warnings)


SIGINT_AT_FAULT_POINT = (
    """
import os, signal, sys
import lstm_surgeon.writing

wanted = sys.argv.pop(1)

def fault_point(name):
    global wanted
    if name == wanted:
        wanted = None  # one Ctrl-C, as a user gives it
        os.kill(os.getpid(), signal.SIGINT)

lstm_surgeon.writing.fault_point = fault_point
"""
    + EDIT_SCRIPT
)


@pytest.mark.parametrize("fault", FAULT_POINTS)
def test_ctrl_c_at_each_step_rolls_every_file_back_at_once(split, fault):
    result = subprocess.run(
        [sys.executable, "-c", SIGINT_AT_FAULT_POINT, fault, str(VALUE), *map(str, split.paths)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=clean_environment(),
        timeout=120,
        check=False,
    )
    assert result.returncode != 0
    assert "KeyboardInterrupt" in result.stderr
    assert split.now() == split.old
    assert debris(split.paths[0].parent) == []


def wait_for_journal(paths: list[Path], process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while process.poll() is None and time.monotonic() < deadline:
        if journal_path(paths[0]).exists():
            return


def test_kill_at_random_times_leaves_both_old_or_both_new(split):
    rng = random.Random("kill-split")
    started = time.monotonic()
    assert run_edit(split.paths).returncode == 0
    duration = time.monotonic() - started
    assert split.now() == split.new
    outcomes = []
    for attempt in range(30):
        if attempt >= 12 and (-signal.SIGKILL, True) in outcomes:
            break
        split.reset()
        process = subprocess.Popen(
            [sys.executable, "-c", EDIT_SCRIPT, str(VALUE), *map(str, split.paths)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=clean_environment(),
        )
        if attempt % 2:
            wait_for_journal(split.paths, process)  # aim at the patches themselves
            time.sleep(rng.uniform(0, 0.002))
        else:
            time.sleep(rng.uniform(0.5, 1.2) * duration)
        process.kill()
        process.wait(timeout=60)
        journaled = any(journal_path(path).exists() for path in split.paths)
        outcomes.append((process.returncode, journaled))
        for path in split.paths:
            recover_interrupted_edit(path)
        assert split.now() in (split.old, split.new), (attempt, process.returncode)
        assert debris(split.paths[0].parent) == []
    assert (-signal.SIGKILL, True) in outcomes  # at least one kill hit the edit itself
