"""The words users and the library share: edit modes and cell directions, declared once.

The command line offers exactly these choices and the library accepts exactly these values, so the two
cannot drift apart. This module imports nothing heavy: `lstm-surgeon --help` reads it.
"""

from __future__ import annotations

from typing import Literal, get_args

Mode = Literal["effective", "both", "ih", "hh", "add"]
"""How a value V reaches a gate: effective (b_ih=V, b_hh=0), both (b_ih=b_hh=V), ih, hh, add (b_ih += V)."""

MODES: tuple[Mode, ...] = get_args(Mode)

Direction = Literal["forward", "reverse"]
"""Which direction of a bidirectional layer a cell runs in (a one-directional layer is forward)."""

FORWARD: Direction = "forward"
REVERSE: Direction = "reverse"
DIRECTIONS: tuple[Direction, ...] = get_args(Direction)

RecurrentActivation = Literal["sigmoid", "hard_sigmoid"]
"""The gate activation a Keras file without a model config is assumed to use (`hard_sigmoid` was
Keras's default before 2.3)."""
