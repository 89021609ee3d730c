"""lstm-surgeon: inspect and edit the recurrent layers inside saved models (PyTorch, ONNX, Keras...).

The library is the product; the `lstm-surgeon` command is a thin layer over these functions. Names are
imported on first use, so `import lstm_surgeon` (and `lstm-surgeon --help`) stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Checkpoint": "lstm_surgeon.checkpoint",
    "TensorRef": "lstm_surgeon.checkpoint",
    "open_checkpoint": "lstm_surgeon.formats",
    "open_checkpoint_files": "lstm_surgeon.formats",
    "RecurrentLayer": "lstm_surgeon.layers",
    "Cell": "lstm_surgeon.layers",
    "Region": "lstm_surgeon.layers",
    "discover": "lstm_surgeon.discovery",
    "module_state": "lstm_surgeon.layouts.pytorch",
    "inspect_checkpoint": "lstm_surgeon.inspection",
    "Selection": "lstm_surgeon.surgery",
    "plan_set_forget_bias": "lstm_surgeon.surgery",
    "plan_set_gate_bias": "lstm_surgeon.surgery",
    "plan_chrono": "lstm_surgeon.surgery",
    "plan_zero_bias": "lstm_surgeon.surgery",
    "plan_add_bias": "lstm_surgeon.surgery",
    "plan_zero_input": "lstm_surgeon.surgery",
    "Destination": "lstm_surgeon.apply",
    "apply_plan": "lstm_surgeon.apply",
    "edit_checkpoint": "lstm_surgeon.apply",
    "recover_checkpoint": "lstm_surgeon.apply",
    "expand_sources": "lstm_surgeon.batch",
    "inspect_each": "lstm_surgeon.batch",
    "check_each": "lstm_surgeon.batch",
    "verify_each": "lstm_surgeon.batch",
    "plan_edits": "lstm_surgeon.batch",
    "write_edits": "lstm_surgeon.batch",
    "edit_source": "lstm_surgeon.batch",
    "diff_checkpoints": "lstm_surgeon.diff",
    "follow_run": "lstm_surgeon.trend",
    "verify_checkpoint": "lstm_surgeon.verify",
    "check_checkpoint": "lstm_surgeon.check",
    "RenameRule": "lstm_surgeon.renames",
    "parse_renames": "lstm_surgeon.renames",
    "renamed": "lstm_surgeon.renames",
    "with_renames": "lstm_surgeon.renames",
    "SurgeonError": "lstm_surgeon.errors",
    "CheckpointError": "lstm_surgeon.errors",
    "EditError": "lstm_surgeon.errors",
    "OutputError": "lstm_surgeon.errors",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lstm_surgeon' has no attribute {name!r}")
