"""`diff` of ONNX models: one stored tensor holds several cells (both directions in W, R and B, both
biases in B), and each changed (role, cell) of it is reported; an ONNX export against the torch
checkpoint it came from is compared layer by layer."""

from __future__ import annotations

import pytest
import torch
from onnx_models import export
from safetensors.torch import save_file
from torch import nn

from lstm_surgeon.apply import Destination, edit_checkpoint
from lstm_surgeon.diff import diff_checkpoints
from lstm_surgeon.formats import open_checkpoint
from lstm_surgeon.surgery import Selection, plan_set_forget_bias

pytestmark = pytest.mark.filterwarnings(
    "ignore::UserWarning", "ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning"
)


@pytest.fixture
def bidirectional(tmp_path):
    torch.manual_seed(5)
    module = nn.LSTM(3, 4, bidirectional=True).eval()
    return module, export(module, tmp_path / "lstm.onnx", 3)


def test_an_edit_of_one_direction_in_a_packed_bias_is_reported_for_that_cell(
    bidirectional, tmp_path
):
    _, path = bidirectional
    output = tmp_path / "edited.onnx"
    selection = Selection(directions=("reverse",))
    edit_checkpoint(
        path, lambda ck: plan_set_forget_bias(ck, 3.0, selection=selection), Destination(output)
    )
    with open_checkpoint(path) as a, open_checkpoint(output) as b:
        result = diff_checkpoints(a, b).to_dict()
    assert not result["identical"]
    changed = {
        (entry["parameter"], entry["cell"]["direction"]): entry for entry in result["changed"]
    }
    assert set(changed) == {("bias_ih", "reverse"), ("bias_hh", "reverse")}
    assert all(entry["gates"] == ["forget"] for entry in changed.values())
    effective = changed[("bias_ih", "reverse")]["effective"][0]
    assert effective["after"]["mean"] == pytest.approx(3.0)


def test_an_export_equals_the_checkpoint_it_came_from(bidirectional, tmp_path):
    module, path = bidirectional
    checkpoint = tmp_path / "lstm.safetensors"
    save_file({f"lstm.{k}": v for k, v in module.state_dict().items()}, str(checkpoint))
    with open_checkpoint(checkpoint) as a, open_checkpoint(path) as b:
        result = diff_checkpoints(a, b, atol=1e-6).to_dict()
    assert len(result["matched"]) == 1 and result["identical"], result
