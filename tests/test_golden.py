"""Golden snapshots of what people read: `inspect --hist`, `diff --hist` and `trend` at a fixed width.

The expected text lives in tests/golden/. A change to the rendering shows up here as a diff to
review; regenerate the files deliberately with `LSTM_SURGEON_UPDATE_GOLDEN=1 pytest tests/test_golden.py`.
Every run is the installed command in a subprocess, at COLUMNS=120 (the width of output that is not a terminal) and without colour, on committed
fixtures or on files whose values are set, not computed.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("LSTM_SURGEON_UPDATE_GOLDEN", "") not in ("", "0")
WIDTH = "120"


def assert_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if UPDATE:
        path.write_text(text, encoding="utf-8")
    assert path.is_file(), f"no golden file {path}; run with LSTM_SURGEON_UPDATE_GOLDEN=1"
    assert text == path.read_text(encoding="utf-8")


@pytest.fixture
def in_folder(surgeon, tmp_path):
    """Run the command in tmp_path, so the paths it prints are the relative ones given to it."""

    def run(*args, env=None):
        return surgeon(*args, env={"COLUMNS": WIDTH, **(env or {})}, cwd=tmp_path)

    return run


def test_inspect_hist(in_folder, fixtures_dir, tmp_path):
    shutil.copyfile(fixtures_dir / "gru_biased.pt", tmp_path / "gru_biased.pt")
    result = in_folder("inspect", "gru_biased.pt", "--hist")
    assert result.returncode == 0, result.stderr
    assert_golden("inspect_hist.txt", result.stdout)


def test_inspect_hist_ascii(in_folder, fixtures_dir, tmp_path):
    shutil.copyfile(fixtures_dir / "gru_biased.pt", tmp_path / "gru_biased.pt")
    result = in_folder("inspect", "gru_biased.pt", "--hist", env={"PYTHONIOENCODING": "ascii"})
    assert result.returncode == 0, result.stderr
    assert_golden("inspect_hist_ascii.txt", result.stdout)


def test_diff_hist(in_folder, fixtures_dir, tmp_path):
    shutil.copyfile(fixtures_dir / "zoo.pt", tmp_path / "zoo.pt")
    edit = in_folder("set-forget-bias", "zoo.pt", "--layer", "rnn", "-o", "edited.pt")
    assert edit.returncode == 0, edit.stderr
    result = in_folder("diff", "zoo.pt", "edited.pt", "--hist")
    assert result.returncode == 1, result.stderr
    assert_golden("diff_hist.txt", result.stdout)


def set_values_run(folder: Path) -> list[str]:
    """Five checkpoints of an LSTM(2, 8) whose biases are eighths (exact in float32), the forget
    gate moving up step by step; saved out of order, with the step in the metadata."""
    names = []
    units = np.arange(8, dtype=np.float32) / 8  # 0, 1/8, ..., 7/8
    for step in (4, 0, 3, 1, 2):
        bias_ih = np.tile(units - 0.5, 4)
        bias_ih[8:16] += step / 2  # the forget gate
        state = {
            "lstm.weight_ih_l0": torch.zeros(32, 2),
            "lstm.weight_hh_l0": torch.zeros(32, 8),
            "lstm.bias_ih_l0": torch.from_numpy(bias_ih),
            "lstm.bias_hh_l0": torch.full((32,), 0.25),
        }
        name = f"run-{step}.safetensors"
        save_file(state, str(folder / name), metadata={"global_step": str(500 * step)})
        names.append(name)
    return names


def test_trend(in_folder, tmp_path):
    result = in_folder("trend", *set_values_run(tmp_path), "--gate", "forget", "--gate", "input")
    assert result.returncode == 0, result.stderr
    assert_golden("trend.txt", result.stdout)


def test_trend_ascii(in_folder, tmp_path):
    names = set_values_run(tmp_path)
    result = in_folder("trend", *names, "--gate", "f", env={"PYTHONIOENCODING": "ascii"})
    assert result.returncode == 0, result.stderr
    assert_golden("trend_ascii.txt", result.stdout)
