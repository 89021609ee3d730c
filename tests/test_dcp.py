"""torch.distributed.checkpoint folders: read through `.metadata` (never executed), edited in place.

Folders are written by `torch.distributed.checkpoint.save` itself: from one process (no process
group), and from a 2-process gloo run on localhost where the LSTM's and the GRU's parameters are
DTensors sharded on dim 0, so each is split in two chunks, one per rank's `.distcp` file. The oracle is
`torch.distributed.checkpoint.load` into plain tensors (which reassembles the chunks) and `zipfile`'s
own CRC-32 check of each item's torch.save archive.
"""

from __future__ import annotations

import inspect
import io
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from conftest import clean_environment
from safetensors.torch import save_file

from lstm_surgeon.errors import CheckpointError
from lstm_surgeon.formats import open_checkpoint
from lstm_surgeon.writing import journal_path

HIDDEN = 3
FORGET = slice(HIDDEN, 2 * HIDDEN)
GRU_HIDDEN = 2
UPDATE = slice(GRU_HIDDEN, 2 * GRU_HIDDEN)  # PyTorch's [r, z, n]: rows 2:4, split by ranks at 3


def model_state() -> dict[str, torch.Tensor]:
    """The state dict every test expects (the rank processes run this very function's source)."""
    torch.manual_seed(0)
    model = torch.nn.ModuleDict(
        {
            "embedding": torch.nn.Embedding(10, 4),
            "lstm": torch.nn.LSTM(4, 3, num_layers=2),
            "gru": torch.nn.GRU(3, 2),
        }
    )
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


RANK_SCRIPT = (
    "import torch\n"
    + inspect.getsource(model_state)
    + """
import sys
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

dist.init_process_group("gloo")
mesh = init_device_mesh("cpu", (2,))
state = {
    name: distribute_tensor(tensor, mesh, [Shard(0)]) if not name.startswith("embedding") else tensor
    for name, tensor in model_state().items()
}
dcp.save({"model": state}, checkpoint_id=sys.argv[1])
dist.barrier()  # neither rank tears down while the other still talks
dist.destroy_process_group()
sys.stdout.flush()
# gloo's threads can abort a normal interpreter exit ("terminate called without an active
# exception"); the checkpoint is complete and the group destroyed, so leave without teardown.
import os
os._exit(0)
"""
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def save_single(folder: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        dcp.save({"model": model_state(), "step": 7}, checkpoint_id=str(folder))
    return folder


def save_two_ranks(folder: Path) -> Path:
    port = str(free_port())
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", RANK_SCRIPT, str(folder)],
            env=clean_environment(
                MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank), WORLD_SIZE="2"
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for rank in range(2)
    ]
    for process in processes:
        _, stderr = process.communicate(timeout=180)
        assert process.returncode == 0, stderr.decode()
    return folder


def load_oracle(folder: Path) -> dict[str, torch.Tensor]:
    """What DCP itself loads, chunks reassembled, as `model.<name>`."""
    state = {"model": {name: torch.zeros_like(t) for name, t in model_state().items()}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, checkpoint_id=str(folder))
    return {f"model.{name}": tensor for name, tensor in state["model"].items()}


def items_sound(folder: Path) -> None:
    """Every item's torch.save archive passes zipfile's own CRC-32 check."""
    with open(folder / ".metadata", "rb") as file:
        metadata = pickle.load(file)  # the oracle may unpickle: this file was written here
    for info in metadata.storage_data.values():
        data = (folder / info.relative_path).read_bytes()[info.offset : info.offset + info.length]
        if data[:4] == b"PK\x03\x04":
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                assert archive.testzip() is None


def file_bytes(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def ranks_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_two_ranks(tmp_path_factory.mktemp("dcp") / "ranks")


@pytest.fixture
def single(tmp_path: Path) -> Path:
    return save_single(tmp_path / "single")


@pytest.fixture
def ranks(ranks_source: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "ranks"
    copy.mkdir()
    for path in ranks_source.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    return copy


@pytest.fixture(params=["single", "ranks"])
def folder(request: pytest.FixtureRequest) -> Path:
    return request.getfixturevalue(request.param)


# --- Reading ---------------------------------------------------------------------------------


def test_every_tensor_reads_as_dcp_loads_it(folder):
    expected = load_oracle(folder)
    for given in (folder, folder / ".metadata", folder / "__0_0.distcp"):
        with open_checkpoint(given) as checkpoint:
            assert checkpoint.path == folder
            assert set(checkpoint.tensors) == set(expected)
            for name, tensor in expected.items():
                np.testing.assert_array_equal(checkpoint.raw(name), tensor.numpy())


def test_two_ranks_split_the_recurrent_tensors_across_files(ranks):
    assert sorted(p.name for p in ranks.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    with open_checkpoint(ranks) as checkpoint:
        real = [file for file in checkpoint.files if not file.gathered]
        assert len(real) == 2
        gathered = {
            name
            for name, ref in checkpoint.tensors.items()
            if checkpoint.files[ref.storage.file].gathered
        }
        assert gathered == {name for name in checkpoint.tensors if "embedding" not in name}
        assert checkpoint.size == sum(file.size for file in real)


def test_inspect_and_check(folder, run_cli):
    result = run_cli("inspect", folder, "--json")
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["format"] == "dcp"
    assert {layer["name"] for layer in document["layers"]} == {"model.lstm", "model.gru"}
    result = run_cli("check", folder, "--json")
    assert result.exit_code == 0, result.stdout
    assert json.loads(result.stdout)["tensors_scanned"] == 12


def test_diff_against_a_safetensors_file(folder, tmp_path, run_cli):
    single = tmp_path / "model.safetensors"
    save_file({f"model.{n}": t for n, t in model_state().items()}, str(single))
    result = run_cli("diff", folder, single, "--json")
    assert result.exit_code == 0, result.stdout
    assert json.loads(result.stdout)["identical"]
    changed = {f"model.{n}": t.clone() for n, t in model_state().items()}
    changed["model.lstm.bias_hh_l1"][FORGET] += 1
    save_file(changed, str(single))
    result = run_cli("diff", folder, single, "--json")
    assert result.exit_code == 1
    (entry,) = json.loads(result.stdout)["changed"]
    assert entry["key"] == "model.lstm.bias_hh_l1" and entry["gates"] == ["forget"]


# --- Editing ---------------------------------------------------------------------------------


def expected_after_forget(value: float) -> dict[str, torch.Tensor]:
    expected = {f"model.{n}": t for n, t in model_state().items()}
    for layer in (0, 1):
        expected[f"model.lstm.bias_ih_l{layer}"][FORGET] = value
        expected[f"model.lstm.bias_hh_l{layer}"][FORGET] = 0.0
    return expected


def assert_loads_as(folder: Path, expected: dict[str, torch.Tensor]) -> None:
    loaded = load_oracle(folder)
    for name, tensor in expected.items():
        torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=0)


def test_in_place_edit_changes_only_its_targets(folder, run_cli):
    before = file_bytes(folder)
    result = run_cli("set-forget-bias", folder, "--in-place", "--yes", "--value", "1.5", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["result"]["method"] == "patch"
    assert_loads_as(folder, expected_after_forget(1.5))
    items_sound(folder)
    after = file_bytes(folder)
    assert after[".metadata"] == before[".metadata"]
    assert set(after) == set(before)  # no journal left behind
    assert run_cli("check", folder).exit_code == 0


def test_an_edit_across_both_ranks_chunks_patches_both_files(ranks, run_cli):
    before = file_bytes(ranks)
    result = run_cli(
        "set-gate-bias", ranks, "--gate", "update", "--value", "-2", "--in-place", "--yes"
    )
    assert result.exit_code == 0, result.stderr
    after = file_bytes(ranks)
    assert [name for name in before if before[name] != after[name]] == [
        "__0_0.distcp",
        "__1_0.distcp",
    ]
    expected = {f"model.{n}": t for n, t in model_state().items()}
    expected["model.gru.bias_ih_l0"][UPDATE] = -2.0
    expected["model.gru.bias_hh_l0"][UPDATE] = 0.0
    assert_loads_as(ranks, expected)
    items_sound(ranks)


def run_surgeon(command: list[str], *args: str, **env: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [*command, *args], env=clean_environment(**env), capture_output=True, timeout=120
    )


@pytest.mark.parametrize("fault", ["mid-patch", "between-files", "before-journal-removal"])
def test_kill_during_an_edit_across_ranks_leaves_every_file_old(ranks, fault, surgeon_command):
    before = file_bytes(ranks)
    edit = ["set-gate-bias", str(ranks), "--gate", "update", "--value", "-2", "--in-place", "-y"]
    killed = run_surgeon(surgeon_command, *edit, LSTM_SURGEON_FAULT=fault)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert any(journal_path(ranks / name).exists() for name in before)
    with open_checkpoint(ranks) as checkpoint:  # reads as the rollback will leave it
        for name, tensor in model_state().items():
            np.testing.assert_array_equal(checkpoint.raw(f"model.{name}"), tensor.numpy())
    assert run_surgeon(surgeon_command, "recover", str(ranks)).returncode == 0
    assert file_bytes(ranks) == before
    assert run_surgeon(surgeon_command, *edit).returncode == 0
    assert file_bytes(ranks) != before


def test_output_to_a_file_is_refused(single, tmp_path, run_cli):
    out = tmp_path / "out.safetensors"
    result = run_cli("set-forget-bias", single, "-o", out)
    assert result.exit_code == 2 and "--in-place" in result.stderr
    assert not out.exists()


# --- Damaged folders and hostile metadata ----------------------------------------------------------


def truncate(folder: Path) -> str:
    path = folder / "__0_0.distcp"
    path.write_bytes(path.read_bytes()[:-100])
    return "__0_0.distcp"


def remove(folder: Path) -> str:
    (folder / "__1_0.distcp").unlink()
    return "__1_0.distcp: missing"


@pytest.mark.parametrize("damage", [truncate, remove])
def test_a_damaged_folder_is_reported_by_check_and_refused_by_others(ranks, damage, run_cli):
    named = damage(ranks)
    result = run_cli("check", ranks, "--json")
    assert result.exit_code == 1, result.stdout
    assert any(named in problem for problem in json.loads(result.stdout)["problems"])
    for command in ("inspect", "verify"):
        result = run_cli(command, ranks)
        assert result.exit_code == 2 and named.split(":")[0] in result.stderr
    with pytest.raises(CheckpointError):
        open_checkpoint(ranks)


class RunsCode:
    def __init__(self, canary: str) -> None:
        self.canary = canary

    def __reduce__(self) -> tuple[object, tuple[str]]:  # what a hostile .metadata carries
        return (os.system, (f"touch {self.canary}",))


def test_a_metadata_that_would_run_code_runs_nothing(single, tmp_path, run_cli):
    canary = tmp_path / "canary"
    (single / ".metadata").write_bytes(pickle.dumps(RunsCode(str(canary))))
    for command in ("inspect", "check", "verify", "set-forget-bias"):
        args = ["--in-place", "--yes"] if command == "set-forget-bias" else []
        result = run_cli(command, single, *args)
        assert result.exit_code == 2, (command, result.stdout)
        assert "not a readable DCP .metadata" in result.stderr or "expected a" in result.stderr
    assert not canary.exists()


def test_items_in_another_serialisation_are_refused_clearly(tmp_path, run_cli):
    from torch.distributed.checkpoint.filesystem import FileSystemWriter, SerializationFormat

    folder = tmp_path / "safetensors-items"
    writer = FileSystemWriter(str(folder), serialization_format=SerializationFormat.SAFETENSORS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": model_state()}, storage_writer=writer)
    for command in ("inspect", "check"):
        result = run_cli(command, folder)
        assert result.exit_code == 2
        assert "not a torch.save archive" in result.stderr


def test_convert_writes_the_folder_as_one_state_dict(folder, tmp_path, run_cli):
    out = tmp_path / "model.pt"
    result = run_cli("convert", folder, "-o", out, "--all")
    assert result.exit_code == 0, result.stderr
    loaded = torch.load(out, weights_only=True)
    expected = load_oracle(folder)
    assert loaded.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=0)
