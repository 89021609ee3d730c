"""What people read: lines that say nothing are left out, and text is not cut mid-sentence in files.

Output to a terminal wraps at the terminal's width; output to a pipe or a file has no width, so tables
are laid out at $COLUMNS (or 120) and each line of text (a note, a layer title) is printed whole.
"""

from __future__ import annotations

import os
import pty
import re
import subprocess
from pathlib import Path

import torch
from safetensors.torch import save_file

from lstm_surgeon.render import FAMILY_NOTES

GRU_NOTE = f"  {FAMILY_NOTES['GRU']}"


def stdout_lines(result: subprocess.CompletedProcess[str] | object) -> list[str]:
    return [line.rstrip() for line in result.stdout.splitlines()]  # type: ignore[attr-defined]


def lstm_file(folder: Path, name: str, others: dict[str, torch.Tensor]) -> Path:
    """A safetensors file holding one LSTM named `name`, plus `others`."""
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(3, 4)
    tensors = {f"{name}.{key}": value.detach() for key, value in lstm.state_dict().items()}
    path = folder / "model.safetensors"
    save_file({**tensors, **others}, str(path))
    return path


# --- "N other tensors not recurrent" -----------------------------------------------------------


def test_inspect_leaves_out_the_other_tensors_line_when_there_are_none(run_cli, tmp_path):
    result = run_cli("inspect", lstm_file(tmp_path, "lstm", {}))
    assert result.exit_code == 0, result.stderr
    assert "lstm  LSTM" in result.stdout
    assert "other tensor" not in result.stdout
    assert "not recurrent" not in result.stdout


def test_inspect_counts_one_other_tensor(run_cli, tmp_path):
    path = lstm_file(tmp_path, "lstm", {"head.weight": torch.zeros(2, 4)})
    result = run_cli("inspect", path)
    assert stdout_lines(result)[-1] == "1 other tensor (32 B) not recurrent"


def test_inspect_counts_other_tensors(run_cli, fixtures_dir):
    result = run_cli("inspect", fixtures_dir / "zoo.pt")
    assert stdout_lines(result)[-1] == "3 other tensors (272 B) not recurrent"


# --- Non-terminal output: text lines whole, at any width ------------------------------------------


def test_notes_under_a_table_are_whole_lines_in_a_pipe(surgeon, fixtures_dir):
    result = surgeon("inspect", fixtures_dir / "zoo.pt", env={"COLUMNS": "60"})
    assert result.returncode == 0, result.stderr
    lines = stdout_lines(result)
    assert len(GRU_NOTE) > 60
    assert lines.count(GRU_NOTE) == 2  # the GRU and the GRUCell, each note on one line
    assert not any(line.startswith("tanh(b_in") for line in lines)  # no wrapped remainder


def test_notes_are_whole_lines_in_captured_output(run_cli, fixtures_dir):
    result = run_cli("inspect", fixtures_dir / "gru_biased.pt", env={"COLUMNS": "40"})
    assert result.exit_code == 0, result.stderr
    assert GRU_NOTE in stdout_lines(result)


def test_a_long_layer_name_stays_on_its_title_line(run_cli, tmp_path):
    name = "encoder." + ".".join(f"block{index}" for index in range(30))
    path = lstm_file(tmp_path, name, {})
    result = run_cli("inspect", path, env={"COLUMNS": "80"})
    titles = [line for line in stdout_lines(result) if line.startswith(name)]
    assert titles == [f"{name}  LSTM  input 3 · hidden 4 · 1 layer · bias · float32"]


def test_tables_keep_the_width_of_non_terminal_output(surgeon, fixtures_dir):
    result = surgeon("inspect", fixtures_dir / "zoo.pt", env={"COLUMNS": "100"})
    table_rows = [line for line in result.stdout.splitlines() if "σ" in line]
    assert table_rows
    assert all(len(row) <= 100 for row in table_rows)


def test_a_terminal_still_wraps_notes_at_its_width(surgeon_command, fixtures_dir):
    """In a terminal (a pseudo-terminal here) rich wraps at the terminal's width, as before."""
    env = {**os.environ, "COLUMNS": "60", "NO_COLOR": "1"}
    env.pop("LSTM_SURGEON_DEBUG", None)
    leader, follower = pty.openpty()
    with subprocess.Popen(
        [*surgeon_command, "inspect", str(fixtures_dir / "gru_biased.pt")],
        stdin=subprocess.DEVNULL,
        stdout=follower,
        stderr=subprocess.DEVNULL,
        env=env,
    ) as process:
        os.close(follower)  # the child holds the only copy: reading ends when it exits
        output = read_until_closed(leader).decode()
        os.close(leader)
    assert process.returncode == 0
    text = re.sub(r"\x1b\[[0-9;]*m", "", output)  # NO_COLOR keeps bold and dim: drop the styles
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").splitlines()]
    assert GRU_NOTE not in lines
    assert all(len(line) <= 60 for line in lines)
    assert "tanh(b_in + r·b_hn)" in " ".join(lines)


def read_until_closed(fd: int) -> bytes:
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the terminal's other side was closed, everything is read
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)
