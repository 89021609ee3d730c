"""The `lstm-surgeon` command: help, JSON documents, error lines, safe printing, no prompts.

Most runs go through typer's CliRunner (in-process, stdout and stderr kept apart); a handful run the
installed command in a subprocess, as a user would.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import make_fixtures
import pytest
import torch
import typer
from conftest import TorchReference
from safetensors.torch import save_file

from lstm_surgeon import __version__, vocabulary
from lstm_surgeon.cli import app

COMMANDS = sorted(typer.main.get_command(app).commands)  # type: ignore[attr-defined]
EDIT_COMMANDS = ["set-forget-bias", "set-gate-bias", "zero-bias", "add-bias", "zero-input"]
GATES = {
    "LSTM": ["input", "forget", "cell", "output"],
    "GRU": ["reset", "update", "new"],
    "RNN": ["hidden"],
}
LAYER_KEYS = {
    "name",
    "kind",
    "input_size",
    "hidden_size",
    "proj_size",
    "num_layers",
    "bidirectional",
    "bias",
    "dtype",
    "cells",
}
FIXTURES_WITH_LAYERS = [fixture.filename for fixture in make_fixtures.FIXTURES if fixture.layers]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_one_error_line(result: Any) -> str:
    """Exit 2, nothing on stdout, one `lstm-surgeon: error:` line on stderr, no traceback."""
    assert result.exit_code == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("lstm-surgeon: error: ")
    assert "Traceback" not in result.output
    return lines[0]


def run_command(
    command: list[str], *args: Any, env: Mapping[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, **(env or {})}
    for variable in ("FORCE_COLOR", "LSTM_SURGEON_DEBUG", "TTY_COMPATIBLE"):
        if variable not in (env or {}):
            environment.pop(variable, None)
    return subprocess.run(
        [*command, *map(str, args)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        env=environment,
        cwd=cwd,
        check=False,
    )


def crafted_names_file(folder: Path, prefix: str, broken: bool = False) -> Path:
    """A safetensors file whose LSTMCell is named `prefix` (and, if `broken`, a tensor of that name
    whose shape fits no layer, so that discovery warns about it)."""
    torch.manual_seed(0)
    cell = torch.nn.LSTMCell(3, 4)
    tensors = {f"{prefix}.{key}": value.detach() for key, value in cell.state_dict().items()}
    if broken:
        tensors[f"{prefix}2.weight_ih"] = torch.zeros(5, 3)
        tensors[f"{prefix}2.weight_hh"] = torch.zeros(5, 4)
    path = folder / "crafted.safetensors"
    save_file(tensors, str(path))
    return path


# --- Help and version ------------------------------------------------------------------------


def test_the_commands_users_expect_exist():
    assert {*EDIT_COMMANDS, "inspect", "verify", "check"} <= set(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_an_example(run_cli, command):
    result = run_cli(command, "--help")
    assert result.exit_code == 0
    assert "Example" in result.stdout
    assert f"lstm-surgeon {command}" in result.stdout


def test_root_help_lists_every_command(run_cli):
    result = run_cli("--help")
    assert result.exit_code == 0
    for command in COMMANDS:
        assert command in result.stdout


def test_version(run_cli):
    result = run_cli("--version")
    assert result.exit_code == 0
    assert result.stdout == f"lstm-surgeon {__version__}\n"


# --- inspect --json ---------------------------------------------------------------------------


def summary_of(values: torch.Tensor) -> dict[str, float]:
    return {
        "mean": float(values.mean()),
        "min": float(values.min()),
        "max": float(values.max()),
    }


def assert_summary(actual: dict[str, float] | None, values: torch.Tensor | None) -> None:
    if values is None:
        assert actual is None
        return
    assert actual is not None
    expected = summary_of(values)
    assert actual["min"] == expected["min"] and actual["max"] == expected["max"]
    assert actual["mean"] == pytest.approx(expected["mean"], abs=1e-12, rel=1e-12)


def torch_tensors(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return TorchReference.flatten(torch.load(path, map_location="cpu", weights_only=False))


@pytest.mark.parametrize("filename", FIXTURES_WITH_LAYERS)
def test_inspect_json_reports_torch_values(run_cli, fixtures_dir, filename):
    path = fixtures_dir / filename
    result = run_cli("inspect", path, "--json")
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    fixture = make_fixtures.get_fixture(filename)
    assert document["path"] == str(path)
    assert document["format"] == fixture.format
    tensors = torch_tensors(path)
    reported_layers = sorted(document["layers"], key=lambda layer: layer["name"])
    expected_layers = sorted(fixture.layers, key=lambda layer: layer.name)
    assert [layer["name"] for layer in reported_layers] == [layer.name for layer in expected_layers]
    for reported, expected in zip(reported_layers, expected_layers, strict=True):
        assert set(reported) >= LAYER_KEYS
        for key in LAYER_KEYS - {"cells"}:
            assert reported[key] == getattr(expected, key), (expected.name, key)
        family = expected.kind.removesuffix("Cell")
        directions = ["forward", "reverse"] if expected.bidirectional else ["forward"]
        cells = [(k, d) for k in range(expected.num_layers) for d in directions]
        assert [(cell["layer"], cell["direction"]) for cell in reported["cells"]] == cells
        prefix = f"{expected.name}." if expected.name else ""
        hidden = expected.hidden_size
        for cell in reported["cells"]:
            suffix = "" if expected.kind.endswith("Cell") else f"_l{cell['layer']}"
            suffix += "_reverse" if cell["direction"] == "reverse" else ""
            assert [gate["gate"] for gate in cell["gates"]] == GATES[family]
            for index, gate in enumerate(cell["gates"]):
                assert {"gate", "bias_ih", "bias_hh", "effective"} <= set(gate)
                rows = slice(index * hidden, (index + 1) * hidden)
                if not expected.bias:
                    assert gate["bias_ih"] is gate["bias_hh"] is gate["effective"] is None
                    continue
                ih = tensors[f"{prefix}bias_ih{suffix}"][rows].double()
                hh = tensors[f"{prefix}bias_hh{suffix}"][rows].double()
                assert_summary(gate["bias_ih"], ih)
                assert_summary(gate["bias_hh"], hh)
                new_gate = family == "GRU" and gate["gate"] == "new"
                assert_summary(gate["effective"], None if new_gate else ih + hh)


def test_inspect_json_of_a_checkpoint_without_layers(run_cli, fixtures_dir):
    result = run_cli("inspect", fixtures_dir / "plain_tensor.pt", "--json")
    assert result.exit_code == 0
    assert json.loads(result.stdout)["layers"] == []


def test_inspect_layer_glob_selects(run_cli, fixtures_dir):
    result = run_cli("inspect", fixtures_dir / "zoo.pt", "--layer", "*cell", "--json")
    names = [layer["name"] for layer in json.loads(result.stdout)["layers"]]
    assert names == ["gru_cell", "rnn_cell"]


# --- JSON on stdout and nothing else ------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["inspect", "{zoo}"],
        ["verify", "{zoo}"],
        ["check", "{zoo}"],
        ["set-forget-bias", "{zoo}", "-o", "{out}"],
        ["set-gate-bias", "{zoo}", "--gate", "update", "--value", "-1", "-o", "{out}"],
        ["zero-bias", "{zoo}", "--drop", "-o", "{out}"],
        ["zero-input", "{zoo}", "--features", "0", "-o", "{out}"],
        ["add-bias", "{nobias}", "-o", "{out}"],
    ],
    ids=lambda args: args[0],
)
def test_json_stdout_is_one_json_document(run_cli, fixtures_dir, tmp_path, args):
    paths = {
        "zoo": fixtures_dir / "zoo.pt",
        "nobias": fixtures_dir / "nobias.pt",
        "out": tmp_path / "out.pt",
    }
    result = run_cli(*[arg.format(**paths) for arg in args], "--json")
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    if args[0] in EDIT_COMMANDS:
        assert set(document) == {"dry_run", "plan", "result"}
        assert document["dry_run"] is False
        assert document["plan"]["command"] == args[0]
        assert document["result"] == {
            "path": str(paths["out"]),
            "format": "pt",
            "in_place": False,
            "written": True,
            "method": document["result"]["method"],
            "backup": None,
        }
        assert document["result"]["method"] in ("patch", "rewrite")
        assert paths["out"].is_file()


def test_edit_json_plan_lists_what_was_written(run_cli, fixtures_dir, tmp_path):
    output = tmp_path / "out.pt"
    result = run_cli(
        "set-forget-bias", fixtures_dir / "zoo.pt", "--value", "2", "-o", output, "--json"
    )
    plan = json.loads(result.stdout)["plan"]
    assert {edit["tensor"] for edit in plan["edits"]} == {
        f"{layer}.{parameter}{suffix}"
        for layer in ("encoder", "projected")
        for parameter in ("bias_ih", "bias_hh")
        for suffix in ("_l0", "_l0_reverse", "_l1", "_l1_reverse")
    } | {"rnn.bias_ih", "rnn.bias_hh"}
    for edit in plan["edits"]:
        expected = 2.0 if edit["parameter"] == "bias_ih" else 0.0
        assert edit["after"] == {"mean": expected, "min": expected, "max": expected}
        assert edit["gate"] == "forget"
    for effect in plan["effects"]:
        assert effect["effective_after"] == {"mean": 2.0, "min": 2.0, "max": 2.0}
    assert sorted(entry.split(":")[0] for entry in plan["skipped"]) == sorted(
        ["gru", "elman", "gru_cell", "rnn_cell"]
    )
    loaded = torch.load(output, weights_only=True)
    assert torch.equal(loaded["rnn.bias_ih"][4:8], torch.full((4,), 2.0))


def test_chrono_from_the_command_line(run_cli, fixtures_dir, tmp_path):
    outputs = [tmp_path / "a.pt", tmp_path / "b.pt"]
    for output in outputs:
        args = ["--chrono", "20", "--seed", "3", "-o", output, "--json"]
        result = run_cli("set-forget-bias", fixtures_dir / "double.pt", *args)
        assert result.exit_code == 0, result.stderr
    assert outputs[0].read_bytes() == outputs[1].read_bytes()
    state = torch.load(outputs[0], weights_only=True)
    for suffix in ("_l0", "_l0_reverse"):
        forget = state[f"bias_ih{suffix}"][5:10]
        assert torch.equal(state[f"bias_ih{suffix}"][0:5], -forget)
        assert bool((forget >= 0).all()) and bool((forget <= torch.log(torch.tensor(19.0))).all())
        assert torch.count_nonzero(state[f"bias_hh{suffix}"][0:10]) == 0


# --- --dry-run ------------------------------------------------------------------------------


def test_dry_run_writes_nothing(run_cli, fixtures_dir, tmp_path):
    output = tmp_path / "out.pt"
    result = run_cli(
        "set-forget-bias", fixtures_dir / "zoo.pt", "-o", output, "--dry-run", "--json"
    )
    assert result.exit_code == 0
    document = json.loads(result.stdout)
    assert document["dry_run"] is True
    assert document["result"] is None
    assert document["plan"]["edits"]
    assert not output.exists()
    assert list(tmp_path.iterdir()) == []


def test_dry_run_in_place_leaves_the_file_alone(run_cli, fixture_copy):
    path = fixture_copy("zoo.pt")
    digest, mtime = sha256(path), path.stat().st_mtime_ns
    result = run_cli("zero-bias", path, "--in-place", "--dry-run")
    assert result.exit_code == 0
    assert "dry run" in result.stderr
    assert sha256(path) == digest and path.stat().st_mtime_ns == mtime


# --- Errors: one line, exit 2, no traceback, nothing left behind -------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["inspect", "{missing}"], "no such file"),
        (["inspect", "{folder}"], "directory"),
        (["inspect", "{readme}"], "not a checkpoint"),
        (["verify", "{readme}"], "not a checkpoint"),
        (["set-forget-bias", "{readme}", "-o", "{out}"], "not a checkpoint"),
        (["set-forget-bias", "{zoo}", "-o", "{out}", "--in-place"], "exactly one"),
        (["set-forget-bias", "{zoo}"], "exactly one"),
        (["zero-bias", "{zoo}"], "exactly one"),
        (["set-gate-bias", "{zoo}", "--gate", "bogus", "--value", "1", "-o", "{out}"], "bogus"),
        (["set-forget-bias", "{zoo}", "--layer", "nomatch*", "-o", "{out}"], "nomatch"),
        (["zero-input", "{zoo}", "--features", "1,x", "-o", "{out}"], "features"),
        (["set-forget-bias", "{nobias}", "-o", "{out}"], "add-bias"),
        (["check", "{missing}"], "no such file"),
    ],
)
def test_errors_are_one_line_on_stderr(run_cli, fixtures_dir, tmp_path, args, message):
    readme = tmp_path / "README.md"
    readme.write_text("# lstm-surgeon\n\nInspect and edit recurrent layers.\n")
    (tmp_path / "folder").mkdir()
    paths = {
        "missing": tmp_path / "missing.pt",
        "folder": tmp_path / "folder",
        "readme": readme,
        "zoo": fixtures_dir / "zoo.pt",
        "nobias": fixtures_dir / "nobias.pt",
        "out": tmp_path / "out.pt",
    }
    result = run_cli(*[arg.format(**paths) for arg in args])
    line = assert_one_error_line(result)
    assert message in line
    assert result.stdout == ""
    assert sorted(item.name for item in tmp_path.iterdir()) == ["README.md", "folder"]


@pytest.mark.parametrize(
    ("source", "args"),
    [
        ("unsafe_objects.pt", ["zero-bias", "--drop", "-o", "out.safetensors"]),
        ("training.pt", ["set-forget-bias", "-o", "out.safetensors"]),
        ("zoo.pt", ["set-forget-bias", "-o", "zoo.pt", "--force"]),
    ],
)
def test_failed_edit_leaves_no_output_and_no_temporary_files(run_cli, fixture_copy, source, args):
    path = fixture_copy(source)
    digest = sha256(path)
    command, *options = args
    options = [
        str(path.parent / option) if option.endswith((".pt", ".safetensors")) else option
        for option in options
    ]
    result = run_cli(command, path, *options)
    assert result.exit_code == 2
    errors = [
        line for line in result.stderr.splitlines() if line.startswith("lstm-surgeon: error:")
    ]
    assert len(errors) == 1
    assert "Traceback" not in result.output
    assert [item.name for item in path.parent.iterdir()] == [source]
    assert sha256(path) == digest


def test_existing_output_is_refused_without_force(run_cli, fixtures_dir, tmp_path):
    output = tmp_path / "out.pt"
    output.write_bytes(b"keep me")
    result = run_cli("set-forget-bias", fixtures_dir / "zoo.pt", "-o", output)
    assert result.exit_code == 2
    assert "--force" in result.stderr
    assert output.read_bytes() == b"keep me"


def test_debug_shows_the_traceback(surgeon_command, tmp_path):
    missing = tmp_path / "missing.pt"
    plain = run_command(surgeon_command, "inspect", missing)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    for env, args in (({}, ["--debug"]), ({"LSTM_SURGEON_DEBUG": "1"}, [])):
        result = run_command(surgeon_command, *args, "inspect", missing, env=env)
        assert result.returncode != 0
        assert "Traceback" in result.stderr
        assert "CheckpointError" in result.stderr


# --- Plain output: no colour codes, names printed literally ------------------------------------


def test_no_color_and_non_terminal_output_have_no_escape_codes(
    surgeon_command, fixtures_dir, tmp_path
):
    runs = [
        run_command(surgeon_command, "inspect", fixtures_dir / "zoo.pt", env={"NO_COLOR": "1"}),
        run_command(
            surgeon_command, "set-forget-bias", fixtures_dir / "zoo.pt", "-o", tmp_path / "a.pt"
        ),
        run_command(surgeon_command, "verify", tmp_path / "a.pt"),
        run_command(surgeon_command, "inspect", tmp_path / "missing.pt"),
    ]
    for result in runs:
        assert "\x1b" not in result.stdout and "\x1b" not in result.stderr, result.args
    assert [result.returncode for result in runs] == [0, 0, 0, 2]
    assert "encoder" in runs[0].stdout and "forget" in runs[0].stdout


def test_cli_runner_output_has_no_escape_codes(run_cli, fixtures_dir):
    env = {"FORCE_COLOR": None, "NO_COLOR": None, "TTY_COMPATIBLE": None}
    result = run_cli("inspect", fixtures_dir / "zoo.pt", env=env)
    assert result.exit_code == 0
    assert "\x1b" not in result.output


@pytest.mark.parametrize("prefix", ["[red]x[/red]", "\x1b[31mevil", "[bold]b"])
def test_inspect_and_verify_print_names_from_files_literally(run_cli, tmp_path, prefix):
    path = crafted_names_file(tmp_path, prefix)
    shown = prefix.replace("\x1b", "\\x1b")
    for command in ("inspect", "verify"):
        result = run_cli(command, path)
        assert result.exit_code == 0, result.stderr
        assert "\x1b" not in result.stdout
        assert shown in result.stdout
    document = json.loads(run_cli("inspect", path, "--json").stdout)
    assert document["layers"][0]["name"] == prefix  # JSON keeps the exact name


@pytest.mark.parametrize("prefix", ["[red]x[/red]", "\x1b[31mevil"])
def test_edit_preview_prints_tensor_names_literally(run_cli, tmp_path, prefix):
    path = crafted_names_file(tmp_path, prefix)
    result = run_cli("set-forget-bias", path, "-o", tmp_path / "out.safetensors")
    assert result.exit_code == 0, result.stderr
    assert "\x1b" not in result.stdout
    assert prefix.replace("\x1b", "\\x1b") + ".bias_ih" in result.stdout


def test_edit_preview_prints_layer_names_with_markup_literally(run_cli, tmp_path):
    path = crafted_names_file(tmp_path, "[red]x[/red]")
    result = run_cli("set-forget-bias", path, "-o", tmp_path / "out.safetensors")
    assert result.exit_code == 0
    assert "[red]x[/red] [0 forward]" in result.stdout


def test_warnings_about_tensors_escape_control_characters(run_cli, tmp_path):
    path = crafted_names_file(tmp_path, "\x1b[31mevil", broken=True)
    result = run_cli("inspect", path)
    assert result.exit_code == 0
    assert "evil2.weight_hh" in result.stderr  # the warning is there...
    assert "\x1b" not in result.stderr  # ...with the escape shown, not sent to the terminal


# --- Never waits for input; end-to-end runs of the installed command ---------------------------


def test_edit_does_not_prompt_when_stdin_is_not_a_terminal(surgeon_command, fixtures_dir, tmp_path):
    output = tmp_path / "out.pt"
    result = run_command(surgeon_command, "zero-bias", fixtures_dir / "zoo.pt", "-o", output)
    assert result.returncode == 0, result.stderr
    assert output.is_file()
    assert "?" not in result.stderr  # no confirmation question was asked


def test_end_to_end_edit_then_verify_with_torch(surgeon_command, fixtures_dir, tmp_path):
    output = tmp_path / "fixed.pt"
    edit = run_command(
        surgeon_command, "set-forget-bias", fixtures_dir / "ddp.pt", "-o", output, "--json"
    )
    assert edit.returncode == 0, edit.stderr
    assert json.loads(edit.stdout)["result"]["written"] is True
    state = torch.load(output, weights_only=True)
    lstm = torch.nn.LSTM(4, 6, batch_first=True)
    lstm.load_state_dict(
        {k.removeprefix("module.lstm."): v for k, v in state.items() if ".lstm." in k}
    )
    assert torch.equal(lstm.bias_ih_l0[6:12] + lstm.bias_hh_l0[6:12], torch.ones(6))
    verify = run_command(surgeon_command, "verify", output, "--json")
    assert verify.returncode == 0
    assert json.loads(verify.stdout)["ok"] is True


def test_python_dash_m_runs_the_tool(tmp_path):
    import sys

    result = run_command([sys.executable, "-m", "lstm_surgeon"], "--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"lstm-surgeon {__version__}"


@pytest.mark.parametrize(
    "options",
    [["--chrono", "10", "--value", "1"], ["--seed", "3"], ["--chrono", "10", "--mode", "both"]],
)
def test_set_forget_bias_refuses_options_that_would_be_ignored(
    run_cli, fixtures_dir, tmp_path, options
):
    result = run_cli("set-forget-bias", fixtures_dir / "zoo.pt", *options, "-o", tmp_path / "o.pt")
    assert result.exit_code == 2
    assert result.stderr.startswith("lstm-surgeon: error:")
    assert not (tmp_path / "o.pt").exists()


# --- The vocabulary: the command line offers exactly the library's words ------------------------


@pytest.mark.parametrize("mode", vocabulary.MODES)
def test_every_mode_of_the_vocabulary_is_accepted(run_cli, fixtures_dir, mode):
    """The command line offers the vocabulary's modes, and the library plans each of them."""
    args = ["set-forget-bias", fixtures_dir / "double.pt", "--mode", mode, "--dry-run", "--json"]
    result = run_cli(*args)
    assert result.exit_code == 0, result.stderr
    edits = json.loads(result.stdout)["plan"]["edits"]
    assert {edit["gate"] for edit in edits} == {"forget"}


@pytest.mark.parametrize("direction", vocabulary.DIRECTIONS)
def test_direction_selects_those_cells_only(run_cli, fixtures_dir, direction):
    args = ["set-forget-bias", fixtures_dir / "double.pt", "--direction", direction, "--dry-run"]
    result = run_cli(*args, "--json")
    assert result.exit_code == 0, result.stderr
    edits = json.loads(result.stdout)["plan"]["edits"]
    assert edits
    assert {edit["cell"]["direction"] for edit in edits} == {direction}
