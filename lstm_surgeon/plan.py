"""An edit is data: a plan of (tensor, slice, new values) that is previewed, printed as JSON, then applied.

`--dry-run`, the preview table, `--json` and the write all consume the same `EditPlan`, so what is shown
is what is written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lstm_surgeon.stats import Summary


@dataclass(frozen=True)
class SliceEdit:
    """New values for rows (and optionally some columns) of one tensor."""

    tensor: str
    layer: str
    cell_layer: int
    direction: str
    parameter: str  # bias_ih, bias_hh or weight_ih
    gate: str | None  # the gate whose rows these are; None when the edit spans every gate
    rows: tuple[int, int]  # [start, stop) along dimension 0
    columns: tuple[int, ...] | None  # the columns of a 2-D tensor; None for a 1-D bias
    new_raw: np.ndarray  # the new elements, already rounded to the tensor's dtype (storage form)
    before: Summary
    after: Summary
    changes_anything: bool  # False when every new element equals the old one bit for bit

    def to_dict(self) -> dict[str, Any]:
        return {
            "tensor": self.tensor,
            "layer": self.layer,
            "cell": {"layer": self.cell_layer, "direction": self.direction},
            "parameter": self.parameter,
            "gate": self.gate,
            "rows": list(self.rows),
            "columns": None if self.columns is None else list(self.columns),
            "before": self.before.to_dict(),
            "after": self.after.to_dict(),
            "changed": self.changes_anything,
        }


@dataclass(frozen=True)
class TensorAddition:
    """A new tensor (zeros) placed right after `after` in the file and in its container."""

    tensor: str
    layer: str
    dtype: str
    shape: tuple[int, ...]
    after: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "tensor": self.tensor,
            "layer": self.layer,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "after": self.after,
        }


@dataclass(frozen=True)
class TensorRemoval:
    tensor: str
    layer: str

    def to_dict(self) -> dict[str, Any]:
        return {"tensor": self.tensor, "layer": self.layer}


@dataclass(frozen=True)
class GateEffect:
    """What a gate sees before and after the edit: the effective bias (b_ih + b_hh) of one cell."""

    layer: str
    cell_layer: int
    direction: str
    gate: str
    before: Summary | None
    after: Summary | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "cell": {"layer": self.cell_layer, "direction": self.direction},
            "gate": self.gate,
            "effective_before": None if self.before is None else self.before.to_dict(),
            "effective_after": None if self.after is None else self.after.to_dict(),
        }


@dataclass
class EditPlan:
    """Everything one command will change, and what it decided not to touch and why."""

    command: str
    source: Path
    edits: list[SliceEdit] = field(default_factory=list)
    additions: list[TensorAddition] = field(default_factory=list)
    removals: list[TensorRemoval] = field(default_factory=list)
    effects: list[GateEffect] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # "gru: GRU has no forget gate"
    notes: list[str] = field(default_factory=list)
    drop_optimizer_state: bool = False

    @property
    def changes_structure(self) -> bool:
        return bool(self.additions or self.removals or self.drop_optimizer_state)

    @property
    def changes_anything(self) -> bool:
        return self.changes_structure or any(edit.changes_anything for edit in self.edits)

    def to_dict(self) -> dict[str, Any]:
        return {
            "command": self.command,
            "source": str(self.source),
            "changes_structure": self.changes_structure,
            "changes_anything": self.changes_anything,
            "edits": [edit.to_dict() for edit in self.edits],
            "additions": [addition.to_dict() for addition in self.additions],
            "removals": [removal.to_dict() for removal in self.removals],
            "effects": [effect.to_dict() for effect in self.effects],
            "skipped": list(self.skipped),
            "notes": list(self.notes),
            "drop_optimizer_state": self.drop_optimizer_state,
        }
