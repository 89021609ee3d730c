"""Gate semantics, in one place: which gates a cell has, and what each gate sees of its biases.

Gates here are canonical: named and ordered as PyTorch names and orders them (LSTM input, forget, cell,
output; GRU reset, update, new; RNN hidden), whatever the framework that stored them. Where a gate's
rows or columns lie in a file is a layout's business (`layouts/`); how the gate combines its biases,
which value it sees at zero input, and its activation are this module's.

- Most gates see the *effective* bias, the sum of the input and recurrent biases (one bias alone
  where a layout stores one).
- GRU's new gate in PyTorch (ONNX `linear_before_reset=1`, Keras `reset_after=True`) scales the
  recurrent bias by the reset gate r: `n = tanh(b_in + r * b_hn)`, so `b_in + b_hn` is no effective
  bias. A layout marks such a gate with `biases_sum=False`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np

from lstm_surgeon.errors import EditError


@dataclass(frozen=True)
class Gate:
    """One canonical gate of a recurrent cell: its name, short name and activation, and whether it
    sees the sum of its two biases (False where the recurrent bias is scaled by the reset gate)."""

    name: str
    short: str
    activation: str  # "sigmoid" or "tanh" (an RNN may use relu, which a checkpoint does not record)
    biases_sum: bool = True


LSTM_GATES: tuple[Gate, ...] = (
    Gate("input", "i", "sigmoid"),
    Gate("forget", "f", "sigmoid"),
    Gate("cell", "g", "tanh"),
    Gate("output", "o", "sigmoid"),
)
GRU_GATES: tuple[Gate, ...] = (
    Gate("reset", "r", "sigmoid"),
    Gate("update", "z", "sigmoid"),
    Gate("new", "n", "tanh", biases_sum=False),
)
RNN_GATES: tuple[Gate, ...] = (Gate("hidden", "h", "tanh"),)

GATES_BY_FAMILY: dict[str, tuple[Gate, ...]] = {
    "LSTM": LSTM_GATES,
    "GRU": GRU_GATES,
    "RNN": RNN_GATES,
}
FAMILY_BY_GATE_COUNT: dict[int, str] = {4: "LSTM", 3: "GRU", 1: "RNN"}
ALIASES: dict[str, str] = {"c": "cell", "j": "cell"}
RESET = "reset"


def family(kind: str) -> str:
    """ "LSTM" for both LSTM and LSTMCell, and so on."""
    return kind.removesuffix("Cell")


def gates_of(kind: str) -> tuple[Gate, ...]:
    """The canonical gates of a PyTorch-style kind, in canonical order."""
    return GATES_BY_FAMILY[family(kind)]


def with_summing_new_gate(gates: tuple[Gate, ...]) -> tuple[Gate, ...]:
    """GRU gates whose new gate sums its biases (ONNX `linear_before_reset=0`, Keras
    `reset_after=False`): the reset gate is applied before the recurrent product, not after."""
    return tuple(replace(gate, biases_sum=True) for gate in gates)


def canonical_gate_name(name: str) -> str | None:
    """The full name of the gate called `name` (full or short name, any case) in any family."""
    wanted = ALIASES.get(name.lower(), name.lower())
    for gates in GATES_BY_FAMILY.values():
        for gate in gates:
            if wanted in (gate.name, gate.short):
                return gate.name
    return None


def find_gate(gates: tuple[Gate, ...], name: str) -> Gate | None:
    """The gate of `gates` called `name` (full or short name, any case), or None."""
    canonical = canonical_gate_name(name)
    return next((gate for gate in gates if gate.name == canonical), None)


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


Biases = Mapping[str, tuple[np.ndarray | None, np.ndarray | None]]
"""Per gate name: its input-side and recurrent-side bias values (None where not stored)."""


def effective_bias(
    gate: Gate, input_bias: np.ndarray | None, recurrent_bias: np.ndarray | None
) -> np.ndarray | None:
    """The bias the gate sees: the sum of both biases, or the one a layout stores; None for a gate
    that does not sum them (GRU's new gate) and for a cell without biases."""
    if input_bias is None or not gate.biases_sum:
        return None
    return input_bias if recurrent_bias is None else input_bias + recurrent_bias


def pre_activation_at_zero(
    gates: tuple[Gate, ...], gate: Gate, biases: Biases, hidden_size: int
) -> np.ndarray:
    """What the gate's nonlinearity sees per unit for zero input and zero state: its effective bias,
    except a gate that scales its recurrent bias by the reset gate, `b_in + r * b_hn` with
    `r = sigmoid(effective reset bias)`. Zeros for a cell without biases."""
    input_bias, recurrent_bias = biases[gate.name]
    if input_bias is None:
        return np.zeros(hidden_size)
    if gate.biases_sum:
        summed = effective_bias(gate, input_bias, recurrent_bias)
        assert summed is not None
        return summed
    reset = find_gate(gates, RESET)
    assert reset is not None and recurrent_bias is not None
    reset_bias = effective_bias(reset, *biases[reset.name])
    return input_bias + activate_array("sigmoid", reset_bias) * recurrent_bias


def activate_array(activation: str, values: np.ndarray) -> np.ndarray:
    """The gate's outputs for the pre-activations `values` (a sigmoid that never overflows)."""
    values = np.asarray(values, dtype=np.float64)
    if activation == "sigmoid":
        with np.errstate(over="ignore"):
            positive = 1.0 / (1.0 + np.exp(-np.abs(values)))
        return np.where(values >= 0, positive, 1.0 - positive)
    if activation == "relu":
        return np.maximum(values, 0.0)
    return np.tanh(values)


def activate(activation: str, value: float) -> float:
    """The gate's output for a pre-activation `value` (its opening at zero input and state)."""
    return float(activate_array(activation, np.float64(value)))
