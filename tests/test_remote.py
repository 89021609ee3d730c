"""Checkpoints at URLs: read by range requests from a real HTTP server on 127.0.0.1.

The server (`fixtures/range_server.py`) counts every body byte it sends, so these tests prove that
`inspect` fetches the header and the recurrent tensors, not the file. The oracle for what a URL
holds is the same file read locally (itself checked against torch elsewhere), and for edits the
safetensors library's own loader. hf:// URLs are read from the same server posing as the Hub
(`HF_ENDPOINT` pointed at it, in a subprocess so huggingface_hub reads it at import).
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_clean_failure
from hypothesis import given, settings
from hypothesis import strategies as st
from range_server import serve
from safetensors.torch import load_file, save_file

from lstm_surgeon.formats import open_checkpoint
from lstm_surgeon.remote import BLOCK_BYTES, RemoteBuffer, RemoteLocation, is_url

pytest.importorskip("fsspec")
pytest.importorskip("aiohttp")

HIDDEN = 16


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with a ~0.9 MB safetensors file: a large embedding (never read by inspect), a
    2-layer LSTM, and the embedding again after it (so the LSTM lies mid-file)."""
    folder = tmp_path_factory.mktemp("served")
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(8, HIDDEN, num_layers=2)
    tensors = {"embedding.weight": torch.randn(1000, 100)}
    tensors.update({f"rnn.{key}": value for key, value in lstm.state_dict().items()})
    tensors["head.weight"] = torch.randn(1200, 100)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


@pytest.fixture
def server(served: Path):
    with serve(served) as (url, state):
        yield url, state


def _json(result) -> dict:
    return json.loads(result.stdout)


def _recurrent_bytes(path: Path) -> int:
    with open_checkpoint(path) as checkpoint:
        return sum(ref.nbytes for name, ref in checkpoint.tensors.items() if name.startswith("rnn"))


def test_a_url_stays_whole_as_the_checkpoint_path():
    location = RemoteLocation("https://example.com/a/b.safetensors")
    assert str(location) == "https://example.com/a/b.safetensors"
    assert location.name == "b.safetensors"
    assert is_url("hf://user/repo/model.safetensors")
    assert not is_url("runs/model.pt")
    assert not is_url(Path("https://example.com/x.pt"))  # a Path has lost its `//` already


@settings(max_examples=200, deadline=None)
@given(
    data=st.binary(min_size=1, max_size=3 * BLOCK_BYTES).map(lambda b: b * 2),
    reads=st.lists(st.tuples(st.integers(-10, 7 * BLOCK_BYTES), st.integers(-10, 7 * BLOCK_BYTES))),
)
def test_a_remote_buffer_reads_like_bytes(data: bytes, reads: list[tuple[int, int]]):
    buffer = RemoteBuffer("memory", io.BytesIO(data), len(data))
    for start, stop in reads:  # repeated and overlapping reads: the caches must not change a byte
        assert buffer[start:stop] == data[start:stop]
    assert buffer[len(data) // 2] == data[len(data) // 2]
    assert buffer[-1] == data[-1]
    needle = data[-3:]
    assert buffer.rfind(needle, len(data) // 3) == data.rfind(needle, len(data) // 3)


def test_inspect_of_a_url_reads_only_the_header_and_the_recurrent_tensors(run_cli, served, server):
    url, state = server
    path = served / "model.safetensors"
    local = run_cli("inspect", path, "--json")
    remote = run_cli("inspect", f"{url}/model.safetensors", "--json")
    assert remote.exit_code == 0, remote.stderr
    expected = {**_json(local), "path": f"{url}/model.safetensors"}
    assert _json(remote) == expected
    header = 8 + int.from_bytes(path.read_bytes()[:8], "little")
    assert state.bytes_sent <= header + _recurrent_bytes(path) + 2 * BLOCK_BYTES
    assert state.bytes_sent < path.stat().st_size / 4
    assert all(request.startswith("bytes=") for request in state.requests)


def test_a_torch_save_file_reads_over_http(run_cli, fixtures_dir):
    with serve(fixtures_dir) as (url, _state):
        remote = run_cli("inspect", f"{url}/zoo.pt", "--json")
    local = run_cli("inspect", fixtures_dir / "zoo.pt", "--json")
    assert remote.exit_code == 0, remote.stderr
    assert _json(remote)["layers"] == _json(local)["layers"]


def test_diff_of_a_url_against_its_local_copy_finds_nothing(run_cli, served, server):
    url, _state = server
    result = run_cli("diff", f"{url}/model.safetensors", served / "model.safetensors", "--json")
    assert result.exit_code == 0, result.stdout
    assert _json(result)["identical"] is True


def test_check_of_a_url(run_cli, server):
    url, _state = server
    result = run_cli("check", f"{url}/model.safetensors", "--json")
    assert result.exit_code == 0, result.stderr
    report = _json(result)
    assert report["sound"] is True
    assert report["path"] == f"{url}/model.safetensors"


def test_an_edit_reads_the_url_and_writes_locally(run_cli, served, server, tmp_path):
    url, _state = server
    output = tmp_path / "fixed.safetensors"
    result = run_cli("set-forget-bias", f"{url}/model.safetensors", "-o", output, "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["plan"]["source"] == f"{url}/model.safetensors"
    before, after = load_file(served / "model.safetensors"), load_file(output)
    assert before.keys() == after.keys()
    for name in before:
        if "bias" not in name:
            assert torch.equal(before[name], after[name]), name
    forget = slice(HIDDEN, 2 * HIDDEN)  # torch's gate order: input, forget, cell, output
    for layer in range(2):
        ih, hh = after[f"rnn.bias_ih_l{layer}"], after[f"rnn.bias_hh_l{layer}"]
        np.testing.assert_allclose((ih + hh)[forget].numpy(), 1.0)
    assert [entry.name for entry in tmp_path.iterdir()] == ["fixed.safetensors"]


def test_a_url_cannot_be_edited_in_place(run_cli, server):
    url, _state = server
    result = run_cli("set-forget-bias", f"{url}/model.safetensors", "--in-place")
    line = assert_clean_failure(result.stderr, result.exit_code)
    assert "cannot be edited in place" in line


def test_a_server_that_ignores_range_is_a_clear_error(run_cli, served):
    with serve(served, ignore_range=True) as (url, _state):
        result = run_cli("inspect", f"{url}/model.safetensors")
    line = assert_clean_failure(result.stderr, result.exit_code)
    assert "ignores range requests" in line and "download it" in line


def test_a_dropped_connection_mid_read_fails_cleanly(run_cli, served, tmp_path):
    with serve(served, drop_after=100_000) as (url, _state):
        inspect = run_cli("inspect", f"{url}/model.safetensors")
        output = tmp_path / "out.safetensors"
        edit = run_cli("set-forget-bias", f"{url}/model.safetensors", "-o", output)
    assert_clean_failure(inspect.stderr, inspect.exit_code)
    assert_clean_failure(edit.stderr, edit.exit_code)
    assert list(tmp_path.iterdir()) == []  # no output, no partial download left behind


def test_a_missing_remote_file(run_cli, server):
    url, _state = server
    result = run_cli("inspect", f"{url}/nothing.safetensors", "--json")
    assert_clean_failure(result.stderr, result.exit_code)
    assert _json(result)["error"]["message"] == f"{url}/nothing.safetensors: no such file"


def test_an_unknown_protocol(run_cli):
    result = run_cli("inspect", "nosuchprotocol://host/model.pt")
    line = assert_clean_failure(result.stderr, result.exit_code)
    assert "nosuchprotocol://" in line


def test_without_the_remote_extra_the_install_line_is_named(run_cli, monkeypatch):
    monkeypatch.setitem(sys.modules, "fsspec", None)
    monkeypatch.setitem(sys.modules, "fsspec.core", None)
    result = run_cli("inspect", "https://example.com/model.safetensors")
    line = assert_clean_failure(result.stderr, result.exit_code)
    assert "pip install 'lstm-surgeon[remote]'" in line


def test_fsspec_is_imported_only_for_urls():
    import subprocess

    code = (
        "import sys, lstm_surgeon.cli, lstm_surgeon.formats, lstm_surgeon.batch; "
        "print('fsspec' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "False", result.stderr


def test_an_hf_url_reads_through_the_hub_api(surgeon, run_cli, served):
    with serve(served, hub=True) as (url, state):
        result = surgeon(
            "inspect",
            "hf://user/repo/model.safetensors",
            "--json",
            env={"HF_ENDPOINT": url, "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "0"},
        )
    assert result.returncode == 0, result.stderr
    local = _json(run_cli("inspect", served / "model.safetensors", "--json"))
    assert json.loads(result.stdout) == {**local, "path": "hf://user/repo/model.safetensors"}
    path = served / "model.safetensors"
    assert state.bytes_sent < path.stat().st_size / 4


def test_an_existing_output_is_refused_before_the_download(run_cli, served, server, tmp_path):
    url, state = server
    output = tmp_path / "fixed.safetensors"
    output.write_bytes(b"keep me")
    result = run_cli("set-forget-bias", f"{url}/model.safetensors", "-o", output)
    line = assert_clean_failure(result.stderr, result.exit_code)
    assert "already exists" in line
    assert output.read_bytes() == b"keep me"
    assert state.bytes_sent < (served / "model.safetensors").stat().st_size / 4
    assert [entry.name for entry in tmp_path.iterdir()] == ["fixed.safetensors"]
