"""Reading never writes: `inspect`, `diff`, `check`, `verify`, `trend` and their library calls open nothing for
writing, take no lock, and create, rename or delete nothing, even beside a half-edited file.

Two real mechanisms, because tests run as root (who may write a 0o444 file anyway):
- every call runs in a subprocess with an audit hook (`sys.addaudithook`) that records each `open`
  with write flags, each shared writeable map, each `flock` and each rename, removal, chmod or
  mkdir; the run fails if one is recorded;
- the same commands run as a user who cannot write the read-only file and folder, and the file,
  the folder and their times stay as they were.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import test_faults
from conftest import clean_environment
from test_faults import EDIT

shared_dir = test_faults.shared_dir  # the fixtures of a folder every user reaches, and of a user
unprivileged = test_faults.unprivileged  # who cannot override file modes

AUDITED = r"""
import json, os, sys

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
WRITING_EVENTS = {
    "os.remove", "os.rename", "os.truncate", "os.mkdir", "os.rmdir", "os.chmod", "os.chown",
    "os.utime", "os.link", "os.symlink", "fcntl.flock", "fcntl.lockf", "shutil.copyfile",
    "shutil.move", "tempfile.mkstemp", "tempfile.mkdtemp",
}
SHARED_WRITEABLE_MAPS = (0, 2)  # mmap.ACCESS_DEFAULT, mmap.ACCESS_WRITE (ACCESS_COPY is private)
seen = []


def audit(event, args):
    if event == "open" and isinstance(args[2], int) and args[2] & WRITE_FLAGS:
        seen.append(f"open({args[0]!r}) for writing")
    elif event == "mmap.__new__" and args[0] != -1 and args[2] in SHARED_WRITEABLE_MAPS:
        seen.append(f"writeable map of fd {args[0]}")
    elif event in WRITING_EVENTS:
        seen.append(f"{event}{args!r}")


def library(command, path, other):
    from lstm_surgeon.check import check_checkpoint
    from lstm_surgeon.diff import diff_checkpoints
    from lstm_surgeon.formats import open_checkpoint
    from lstm_surgeon.inspection import inspect_checkpoint
    from lstm_surgeon.trend import follow_run
    from lstm_surgeon.verify import verify_checkpoint

    if command == "check":
        return check_checkpoint(path)
    if command == "trend":
        return follow_run([path, other])
    with open_checkpoint(path) as checkpoint, open_checkpoint(other) as second:
        if command == "inspect":
            return inspect_checkpoint(checkpoint)
        if command == "diff":
            return diff_checkpoints(checkpoint, second)
        return verify_checkpoint(checkpoint)


def run(kind, command, path, other):  # the command's exit code
    if kind == "library":
        result = library(command, Path(path), Path(other))
        return 1 if command == "check" and not result.sound else 0
    sys.argv = ["lstm-surgeon", *command.split(), path, *([other] if command in ("diff", "trend") else [])]
    try:
        main()
    except SystemExit as exit:
        return exit.code or 0
    return 0


kind, commands, path, other = sys.argv[1:5]
sys.addaudithook(audit)  # everything below is audited, imports included
from pathlib import Path

from lstm_surgeon.cli import main

report = {}
for command in commands.split(","):
    seen.clear()
    code = run(kind, command, path, other)
    report[command] = {"exit": code, "writes": list(seen)}
os.write(2, ("\nAUDIT " + json.dumps(report) + "\n").encode())
"""

COMMANDS = ["inspect", "diff", "check", "verify", "trend"]
FILENAMES = ["zoo.pt", "zoo.safetensors"]


def audited(kind: str, commands: list[str], path: Path, other: Path) -> dict[str, Any]:
    """Run commands one after the other in a subprocess under the audit hook: for each, its exit
    code and what it did that writes."""
    result = subprocess.run(
        [sys.executable, "-c", AUDITED, kind, ",".join(commands), str(path), str(other)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=clean_environment(PYTHONDONTWRITEBYTECODE="1"),
        timeout=120,
        check=False,
    )
    audit_lines = [line for line in result.stderr.splitlines() if line.startswith("AUDIT ")]
    assert result.returncode == 0 and len(audit_lines) == 1, result.stderr
    return json.loads(audit_lines[0][len("AUDIT ") :])


def state(folder: Path) -> dict[str, Any]:
    """Everything a write would change: each entry's bytes, mode and times, the folder's times."""
    entries = {
        path.name: (path.read_bytes(), path.stat().st_mode, path.stat().st_mtime_ns)
        for path in sorted(folder.iterdir())
    }
    info = folder.stat()
    return {"entries": entries, "folder": (info.st_mode, info.st_mtime_ns, info.st_ctime_ns)}


def interrupted_edit(surgeon: Any, path: Path) -> None:
    """Kill an in-place edit of `path` halfway: a journal and a half-patched file are left."""
    result = surgeon(*EDIT, path, "--in-place", "-y", env={"LSTM_SURGEON_FAULT": "mid-patch"})
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert path.with_name(f".{path.name}.lstm-surgeon-journal").exists()


@pytest.mark.parametrize("journal", [False, True], ids=["clean", "interrupted-edit"])
@pytest.mark.parametrize("kind", ["cli", "library"])
@pytest.mark.parametrize("filename", FILENAMES)
def test_reading_opens_nothing_for_writing(
    surgeon, fixtures_dir, tmp_path, filename, kind, journal
):
    folder = tmp_path / "models"
    folder.mkdir()
    target = folder / filename
    shutil.copyfile(fixtures_dir / filename, target)
    if journal:
        interrupted_edit(surgeon, target)
    other = tmp_path / f"pristine-{filename}"
    shutil.copyfile(fixtures_dir / filename, other)
    before = state(folder)
    report = audited(kind, COMMANDS, target, other)
    assert {command: run["writes"] for command, run in report.items()} == {
        command: [] for command in COMMANDS
    }
    assert state(folder) == before
    check_exit = 1 if journal else 0  # check: the bytes on disk are half edited
    assert {command: run["exit"] for command, run in report.items()} == {
        "inspect": 0,
        "diff": 0,  # the half-edited file reads as the pristine one
        "check": check_exit,
        "verify": 0,
        "trend": 0,
    }


def test_the_audit_sees_an_editing_command_write(fixtures_dir, tmp_path):
    """Control: the same hook records an edit's writes (so an empty record means something)."""
    target = tmp_path / "zoo.pt"
    shutil.copyfile(fixtures_dir / "zoo.pt", target)
    report = audited("cli", ["set-forget-bias --in-place -y"], target, target)
    run = report["set-forget-bias --in-place -y"]
    assert run["exit"] == 0
    assert any("for writing" in write and "zoo.pt" in write for write in run["writes"])
    assert any(write.startswith("fcntl.flock") for write in run["writes"])


def test_read_only_file_with_an_interrupted_edit_reads_for_anyone(
    surgeon, fixtures_dir, shared_dir, unprivileged
):
    """A 0o444 file in a 0o555 folder, half edited, read by a user who cannot write either: every
    reading command works on the checkpoint the rollback restores, and nothing changes."""
    folder = shared_dir / "locked"
    folder.mkdir()
    target = folder / "model.pt"
    shutil.copyfile(fixtures_dir / "zoo.pt", target)
    interrupted_edit(surgeon, target)
    pristine = shared_dir / "pristine.pt"
    shutil.copyfile(fixtures_dir / "zoo.pt", pristine)
    for path in (target, pristine):
        path.chmod(0o444)
    folder.chmod(0o555)
    before = state(folder)
    runs = {
        "inspect": surgeon("inspect", target, preexec_fn=unprivileged),
        "verify": surgeon("verify", target, preexec_fn=unprivileged),
        "diff": surgeon("diff", target, pristine, preexec_fn=unprivileged),
        "check": surgeon("check", target, "--json", preexec_fn=unprivileged),
    }
    assert state(folder) == before
    for command in ("inspect", "verify", "diff"):
        assert runs[command].returncode == 0, (command, runs[command].stderr)
    assert "interrupted" in runs["inspect"].stderr
    report = json.loads(runs["check"].stdout)
    assert runs["check"].returncode == 1
    assert [problem for problem in report["problems"] if "interrupted" in problem]
    assert len(report["problems"]) == 1  # the rest of the checkpoint is sound


def test_a_journal_that_cannot_be_read_names_the_recovery(surgeon, fixtures_dir, tmp_path):
    target = tmp_path / "zoo.safetensors"
    shutil.copyfile(fixtures_dir / "zoo.safetensors", target)
    journal = target.with_name(f".{target.name}.lstm-surgeon-journal")
    journal.mkdir()  # unreadable as a file: reading it fails with EISDIR
    result = surgeon("inspect", target)
    assert result.returncode == 2
    assert "recover" in result.stderr and "journal" in result.stderr
    assert journal.is_dir() and os.listdir(journal) == []
