"""Domain exceptions.

Every failure a user can cause (a bad path, a broken file, an edit that does not apply) is one of these.
The CLI turns them into one line on stderr and an exit code, in one place (`cli.py`); library users catch
them like any other exception.
"""

from __future__ import annotations


class SurgeonError(Exception):
    """Base class: a problem with the user's input, reported without a traceback (exit code 2)."""

    exit_code = 2


class CheckpointError(SurgeonError):
    """The file cannot be read as a checkpoint: missing, not a checkpoint, truncated or corrupt."""


class UnsupportedCheckpointError(CheckpointError):
    """The file is a recognised checkpoint of a kind lstm-surgeon cannot read safely."""


class EditError(SurgeonError):
    """The requested edit does not apply to this checkpoint (no such gate, no biases, ...)."""


class OutputError(SurgeonError):
    """The output cannot be written where the user asked (exists, not a regular file, ...)."""


class Interrupted(SurgeonError):
    """The user pressed Ctrl-C; temporary files were removed."""

    exit_code = 130
