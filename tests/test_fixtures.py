"""The fixtures are the same bytes on every CPU, and the committed files are what the script writes.

Another CPU is stood in for by torch's plain C++ kernels: with `ATEN_CPU_CAPABILITY=default` (and MKL
and oneDNN held to SSE4) torch computes `uniform_`, `randn` and matmuls with other last bits than its
AVX2/AVX-512 kernels, which is how the fixtures once differed between machines.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import make_fixtures
import numpy as np
import pytest
import torch
from conftest import TorchReference
from safetensors.torch import load_file

FILENAMES = [fixture.filename for fixture in make_fixtures.FIXTURES]
PLAIN_KERNELS = {
    "ATEN_CPU_CAPABILITY": "default",
    "MKL_ENABLE_INSTRUCTIONS": "SSE4_2",
    "ONEDNN_MAX_CPU_ISA": "SSE41",
}


@pytest.fixture(scope="module")
def written_here(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every fixture as this process writes it (with this CPU's fastest kernels)."""
    folder = tmp_path_factory.mktemp("written-here")
    make_fixtures.write_fixtures(folder)
    return folder


def committed_tensors(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    return TorchReference.flatten(torch.load(path, weights_only=False))  # our own files


def test_plain_kernels_write_the_same_bytes(written_here, tmp_path):
    script = make_fixtures.FIXTURES_DIR / "make_fixtures.py"
    result = subprocess.run(
        [sys.executable, str(script), "--out-dir", str(tmp_path)],
        env={**os.environ, **PLAIN_KERNELS},
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    for filename in FILENAMES:
        assert (tmp_path / filename).read_bytes() == (written_here / filename).read_bytes(), (
            filename
        )


@pytest.mark.parametrize("filename", FILENAMES)
def test_committed_fixture_is_what_the_script_writes(written_here, fixtures_dir, filename):
    if torch.__version__.split("+")[0] != make_fixtures.TORCH_VERSION:
        pytest.skip(f"the fixtures were written by torch {make_fixtures.TORCH_VERSION}")
    assert (fixtures_dir / filename).read_bytes() == (written_here / filename).read_bytes()


@pytest.mark.parametrize("filename", FILENAMES)
def test_committed_fixture_holds_the_built_values(fixtures_dir, filename):
    """Whatever the torch version: same names, dtypes, shapes and stored bits as the builder."""
    built = TorchReference.flatten(make_fixtures.build_payload(filename))
    committed = committed_tensors(fixtures_dir / filename)
    assert sorted(committed) == sorted(built)  # the order is in the bytes compared above
    for name, tensor in built.items():
        assert committed[name].dtype == tensor.dtype, name
        ours, theirs = TorchReference.raw(committed[name]), TorchReference.raw(tensor)
        assert ours.shape == theirs.shape, name
        assert np.ascontiguousarray(ours).tobytes() == np.ascontiguousarray(theirs).tobytes(), name


@pytest.mark.parametrize("filename", FILENAMES)
def test_fixture_is_small(fixtures_dir, filename):
    assert (fixtures_dir / filename).stat().st_size < 64 * 1024


def test_grid_values_are_odd_multiples_exact_in_float32():
    values = make_fixtures.grid_values((4096,), torch.Generator().manual_seed(0))
    scaled = values * 2**make_fixtures.GRID_BITS
    assert torch.equal(scaled, scaled.round())
    assert bool((scaled.long() % 2 == 1).all())
    assert bool((values.abs() < 0.5).all())
    assert torch.equal(values.float().double(), values)
    assert len(set(values.tolist())) > 4000  # not a handful of repeated values


def test_building_leaves_the_global_random_state_alone():
    before = torch.get_rng_state()
    make_fixtures.build_modules("lightning.ckpt")
    make_fixtures.build_payload("zoo.pt")
    assert torch.equal(torch.get_rng_state(), before)
