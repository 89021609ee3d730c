"""`--json` failures: one error object on stdout, the one-line message on stderr, the exit code in both.

A CI step that parses stdout must get one JSON object whatever happens: the command's document when it
ran (also when it exits 1 because a diff found differences or a verification failed), or
`{"error": {"message": ..., "exit_code": ...}}` when it could not.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer
from conftest import assert_clean_failure, clean_environment

from lstm_surgeon.cli import app

COMMANDS = sorted(typer.main.get_command(app).commands)  # type: ignore[attr-defined]

# For every command: arguments that make it fail on its input ({missing} does not exist).
FAILING_RUNS = {
    "inspect": ["{missing}"],
    "verify": ["{missing}"],
    "check": ["{missing}"],
    "diff": ["{zoo}", "{missing}"],
    "set-forget-bias": ["{missing}", "-o", "{out}"],
    "set-gate-bias": ["{missing}", "--gate", "forget", "--value", "1", "-o", "{out}"],
    "zero-bias": ["{missing}", "-o", "{out}"],
    "add-bias": ["{missing}", "-o", "{out}"],
    "zero-input": ["{missing}", "--features", "0", "-o", "{out}"],
    "trend": ["{zoo}", "{missing}"],
    "convert": ["{missing}", "-o", "{out}"],
    "recover": ["{missing}"],
}


def error_object(stdout: str) -> dict[str, Any]:
    """The error object of a failed --json run; stdout must hold exactly that one document."""
    document = json.loads(stdout)
    assert set(document) == {"error"}
    assert set(document["error"]) == {"message", "exit_code"}
    return document["error"]


def fill(args: list[str], fixtures_dir: Path, tmp_path: Path) -> list[str]:
    paths = {
        "missing": tmp_path / "missing.pt",
        "zoo": fixtures_dir / "zoo.pt",
        "out": tmp_path / "out.pt",
    }
    return [arg.format(**paths) for arg in args]


def test_every_command_has_a_failing_run_here():
    assert set(FAILING_RUNS) == set(COMMANDS)


@pytest.mark.parametrize("command", sorted(FAILING_RUNS))
def test_input_error_under_json_prints_the_error_object(run_cli, fixtures_dir, tmp_path, command):
    args = fill(FAILING_RUNS[command], fixtures_dir, tmp_path)
    result = run_cli(command, *args, "--json")
    line = assert_clean_failure(result.stderr, result.exit_code)
    error = error_object(result.stdout)
    assert error == {"message": f"{tmp_path / 'missing.pt'}: no such file", "exit_code": 2}
    assert line == f"lstm-surgeon: error: {error['message']}"  # the same message on both streams
    assert not (tmp_path / "out.pt").exists()


@pytest.mark.parametrize("command", sorted(FAILING_RUNS))
def test_without_json_a_failure_prints_nothing_on_stdout(run_cli, fixtures_dir, tmp_path, command):
    result = run_cli(command, *fill(FAILING_RUNS[command], fixtures_dir, tmp_path))
    assert_clean_failure(result.stderr, result.exit_code)
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["set-gate-bias", "{zoo}", "--gate", "bogus", "--value", "1", "-o", "{out}"], "bogus"),
        (["set-forget-bias", "{zoo}", "--layer", "nomatch*", "-o", "{out}"], "nomatch"),
        (["set-forget-bias", "{zoo}", "-o", "{out}", "--in-place"], "exactly one"),
        (["set-forget-bias", "{zoo}", "--chrono", "10", "--value", "1", "-o", "{out}"], "chrono"),
        (["zero-input", "{zoo}", "--features", "1,x", "-o", "{out}"], "features"),
        (["diff", "{zoo}", "{zoo}", "--atol", "-1"], "atol"),
    ],
)
def test_edit_and_diff_errors_under_json(run_cli, fixtures_dir, tmp_path, args, message):
    result = run_cli(*fill(args, fixtures_dir, tmp_path), "--json")
    line = assert_clean_failure(result.stderr, result.exit_code)
    error = error_object(result.stdout)
    assert error["exit_code"] == 2
    assert message in error["message"]
    assert line.removeprefix("lstm-surgeon: error: ") == error["message"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["set-forget-bias", "{zoo}", "--mode", "bogus", "-o", "{out}"], "--mode"),
        (["set-forget-bias", "{zoo}", "--direction", "sideways", "-o", "{out}"], "--direction"),
        (["set-gate-bias", "{zoo}", "--value", "1", "-o", "{out}"], "--gate"),
        (
            ["set-gate-bias", "{zoo}", "--gate", "forget", "--value", "one", "-o", "{out}"],
            "--value",
        ),
        (["inspect", "{zoo}", "--no-such-option"], "--no-such-option"),
        (["inspect"], "CHECKPOINT"),
        (["inpsect", "{zoo}"], "inpsect"),
    ],
)
def test_option_parsing_errors_under_json(run_cli, fixtures_dir, tmp_path, args, message):
    result = run_cli(*fill(args, fixtures_dir, tmp_path), "--json")
    assert result.exit_code == 2
    error = error_object(result.stdout)
    assert error["exit_code"] == 2
    assert message in error["message"]
    assert f"Error: {error['message']}" in result.stderr  # the usual usage message stays
    assert not (tmp_path / "out.pt").exists()


def test_option_parsing_error_without_json_prints_nothing_on_stdout(
    run_cli, fixtures_dir, tmp_path
):
    output = tmp_path / "out.pt"
    result = run_cli("set-forget-bias", fixtures_dir / "zoo.pt", "--mode", "bogus", "-o", output)
    assert result.exit_code == 2
    assert result.stdout == ""
    assert "--mode" in result.stderr


def test_json_after_double_dash_is_an_argument_not_the_option(run_cli, fixtures_dir):
    result = run_cli("inspect", fixtures_dir / "zoo.pt", "--", "--json")
    assert result.exit_code == 2
    assert "--json: no such file" in result.stderr  # a second checkpoint named --json
    assert not result.stdout.startswith("{")  # the table, not JSON


def test_internal_error_under_json_exits_3_with_the_error_object(
    run_cli, fixtures_dir, monkeypatch
):
    import lstm_surgeon.inspection

    def broken(*args: Any, **kwargs: Any) -> None:
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(lstm_surgeon.inspection, "inspect_checkpoint", broken)
    result = run_cli("inspect", fixtures_dir / "zoo.pt", "--json")
    assert_clean_failure(result.stderr, result.exit_code, 3)
    error = error_object(result.stdout)
    assert error["exit_code"] == 3
    assert error["message"].startswith("internal error (ZeroDivisionError: a bug)")


# --- Exit 1 is an answer, not an error: the normal document is printed -------------------------


def test_diff_that_finds_differences_prints_its_document(run_cli, fixtures_dir):
    result = run_cli("diff", fixtures_dir / "zoo.pt", fixtures_dir / "double.pt", "--json")
    assert result.exit_code == 1
    document = json.loads(result.stdout)
    assert "error" not in document
    assert document["identical"] is False


def test_failed_verification_prints_its_document(run_cli, fixtures_dir):
    result = run_cli("verify", fixtures_dir / "plain_tensor.pt", "--json")
    assert result.exit_code == 1
    document = json.loads(result.stdout)
    assert "error" not in document
    assert document["ok"] is False


def test_unsound_check_prints_its_document(run_cli, fixture_copy):
    path = fixture_copy("zoo.pt")
    data = bytearray(path.read_bytes())
    offset = data.index(b"data.pkl") + 200  # inside the pickle record: its CRC-32 no longer fits
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))
    result = run_cli("check", path, "--json")
    assert result.exit_code == 1, result.stderr
    document = json.loads(result.stdout)
    assert "error" not in document
    assert document["sound"] is False


# --- The installed command, as a CI step runs it --------------------------------------------------


def test_installed_command_prints_the_error_object(surgeon, tmp_path):
    result = surgeon("inspect", tmp_path / "missing.pt", "--json")
    line = assert_clean_failure(result.stderr, result.returncode)
    assert error_object(result.stdout) == {
        "message": f"{tmp_path / 'missing.pt'}: no such file",
        "exit_code": 2,
    }
    assert line.endswith("no such file")


def test_installed_command_reports_a_bad_choice_as_json(surgeon, fixtures_dir, tmp_path):
    result = surgeon(
        "set-forget-bias",
        fixtures_dir / "zoo.pt",
        "--mode",
        "sum",
        "-o",
        tmp_path / "o.pt",
        "--json",
    )
    assert result.returncode == 2
    error = error_object(result.stdout)
    assert error["exit_code"] == 2
    assert "'sum' is not one of 'effective', 'both', 'ih', 'hh', 'add'" in error["message"]
    assert "Traceback" not in result.stderr


def test_installed_command_edit_error_as_json(surgeon, fixtures_dir, tmp_path):
    output = tmp_path / "out.pt"
    output.write_bytes(b"keep me")
    result = surgeon("set-forget-bias", fixtures_dir / "ddp.pt", "-o", output, "--json")
    assert_clean_failure(result.stderr, result.returncode)
    error = error_object(result.stdout)
    assert error["exit_code"] == 2 and "--force" in error["message"]
    assert output.read_bytes() == b"keep me"


SIGINT_DURING_THE_EDIT = """
import os, signal, sys
import lstm_surgeon.writing

def fault_point(name):
    if name == "mid-patch":
        os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, delivered while the file is patched

lstm_surgeon.writing.fault_point = fault_point
from lstm_surgeon.cli import main
sys.argv[0] = "lstm-surgeon"
main()
"""


def test_ctrl_c_under_json_prints_the_error_object_with_130(fixture_copy):
    target = fixture_copy("ddp.pt")
    original = target.read_bytes()
    args = ["set-forget-bias", str(target), "--in-place", "-y", "--json"]
    result = subprocess.run(
        [sys.executable, "-c", SIGINT_DURING_THE_EDIT, *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=clean_environment(),
        timeout=120,
        check=False,
    )
    assert result.returncode == 130 != -signal.SIGINT
    assert_clean_failure(result.stderr, result.returncode, 130)
    assert error_object(result.stdout) == {"message": "interrupted", "exit_code": 130}
    assert target.read_bytes() == original
