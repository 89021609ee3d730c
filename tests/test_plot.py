"""`trend --plot`: a PNG or SVG of the requested size, and clear errors (no matplotlib, bad input)."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import save_file

from lstm_surgeon.plot import INSTALL_HINT


@pytest.fixture
def run_files(tmp_path):
    """Three checkpoints of a run: an LSTM and a GRU whose forget/update biases grow."""
    torch.manual_seed(0)
    lstm, gru = torch.nn.LSTM(3, 5), torch.nn.GRU(3, 4)
    paths = []
    for step in range(3):
        state = {f"lstm.{k}": v.detach() + step for k, v in lstm.state_dict().items()}
        state |= {f"gru.{k}": v.detach() - step for k, v in gru.state_dict().items()}
        path = tmp_path / f"ck{step}.safetensors"
        save_file(state, str(path), metadata={"global_step": str(1000 * step)})
        paths.append(path)
    return paths


def test_a_png_decodes_at_the_size_asked_for(surgeon, run_files, tmp_path):
    from matplotlib.image import imread

    target = tmp_path / "trend.png"
    result = surgeon("trend", *run_files, "--plot", target, "--plot-size", "640x480")
    assert result.returncode == 0, result.stderr
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = imread(target)
    assert pixels.shape[:2] == (480, 640)
    assert pixels.std() > 0  # something was drawn
    assert f"plot written to {target}" in result.stderr
    assert not list(tmp_path.glob(".trend.png.*"))  # no temporary file left beside it


def test_the_default_png_size(surgeon, run_files, tmp_path):
    from matplotlib.image import imread

    target = tmp_path / "trend.png"
    result = surgeon("trend", *run_files, "--plot", target, "--json")
    assert result.returncode == 0, result.stderr
    assert imread(target).shape[:2] == (800, 1200)
    assert json.loads(result.stdout)["order"] == "step"  # stdout stays one JSON object


def test_an_svg_has_the_size_asked_for_and_names_the_gates(surgeon, run_files, tmp_path):
    target = tmp_path / "trend.svg"
    result = surgeon("trend", *run_files, "--plot", target, "--plot-size", "900x600")
    assert result.returncode == 0, result.stderr
    svg = target.read_text()
    match = re.search(r'<svg[^>]*width="([0-9.]+)pt"[^>]*height="([0-9.]+)pt"', svg)
    assert match is not None
    assert (float(match[1]), float(match[2])) == (900 * 0.72, 600 * 0.72)  # 100 px per inch
    for gate in ("forget", "update", "new (b_in)", "new (b_hn)"):
        assert gate in svg


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--plot", "trend.pdf", "a plot is written as .png or .svg, not .pdf"),
        ("--plot-size", "big", "plot size 'big' must be WIDTHxHEIGHT in pixels"),
        ("--plot-size", "20x20", "each 100 to 10000"),
    ],
)
def test_bad_plot_options_fail_before_reading(run_cli, run_files, tmp_path, option, value, message):
    extra = [option, value] if option == "--plot" else ["--plot", tmp_path / "t.png", option, value]
    result = run_cli("trend", *run_files, *extra, "--json")
    assert result.exit_code == 2
    assert message in json.loads(result.stdout)["error"]["message"]
    assert not (tmp_path / "t.png").exists()


def test_a_plot_in_a_missing_folder_is_a_clear_error(surgeon, run_files, tmp_path):
    result = surgeon("trend", *run_files, "--plot", tmp_path / "nowhere" / "t.png")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "nowhere" in result.stderr.strip().splitlines()[-1]


def test_without_matplotlib_the_error_names_the_install_command(surgeon, run_files, tmp_path):
    """A matplotlib that cannot be imported (as when the extra is not installed)."""
    shadow = tmp_path / "shadow" / "matplotlib"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('No module named matplotlib')\n")
    env = {"PYTHONPATH": str(shadow.parent)}
    result = surgeon("trend", *run_files, "--plot", tmp_path / "t.png", "--json", env=env)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and INSTALL_HINT in lines[0]
    assert INSTALL_HINT in json.loads(result.stdout)["error"]["message"]
    assert not (tmp_path / "t.png").exists()
    plain = surgeon("trend", *run_files, env=env)  # the terminal chart needs no matplotlib
    assert plain.returncode == 0, plain.stderr
