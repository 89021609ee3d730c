"""PT2 archives (torch.export.save): weights read and patched where they lie as plain records.

Archives are made here by torch.export.export + torch.export.save; torch.export.load is the oracle for
what an archive holds and for what an edited one computes.
"""

from __future__ import annotations

import json
import shutil
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import assert_clean_failure
from safetensors.torch import load_file
from torch import nn

from lstm_surgeon.discovery import discover
from lstm_surgeon.formats import open_checkpoint

INPUT = torch.linspace(-1.0, 1.0, 5 * 1 * 2).reshape(5, 1, 2)


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.LSTM(2, 3)
        self.cell = nn.GRUCell(3, 4)
        self.register_buffer("scale", torch.full((4,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.enc(x)
        return self.cell(y[0]) * self.scale


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # export notes the LSTM's _flat_weights attribute
        program = torch.export.export(Model().eval(), (INPUT,))
    path = tmp_path_factory.mktemp("pt2") / "model.pt2"
    torch.export.save(program, path)
    return path


@pytest.fixture
def archive(exported, tmp_path) -> Path:
    return Path(shutil.copyfile(exported, tmp_path / "model.pt2"))


def test_weights_are_read_by_parameter_name(exported, torch_reference):
    expected = torch.export.load(exported).state_dict
    with open_checkpoint(exported) as checkpoint:
        assert checkpoint.format_name == "pt2"
        torch_reference.assert_matches(checkpoint, dict(expected), ordered=False)
        layers = sorted(layer.name for layer in discover(checkpoint).layers)
    assert layers == ["cell", "enc"]


def test_edit_patches_the_archive_which_still_loads_and_runs(archive, tmp_path, run_cli):
    out = tmp_path / "out.pt2"
    result = run_cli("set-forget-bias", archive, "--value", "2", "-o", out, "-y", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["result"]["method"] == "patch"
    with zipfile.ZipFile(out) as zipped:
        assert zipped.testzip() is None
    program = torch.export.load(out)
    state = program.state_dict
    total = state["enc.bias_ih_l0"] + state["enc.bias_hh_l0"]
    torch.testing.assert_close(total.chunk(4)[1], torch.full((3,), 2.0))
    eager = Model()
    eager.load_state_dict(dict(state))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(INPUT), eager.eval()(INPUT))
    original = torch.export.load(archive).state_dict
    for name in ("enc.weight_ih_l0", "cell.bias_ih", "scale"):
        assert torch.equal(state[name], original[name])


def test_edit_in_place(archive, run_cli):
    result = run_cli("zero-bias", archive, "--layer", "cell", "--in-place", "-y")
    assert result.exit_code == 0, result.stderr
    state = torch.export.load(archive).state_dict
    assert not state["cell.bias_ih"].any() and not state["cell.bias_hh"].any()
    assert run_cli("check", archive).exit_code == 0


def test_structure_change_is_refused(archive, tmp_path, run_cli):
    out = tmp_path / "out.pt2"
    result = run_cli("zero-bias", archive, "--drop", "-o", out, "-y")
    assert "PT2" in assert_clean_failure(result.stderr, result.exit_code)
    assert not out.exists()


def test_conversion_to_safetensors_and_diff(archive, tmp_path, run_cli):
    out = tmp_path / "model.safetensors"
    assert run_cli("set-forget-bias", archive, "-o", out, "-y").exit_code == 0
    written, expected = load_file(out), torch.export.load(archive).state_dict
    assert sorted(written) == sorted(expected)
    result = run_cli("diff", archive, out, "--json")
    assert result.exit_code == 1
    assert not json.loads(result.stdout)["identical"]


def test_a_config_naming_a_missing_record_is_refused(archive, tmp_path, run_cli):
    """The weights config is the map of the archive: a name it gives that is absent is an error."""
    target = tmp_path / "broken.pt2"
    with zipfile.ZipFile(archive) as old, zipfile.ZipFile(target, "w") as new:
        for info in old.infolist():
            data = old.read(info.filename)
            if info.filename.endswith("_weights_config.json"):
                data = data.replace(b'"weight_0"', b'"weight_99"')
            new.writestr(info, data)
    result = run_cli("inspect", target)
    assert "missing record" in assert_clean_failure(result.stderr, result.exit_code)


def test_a_pickled_weight_is_named_in_a_warning_not_run(archive, tmp_path):
    """Tensor subclasses are stored as torch.save pickles, which only their code rebuilds: such a
    weight is left unread and named, the others read as usual."""
    target = tmp_path / "pickled.pt2"
    with zipfile.ZipFile(archive) as old, zipfile.ZipFile(target, "w") as new:
        for info in old.infolist():
            data = old.read(info.filename)
            if info.filename.endswith("_weights_config.json"):
                config = json.loads(data)
                config["config"]["cell.bias_hh"]["use_pickle"] = True
                data = json.dumps(config).encode()
            new.writestr(info, data)
    with open_checkpoint(target) as checkpoint:
        assert "cell.bias_hh" not in checkpoint.tensors
        assert "enc.bias_hh_l0" in checkpoint.tensors
        assert any("cell.bias_hh" in warning for warning in checkpoint.warnings)
