"""TorchScript archives (torch.jit.save): read without running anything, patched where they lie.

Every archive is made here by torch.jit.script / torch.jit.trace / torch.jit.freeze; torch.jit.load is
the oracle for what an archive holds and for what an edited archive does.
"""

from __future__ import annotations

import json
import pickle
import shutil
import struct
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_clean_failure
from safetensors.torch import load_file
from torch import nn

from lstm_surgeon.apply import Destination, apply_plan
from lstm_surgeon.checkpoint import Checkpoint
from lstm_surgeon.discovery import discover
from lstm_surgeon.formats import open_checkpoint
from lstm_surgeon.surgery import plan_set_forget_bias

INPUT = torch.linspace(-1.0, 1.0, 5 * 1 * 2).reshape(5, 1, 2)


class LstmThenCell(nn.Module):
    """Two recurrent submodules: a layer, and a cell fed by its first step."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.LSTM(2, 3)
        self.cell = nn.GRUCell(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.enc(x)
        return self.cell(y[0])


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(2, 3, num_layers=2, bidirectional=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rnn(x)[0]


class Zoo(nn.Module):
    """Every recurrent kind, one of them nested two modules deep (`encoder.rnn`)."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = Encoder()
        self.rnn = nn.RNN(6, 3, nonlinearity="relu")
        self.lstm_cell = nn.LSTMCell(3, 2)
        self.rnn_cell = nn.RNNCell(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.rnn(self.encoder(x))
        h, _ = self.lstm_cell(y[-1])
        return self.rnn_cell(h)


def seeded(module: type[nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    return module().eval()


def jit_save(module: torch.jit.ScriptModule, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated in 2.13
        torch.jit.save(module, path)
    return path


def jit_load(path: Path) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.load(path)


def scripted(module: nn.Module) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.script(module)


def traced(module: nn.Module) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.trace(module, INPUT)


MAKERS: dict[str, Callable[[nn.Module], torch.jit.ScriptModule]] = {
    "script": scripted,
    "trace": traced,
}
MODULES = {"lstm-then-cell": LstmThenCell, "zoo": Zoo}


@pytest.fixture(scope="module", params=sorted(MAKERS))
def archive(request, tmp_path_factory) -> Path:
    """`two.pt`: LstmThenCell, scripted or traced."""
    folder = tmp_path_factory.mktemp(request.param)
    return jit_save(MAKERS[request.param](seeded(LstmThenCell)), folder / "two.pt")


@pytest.fixture
def copy(tmp_path) -> Callable[[Path, str], Path]:
    def make(source: Path, name: str) -> Path:
        return Path(shutil.copyfile(source, tmp_path / name))

    return make


# --- Reading --------------------------------------------------------------------------------------


@pytest.mark.parametrize("maker", sorted(MAKERS))
@pytest.mark.parametrize("module", sorted(MODULES))
def test_tensors_are_named_by_module_path_as_torch_names_them(
    tmp_path, torch_reference, maker, module
):
    path = jit_save(MAKERS[maker](seeded(MODULES[module])), tmp_path / "model.pt")
    expected = jit_load(path).state_dict()
    with open_checkpoint(path) as checkpoint:
        assert checkpoint.format_name == "torchscript"
        torch_reference.assert_matches(checkpoint, expected, ordered=False)


def test_every_recurrent_submodule_is_found(tmp_path):
    path = jit_save(scripted(seeded(Zoo)), tmp_path / "zoo.pt")
    with open_checkpoint(path) as checkpoint:
        layers = {layer.name: layer for layer in discover(checkpoint).layers}
    assert sorted(layers) == ["encoder.rnn", "lstm_cell", "rnn", "rnn_cell"]
    assert (layers["encoder.rnn"].kind, layers["encoder.rnn"].num_layers) == ("GRU", 2)
    assert layers["encoder.rnn"].bidirectional
    assert layers["lstm_cell"].kind == "LSTMCell"


@pytest.mark.parametrize("suffix", [".jit", ".pt", ".pth", ".zip"])
def test_detected_by_content_whatever_the_suffix(archive, copy, suffix):
    with open_checkpoint(copy(archive, f"model{suffix}")) as checkpoint:
        assert checkpoint.format_name == "torchscript"


def test_a_torch_save_zip_is_still_a_torch_save_file(tmp_path):
    path = tmp_path / "state.pt"
    torch.save(seeded(LstmThenCell).state_dict(), path)
    with open_checkpoint(path) as checkpoint:
        assert checkpoint.format_name == "pt"


def test_deflated_code_records_are_checked(archive, run_cli):
    """torch.jit.save deflates code/: check inflates and verifies those records too."""
    result = run_cli("check", archive, "--json")
    report = json.loads(result.stdout)
    assert result.exit_code == 0, result.stdout
    assert report["sound"] and report["problems"] == []
    with zipfile.ZipFile(archive) as zipped:
        assert report["records_checked"] == len(zipped.infolist())
        assert any(info.compress_type == zipfile.ZIP_DEFLATED for info in zipped.infolist())


def test_check_finds_a_flipped_bit_in_a_deflated_record(archive, tmp_path, run_cli):
    with zipfile.ZipFile(archive) as zipped:
        info = next(i for i in zipped.infolist() if i.compress_type == zipfile.ZIP_DEFLATED)
        start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    data = bytearray(archive.read_bytes())
    data[start + info.compress_size // 2] ^= 0x10
    broken = tmp_path / "broken.pt"
    broken.write_bytes(bytes(data))
    report = json.loads(run_cli("check", broken, "--json").stdout)
    assert not report["sound"]
    assert any(info.filename in problem for problem in report["problems"])


# --- Same-structure edits: patched in place, the archive still loads and runs ---------------------


def forget_bias(module: torch.jit.ScriptModule, layer: str) -> torch.Tensor:
    """The effective forget-gate bias of an LSTM submodule, by torch's gate order [i, f, g, o]."""
    state = module.state_dict()
    total = state[f"{layer}.bias_ih_l0"] + state[f"{layer}.bias_hh_l0"]
    return total.chunk(4)[1]


def assert_runs_as_eager(path: Path, module: type[nn.Module]) -> None:
    """The archive's forward equals an eager module given the archive's state dict: the code
    computes with the values its state dict shows."""
    loaded = jit_load(path)
    eager = module()
    eager.load_state_dict(loaded.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(loaded(INPUT), eager.eval()(INPUT))


def record_spans(path: Path) -> dict[str, tuple[int, int]]:
    """Where each record's bytes lie (start, size), from its local header (whose extra field,
    torch's alignment padding, the central directory does not repeat)."""
    data = path.read_bytes()
    spans = {}
    with zipfile.ZipFile(path) as zipped:
        for info in zipped.infolist():
            name_len, extra_len = struct.unpack_from("<HH", data, info.header_offset + 26)
            spans[info.filename] = (
                info.header_offset + 30 + name_len + extra_len,
                info.compress_size,
            )
    return spans


def changed_records(before: Path, after: Path) -> set[str]:
    """The records whose bytes differ; every other byte that differs must be in a CRC-32 field
    (in the data descriptor and in the central directory), and every CRC-32 must match."""
    with zipfile.ZipFile(after) as zipped:
        assert zipped.testzip() is None
    old = np.frombuffer(before.read_bytes(), np.uint8)
    new = np.frombuffer(after.read_bytes(), np.uint8)
    assert old.size == new.size
    spans = record_spans(before)
    changed, outside = set(), 0
    for offset in np.flatnonzero(old != new):
        name = next((n for n, (s, size) in spans.items() if s <= offset < s + size), None)
        if name is None:
            outside += 1
        else:
            changed.add(name)
    assert outside <= 4 * 2 * len(changed)
    return changed


def test_edit_to_a_copy_patches_the_bias_records_only(archive, tmp_path, run_cli):
    out = tmp_path / "out.pt"
    result = run_cli("set-forget-bias", archive, "--value", "2", "-o", out, "-y", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["result"]["method"] == "patch"
    torch.testing.assert_close(forget_bias(jit_load(out), "enc"), torch.full((3,), 2.0))
    assert_runs_as_eager(out, LstmThenCell)
    assert {name.rsplit("/", 1)[1] for name in changed_records(archive, out)} <= {"2", "3"}
    assert open_checkpoint(out).format_name == "torchscript"


def test_edit_in_place_keeps_the_archive(archive, copy, run_cli):
    path = copy(archive, "model.jit")
    before = jit_load(path).state_dict()
    result = run_cli("zero-bias", path, "--layer", "cell", "--in-place", "-y")
    assert result.exit_code == 0, result.stderr
    after = jit_load(path).state_dict()
    assert not after["cell.bias_ih"].any() and not after["cell.bias_hh"].any()
    for name in ("enc.bias_ih_l0", "enc.weight_ih_l0", "cell.weight_hh"):
        assert torch.equal(after[name], before[name])
    assert_runs_as_eager(path, LstmThenCell)


@pytest.mark.parametrize("command", [["zero-bias", "--drop"], ["add-bias"]])
def test_structure_changes_are_refused_cleanly(archive, tmp_path, run_cli, command):
    if command == ["add-bias"]:
        archive = jit_save(scripted(nn.LSTM(2, 3, bias=False)), tmp_path / "nobias.pt")
    out = tmp_path / "out.pt"
    result = run_cli(*command, archive, "-o", out, "-y")
    message = assert_clean_failure(result.stderr, result.exit_code)
    assert "TorchScript" in message
    assert not out.exists()


def test_conversion_to_safetensors_writes_the_state_dict(archive, tmp_path, run_cli):
    out = tmp_path / "model.safetensors"
    result = run_cli("set-forget-bias", archive, "-o", out, "-y")
    assert result.exit_code == 0, result.stderr
    written, expected = load_file(out), jit_load(archive).state_dict()
    assert sorted(written) == sorted(expected)
    untouched = [name for name in expected if "enc.bias" not in name]
    for name in untouched:
        assert torch.equal(written[name], expected[name]), name
    total = written["enc.bias_ih_l0"] + written["enc.bias_hh_l0"]
    torch.testing.assert_close(total.chunk(4)[1], torch.ones(3))


def test_diff_across_containers(archive, tmp_path, run_cli):
    state = {name: t.contiguous() for name, t in jit_load(archive).state_dict().items()}
    from safetensors.torch import save_file

    same = tmp_path / "same.safetensors"
    save_file(state, str(same))
    result = run_cli("diff", archive, same, "--json")
    assert result.exit_code == 0, result.stdout
    assert json.loads(result.stdout)["identical"]


def test_verify_runs_the_archive_layers(archive, run_cli):
    result = run_cli("verify", archive, "--json")
    assert result.exit_code == 0, result.stdout


# --- Frozen modules: weights become constants -----------------------------------------------------


@pytest.fixture(scope="module")
def frozen(tmp_path_factory) -> tuple[Path, nn.Module]:
    module = seeded(LstmThenCell)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        frozen_module = torch.jit.freeze(torch.jit.script(module))
    return jit_save(frozen_module, tmp_path_factory.mktemp("frozen") / "frozen.pt"), module


def test_constants_of_a_frozen_module_are_reported(frozen):
    path, module = frozen
    with open_checkpoint(path) as checkpoint:
        names = list(checkpoint.tensors)
        assert names and all(name.startswith("CONSTANTS.c") for name in names)
        assert any("TorchScript constants" in warning for warning in checkpoint.warnings)
        # The constants are the module's parameters (oracle: the eager module torch froze).
        ours = sorted(checkpoint.values(name).tobytes() for name in names)
    theirs = sorted(p.detach().double().numpy().tobytes() for p in module.parameters())
    assert ours == theirs


def renamed(checkpoint: Checkpoint, names: dict[str, str]) -> Checkpoint:
    """The checkpoint with tensors named anew (what a user's rename of the constants does)."""
    tensors = {
        names.get(n, n): replace(ref, name=names.get(n, n)) for n, ref in checkpoint.tensors.items()
    }
    return replace(checkpoint, tensors=tensors)


def test_constants_of_a_frozen_module_are_editable(frozen, tmp_path):
    """Constants named like the parameters they hold are discovered and patched where they lie."""
    path, module = frozen
    parameter_names = [name for name, _ in module.named_parameters()]
    out = tmp_path / "edited.pt"
    with open_checkpoint(path) as checkpoint:
        by_value = {checkpoint.values(n).tobytes(): n for n in checkpoint.tensors}
        names = {
            by_value[p.detach().double().numpy().tobytes()]: name
            for name, p in module.named_parameters()
        }
        edited = renamed(checkpoint, names)
        assert sorted(edited.tensors) == sorted(parameter_names)
        plan = plan_set_forget_bias(edited, 3.0)
        apply_plan(plan, edited, Destination(output=out))
    loaded = jit_load(out)
    with torch.no_grad():
        module.enc.bias_ih_l0.chunk(4)[1].fill_(3.0)
        module.enc.bias_hh_l0.chunk(4)[1].zero_()
        torch.testing.assert_close(loaded(INPUT), module(INPUT))


# --- Safety: nothing in the archive runs ----------------------------------------------------------


def payload(canary: Path) -> bytes:
    """A pickle that runs `touch canary` when loaded by an ordinary unpickler."""

    class Touch:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            import os

            return os.system, (f"touch {canary}",)

    return pickle.dumps(Touch(), protocol=2)


def replace_records(source: Path, target: Path, records: dict[str, bytes]) -> Path:
    """The archive with records (by name ending) replaced, others copied as they were."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for info in old.infolist():
            data = next(
                (
                    new_data
                    for ending, new_data in records.items()
                    if info.filename.endswith(ending)
                ),
                old.read(info.filename),
            )
            new.writestr(info, data)
    return target


@pytest.mark.parametrize("record", ["/data.pkl", "/constants.pkl"])
def test_a_hostile_pickle_in_the_archive_runs_nothing(archive, tmp_path, run_cli, record):
    canary = tmp_path / "canary"
    evil = payload(canary)
    pickle.loads(evil)  # control: an ordinary unpickler runs it
    assert canary.exists()
    canary.unlink()
    target = replace_records(archive, tmp_path / "evil.pt", {record: evil})
    result = run_cli("inspect", target)
    assert not canary.exists()
    if result.exit_code != 0:
        assert_clean_failure(result.stderr, result.exit_code)


def test_hostile_code_is_never_run(archive, tmp_path, run_cli):
    """Python in code/ (TorchScript would reject it; an `exec` of it would run it) stays text."""
    canary = tmp_path / "canary"
    code = f"import os\nos.system('touch {canary}')\n".encode()
    with zipfile.ZipFile(archive) as zipped:
        names = [n for n in zipped.namelist() if "/code/" in n and n.endswith(".py")]
    target = replace_records(archive, tmp_path / "evil.pt", dict.fromkeys(names, code))
    for command in (
        ["inspect", target],
        ["check", target],
        ["set-forget-bias", target, "--dry-run"],
    ):
        result = run_cli(*command)
        assert result.exit_code in (0, 1), result.stderr
    assert not canary.exists()
