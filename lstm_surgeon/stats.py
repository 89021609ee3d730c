"""Gate-sliced statistics of recurrent biases: what `inspect` shows and `verify` cross-checks.

The number that matters is the bias a gate sees (`gates.effective_bias`); its activation at zero input
and state says how open a gate starts. A gate whose recurrent bias is scaled by the reset gate (GRU's
new gate) has its two biases reported separately and never summed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from lstm_surgeon.checkpoint import Checkpoint
from lstm_surgeon.gates import Gate, activate, effective_bias, pre_activation_at_zero
from lstm_surgeon.layers import Cell, RecurrentLayer


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


def cell_stats(checkpoint: Checkpoint, layer: RecurrentLayer, cell: Cell) -> CellStats:
    """Statistics of every gate of one cell, reading only its bias tensors."""
    biases = {gate.name: cell.bias_values(checkpoint, gate) for gate in layer.gates}
    gates = []
    for gate in layer.gates:
        ih, hh = biases[gate.name]
        pre = pre_activation_at_zero(layer.gates, gate, biases, layer.hidden_size)
        gates.append(_gate_stats(gate, ih, hh, pre))
    return CellStats(cell.layer, cell.direction, tuple(gates))


def _gate_stats(
    gate: Gate, ih: np.ndarray | None, hh: np.ndarray | None, pre: np.ndarray
) -> GateStats:
    """A gate's biases, the bias it sees (not for a gate that scales b_hn by r), and the gate's
    activation of its mean pre-activation at zero input and state."""
    opening = activate(gate.activation, float(pre.mean())) if pre.size else None
    return GateStats(
        gate,
        gate.activation,
        None if ih is None else Summary.of(ih),
        None if hh is None else Summary.of(hh),
        _optional_summary(effective_bias(gate, ih, hh)),
        opening,
    )


def _optional_summary(values: np.ndarray | None) -> Summary | None:
    return None if values is None else Summary.of(values)


def layer_stats(checkpoint: Checkpoint, layer: RecurrentLayer) -> list[CellStats]:
    return [cell_stats(checkpoint, layer, cell) for cell in layer.cells]
