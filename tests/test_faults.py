"""Writing under real faults: a full disk, a read-only folder, Ctrl-C, `kill -9`, a second editor.

Every fault is injected for real, in a subprocess running the installed command: RLIMIT_FSIZE and a
tiny tmpfs for a full disk, dropped privileges for a read-only folder, SIGINT, SIGKILL (at random
times and at the named steps of `writing.fault_point`), and two editors started together. Whatever
happens, the checkpoint is the old one or the new one (never a mix), a failed run says so in one line
and leaves no output and no temporary file behind, and the input of a `-o` run is never touched.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import json
import os
import pty
import random
import resource
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import make_fixtures
import numpy as np
import pytest
from conftest import assert_clean_failure, clean_environment
from safetensors.numpy import save_file

from lstm_surgeon.check import check_checkpoint
from lstm_surgeon.formats import open_checkpoint
from lstm_surgeon.writing import recover_interrupted_edit

DEBRIS_SUFFIXES = (".lstm-surgeon-tmp", ".lstm-surgeon-journal")
FAULT_POINTS = ["after-journal", "mid-patch", "before-journal-removal"]
EDIT = ("set-forget-bias", "--value", "1.5")  # zoo.*: a patch of 18 bias tensors
ZOO = ["zoo.pt", "zoo.safetensors"]


def debris(folder: Path) -> list[str]:
    """Temporary files and journals lstm-surgeon left in `folder`."""
    return sorted(path.name for path in folder.iterdir() if path.name.endswith(DEBRIS_SUFFIXES))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_zip_sound(path: Path) -> None:
    if path.suffix == ".pt":
        with zipfile.ZipFile(path) as archive:
            assert archive.testzip() is None


def recover(path: Path) -> None:
    """What any later editing command does first: roll back an interrupted in-place edit."""
    recover_interrupted_edit(path)


def inspected_layers(surgeon: Callable[..., Any], path: Path) -> list[Any]:
    """What `inspect --json` reports of the file's recurrent layers."""
    result = surgeon("inspect", path, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["layers"]


# --- A full disk ----------------------------------------------------------------------------


def file_size_limit(limit: int) -> Callable[[], None]:
    """preexec_fn: writes past `limit` bytes fail with EFBIG (SIGXFSZ ignored, as a full disk)."""

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


# ddp.pt and half.safetensors hold only LSTMs: no "skipped" notes, so stderr is the error alone.
FULL_DISK_CASES = [
    pytest.param("ddp.pt", ("set-forget-bias",), id="pt-patch"),
    pytest.param("ddp.pt", ("zero-bias", "--drop"), id="pt-rewrite"),
    pytest.param("half.safetensors", ("set-forget-bias",), id="safetensors-patch"),
    pytest.param("half.safetensors", ("zero-bias", "--drop"), id="safetensors-rewrite"),
]


@pytest.mark.parametrize("fraction", [0.0, 0.5], ids=["nothing-fits", "half-fits"])
@pytest.mark.parametrize(("filename", "command"), FULL_DISK_CASES)
def test_full_disk_leaves_no_output_and_no_temporary_file(
    surgeon, fixture_copy, tmp_path, filename, command, fraction
):
    source = fixture_copy(filename)
    before = sha256(source)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    output = out_dir / f"edited{source.suffix}"
    limit = int(source.stat().st_size * fraction)
    result = surgeon(*command, source, "-o", output, preexec_fn=file_size_limit(limit))
    line = assert_clean_failure(result.stderr, result.returncode)
    assert "cannot write" in line
    assert os.strerror(errno.EFBIG) in line
    assert not output.exists()
    assert list(out_dir.iterdir()) == []
    assert sha256(source) == before


@pytest.mark.parametrize(
    "command",
    [("set-forget-bias",), ("set-forget-bias", "--backup"), ("zero-bias", "--drop")],
    ids=["patch", "patch-with-backup", "rewrite"],
)
@pytest.mark.parametrize("filename", ["ddp.pt", "half.safetensors"])
def test_full_disk_during_in_place_edit_keeps_the_old_checkpoint(
    surgeon, fixture_copy, tmp_path, filename, command
):
    target = fixture_copy(filename)
    before = sha256(target)
    result = surgeon(*command, target, "--in-place", "-y", preexec_fn=file_size_limit(64))
    line = assert_clean_failure(result.stderr, result.returncode)
    assert os.strerror(errno.EFBIG) in line
    assert sha256(target) == before
    assert not target.with_name(target.name + ".bak").exists()
    recover(target)  # the next command finds whatever the failed run left, and cleans it up
    assert sha256(target) == before
    assert debris(tmp_path) == []


@pytest.mark.parametrize("filename", ["ddp.pt", "half.safetensors"])
def test_full_disk_during_in_place_patch_leaves_no_journal(
    surgeon, fixture_copy, tmp_path, filename
):
    target = fixture_copy(filename)
    result = surgeon("set-forget-bias", target, "--in-place", "-y", preexec_fn=file_size_limit(64))
    assert result.returncode == 2
    assert debris(tmp_path) == []


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs (a real full disk: ENOSPC), mounted for the test; skipped when not allowed."""
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount_point)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], capture_output=True, check=False)


def fill(folder: Path, leave: int = 0) -> None:
    """Fill the filesystem of `folder` until at most `leave` bytes are free."""
    with open(folder / "filler", "wb") as filler:
        while True:
            free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
            if free <= leave:
                return
            try:
                filler.write(b"\0" * 4096)
                filler.flush()
            except OSError as error:
                assert error.errno == errno.ENOSPC
                return


def test_no_space_left_for_the_output(surgeon, fixtures_dir, tiny_tmpfs):
    source = fixtures_dir / "zoo.pt"  # 33 KB: does not fit in what is left
    fill(tiny_tmpfs, leave=16 * 1024)
    output = tiny_tmpfs / "edited.pt"
    result = surgeon("zero-bias", source, "-o", output)
    line = assert_clean_failure(result.stderr, result.returncode)
    assert os.strerror(errno.ENOSPC) in line
    assert sorted(path.name for path in tiny_tmpfs.iterdir()) == ["filler"]


def test_no_space_left_for_the_journal(surgeon, fixtures_dir, tiny_tmpfs):
    target = tiny_tmpfs / "zoo.safetensors"
    shutil.copyfile(fixtures_dir / "zoo.safetensors", target)
    before = sha256(target)
    fill(tiny_tmpfs)
    result = surgeon("zero-bias", target, "--in-place", "-y")
    line = assert_clean_failure(result.stderr, result.returncode)
    assert os.strerror(errno.ENOSPC) in line
    assert sha256(target) == before
    recover(target)
    assert sha256(target) == before
    assert debris(tiny_tmpfs) == []


# --- A read-only folder, as a user who cannot override file permissions ------------------------

PR_CAPBSET_DROP = 24
CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER = 1, 2, 3
NOBODY = 65534


def become_nobody() -> None:
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)


_LIBC = ctypes.CDLL(None, use_errno=True)


def drop_permission_overrides() -> None:
    """Stay uid 0 but lose, from exec on, the capabilities that let root ignore file modes."""
    for capability in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER):
        if _LIBC.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A folder every user can reach (tmp_path sits in root's private folder)."""
    folder = Path(tempfile.mkdtemp(prefix="lstm-surgeon-faults-", dir="/tmp"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        for path in [folder, *folder.rglob("*")]:
            if path.is_dir():
                path.chmod(0o755)
        shutil.rmtree(folder)


@pytest.fixture(scope="session")
def unprivileged(surgeon_command) -> Callable[[], None]:
    """preexec_fn that makes the command an ordinary user: `nobody` when `nobody` can run the
    interpreter, else root without CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH/CAP_FOWNER (the venv's
    interpreter may live in root's private home)."""
    if os.geteuid() != 0:
        pytest.skip("dropping privileges needs root")
    with tempfile.TemporaryDirectory(dir="/tmp") as probe_dir:
        locked = Path(probe_dir) / "locked"
        locked.mkdir(mode=0o555)
        locked.chmod(0o555)
        for preexec in (become_nobody, drop_permission_overrides):
            try:
                runs = subprocess.run(
                    [*surgeon_command, "--version"],
                    preexec_fn=preexec,
                    capture_output=True,
                    env=clean_environment(HOME="/nonexistent"),
                    timeout=60,
                    check=False,
                )
                denied = subprocess.run(
                    [sys.executable, "-c", "import sys; open(sys.argv[1], 'w')", locked / "x"],
                    preexec_fn=preexec,
                    capture_output=True,
                    timeout=60,
                    check=False,
                )
            except (OSError, subprocess.SubprocessError):
                continue
            if runs.returncode == 0 and denied.returncode != 0:
                return preexec
    pytest.skip("cannot run the command as an ordinary user here")


READ_ONLY_CASES = {
    "output-in-read-only-folder": ("set-forget-bias", "{source}", "-o", "{locked}/out.pt"),
    "in-place-patch": ("set-forget-bias", "{locked}/model.pt", "--in-place", "-y"),
    "in-place-rewrite": ("zero-bias", "--drop", "{locked}/model.pt", "--in-place", "-y"),
    "in-place-backup": ("set-forget-bias", "{locked}/model.pt", "--in-place", "-y", "--backup"),
    "read-only-file": ("set-forget-bias", "{open}/readonly.pt", "--in-place", "-y"),
}


@pytest.mark.parametrize("case", list(READ_ONLY_CASES))
def test_read_only_folder_gives_one_clear_error(
    surgeon, fixtures_dir, shared_dir, unprivileged, case
):
    """`locked` is mode 0o555 with a writable model.pt inside; `open` is 0o777 with a 0o444 file."""
    locked, open_dir = shared_dir / "locked", shared_dir / "open"
    locked.mkdir()
    open_dir.mkdir()
    source = shared_dir / "source.pt"
    for path, mode in (
        (source, 0o644),
        (locked / "model.pt", 0o666),
        (open_dir / "readonly.pt", 0o444),
    ):
        shutil.copyfile(fixtures_dir / "ddp.pt", path)
        path.chmod(mode)
    locked.chmod(0o555)
    open_dir.chmod(0o777)
    before = {
        path: sha256(path) for path in (source, locked / "model.pt", open_dir / "readonly.pt")
    }
    places = {"source": source, "locked": locked, "open": open_dir}
    args = [arg.format(**places) for arg in READ_ONLY_CASES[case]]
    result = surgeon(*args, preexec_fn=unprivileged, env={"HOME": "/nonexistent"})
    line = assert_clean_failure(result.stderr, result.returncode)
    assert "ermission denied" in line
    assert {path: sha256(path) for path in before} == before
    assert sorted(path.name for path in locked.iterdir()) == ["model.pt"]
    assert sorted(path.name for path in open_dir.iterdir()) == ["readonly.pt"]


def test_read_only_folder_can_still_be_inspected(surgeon, fixtures_dir, shared_dir, unprivileged):
    locked = shared_dir / "locked"
    locked.mkdir()
    shutil.copyfile(fixtures_dir / "ddp.pt", locked / "model.pt")
    (locked / "model.pt").chmod(0o444)
    locked.chmod(0o555)
    result = surgeon("inspect", locked / "model.pt", preexec_fn=unprivileged)
    assert result.returncode == 0, result.stderr
    assert "module.lstm" in result.stdout


# --- Ctrl-C ---------------------------------------------------------------------------------

BALLAST = 256 * 1024 * 1024  # a sparse tensor: the copy takes long enough to be interrupted


@pytest.fixture
def big_checkpoint(tmp_path: Path) -> Path:
    """A ~256 MB safetensors file: a small LSTM plus a sparse uint8 tensor, written with numpy."""
    folder = tmp_path / "big"
    folder.mkdir()
    path = folder / "big.safetensors"
    rng = np.random.default_rng(0)
    tensors = {
        f"lstm.{name}_l0": rng.standard_normal(shape).astype(np.float32)
        for name, shape in (
            ("weight_ih", (16, 3)),
            ("weight_hh", (16, 4)),
            ("bias_ih", (16,)),
            ("bias_hh", (16,)),
        )
    }
    tensors["ballast"] = np.zeros(8, dtype=np.uint8)
    save_file(tensors, str(path))
    # Grow the last tensor (ballast) in the header and the file: sparse, so instant to write.
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = data[8 : 8 + length].decode()
    start = len(data) - 8 - (8 + length)
    old = f'"ballast":{{"dtype":"U8","shape":[8],"data_offsets":[{start},{start + 8}]}}'
    new = (
        f'"ballast":{{"dtype":"U8","shape":[{BALLAST}],"data_offsets":[{start},{start + BALLAST}]}}'
    )
    assert old in header, header
    header = header.replace(old, new)
    header += " " * (-(len(header) + 8) % 8)
    with open(path, "wb") as file:
        file.write(len(header).to_bytes(8, "little") + header.encode() + data[8 + length : -8])
        file.truncate(file.tell() + BALLAST)
    with open_checkpoint(path) as checkpoint:
        assert checkpoint.tensors["ballast"].shape == (BALLAST,)
    return path


def head_and_stat(path: Path) -> tuple[bytes, int, int]:
    """A cheap fingerprint of the big file: its first 64 KiB (header, LSTM), size, mtime."""
    with open(path, "rb") as file:
        head = file.read(65536)
    info = path.stat()
    return head, info.st_size, info.st_mtime_ns


INTERRUPT_CASES = {
    "copy-and-patch": ("set-forget-bias", "{source}", "-o", "{output}"),
    "rewrite": ("zero-bias", "--drop", "{source}", "-o", "{output}"),
    "backup-of-in-place": ("set-forget-bias", "{source}", "--in-place", "-y", "--backup"),
}


@pytest.mark.parametrize("case", list(INTERRUPT_CASES))
def test_ctrl_c_exits_130_and_leaves_nothing_behind(surgeon_command, big_checkpoint, case):
    folder = big_checkpoint.parent
    output = folder / "edited.safetensors"
    before = head_and_stat(big_checkpoint)
    args = [a.format(source=big_checkpoint, output=output) for a in INTERRUPT_CASES[case]]
    for attempt in range(4):
        process = subprocess.Popen(
            [*surgeon_command, *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=clean_environment(),
        )
        deadline = time.monotonic() + 60
        while process.poll() is None and not debris(folder) and time.monotonic() < deadline:
            time.sleep(0.002)  # wait until the temporary file exists: the write is under way
        time.sleep(0.02 / (attempt + 1))
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=120)
        if process.returncode == 0:  # finished before the signal: try again, sooner
            output.unlink(missing_ok=True)
            big_checkpoint.with_name(big_checkpoint.name + ".bak").unlink(missing_ok=True)
            continue
        break
    assert process.returncode == 130, stderr
    assert (
        assert_clean_failure(stderr, process.returncode, 130) == "lstm-surgeon: error: interrupted"
    )
    assert sorted(path.name for path in folder.iterdir()) == [big_checkpoint.name]
    assert head_and_stat(big_checkpoint) == before


# --- kill -9 during --in-place ----------------------------------------------------------------


@pytest.fixture(scope="module")
def zoo_versions(tmp_path_factory, surgeon) -> dict[str, tuple[bytes, bytes, float]]:
    """For each zoo fixture: its bytes, the bytes `EDIT -o` makes of it, the run's duration."""
    folder = tmp_path_factory.mktemp("zoo-versions")
    versions = {}
    for filename in ZOO:
        source = folder / filename
        shutil.copyfile(make_fixtures.FIXTURES_DIR / filename, source)
        output = folder / f"edited-{filename}"
        started = time.monotonic()
        result = surgeon(*EDIT, source, "-o", output)
        assert result.returncode == 0, result.stderr
        versions[filename] = (source.read_bytes(), output.read_bytes(), time.monotonic() - started)
    return versions


@pytest.mark.parametrize("fault", FAULT_POINTS)
@pytest.mark.parametrize("filename", ZOO)
def test_kill_at_each_step_of_an_in_place_edit(
    surgeon, fixture_copy, tmp_path, zoo_versions, filename, fault
):
    original, edited, _ = zoo_versions[filename]
    target = fixture_copy(filename)
    result = surgeon(*EDIT, target, "--in-place", "-y", env={"LSTM_SURGEON_FAULT": fault})
    assert result.returncode == -signal.SIGKILL, result.stderr
    journal = tmp_path / f".{filename}.lstm-surgeon-journal"
    assert journal.exists()  # every fault point lies after the journal is durable
    expected_now = {"after-journal": original, "before-journal-removal": edited}
    if fault in expected_now:
        assert target.read_bytes() == expected_now[fault]
    left = target.read_bytes()
    # A reading command shows the checkpoint the journal saved, and writes nothing.
    pristine = tmp_path / "pristine" / filename
    pristine.parent.mkdir()
    pristine.write_bytes(original)
    assert inspected_layers(surgeon, target) == inspected_layers(surgeon, pristine)
    assert target.read_bytes() == left
    assert journal.exists()
    assert not check_checkpoint(target).sound  # the bytes on disk are not the checkpoint yet
    # An editing command (here its library call) rolls the file back to the saved checkpoint.
    recover(target)
    assert target.read_bytes() == original
    assert debris(tmp_path) == []
    assert_zip_sound(target)
    assert check_checkpoint(target).sound


@pytest.mark.parametrize("filename", ZOO)
def test_the_next_edit_rolls_back_an_interrupted_one_first(
    surgeon, fixture_copy, tmp_path, zoo_versions, filename
):
    _, edited, _ = zoo_versions[filename]
    target = fixture_copy(filename)
    result = surgeon(*EDIT, target, "--in-place", "-y", env={"LSTM_SURGEON_FAULT": "mid-patch"})
    assert result.returncode == -signal.SIGKILL
    result = surgeon(*EDIT, target, "--in-place", "-y")
    assert result.returncode == 0, result.stderr
    assert target.read_bytes() == edited  # the edit of the rolled-back file, not of a half one
    assert debris(tmp_path) == []


def test_the_in_place_result_is_the_output_result(surgeon, fixture_copy, zoo_versions):
    """Control for the kill tests: an uninterrupted in-place edit gives the `-o` bytes."""
    for filename in ZOO:
        target = fixture_copy(filename)
        assert surgeon(*EDIT, target, "--in-place", "-y").returncode == 0
        assert target.read_bytes() == zoo_versions[filename][1]


def wait_for(path: Path, process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists() and process.poll() is None and time.monotonic() < deadline:
        pass  # busy wait: the journal lives for a few milliseconds


@pytest.mark.parametrize("filename", ZOO)
def test_kill_at_random_times_leaves_old_or_new(surgeon_command, tmp_path, zoo_versions, filename):
    original, edited, duration = zoo_versions[filename]
    target = tmp_path / filename
    journal = tmp_path / f".{filename}.lstm-surgeon-journal"
    rng = random.Random(f"kill-{filename}")
    outcomes = []
    for attempt in range(24):
        if attempt >= 10 and (-signal.SIGKILL, True) in outcomes:
            break
        target.write_bytes(original)
        process = subprocess.Popen(
            [*surgeon_command, *EDIT, str(target), "--in-place", "-y"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=clean_environment(),
        )
        if attempt % 2:
            wait_for(journal, process)  # aim at the patch itself
            time.sleep(rng.uniform(0, 0.003))
        else:
            time.sleep(rng.uniform(0.5, 1.2) * duration)
        process.kill()
        process.wait(timeout=60)
        outcomes.append((process.returncode, journal.exists()))
        recover(target)
        assert target.read_bytes() in (original, edited), (attempt, process.returncode)
        assert debris(tmp_path) == []
        assert_zip_sound(target)
    assert (-signal.SIGKILL, True) in outcomes  # at least one kill hit the patch


SIGINT_AT_FAULT_POINT = """
import os, signal, sys
import lstm_surgeon.writing

wanted = sys.argv.pop(1)

def fault_point(name):
    if name == wanted:
        os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, delivered at this very step

lstm_surgeon.writing.fault_point = fault_point
from lstm_surgeon.cli import main
sys.argv[0] = "lstm-surgeon"
main()
"""


@pytest.mark.parametrize(
    "fault",
    [
        "after-journal",
        "mid-patch",
        "before-journal-removal",
    ],
)
@pytest.mark.parametrize("filename", ["ddp.pt", "half.safetensors"])
def test_ctrl_c_at_each_step_of_an_in_place_edit(fixture_copy, tmp_path, filename, fault):
    target = fixture_copy(filename)
    original = target.read_bytes()
    result = subprocess.run(
        [sys.executable, "-c", SIGINT_AT_FAULT_POINT, fault, *EDIT, target, "--in-place", "-y"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=clean_environment(),
        timeout=120,
        check=False,
    )
    line = assert_clean_failure(result.stderr, result.returncode, 130)
    assert line == "lstm-surgeon: error: interrupted"
    assert target.read_bytes() == original  # rolled back at once, not by the next command
    assert debris(tmp_path) == []


def test_interrupted_edit_of_a_read_only_file_is_explained(
    surgeon, fixtures_dir, shared_dir, unprivileged
):
    target = shared_dir / "model.pt"
    shutil.copyfile(fixtures_dir / "ddp.pt", target)
    result = surgeon(*EDIT, target, "--in-place", "-y", env={"LSTM_SURGEON_FAULT": "mid-patch"})
    assert result.returncode == -signal.SIGKILL
    target.chmod(0o444)
    left = sha256(target)
    # Reading works for a user who cannot roll the file back, and says what happened.
    result = surgeon("inspect", target, preexec_fn=unprivileged)
    assert result.returncode == 0, result.stderr
    assert "interrupted" in result.stderr and "recover" in result.stderr
    # Editing needs the rollback first, which this user cannot do: one clear line.
    result = surgeon(*EDIT, target, "-o", shared_dir / "out.pt", preexec_fn=unprivileged)
    line = assert_clean_failure(result.stderr, result.returncode)
    assert "interrupted" in line and "recover" in line, line
    assert sha256(target) == left


# --- Two editors at once ----------------------------------------------------------------------

ADD = ("set-gate-bias", "--gate", "forget", "--mode", "add", "--value", "1")


def run_together(
    command: list[str], runs: list[list[str]]
) -> list[subprocess.CompletedProcess[str]]:
    def run(args: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*command, *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            env=clean_environment(),
            timeout=120,
            check=False,
        )

    with ThreadPoolExecutor(len(runs)) as pool:
        return list(pool.map(run, runs))


def chain(
    run_cli: Callable[..., Any], source: Path, folder: Path, *edits: tuple[str, ...]
) -> bytes:
    """The bytes that applying `edits` one after the other (each `-o`) gives."""
    current, steps = source, Path(tempfile.mkdtemp(dir=folder))
    for index, edit in enumerate(edits):
        output = steps / f"step{index}-{source.name}"
        result = run_cli(*edit, current, "-o", output)
        assert result.exit_code == 0, result.stderr
        current = output
    return current.read_bytes()


def assert_waited_or_refused(result: subprocess.CompletedProcess[str]) -> None:
    """Success, or one clear refusal: the lock was busy too long, or (after the preview, which the
    user saw with the lock released) the file changed before the lock was taken."""
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines()
        errors = [line for line in lines if "error:" in line]
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr, result.stderr
        assert errors == lines[-1:], result.stderr
        assert errors[0].startswith("lstm-surgeon: error: "), result.stderr
        assert "another lstm-surgeon" in errors[0]


@pytest.mark.parametrize("filename", ZOO)
def test_two_concurrent_in_place_edits_both_apply(
    surgeon_command, run_cli, fixtures_dir, tmp_path, filename
):
    expected = tmp_path / "expected"
    expected.mkdir()
    source = fixtures_dir / filename
    once = chain(run_cli, source, expected, ADD)
    twice = chain(run_cli, source, expected, ADD, ADD)
    target = tmp_path / filename
    for _ in range(2):
        shutil.copyfile(source, target)
        results = run_together(surgeon_command, [[*ADD, str(target), "--in-place", "-y"]] * 2)
        for result in results:
            assert_waited_or_refused(result)
        succeeded = sum(result.returncode == 0 for result in results)
        assert target.read_bytes() == {1: once, 2: twice}[succeeded]
        assert debris(tmp_path) == []
        assert_zip_sound(target)


DROP_ENCODER = ("zero-bias", "--drop", "--layer", "encoder")
ADD_PROJECTED = (*ADD, "--layer", "projected")


def locked_by_another(path: Path) -> bool:
    """True while another process holds the flock lstm-surgeon takes on `path`."""
    with open(path, "rb") as file:
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(file.fileno(), fcntl.LOCK_UN)
        return False


def start(command: list[str], args: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*command, *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=clean_environment(),
    )


def test_patch_waiting_for_a_rewrite_edits_the_new_file(
    surgeon_command, run_cli, fixtures_dir, tmp_path
):
    """The rewrite (torch.save: slow) holds the lock, then renames a new file over the path; the
    patcher that waited for the old file's lock must edit the new file, not the unlinked old one."""
    expected = tmp_path / "expected"
    expected.mkdir()
    source = fixtures_dir / "zoo.pt"
    both = chain(run_cli, source, expected, DROP_ENCODER, ADD_PROJECTED)
    target = tmp_path / "zoo.pt"
    shutil.copyfile(source, target)
    rewriter = start(surgeon_command, [*DROP_ENCODER, str(target), "--in-place", "-y"])
    deadline = time.monotonic() + 60
    while rewriter.poll() is None and time.monotonic() < deadline:
        if locked_by_another(target):
            break
        time.sleep(0.005)
    else:
        pytest.fail(f"the rewrite never held the lock: {rewriter.communicate()[1]}")
    patcher = start(surgeon_command, [*ADD_PROJECTED, str(target), "--in-place", "-y"])
    for process in (rewriter, patcher):
        _, stderr = process.communicate(timeout=120)
        assert process.returncode == 0, stderr
    assert target.read_bytes() == both
    assert debris(tmp_path) == []
    assert_zip_sound(target)


@pytest.mark.parametrize("filename", ZOO)
def test_concurrent_rewrite_and_patch_lose_neither_edit(
    surgeon_command, run_cli, fixtures_dir, tmp_path, filename
):
    """Started together, in both orders: the result is both edits, whichever ran first."""
    expected = tmp_path / "expected"
    expected.mkdir()
    source = fixtures_dir / filename
    both = {
        chain(run_cli, source, expected, DROP_ENCODER, ADD_PROJECTED),
        chain(run_cli, source, expected, ADD_PROJECTED, DROP_ENCODER),
    }
    only = {
        chain(run_cli, source, expected, DROP_ENCODER),
        chain(run_cli, source, expected, ADD_PROJECTED),
    }
    target = tmp_path / filename
    for order in ([DROP_ENCODER, ADD_PROJECTED], [ADD_PROJECTED, DROP_ENCODER]):
        shutil.copyfile(source, target)
        runs = [[*edit, str(target), "--in-place", "-y"] for edit in order]
        results = run_together(surgeon_command, runs)
        for result in results:
            assert_waited_or_refused(result)
        if all(result.returncode == 0 for result in results):
            assert target.read_bytes() in both
        else:
            assert target.read_bytes() in only
        assert debris(tmp_path) == []


# --- The input of a -o run is never modified ---------------------------------------------------

COMMANDS = {
    "set-forget-bias": ("set-forget-bias",),
    "set-gate-bias": ("set-gate-bias", "--gate", "update", "--value", "1"),
    "zero-bias": ("zero-bias",),
    "zero-bias-drop": ("zero-bias", "--drop"),
    "add-bias": ("add-bias",),
    "zero-input": ("zero-input", "--features", "0"),
    "convert": ("set-forget-bias",),  # to the other format (a rewrite)
}
OTHER_SUFFIX = {".safetensors": ".pt"}


@pytest.mark.parametrize("filename", [fixture.filename for fixture in make_fixtures.FIXTURES])
def test_output_runs_never_modify_the_input(run_cli, fixture_copy, tmp_path, filename):
    source = fixture_copy(filename)
    info = source.stat()
    before = sha256(source)
    for name, command in COMMANDS.items():
        suffix = source.suffix
        if name == "convert":
            suffix = OTHER_SUFFIX.get(source.suffix, ".safetensors")
        output = tmp_path / f"out-{name}{suffix}"
        result = run_cli(*command, source, "-o", output)
        assert result.exit_code in (0, 2), (name, result.stderr)
        if result.exit_code == 2:  # a legitimate refusal (no such gate, no biases, ...)
            errors = [line for line in result.stderr.splitlines() if "error:" in line]
            assert len(errors) == 1, (name, result.stderr)
            assert errors[0].startswith("lstm-surgeon: error: "), (name, result.stderr)
            assert not output.exists(), name
        assert sha256(source) == before, name
        assert source.stat().st_mtime_ns == info.st_mtime_ns, name
    assert debris(tmp_path) == []


@pytest.mark.parametrize("replace_with", ["compiled.safetensors", "zoo.pt"])
def test_a_journal_that_no_longer_fits_the_file_is_never_applied(
    surgeon, fixture_copy, fixtures_dir, tmp_path, replace_with
):
    """Killed after journaling, then the file is replaced (or re-saved in place): the journal must
    not be 'rolled back' into the new file, which would corrupt it."""
    target = fixture_copy("zoo.safetensors")
    result = surgeon(*EDIT, target, "--in-place", "-y", env={"LSTM_SURGEON_FAULT": "after-journal"})
    assert result.returncode == -signal.SIGKILL
    replacement = (fixtures_dir / replace_with).read_bytes()
    with open(target, "r+b") as file:  # same inode, new content: as torch.save over the path
        file.truncate(0)
        file.write(replacement)
    result = surgeon("inspect", target)
    line = assert_clean_failure(result.stderr, result.returncode)
    assert "journal" in line and "does not match" in line
    assert target.read_bytes() == replacement
    # `check` names the stale journal and checks the bytes on disk, so the user can decide.
    report = check_checkpoint(target)
    assert [problem for problem in report.problems if "does not match" in problem]
    assert report.problems == [report.problems[0]]  # the replacement itself is sound
    assert report.tensors_scanned > 0
    assert target.read_bytes() == replacement


# --- The confirmation question is asked with nothing locked -------------------------------------


def ask_in_a_terminal(
    command: list[str], args: list[str]
) -> tuple[subprocess.Popen[bytes], int, bytes]:
    """Start an edit whose stdin and stderr are a terminal, and wait for its question; returns
    the process, the terminal's controlling end, and what was printed until then."""
    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        [*command, *args],
        stdin=terminal,
        stdout=subprocess.DEVNULL,
        stderr=terminal,
        env=clean_environment(),
    )
    os.close(terminal)
    shown = b""
    deadline = time.monotonic() + 60
    while b"Write the checkpoint in place?" not in shown and time.monotonic() < deadline:
        ready, _, _ = select.select([controller], [], [], 1)
        if ready:
            shown += os.read(controller, 4096)
    assert b"Write the checkpoint in place?" in shown, shown
    return process, controller, shown


def answer(process: subprocess.Popen[bytes], controller: int, text: bytes) -> bytes:
    """Type `text` into the terminal and read what follows until the process ends."""
    os.write(controller, text)
    output = b""
    while True:
        try:
            chunk = os.read(controller, 4096)
        except OSError:  # EIO: the process closed the terminal
            break
        if not chunk:
            break
        output += chunk
    process.wait(timeout=60)
    os.close(controller)
    return output


@pytest.mark.parametrize("filename", ZOO)
def test_the_question_waits_with_the_file_unlocked(
    surgeon_command, tmp_path, zoo_versions, filename
):
    original, edited, _ = zoo_versions[filename]
    target = tmp_path / filename
    target.write_bytes(original)
    process, controller, _ = ask_in_a_terminal(surgeon_command, [*EDIT, str(target), "--in-place"])
    assert not locked_by_another(target)
    assert debris(tmp_path) == []
    answer(process, controller, b"y\n")
    assert process.returncode == 0
    assert target.read_bytes() == edited


@pytest.mark.parametrize("filename", ZOO)
def test_an_edit_made_while_the_question_waits_is_not_overwritten(
    surgeon, surgeon_command, run_cli, fixtures_dir, tmp_path, filename
):
    """Another editor edits the file while the first one waits for its answer (before, it would
    have waited a minute for the lock, then failed); the first then refuses to write a plan made
    for the old file."""
    expected = tmp_path / "expected"
    expected.mkdir()
    other_edit = chain(run_cli, fixtures_dir / filename, expected, ADD)
    target = tmp_path / filename
    shutil.copyfile(fixtures_dir / filename, target)
    process, controller, _ = ask_in_a_terminal(surgeon_command, [*EDIT, str(target), "--in-place"])
    result = surgeon(*ADD, target, "--in-place", "-y")
    assert result.returncode == 0, result.stderr
    output = answer(process, controller, b"y\n").decode()
    assert process.returncode == 2
    assert "changed after this edit was planned" in output
    assert "Traceback" not in output
    assert target.read_bytes() == other_edit
    assert debris(tmp_path) == []


def test_a_journal_left_by_the_previous_version_is_still_rolled_back(fixture_copy, tmp_path):
    """Journals of format 2 (one file) were written before edits could span several files; one
    left by a killed run of that version must still be read and rolled back, never ignored."""
    target = fixture_copy("zoo.safetensors")
    original = target.read_bytes()
    offset = len(original) - 8
    info = target.stat()
    body = b"lstm-surgeon journal 2\n" + struct.pack(
        "<QQQI", info.st_dev, info.st_ino, info.st_size, 1
    )
    body += struct.pack("<QQ", offset, 8) + original[offset:] + b"\xff" * 8
    body += hashlib.sha256(body).digest()
    target.with_name(f".{target.name}.lstm-surgeon-journal").write_bytes(body)
    with open(target, "r+b") as file:  # the patch the killed run had written
        os.pwrite(file.fileno(), b"\xff" * 8, offset)
    with open_checkpoint(target) as checkpoint:
        assert bytes(checkpoint.buffer[offset:]) == original[offset:]
    assert target.read_bytes()[offset:] == b"\xff" * 8  # reading wrote nothing
    assert recover_interrupted_edit(target)
    assert target.read_bytes() == original
    assert debris(tmp_path) == []
