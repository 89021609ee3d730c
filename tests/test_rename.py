"""`--rename`: weights saved under custom names with PyTorch's layout. Discovery sees the new names;
edits write the file's real tensors (checked with torch.load / np.load and the torch modules)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import assert_clean_failure

from lstm_surgeon import open_checkpoint
from lstm_surgeon.renames import RenameError, RenameRule, new_names, renamed

RULES = (
    "--rename",
    r"^(rnn\d)_w_(ih|hh)$=\1.weight_\2",
    "--rename",
    r"^(rnn\d)_b_(ih|hh)$=\1.bias_\2",
)
CUSTOM = {"weight_ih": "w_ih", "weight_hh": "w_hh", "bias_ih": "b_ih", "bias_hh": "b_hh"}


def custom_state(bias: bool = True) -> tuple[dict[str, torch.Tensor], torch.nn.LSTMCell]:
    torch.manual_seed(3)
    cell = torch.nn.LSTMCell(3, 4, bias=bias)
    state = {f"rnn1_{CUSTOM[name]}": value for name, value in cell.state_dict().items()}
    return state, cell


@pytest.fixture
def custom_pt(tmp_checkpoint):
    state, _ = custom_state()
    return tmp_checkpoint(state, "custom.pt")


def test_rules_split_at_the_last_equals_sign():
    rule = RenameRule.parse("^(a=b)_x$=\\1.weight")
    assert rule.pattern.pattern == "^(a=b)_x$"
    assert rule.apply("a=b_x") == "a=b.weight"


@pytest.mark.parametrize(
    ("text", "message"),
    [("no-equals", "expected REGEX=REPLACEMENT"), ("(=x", "invalid regular expression")],
)
def test_bad_rules_are_clear_errors(run_cli, custom_pt, text, message):
    result = run_cli("inspect", custom_pt, "--rename", text)
    assert message in assert_clean_failure(result.stderr, result.exit_code)


def test_names_that_collide_are_an_error(run_cli, custom_pt):
    with pytest.raises(RenameError, match="the same name"):
        new_names(["rnn1_w_ih", "rnn1_w_hh"], [RenameRule.parse("_w_(ih|hh)$=")])
    result = run_cli("inspect", custom_pt, "--rename", "_[wb]_(ih|hh)$=")
    assert "the same name" in assert_clean_failure(result.stderr, result.exit_code)


def test_the_view_points_at_the_same_bytes(custom_pt):
    rules = [RenameRule.parse(rule) for rule in RULES[1::2]]
    with open_checkpoint(custom_pt) as checkpoint:
        view = renamed(checkpoint, rules)
        assert set(view.tensors) == {
            "rnn1.weight_ih",
            "rnn1.weight_hh",
            "rnn1.bias_ih",
            "rnn1.bias_hh",
        }
        real = new_names(checkpoint.tensors, rules)
        for name, ref in view.tensors.items():
            original = checkpoint.tensors[real[name]]
            assert ref.storage == original.storage
            assert np.array_equal(view.raw(ref), checkpoint.raw(original))


def test_inspect_finds_the_layer_only_with_the_rules(run_cli, custom_pt):
    plain = json.loads(run_cli("inspect", custom_pt, "--json").stdout)
    assert plain["layers"] == []
    mapped = json.loads(run_cli("inspect", custom_pt, *RULES, "--json").stdout)
    assert [(layer["name"], layer["kind"]) for layer in mapped["layers"]] == [("rnn1", "LSTMCell")]


def test_inspect_hints_at_rename_on_one_stderr_line(run_cli, custom_pt):
    result = run_cli("inspect", custom_pt)
    hints = [line for line in result.stderr.splitlines() if line.startswith("hint:")]
    assert len(hints) == 1
    assert "'rnn1_w_ih'" in hints[0] and "--rename" in hints[0]
    assert result.exit_code == 0
    assert "hint:" not in run_cli("inspect", custom_pt, *RULES).stderr


def test_no_hint_for_tensors_not_shaped_like_a_layer(run_cli, tmp_checkpoint):
    path = tmp_checkpoint({"embedding": torch.zeros(10, 3), "head": torch.zeros(5, 7)}, "x.pt")
    assert "hint:" not in run_cli("inspect", path).stderr


def test_an_edit_writes_the_real_tensors(run_cli, tmp_path, custom_pt):
    out = tmp_path / "out.pt"
    result = run_cli("set-forget-bias", custom_pt, *RULES, "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    assert {edit["tensor"] for edit in document["plan"]["edits"]} == {"rnn1_b_ih", "rnn1_b_hh"}
    assert document["result"]["method"] == "patch"
    saved = torch.load(out, weights_only=True)
    assert set(saved) == set(custom_state()[0])  # the file keeps its own names
    cell = torch.nn.LSTMCell(3, 4)
    cell.load_state_dict({name: saved[f"rnn1_{short}"] for name, short in CUSTOM.items()})
    forget = (cell.bias_ih + cell.bias_hh)[4:8]
    torch.testing.assert_close(forget, torch.ones(4))


def test_an_edit_of_an_npz_in_place(run_cli, tmp_path):
    state, _ = custom_state()
    path = tmp_path / "custom.npz"
    np.savez(path, **{name: value.numpy() for name, value in state.items()})
    result = run_cli("zero-bias", path, *RULES, "--gate", "input", "--in-place")
    assert result.exit_code == 0, result.stderr
    with np.load(path) as archive:
        assert np.all(archive["rnn1_b_ih"][:4] == 0)
        assert np.array_equal(archive["rnn1_b_ih"][4:], state["rnn1_b_ih"].numpy()[4:])


def test_dropping_tensors_removes_the_real_ones(run_cli, tmp_path, custom_pt):
    out = tmp_path / "nobias.pt"
    assert run_cli("zero-bias", custom_pt, *RULES, "--drop", "-o", out).exit_code == 0
    assert set(torch.load(out, weights_only=True)) == {"rnn1_w_ih", "rnn1_w_hh"}


def test_adding_tensors_under_renames_is_refused(run_cli, tmp_path, tmp_checkpoint):
    state, _ = custom_state(bias=False)
    path = tmp_checkpoint(state, "nobias.pt")
    result = run_cli("add-bias", path, *RULES, "-o", tmp_path / "out.pt")
    assert "adding tensors with --rename" in assert_clean_failure(result.stderr, result.exit_code)
    assert not (tmp_path / "out.pt").exists()


def test_verify_check_and_diff_see_the_renamed_layer(run_cli, tmp_path, custom_pt):
    verified = json.loads(run_cli("verify", custom_pt, *RULES, "--json").stdout)
    assert [layer["name"] for layer in verified["layers"]] == ["rnn1"]
    checked = json.loads(run_cli("check", custom_pt, *RULES, "--json").stdout)
    assert checked["tensors_scanned"] == 4
    out = tmp_path / "out.pt"
    run_cli("set-forget-bias", custom_pt, *RULES, "-o", out)
    compared = json.loads(run_cli("diff", custom_pt, out, *RULES, "--json").stdout)
    assert {(change["key"], change["layer"]) for change in compared["changed"]} == {
        ("rnn1.bias_ih", "rnn1"),
        ("rnn1.bias_hh", "rnn1"),
    }


def test_every_command_that_reads_a_checkpoint_takes_rename():
    import typer

    from lstm_surgeon.cli import app

    commands = typer.main.get_command(app).commands  # type: ignore[attr-defined]
    for name, command in commands.items():
        options = {option for param in command.params for option in param.opts}
        # recover reads no tensors; trend opens its checkpoints inside `trend.follow_run`
        assert ("--rename" in options) == (name not in ("recover", "trend")), name
