"""The per-unit gate biases of a PyTorch state dict, computed with torch from `torch.load`: the
oracle the histogram and trend tests compare against (nothing of lstm-surgeon is used here)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch

GATE_NAMES = {
    "LSTM": ("input", "forget", "cell", "output"),
    "GRU": ("reset", "update", "new"),
    "RNN": ("hidden",),
}


@dataclass(frozen=True)
class OracleGate:
    """A gate's biases as float64: `effective` (b_ih + b_hh), or for GRU's new gate `b_in` and
    `b_hn` apart (`effective` None)."""

    name: str
    effective: np.ndarray | None
    b_in: np.ndarray | None = None
    b_hn: np.ndarray | None = None

    def arrays(self) -> list[np.ndarray]:
        return [a for a in (self.effective, self.b_in, self.b_hn) if a is not None]


def oracle_gates(
    state: Mapping[str, torch.Tensor], prefix: str, suffix: str, kind: str, hidden: int
) -> Iterator[OracleGate]:
    """The gates of one cell whose biases are `{prefix}bias_ih{suffix}` and `..._hh...`."""
    family = kind.removesuffix("Cell")
    ih = state[f"{prefix}bias_ih{suffix}"].to(torch.float64)
    hh = state[f"{prefix}bias_hh{suffix}"].to(torch.float64)
    for index, name in enumerate(GATE_NAMES[family]):
        rows = slice(index * hidden, (index + 1) * hidden)
        if family == "GRU" and name == "new":
            yield OracleGate(name, None, ih[rows].numpy(), hh[rows].numpy())
        else:
            yield OracleGate(name, (ih[rows] + hh[rows]).numpy())


def cell_suffix(kind: str, sublayer: int, direction: str) -> str:
    """The parameter-name suffix of a cell: `_l1_reverse` in a layer, nothing in a `*Cell`."""
    if kind.endswith("Cell"):
        return ""
    return f"_l{sublayer}" + ("_reverse" if direction == "reverse" else "")
