"""Frameworks' own runtimes as oracles for `verify`: run a layer the way its framework does.

A layer found by a layout other than PyTorch's is verified twice: loaded into the torch module its
weights convert to, and run by its own framework's runtime on the same input; the largest difference
between the two outputs is reported. Each runtime is one module here with `max_abs_difference`, and
one line in `RUNTIMES`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import numpy as np

    from lstm_surgeon.checkpoint import Checkpoint
    from lstm_surgeon.layers import RecurrentLayer

RUNTIMES: dict[str, str] = {  # framework -> module that runs its layers
    "onnx": "lstm_surgeon.runtimes.onnx",
}


class Runtime(Protocol):
    def max_abs_difference(
        self,
        checkpoint: Checkpoint,
        layer: RecurrentLayer,
        inputs: np.ndarray,
        expected: np.ndarray,
    ) -> float:
        """Run the layer on `inputs` (sequence-first, float32, as torch's module took them) and
        return the largest |difference| from `expected`, the torch module's output sequence."""

    def run(self, checkpoint: Checkpoint, layer: RecurrentLayer, inputs: np.ndarray) -> np.ndarray:
        """The layer's output sequence for `inputs`, laid out as torch's module lays it out (for
        a layer torch cannot compute, the runtime alone checks it runs and stays finite)."""


def runtime_for(framework: str) -> Any | None:
    """The runtime module of a framework, or None for PyTorch's own layout (torch is its runtime)."""
    name = RUNTIMES.get(framework)
    return None if name is None else importlib.import_module(name)
