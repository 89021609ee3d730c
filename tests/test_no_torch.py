"""Every command except `verify` must run without importing torch (structure changes: test_tree_writer).

torch takes seconds to import; lstm-surgeon reads and patches checkpoints with numpy alone. Each case
runs the real entry point (`lstm_surgeon.cli.main` with `sys.argv` set) in a fresh interpreter, then
reports whether `torch` (or any `torch.*` module) ended up in `sys.modules`. `verify` is the control:
it must import torch, which proves the check can fail.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
MARKER = "@@lstm-surgeon-no-torch@@"

# Runs the console script's entry point; prints one marker line with the exit code and whether torch
# was imported. The command's own stdout comes before it.
PROBE = f"""
import json
import sys

from lstm_surgeon.cli import main

sys.argv = ["lstm-surgeon", *sys.argv[1:]]
try:
    main()
    code = 0
except SystemExit as exit:
    code = exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 1)
torch = sorted(name for name in sys.modules if name == "torch" or name.startswith("torch."))
sys.stdout.flush()
print({MARKER!r}, json.dumps({{"code": code, "torch": torch[:5]}}))
"""


def run_probe(args: list[str], cwd: Path) -> tuple[int, list[str], str, str]:
    """(exit code, torch modules imported, command stdout, stderr) of `lstm-surgeon ARGS`."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("LSTM_SURGEON_FAULT", "LSTM_SURGEON_DEBUG")
    }
    env["COLUMNS"] = "120"
    completed = subprocess.run(
        [sys.executable, "-c", PROBE, *args],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    stdout, _, report = completed.stdout.rpartition(MARKER)
    assert report, (
        f"probe crashed (exit {completed.returncode}):\n{completed.stdout}\n{completed.stderr}"
    )
    result = json.loads(report)
    return result["code"], result["torch"], stdout, completed.stderr


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    for name in ("zoo.pt", "zoo.safetensors"):
        shutil.copyfile(FIXTURES / name, tmp_path / name)
    return tmp_path


def _diff_available() -> bool:
    completed = subprocess.run(
        [sys.executable, "-m", "lstm_surgeon", "diff", "--help"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=120,
        check=False,
    )
    return completed.returncode == 0


SUFFIXES = ["pt", "safetensors"]

# (command arguments before the -o/--json options, expected "method"): same-structure edits only.
EDITS = {
    "set-forget-bias": [],
    "set-forget-bias-value": ["--value", "2.5", "--mode", "both"],
    "set-gate-bias": ["--gate", "update", "--value", "-1"],
    "zero-bias": [],
    "zero-input": ["--features", "0,2"],
}


def assert_no_torch(args: list[str], cwd: Path, codes: tuple[int, ...] = (0,)) -> str:
    code, torch, stdout, stderr = run_probe(args, cwd)
    assert code in codes, f"lstm-surgeon {' '.join(args)} exited {code}:\n{stdout}\n{stderr}"
    assert not torch, f"lstm-surgeon {' '.join(args)} imported {torch}"
    return stdout


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_inspect_does_not_import_torch(workdir: Path, suffix: str) -> None:
    stdout = assert_no_torch(["inspect", f"zoo.{suffix}"], workdir)
    assert "encoder" in stdout


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_inspect_json_does_not_import_torch(workdir: Path, suffix: str) -> None:
    stdout = assert_no_torch(["inspect", f"zoo.{suffix}", "--json"], workdir)
    assert len(json.loads(stdout)["layers"]) == 7


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("edit", sorted(EDITS))
def test_same_structure_edit_does_not_import_torch(workdir: Path, edit: str, suffix: str) -> None:
    command = edit.removesuffix("-value")
    output = workdir / f"out.{suffix}"
    args = [command, f"zoo.{suffix}", *EDITS[edit], "-o", output.name, "--json"]
    stdout = assert_no_torch(args, workdir)
    result = json.loads(stdout)["result"]
    assert result["method"] == "patch", result
    assert output.is_file()
    assert output.read_bytes() != (workdir / f"zoo.{suffix}").read_bytes()


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_in_place_edit_does_not_import_torch(workdir: Path, suffix: str) -> None:
    before = (workdir / f"zoo.{suffix}").read_bytes()
    args = ["set-forget-bias", f"zoo.{suffix}", "--in-place", "--yes"]
    assert_no_torch(args, workdir)
    assert (workdir / f"zoo.{suffix}").read_bytes() != before


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_dry_run_does_not_import_torch(workdir: Path, suffix: str) -> None:
    assert_no_torch(["set-forget-bias", f"zoo.{suffix}", "--dry-run"], workdir)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_check_does_not_import_torch(workdir: Path, suffix: str) -> None:
    stdout = assert_no_torch(["check", f"zoo.{suffix}", "--json"], workdir)
    assert json.loads(stdout)["sound"] is True


@pytest.mark.parametrize("args", [["--help"], [], ["--version"], ["inspect", "--help"]])
def test_help_does_not_import_torch(workdir: Path, args: list[str]) -> None:
    # With no arguments click prints the help on stderr and exits 2 (no_args_is_help).
    code, torch, stdout, stderr = run_probe(args, workdir)
    assert code in (0, 2), f"lstm-surgeon {' '.join(args)} exited {code}:\n{stdout}\n{stderr}"
    assert not torch, f"lstm-surgeon {' '.join(args)} imported {torch}"
    assert "lstm-surgeon" in stdout + stderr


def test_diff_does_not_import_torch(workdir: Path) -> None:
    if not _diff_available():
        pytest.skip("`lstm-surgeon diff` is not available")
    assert_no_torch(["diff", "zoo.pt", "zoo.safetensors"], workdir)
    edited = ["set-forget-bias", "zoo.pt", "-o", "edited.pt"]
    assert_no_torch(edited, workdir)
    # Exit 1: the files differ (the forget biases changed).
    assert_no_torch(["diff", "zoo.pt", "edited.pt"], workdir, codes=(1,))


def test_verify_does_import_torch(workdir: Path) -> None:
    """The control: a command that needs torch shows up, so the checks above can fail."""
    code, torch, stdout, stderr = run_probe(["verify", "zoo.pt"], workdir)
    assert code == 0, f"verify exited {code}:\n{stdout}\n{stderr}"
    assert "torch" in torch
