"""Gate-sliced statistics of recurrent biases: what `inspect` shows and `verify` cross-checks.

PyTorch adds two bias vectors, so the number that matters is the *effective* bias `b_ih + b_hh`; its
activation at zero input and state says how open a gate starts. GRU's new gate is the exception:
`b_hn` is multiplied by the reset gate, so the two biases are reported separately and never summed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from lstm_surgeon.checkpoint import Checkpoint
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


def cell_stats(checkpoint: Checkpoint, layer: RecurrentLayer, cell: CellParams) -> CellStats:
    """Statistics of every gate of one cell, reading only its two bias tensors."""
    bias_ih = checkpoint.values(cell.bias_ih) if cell.bias_ih is not None else None
    bias_hh = checkpoint.values(cell.bias_hh) if cell.bias_hh is not None else None
    gates = []
    for gate in layer.gates:
        rows = gate.rows(layer.hidden_size)
        ih = bias_ih[rows] if bias_ih is not None else None
        hh = bias_hh[rows] if bias_hh is not None else None
        pre = _pre_activation_at_zero(layer, gate, bias_ih, bias_hh)
        gates.append(_gate_stats(gate, ih, hh, pre))
    return CellStats(cell.layer, cell.direction, tuple(gates))


def _pre_activation_at_zero(
    layer: RecurrentLayer, gate: Gate, bias_ih: np.ndarray | None, bias_hh: np.ndarray | None
) -> np.ndarray:
    """What the gate's nonlinearity sees per unit for zero input and zero state: `b_ih + b_hh`,
    except GRU's new gate, `b_in + r * b_hn` with the reset gate `r = sigmoid(b_ir + b_hr)`."""
    if bias_ih is None or bias_hh is None:
        return np.zeros(layer.hidden_size)
    rows = gate.rows(layer.hidden_size)
    if gate.biases_sum:
        return bias_ih[rows] + bias_hh[rows]
    reset = layer.gates[0].rows(layer.hidden_size)
    r = 1.0 / (1.0 + np.exp(-(bias_ih[reset] + bias_hh[reset])))
    return bias_ih[rows] + r * bias_hh[rows]


def _gate_stats(
    gate: Gate, ih: np.ndarray | None, hh: np.ndarray | None, pre: np.ndarray
) -> GateStats:
    """A gate's biases, their sum (not for GRU's new gate, where b_hn is scaled by r), and the
    gate's activation of its mean pre-activation at zero input and state."""
    summed = gate.biases_sum and ih is not None and hh is not None
    effective = Summary.of(ih + hh) if summed else None  # type: ignore[operator]
    opening = activate(gate.activation, float(pre.mean())) if pre.size else None
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
