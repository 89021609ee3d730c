"""`lstm-surgeon recover FILE`: the command every half-edited file's message names."""

from __future__ import annotations

import json

from conftest import assert_clean_failure

from lstm_surgeon.writing import journal_path


def test_recover_rolls_back_an_edit_killed_mid_patch(surgeon, fixture_copy):
    target = fixture_copy("zoo.safetensors")
    original = target.read_bytes()
    killed = surgeon(
        "set-forget-bias", target, "--in-place", "-y", env={"LSTM_SURGEON_FAULT": "mid-patch"}
    )
    assert killed.returncode == -9
    assert target.read_bytes() != original and journal_path(target).exists()
    inspected = surgeon("inspect", target)  # names the command, shows the old checkpoint
    assert f"lstm-surgeon recover {target}" in inspected.stderr
    assert target.read_bytes() != original  # reading never writes
    result = surgeon("recover", target, "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"path": str(target), "rolled_back": True}
    assert target.read_bytes() == original
    assert not journal_path(target).exists()
    again = surgeon("recover", target)
    assert (again.returncode, again.stdout.strip()) == (0, f"{target}: nothing to recover")


def test_recover_of_a_missing_file_is_a_clean_failure(surgeon, tmp_path):
    result = surgeon("recover", tmp_path / "nope.pt")
    line = assert_clean_failure(result.stderr, result.returncode)
    assert "no such file" in line
