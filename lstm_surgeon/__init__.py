"""lstm-surgeon: inspect and edit the recurrent layers inside saved PyTorch checkpoints.

The library is the product; the `lstm-surgeon` command is a thin layer over these functions.
"""

from __future__ import annotations

from lstm_surgeon.checkpoint import Checkpoint, TensorRef
from lstm_surgeon.discovery import RecurrentLayer, discover
from lstm_surgeon.errors import CheckpointError, EditError, OutputError, SurgeonError
from lstm_surgeon.formats import open_checkpoint
from lstm_surgeon.inspection import inspect_checkpoint

__version__ = "0.1.0"

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "EditError",
    "OutputError",
    "RecurrentLayer",
    "SurgeonError",
    "TensorRef",
    "__version__",
    "discover",
    "inspect_checkpoint",
    "open_checkpoint",
]
