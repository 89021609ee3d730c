"""An edit is data: a plan of (tensor, slice, new values) that is previewed, printed as JSON, then applied.

`--dry-run`, the preview table, `--json` and the write all consume the same `EditPlan`, so what is shown
is what is written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lstm_surgeon.layers import Region
from lstm_surgeon.stats import Summary


@dataclass(frozen=True)
class SliceEdit:
    """New values for one region of one tensor (a gate's biases, a weight's input columns, ...)."""

    region: Region
    layer: str
    cell_layer: int
    direction: str
    parameter: str  # the role: bias_ih, bias_hh or weight_ih
    gate: str | None  # the gate whose part this is; None when the edit spans every gate
    new_raw: np.ndarray  # the new elements as `tensor[region index]` holds them, in storage form
    before: Summary
    after: Summary
    changes_anything: bool  # False when every new element equals the old one bit for bit

    @property
    def tensor(self) -> str:
        return self.region.tensor.name

    @property
    def rows(self) -> tuple[int, int]:
        """The span of hidden-unit positions along the tensor's gate axis."""
        return self.region.units.start, self.region.units.stop

    @property
    def columns(self) -> tuple[int, ...] | None:
        """The input features edited (None: every one, or a bias)."""
        return self.region.inputs

    def write_into(self, array: np.ndarray) -> None:
        """Write the new elements into `array`, the edited tensor's elements (or a copy of them)."""
        array[self.region.numpy_index()] = self.new_raw

    def to_dict(self) -> dict[str, Any]:
        return {
            "tensor": self.tensor,
            "layer": self.layer,
            "cell": {"layer": self.cell_layer, "direction": self.direction},
            "parameter": self.parameter,
            "gate": self.gate,
            "rows": list(self.rows),
            "columns": None if self.columns is None else list(self.columns),
            "index": self.region.index_to_json(),
            "before": self.before.to_dict(),
            "after": self.after.to_dict(),
            "changed": self.changes_anything,
        }


def edited_copy(raw: np.ndarray, edits: list[SliceEdit]) -> np.ndarray:
    """A copy of a tensor's stored elements with every edit of that tensor written into it."""
    array = np.array(raw)
    for edit in edits:
        edit.write_into(array)
    return array


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
    """What a gate sees before and after the edit: the effective bias of one cell's gate."""

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
