"""Gate-sliced statistics of recurrent biases: what `inspect` shows and `verify` cross-checks.

PyTorch adds two bias vectors, so the number that matters is the *effective* bias `b_ih + b_hh`; its
activation at zero input and state says how open a gate starts. GRU's new gate is the exception:
`b_hn` is multiplied by the reset gate, so the two biases are reported separately and never summed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from lstm_surgeon.checkpoint import Checkpoint, TensorRef
from lstm_surgeon.discovery import CellParams, RecurrentLayer
from lstm_surgeon.gates import Gate, activate


@dataclass(frozen=True)
class Summary:
    """Mean, min and max of a slice of values."""

    mean: float
    min: float
    max: float

    @classmethod
    def of(cls, values: np.ndarray) -> Summary | None:
        if values.size == 0:
            return None
        return cls(float(values.mean()), float(values.min()), float(values.max()))

    def to_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "min": self.min, "max": self.max}


@dataclass(frozen=True)
class GateStats:
    """One gate of one cell: its two biases, their sum, and the gate's output at zero input."""

    gate: Gate
    activation: str
    bias_ih: Summary | None
    bias_hh: Summary | None
    effective: Summary | None
    activation_at_zero: float | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "gate": self.gate.name,
            "activation": self.activation,
            "bias_ih": _summary_dict(self.bias_ih),
            "bias_hh": _summary_dict(self.bias_hh),
            "effective": _summary_dict(self.effective),
            "activation_at_zero": self.activation_at_zero,
        }


@dataclass(frozen=True)
class CellStats:
    layer: int
    direction: str
    gates: tuple[GateStats, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "direction": self.direction,
            "gates": [gate.to_dict() for gate in self.gates],
        }


def _summary_dict(summary: Summary | None) -> dict[str, float] | None:
    return None if summary is None else summary.to_dict()


def gate_values(
    checkpoint: Checkpoint, ref: TensorRef | None, gate: Gate, hidden: int
) -> np.ndarray:
    """The float64 values of one gate's rows of a bias (empty when the bias is absent)."""
    if ref is None:
        return np.empty(0)
    return checkpoint.values(ref)[gate.rows(hidden)]


def cell_stats(checkpoint: Checkpoint, layer: RecurrentLayer, cell: CellParams) -> CellStats:
    """Statistics of every gate of one cell, reading only its two bias tensors."""
    bias_ih = checkpoint.values(cell.bias_ih) if cell.bias_ih is not None else None
    bias_hh = checkpoint.values(cell.bias_hh) if cell.bias_hh is not None else None
    gates = []
    for gate in layer.gates:
        rows = gate.rows(layer.hidden_size)
        ih = bias_ih[rows] if bias_ih is not None else None
        hh = bias_hh[rows] if bias_hh is not None else None
        gates.append(_gate_stats(gate, ih, hh))
    return CellStats(cell.layer, cell.direction, tuple(gates))


def _gate_stats(gate: Gate, ih: np.ndarray | None, hh: np.ndarray | None) -> GateStats:
    if not gate.biases_sum:
        # b_hn is scaled by the reset gate: the opening at zero input depends on r, not on a sum.
        effective, opening = None, None
    elif ih is None or hh is None:
        effective, opening = None, activate(gate.activation, 0.0)
    else:
        effective = Summary.of(ih + hh)
        opening = None if effective is None else activate(gate.activation, effective.mean)
    return GateStats(
        gate,
        gate.activation,
        None if ih is None else Summary.of(ih),
        None if hh is None else Summary.of(hh),
        effective,
        opening,
    )


def layer_stats(checkpoint: Checkpoint, layer: RecurrentLayer) -> list[CellStats]:
    return [cell_stats(checkpoint, layer, cell) for cell in layer.cells]
