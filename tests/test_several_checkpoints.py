"""Several checkpoints per call: paths and globs, JSON Lines, failures reported per checkpoint.

Each JSON line must be the very object the same command prints for that checkpoint alone; edits of
several files plan every file before writing any, and their results are checked against torch.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import assert_clean_failure

from lstm_surgeon.batch import expand_sources, inspect_each, output_paths
from lstm_surgeon.errors import CheckpointError, OutputError

HIDDEN = 8  # the zoo's `encoder` LSTM: input 5, 2 layers, bidirectional (fixtures/make_fixtures.py)


@pytest.fixture
def runs(fixtures_dir: Path, tmp_path: Path) -> list[Path]:
    """Two training runs, each with a `last.pt` (the zoo), as `runs/*/last.pt`."""
    paths = []
    for run in ("a", "b"):
        path = tmp_path / "runs" / run / "last.pt"
        path.parent.mkdir(parents=True)
        shutil.copyfile(fixtures_dir / "zoo.pt", path)
        paths.append(path)
    return paths


def _lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines()]


def _alone(run_cli, *args) -> dict:
    result = run_cli(*args, "--json")
    return json.loads(result.stdout)


@pytest.mark.parametrize("command", ["inspect", "check", "verify"])
def test_each_line_is_the_object_of_that_checkpoint_alone(run_cli, fixtures_dir, command):
    files = [fixtures_dir / "zoo.pt", fixtures_dir / "zoo.safetensors"]
    result = run_cli(command, *files, "--json")
    assert result.exit_code == 0, result.stderr
    assert _lines(result.stdout) == [_alone(run_cli, command, path) for path in files]


def test_a_glob_names_every_match_in_order(run_cli, runs, tmp_path):
    result = run_cli("inspect", f"{tmp_path}/runs/*/last.pt", "--json")
    assert result.exit_code == 0, result.stderr
    assert [line["path"] for line in _lines(result.stdout)] == [str(path) for path in runs]


def test_a_failure_is_reported_for_its_file_and_the_others_go_on(run_cli, fixtures_dir, tmp_path):
    missing = tmp_path / "missing.pt"
    files = [fixtures_dir / "zoo.pt", missing, fixtures_dir / "zoo.safetensors"]
    result = run_cli("inspect", *files, "--json")
    assert result.exit_code == 2
    lines = _lines(result.stdout)
    assert lines[0] == _alone(run_cli, "inspect", files[0])
    assert lines[1] == {
        "error": {"message": f"{missing}: no such file", "exit_code": 2, "path": str(missing)}
    }
    assert lines[2] == _alone(run_cli, "inspect", files[2])
    assert result.stderr.strip() == f"lstm-surgeon: error: {missing}: no such file"


def test_check_exits_1_when_a_file_is_unsound_and_none_failed(run_cli, fixtures_dir, tmp_path):
    corrupt = tmp_path / "corrupt.pt"
    data = bytearray((fixtures_dir / "zoo.pt").read_bytes())
    with open_zoo_storage(fixtures_dir / "zoo.pt") as offset:
        data[offset] ^= 0xFF
    corrupt.write_bytes(bytes(data))
    result = run_cli("check", fixtures_dir / "zoo.pt", corrupt, "--json")
    assert result.exit_code == 1
    assert [line["sound"] for line in _lines(result.stdout)] == [True, False]


def open_zoo_storage(path: Path):
    """The offset of the first byte of the first tensor's elements (flipping it breaks a CRC)."""
    from lstm_surgeon.formats import open_checkpoint

    class Offset:
        def __enter__(self) -> int:
            self.checkpoint = open_checkpoint(path)
            return next(iter(self.checkpoint.tensors.values())).storage.offset

        def __exit__(self, *exc: object) -> None:
            self.checkpoint.close()

    return Offset()


def test_a_glob_that_matches_nothing_is_an_error(run_cli, tmp_path):
    result = run_cli("inspect", f"{tmp_path}/*.pt")
    line = assert_clean_failure(result.stderr, result.exit_code)
    assert "no file matches" in line


def test_the_library_yields_one_outcome_per_checkpoint(fixtures_dir, tmp_path):
    sources = expand_sources([str(fixtures_dir / "zoo.*"), str(tmp_path / "missing.pt")])
    outcomes = list(inspect_each(sources))
    assert [outcome.source for outcome in outcomes] == sources
    assert [outcome.error is None for outcome in outcomes] == [True, True, False]
    assert isinstance(outcomes[2].error, CheckpointError)


def _forget_bias(path: Path) -> torch.Tensor:
    """The zoo encoder's forget-gate effective bias in every cell, as torch's own module holds it
    after loading the file (strict)."""
    state = torch.load(path, weights_only=True)
    module = torch.nn.LSTM(5, HIDDEN, num_layers=2, bidirectional=True)
    prefix = "encoder."
    module.load_state_dict(
        {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
    )
    cells = [f"l{layer}{suffix}" for layer in range(2) for suffix in ("", "_reverse")]
    return torch.stack(
        [
            (getattr(module, f"bias_ih_{cell}") + getattr(module, f"bias_hh_{cell}"))[
                HIDDEN : 2 * HIDDEN
            ]
            for cell in cells
        ]
    ).detach()


def test_edits_into_a_folder_are_named_like_the_inputs(run_cli, runs, tmp_path):
    out = tmp_path / "fixed"
    result = run_cli(
        "set-forget-bias", f"{tmp_path}/runs/*/last.pt", "--layer", "encoder", "-o", out, "--json"
    )
    assert result.exit_code == 0, result.stderr
    lines = _lines(result.stdout)
    assert [line["plan"]["source"] for line in lines] == [str(path) for path in runs]
    assert [line["result"]["path"] for line in lines] == [str(out / r / "last.pt") for r in "ab"]
    for run in ("a", "b"):
        written = out / run / "last.pt"
        torch.testing.assert_close(_forget_bias(written), torch.ones(4, HIDDEN))
    for path in runs:  # the inputs stay as they were
        assert not torch.allclose(_forget_bias(path), torch.ones(4, HIDDEN))


def test_edits_in_place_of_several_files(run_cli, runs):
    result = run_cli("set-forget-bias", *runs, "--layer", "encoder", "--in-place", "--json")
    assert result.exit_code == 0, result.stderr
    assert [line["result"]["in_place"] for line in _lines(result.stdout)] == [True, True]
    for path in runs:
        torch.testing.assert_close(_forget_bias(path), torch.ones(4, HIDDEN))


def test_an_edit_that_fails_on_one_file_writes_none(run_cli, runs, fixtures_dir, tmp_path):
    nobias = tmp_path / "nobias.pt"
    shutil.copyfile(fixtures_dir / "nobias.pt", nobias)
    before = {path: path.read_bytes() for path in [*runs, nobias]}
    result = run_cli("set-forget-bias", *runs, nobias, "--in-place", "--json")
    assert result.exit_code == 2
    errors = [line["error"] for line in _lines(result.stdout) if "error" in line]
    assert [error["path"] for error in errors] == [str(nobias)]
    assert {path: path.read_bytes() for path in before} == before


def test_an_existing_output_stops_every_write(run_cli, runs, tmp_path):
    out = tmp_path / "fixed"
    (out / "b").mkdir(parents=True)
    (out / "b" / "last.pt").write_bytes(b"keep me")
    result = run_cli("set-forget-bias", *runs, "--layer", "encoder", "-o", out)
    assert result.exit_code == 2
    assert "already exists" in result.stderr
    assert not (out / "a").exists()
    assert (out / "b" / "last.pt").read_bytes() == b"keep me"


def test_several_edits_need_a_folder_or_in_place(run_cli, runs):
    result = run_cli("set-forget-bias", *runs)
    line = assert_clean_failure(result.stderr, result.exit_code)
    assert "--in-place" in line


def test_output_paths_keep_inputs_of_one_name_apart(tmp_path):
    sources = [str(tmp_path / "a" / "last.pt"), str(tmp_path / "b" / "last.pt")]
    outputs = output_paths(sources, tmp_path / "out")
    assert outputs == {
        sources[0]: tmp_path / "out" / "a" / "last.pt",
        sources[1]: tmp_path / "out" / "b" / "last.pt",
    }
    with pytest.raises(OutputError):
        output_paths(["https://a.example/last.pt", "https://b.example/last.pt"], tmp_path)
