"""Hugging Face sharded folders: an index.json and its shards, read, checked and edited as one.

Folders are written as transformers' `save_pretrained(max_shard_size=...)` writes them: shards named
`model-0000k-of-0000n.safetensors` (by `safetensors.torch.save_file`) or `pytorch_model-...bin` (by
`torch.save`), and an index `{"metadata": {"total_size"}, "weight_map"}`. The shards split the LSTM so
that its biases lie in another shard than its weights. Oracles: `safetensors.torch.load_file` and
`torch.load` of each shard, and `nn.LSTM` itself.
"""

from __future__ import annotations

import json
import signal
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import clean_environment
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from lstm_surgeon.apply import Destination, edit_checkpoint
from lstm_surgeon.discovery import discover
from lstm_surgeon.errors import CheckpointError, OutputError
from lstm_surgeon.formats import open_checkpoint
from lstm_surgeon.surgery import plan_set_forget_bias
from lstm_surgeon.writing import journal_path, recover_interrupted_edit

HIDDEN = 3
FORGET = slice(HIDDEN, 2 * HIDDEN)
KINDS = {
    "safetensors": ("model.safetensors.index.json", "model-{:05d}-of-{:05d}.safetensors"),
    "bin": ("pytorch_model.bin.index.json", "pytorch_model-{:05d}-of-{:05d}.bin"),
}
FAULT_POINTS = ["after-journal", "between-journals", "mid-patch", "between-files"]


def state_dict() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.ModuleDict(
        {
            "embedding": torch.nn.Embedding(10, 4),
            "lstm": torch.nn.LSTM(4, HIDDEN, num_layers=2),
            "gru": torch.nn.GRU(HIDDEN, 2),
        }
    )
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def shard_groups(names: list[str]) -> list[list[str]]:
    """Embedding alone; the LSTM's weights; its biases with the GRU (so an edit of the forget
    biases touches one shard of three, and a layer spans two shards)."""
    lstm_weights = [n for n in names if n.startswith("lstm.weight")]
    lstm_biases = [n for n in names if n.startswith("lstm.bias")]
    rest = [n for n in names if n.startswith("gru.")]
    return [["embedding.weight"], lstm_weights, lstm_biases + rest]


def save_shard(tensors: dict[str, torch.Tensor], path: Path) -> None:
    if path.suffix == ".safetensors":
        save_file(tensors, str(path), metadata={"format": "pt"})
    else:
        torch.save(tensors, path)


def write_sharded(folder: Path, kind: str, tensors: dict[str, torch.Tensor]) -> Path:
    """A folder as transformers writes it; returns the folder."""
    index_name, shard_name = KINDS[kind]
    folder.mkdir(parents=True, exist_ok=True)
    groups = shard_groups(list(tensors))
    weight_map = {}
    for number, group in enumerate(groups, start=1):
        name = shard_name.format(number, len(groups))
        save_shard({n: tensors[n] for n in group}, folder / name)
        weight_map.update(dict.fromkeys(group, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / index_name).write_text(json.dumps(index, indent=2))
    return folder


def load_shard(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    return torch.load(path, weights_only=True)


def shards(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir()) if path.is_file()}


@pytest.fixture(params=sorted(KINDS))
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def folder(tmp_path: Path, kind: str) -> Path:
    return write_sharded(tmp_path / "model", kind, state_dict())


# --- Reading ---------------------------------------------------------------------------------


def test_the_folder_reads_as_one_checkpoint_named_as_the_index(folder, kind):
    index = json.loads((folder / KINDS[kind][0]).read_text())
    expected = state_dict()
    for path in (folder, folder / KINDS[kind][0]):
        with open_checkpoint(path) as checkpoint:
            assert checkpoint.path == folder
            assert set(checkpoint.tensors) == set(index["weight_map"])
            for name, ref in checkpoint.tensors.items():
                assert checkpoint.files[ref.storage.file].path.name == index["weight_map"][name]
                np.testing.assert_array_equal(checkpoint.raw(name), expected[name].numpy())
            assert checkpoint.metadata == {"total_size": str(index["metadata"]["total_size"])}


def test_inspect_finds_layers_across_shards(folder, run_cli):
    result = run_cli("inspect", folder, "--json")
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    layers = {layer["name"]: layer for layer in document["layers"]}
    assert set(layers) == {"lstm", "gru"}
    assert layers["lstm"]["num_layers"] == 2
    bias = state_dict()["lstm.bias_ih_l0"][FORGET]
    forget = next(g for g in layers["lstm"]["cells"][0]["gates"] if g["gate"] == "forget")
    assert forget["bias_ih"]["mean"] == pytest.approx(float(bias.mean()), abs=1e-6)


def test_a_folder_with_a_single_weights_file_is_that_file(tmp_path, run_cli):
    folder = tmp_path / "single"
    folder.mkdir()
    save_file(state_dict(), str(folder / "model.safetensors"))
    with open_checkpoint(folder) as checkpoint:
        assert checkpoint.path == folder / "model.safetensors"
    result = run_cli("diff", folder, folder / "model.safetensors", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["identical"]


def test_diff_of_the_folder_against_one_file(folder, tmp_path, run_cli):
    single = tmp_path / "single.safetensors"
    save_file(state_dict(), str(single))
    result = run_cli("diff", folder, single, "--json")
    assert result.exit_code == 0, result.stdout
    assert json.loads(result.stdout)["identical"]


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_convert_writes_the_folder_as_one_file(folder, tmp_path, suffix, run_cli):
    out = tmp_path / f"model{suffix}"
    result = run_cli("convert", folder, "-o", out, "--all")
    assert result.exit_code == 0, result.stderr
    loaded = load_shard(out) if suffix == ".safetensors" else torch.load(out, weights_only=True)
    expected = state_dict()
    assert loaded.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=0)


def test_a_folder_that_is_no_checkpoint_is_a_clear_error(tmp_path, run_cli):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_cli("inspect", empty)
    assert result.exit_code == 2
    assert "no checkpoint lstm-surgeon reads" in result.stderr


# --- Editing ---------------------------------------------------------------------------------


def test_in_place_edit_patches_only_the_shard_with_targets(folder, kind, run_cli):
    before = shards(folder)
    result = run_cli("set-forget-bias", folder, "--in-place", "--yes", "--value", "1.5", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["result"]["method"] == "patch"
    after = shards(folder)
    changed = sorted(name for name in before if before[name] != after[name])
    assert changed == [KINDS[kind][1].format(3, 3)]  # the biases' shard only
    expected = state_dict()
    for layer in (0, 1):
        expected[f"lstm.bias_ih_l{layer}"][FORGET] = 1.5
        expected[f"lstm.bias_hh_l{layer}"][FORGET] = 0.0
    loaded = {}
    for name in after:
        if not name.endswith(".json"):
            loaded.update(load_shard(folder / name))
    assert loaded.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=0)
    if kind == "bin":
        with zipfile.ZipFile(folder / changed[0]) as archive:
            assert archive.testzip() is None  # every CRC-32 was refreshed


def test_the_edited_lstm_runs_as_expected_in_torch(folder, kind):
    edit_checkpoint(folder, lambda c: plan_set_forget_bias(c, 1.5), Destination(in_place=True))
    loaded = {}
    for path in folder.iterdir():
        if not path.name.endswith(".json"):
            loaded.update(load_shard(path))
    lstm = torch.nn.LSTM(4, HIDDEN, num_layers=2)
    lstm.load_state_dict(
        {k.removeprefix("lstm."): v for k, v in loaded.items() if k.startswith("lstm.")}
    )
    effective = lstm.bias_ih_l0[FORGET] + lstm.bias_hh_l0[FORGET]
    torch.testing.assert_close(effective.detach(), torch.full((HIDDEN,), 1.5))


def test_output_to_a_file_is_refused_clearly(folder, tmp_path):
    with pytest.raises(OutputError, match="--in-place"):
        edit_checkpoint(
            folder,
            lambda c: plan_set_forget_bias(c, 1.5),
            Destination(tmp_path / "out.safetensors"),
        )
    assert not (tmp_path / "out.safetensors").exists()


EDIT_COMMAND = ["set-forget-bias", "--in-place", "--yes", "--value", "1.5"]


@pytest.mark.parametrize("fault", FAULT_POINTS)
def test_kill_at_each_step_leaves_every_shard_old(tmp_path, fault, surgeon_command):
    """The LSTM's weights and biases in one shard each, plus a second LSTM's biases in a third:
    the edit patches two shards, and a kill at any step leaves both old once recovered."""
    tensors = state_dict()
    folder = write_sharded(tmp_path / "model", "safetensors", tensors)
    (folder / "model.safetensors.index.json").unlink()
    first = {n: t for n, t in tensors.items() if n.endswith("_l0") or not n.startswith("lstm")}
    second = {n: t for n, t in tensors.items() if n not in first}
    for path in folder.iterdir():
        path.unlink()
    save_file(first, str(folder / "model-00001-of-00002.safetensors"))
    save_file(second, str(folder / "model-00002-of-00002.safetensors"))
    weight_map = {n: "model-00001-of-00002.safetensors" for n in first}
    weight_map.update({n: "model-00002-of-00002.safetensors" for n in second})
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    old = shards(folder)
    killed = subprocess.run(
        [*surgeon_command, EDIT_COMMAND[0], str(folder), *EDIT_COMMAND[1:]],
        env=clean_environment(LSTM_SURGEON_FAULT=fault),
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    with open_checkpoint(folder) as checkpoint:  # reads as the rollback will leave it
        for name, tensor in tensors.items():
            np.testing.assert_array_equal(checkpoint.raw(name), tensor.numpy())
    assert any(journal_path(folder / name).exists() for name in old if name.endswith("tensors"))
    done = subprocess.run(
        [*surgeon_command, EDIT_COMMAND[0], str(folder), *EDIT_COMMAND[1:]],
        env=clean_environment(),
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr  # rolls back first, then edits both shards
    new = shards(folder)
    assert sorted(name for name in old if old[name] != new[name]) == sorted(
        name for name in old if name.endswith(".safetensors")
    )


def test_recover_rolls_back_every_shard_of_the_folder(folder, surgeon_command, run_cli):
    old = shards(folder)
    killed = subprocess.run(
        [*surgeon_command, EDIT_COMMAND[0], str(folder), *EDIT_COMMAND[1:]],
        env=clean_environment(LSTM_SURGEON_FAULT="mid-patch"),
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert killed.returncode == -signal.SIGKILL
    assert run_cli("check", folder).exit_code == 1  # the half-edited shard is a problem
    result = run_cli("recover", folder, "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["rolled_back"]
    assert shards(folder) == old
    assert not any(path.name.startswith(".") for path in folder.iterdir())  # no journal left
    assert not any(recover_interrupted_edit(path) for path in folder.iterdir())


# --- The index against the shards ----------------------------------------------------------------


def rewrite_index(folder: Path, kind: str, change) -> None:
    index_path = folder / KINDS[kind][0]
    index = json.loads(index_path.read_text())
    change(index["weight_map"])
    index_path.write_text(json.dumps(index))


def shard_name(kind: str, number: int) -> str:
    return KINDS[kind][1].format(number, 3)


def unlisted(folder: Path, kind: str) -> str:
    rewrite_index(folder, kind, lambda weights: weights.pop("gru.bias_hh_l0"))
    return "'gru.bias_hh_l0' is in"


def listed_but_missing(folder: Path, kind: str) -> str:
    rewrite_index(folder, kind, lambda weights: weights.update({"lstm.extra": shard_name(kind, 2)}))
    return "'lstm.extra' is listed in the index but missing from"


def in_two_shards(folder: Path, kind: str) -> str:
    path = folder / shard_name(kind, 1)
    tensors = load_shard(path)
    tensors["gru.bias_hh_l0"] = torch.zeros(6)
    save_shard(tensors, path)
    return "'gru.bias_hh_l0' is in 2 shards"


def listed_twice(folder: Path, kind: str) -> str:
    """A weight_map naming one tensor twice (JSON readers keep the last silently)."""
    index_path = folder / KINDS[kind][0]
    text = index_path.read_text()
    entry = f'"gru.bias_hh_l0": "{shard_name(kind, 3)}"'
    index_path.write_text(text.replace(entry, f"{entry}, {entry}", 1))
    return "repeats the key 'gru.bias_hh_l0'"


def missing_shard(folder: Path, kind: str) -> str:
    (folder / shard_name(kind, 2)).unlink()
    return f"{shard_name(kind, 2)}: missing"


def truncated_shard(folder: Path, kind: str) -> str:
    path = folder / shard_name(kind, 3)
    path.write_bytes(path.read_bytes()[:-20])
    return shard_name(kind, 3)


@pytest.mark.parametrize(
    "damage",
    [unlisted, listed_but_missing, listed_twice, in_two_shards, missing_shard, truncated_shard],
)
def test_check_reports_a_mismatch_and_other_commands_refuse(folder, kind, damage, run_cli):
    named = damage(folder, kind)
    result = run_cli("check", folder, "--json")
    assert result.exit_code == 1, result.stdout
    report = json.loads(result.stdout)
    assert not report["sound"]
    assert any(named in problem for problem in report["problems"]), report["problems"]
    for command in (["inspect"], ["verify"], ["set-forget-bias", "--in-place", "--yes"]):
        result = run_cli(command[0], folder, *command[1:])
        assert result.exit_code == 2, (command, result.stdout)
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    with pytest.raises(CheckpointError):
        open_checkpoint(folder)


def test_an_index_pointing_outside_its_folder_is_refused(folder, kind, run_cli):
    rewrite_index(folder, kind, lambda weights: weights.update({"x": "../elsewhere.bin"}))
    result = run_cli("inspect", folder)
    assert result.exit_code == 2
    assert "not a file name in the index's folder" in result.stderr


def test_a_sound_folder_checks_sound(folder, run_cli):
    result = run_cli("check", folder, "--json")
    assert result.exit_code == 0, result.stdout
    assert json.loads(result.stdout)["tensors_scanned"] == 12


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_any_split_reads_as_the_state_dict_and_finds_the_same_layers(tmp_path_factory, data):
    """Property: however the tensors are spread over shards, the folder reads as the state dict
    (safetensors' own loader is the oracle for each shard) and discovery finds the same layers."""
    tensors = state_dict()
    count = data.draw(st.integers(1, 5), label="shards")
    assignment = data.draw(
        st.lists(st.integers(0, count - 1), min_size=len(tensors), max_size=len(tensors))
    )
    folder = tmp_path_factory.mktemp("split")
    weight_map = {}
    for number in sorted(set(assignment)):
        group = [n for n, shard in zip(tensors, assignment, strict=True) if shard == number]
        name = f"model-{number + 1:05d}-of-{count:05d}.safetensors"
        save_file({n: tensors[n] for n in group}, str(folder / name))
        weight_map.update(dict.fromkeys(group, name))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    oracle = {}
    for name in set(weight_map.values()):
        oracle.update(load_file(str(folder / name)))
    with open_checkpoint(folder) as checkpoint:
        for name, tensor in oracle.items():
            np.testing.assert_array_equal(checkpoint.raw(name), tensor.numpy())
        layers = {
            (layer.name, layer.kind, layer.num_layers) for layer in discover(checkpoint).layers
        }
    assert layers == {("lstm", "LSTM", 2), ("gru", "GRU", 1)}
