"""Gate layouts: which rows of a recurrent weight or bias belong to which gate.

PyTorch stacks the gates along dimension 0, each block `hidden_size` rows: LSTM `[i, f, g, o]`,
GRU `[r, z, n]`, RNN a single block. This module is the only place that knows those orders.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lstm_surgeon.errors import EditError


@dataclass(frozen=True)
class Gate:
    """One gate of a recurrent cell: its name, short name, activation, and position in the stack."""

    name: str
    short: str
    activation: str  # "sigmoid" or "tanh" (an RNN may use relu, which a checkpoint does not record)
    index: int
    # False only for GRU's new gate, where b_hn is scaled by the reset gate: b_in + b_hn is meaningless.
    biases_sum: bool = True

    def rows(self, hidden_size: int) -> slice:
        """The rows of this gate in a (gates * hidden_size, ...) weight or bias."""
        return slice(self.index * hidden_size, (self.index + 1) * hidden_size)


LSTM_GATES: tuple[Gate, ...] = (
    Gate("input", "i", "sigmoid", 0),
    Gate("forget", "f", "sigmoid", 1),
    Gate("cell", "g", "tanh", 2),
    Gate("output", "o", "sigmoid", 3),
)
GRU_GATES: tuple[Gate, ...] = (
    Gate("reset", "r", "sigmoid", 0),
    Gate("update", "z", "sigmoid", 1),
    Gate("new", "n", "tanh", 2, biases_sum=False),
)
RNN_GATES: tuple[Gate, ...] = (Gate("hidden", "h", "tanh", 0),)

GATES_BY_FAMILY: dict[str, tuple[Gate, ...]] = {
    "LSTM": LSTM_GATES,
    "GRU": GRU_GATES,
    "RNN": RNN_GATES,
}
FAMILY_BY_GATE_COUNT: dict[int, str] = {4: "LSTM", 3: "GRU", 1: "RNN"}
ALIASES: dict[str, str] = {"c": "cell", "j": "cell"}


def family(kind: str) -> str:
    """ "LSTM" for both LSTM and LSTMCell, and so on."""
    return kind.removesuffix("Cell")


def gates_of(kind: str) -> tuple[Gate, ...]:
    return GATES_BY_FAMILY[family(kind)]


def canonical_gate_name(name: str) -> str | None:
    """The full name of the gate called `name` (full or short name, any case) in any family."""
    wanted = ALIASES.get(name.lower(), name.lower())
    for gates in GATES_BY_FAMILY.values():
        for gate in gates:
            if wanted in (gate.name, gate.short):
                return gate.name
    return None


def find_gate(kind: str, name: str) -> Gate | None:
    """The gate of `kind` called `name` (full or short name, any case), or None."""
    canonical = canonical_gate_name(name)
    return next((gate for gate in gates_of(kind) if gate.name == canonical), None)


def check_gate_name(name: str) -> str:
    """The canonical gate name, or an error that lists the valid ones."""
    canonical = canonical_gate_name(name)
    if canonical is None:
        valid = ", ".join(
            f"{family}: {'/'.join(g.name for g in gates)}"
            for family, gates in GATES_BY_FAMILY.items()
        )
        raise EditError(f"unknown gate {name!r}; gates are {valid}")
    return canonical


def activate(activation: str, value: float) -> float:
    """The gate's output for a pre-activation `value` (its opening at zero input and state)."""
    if activation == "sigmoid":
        return (
            1.0 / (1.0 + math.exp(-value))
            if value >= 0
            else math.exp(value) / (1 + math.exp(value))
        )
    if activation == "relu":
        return max(value, 0.0)
    return math.tanh(value)
