"""`convert`: recurrent layers as a PyTorch state dict that torch's modules load strictly.

The transposed, reordered, one-bias layout is converted in tests/test_layouts.py; here PyTorch files
convert to themselves (values read back with torch), and the command behaves as a command should.
"""

from __future__ import annotations

import json

import make_fixtures
import pytest
import torch
from conftest import assert_clean_failure
from safetensors.torch import load_file

from lstm_surgeon.convert import dotted_name


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_every_zoo_layer_loads_strictly_into_its_module(surgeon, fixtures_dir, tmp_path, suffix):
    output = tmp_path / f"converted{suffix}"
    result = surgeon("convert", fixtures_dir / "zoo.pt", "-o", output, "--json")
    assert result.returncode == 0, result.stderr
    converted = (
        load_file(str(output))
        if suffix == ".safetensors"
        else torch.load(output, weights_only=True)
    )
    original = torch.load(fixtures_dir / "zoo.pt", weights_only=True)
    modules = make_fixtures.build_modules("zoo.pt")
    for name, module in modules.items():
        state = {
            k.removeprefix(f"{name}."): v for k, v in converted.items() if k.startswith(f"{name}.")
        }
        module.load_state_dict(state, strict=True)
        for key, value in state.items():
            assert torch.equal(value, original[f"{name}.{key}"])
    assert "lstm_head.weight" not in converted and "embedding.weight" not in converted
    document = json.loads(result.stdout)
    assert (document["output"], document["format"]) == (str(output), suffix.lstrip("."))
    assert len(document["tensors"]) == len(converted)


def test_all_carries_the_other_tensors(surgeon, fixtures_dir, tmp_path):
    output = tmp_path / "all.safetensors"
    assert surgeon("convert", fixtures_dir / "zoo.pt", "-o", output, "--all").returncode == 0
    original = torch.load(fixtures_dir / "zoo.pt", weights_only=True)
    assert load_file(str(output)).keys() == original.keys()


def test_convert_refuses_an_existing_output_and_a_foreign_suffix(surgeon, fixtures_dir, tmp_path):
    existing = tmp_path / "there.safetensors"
    existing.write_bytes(b"keep me")
    result = surgeon("convert", fixtures_dir / "zoo.pt", "-o", existing)
    assert "already exists" in assert_clean_failure(result.stderr, result.returncode)
    assert existing.read_bytes() == b"keep me"
    result = surgeon("convert", fixtures_dir / "zoo.pt", "-o", tmp_path / "out.onnx")
    assert ".safetensors or .pt" in assert_clean_failure(result.stderr, result.returncode)
    assert not (tmp_path / "out.onnx").exists()


def test_a_file_without_recurrent_layers_is_a_clean_failure(surgeon, fixtures_dir, tmp_path):
    result = surgeon("convert", fixtures_dir / "plain_tensor.pt", "-o", tmp_path / "x.pt")
    assert "no recurrent layers" in assert_clean_failure(result.stderr, result.returncode)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("name", "dotted"),
    [
        ("/encoder/LSTM_1", "encoder.LSTM_1"),
        ("model.rnn", "model.rnn"),
        ("a b:c", "a_b.c"),
        ("", ""),
    ],
)
def test_layer_names_become_dotted_module_paths(name, dotted):
    assert dotted_name(name) == dotted
