"""The edits people came for, as planners: each returns an `EditPlan` and changes nothing itself.

How a bias value reaches a gate (`mode`), where a layout stores two biases per gate:
- `effective` (default): b_ih = V, b_hh = 0; the gate sees exactly V (for GRU's new gate too, where
  b_hn is scaled by the reset gate: with b_hn = 0 the gate sees V whatever r is);
- `both`: b_ih = b_hh = V, the popular recipe; the gate sees 2V;
- `ih` / `hh`: only that bias is set to V;
- `add`: b_ih += V, which shifts the effective bias by V.
Where a layout stores one bias per gate, `effective` sets it to V and `add` adds V to it; `both`, `ih`
and `hh` name a second bias that is not there, and are refused. Planners find a gate's biases through
the layer's regions (`layers.Region`) and never slice a tensor themselves. New values are computed in
the precision torch uses for the tensor's dtype and rounded as torch rounds.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from lstm_surgeon.checkpoint import Checkpoint, TensorRef
from lstm_surgeon.discovery import discover, nothing_selected, select_layers
from lstm_surgeon.dtypes import EDITABLE, compute_dtype, round_to, widen
from lstm_surgeon.errors import EditError
from lstm_surgeon.gates import Gate, check_gate_name, effective_bias, find_gate
from lstm_surgeon.layers import (
    BIAS_HH,
    BIAS_IH,
    BIAS_ROLES,
    WEIGHT_IH,
    Cell,
    RecurrentLayer,
    Region,
)
from lstm_surgeon.layouts import layout_for
from lstm_surgeon.plan import (
    EditPlan,
    GateEffect,
    SliceEdit,
    TensorAddition,
    TensorRemoval,
    edited_copy,
)
from lstm_surgeon.sharing import shared_bytes_notes
from lstm_surgeon.stats import Summary
from lstm_surgeon.vocabulary import MODES


@dataclass(frozen=True)
class Selection:
    """Which layers, sub-layers and directions an edit touches (empty means all)."""

    layer_globs: tuple[str, ...] = ()
    sublayers: tuple[int, ...] = ()
    directions: tuple[str, ...] = ()

    def cells(self, layer: RecurrentLayer) -> list[Cell]:
        return [
            cell
            for cell in layer.cells
            if (not self.sublayers or cell.layer in self.sublayers)
            and (not self.directions or cell.direction in self.directions)
        ]

    @property
    def picks_cells(self) -> bool:
        return bool(self.sublayers or self.directions)


# --- Planners ---------------------------------------------------------------------------------


def plan_set_gate_bias(
    checkpoint: Checkpoint,
    gate: str,
    value: float,
    mode: str = "effective",
    selection: Selection = Selection(),
    command: str = "set-gate-bias",
) -> EditPlan:
    """Set one gate's bias to `value` in every selected layer that has that gate."""
    gate_name = check_gate_name(gate)
    _check_mode(mode)
    plan = EditPlan(command, checkpoint.path)
    for layer, cells in _selected(checkpoint, selection, plan, gate_name, needs_bias=True):
        target = find_gate(layer.gates, gate_name)
        assert target is not None
        for cell in cells:
            values = np.full(layer.hidden_size, value, dtype=np.float64)
            plan.edits += _bias_edits(checkpoint, layer, cell, target, values, mode)
    return _finish(checkpoint, plan)


def plan_set_forget_bias(
    checkpoint: Checkpoint,
    value: float = 1.0,
    mode: str = "effective",
    selection: Selection = Selection(),
) -> EditPlan:
    """The forget-gate bias of every selected LSTM (Gers 2000; Jozefowicz et al. 2015 suggest 1)."""
    return plan_set_gate_bias(checkpoint, "forget", value, mode, selection, "set-forget-bias")


def plan_chrono(
    checkpoint: Checkpoint,
    t_max: float,
    seed: int | None = None,
    mode: str = "effective",
    selection: Selection = Selection(),
) -> EditPlan:  # `mode` is taken only to refuse anything but "effective" with a clear message
    """Chrono initialisation (Tallec & Ollivier 2018): b_f ~ log(U(1, T_max - 1)) per unit, b_i = -b_f.

    The draw is the *effective* bias; each unit of each cell is drawn independently."""
    if t_max <= 2:
        raise EditError(f"--chrono T_MAX must be greater than 2 (got {t_max:g})")
    if mode != "effective":
        raise EditError(f"--chrono draws the effective bias; --mode {mode} would distort the draw")
    rng = np.random.default_rng(seed)
    plan = EditPlan("set-forget-bias", checkpoint.path)
    for layer, cells in _selected(checkpoint, selection, plan, "forget", needs_bias=True):
        forget, input_gate = find_gate(layer.gates, "forget"), find_gate(layer.gates, "input")
        assert forget is not None and input_gate is not None
        for cell in cells:
            draw = np.log(rng.uniform(1.0, t_max - 1.0, size=layer.hidden_size))
            plan.edits += _bias_edits(checkpoint, layer, cell, forget, draw, "effective")
            plan.edits += _bias_edits(checkpoint, layer, cell, input_gate, -draw, "effective")
    return _finish(checkpoint, plan)


def plan_zero_bias(
    checkpoint: Checkpoint,
    gates: Sequence[str] = (),
    drop: bool = False,
    selection: Selection = Selection(),
    drop_optimizer_state: bool = False,
) -> EditPlan:
    """Zero the biases (of some gates), or drop the bias tensors to fit `bias=False` modules."""
    if drop and (gates or selection.picks_cells):
        raise EditError(
            "--drop removes whole bias tensors; it cannot be combined with --gate, "
            "--sublayer or --direction"
        )
    names = [check_gate_name(gate) for gate in gates]
    plan = EditPlan(
        "zero-bias",
        checkpoint.path,
        drop_optimizer_state=drop_optimizer_state and checkpoint.has_optimizer_state,
    )
    for layer, cells in _selected(checkpoint, selection, plan, *names, need_all=False):
        if not layer.bias:
            plan.skipped.append(f"{layer.display_name}: has no bias tensors")
            continue
        if drop:
            plan.removals += _bias_removals(layer)
            continue
        wanted = [g for g in layer.gates if not names or g.name in names]
        for cell in cells:
            for gate in wanted:
                zeros = np.zeros(layer.hidden_size)
                plan.edits += _bias_edits(checkpoint, layer, cell, gate, zeros, "effective")
    return _finish(checkpoint, plan)


def plan_add_bias(
    checkpoint: Checkpoint, selection: Selection = Selection(), drop_optimizer_state: bool = False
) -> EditPlan:
    """Give `bias=False` layers zero biases so they load into `bias=True` modules."""
    plan = EditPlan(
        "add-bias",
        checkpoint.path,
        drop_optimizer_state=drop_optimizer_state and checkpoint.has_optimizer_state,
    )
    for layer, _ in _selected(checkpoint, selection, plan):
        if layer.bias:
            plan.skipped.append(f"{layer.display_name}: already has biases")
            continue
        layout = layout_for(layer.framework)
        for cell in layer.cells:
            plan.additions += [
                TensorAddition(new.name, layer.name, layer.dtype, new.shape, new.after)
                for new in layout.missing_biases(layer, cell)
            ]
    return _finish(checkpoint, plan)


def plan_zero_input(
    checkpoint: Checkpoint,
    features: Sequence[int],
    selection: Selection = Selection(),
) -> EditPlan:
    """Zero input columns of sub-layer 0's `weight_ih` (every direction): the model ignores them."""
    if not features:
        raise EditError("--features needs at least one input feature index")
    plan = EditPlan("zero-input", checkpoint.path)
    columns = tuple(sorted(set(features)))
    for layer, cells in _selected(checkpoint, selection, plan, input_features=max(columns) + 1):
        for cell in cells:
            if cell.layer == 0:
                plan.edits.append(_zero_columns(checkpoint, layer, cell, columns))
    return _finish(checkpoint, plan)


def parse_features(text: str) -> list[int]:
    """`"2,5,7-9"` as [2, 5, 7, 8, 9]."""
    indices: list[int] = []
    try:
        for part in filter(None, (piece.strip() for piece in text.split(","))):
            first, _, last = part.partition("-")
            start, stop = int(first), int(last or first)
            if start < 0 or stop < start:
                raise ValueError(part)
            indices.extend(range(start, stop + 1))
    except ValueError:
        raise EditError(f"--features {text!r}: expected indices like 2,5 or 7-9") from None
    return indices


# --- Helpers ----------------------------------------------------------------------------------


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise EditError(f"unknown --mode {mode!r}; choose one of {', '.join(MODES)}")


def _selected(
    checkpoint: Checkpoint,
    selection: Selection,
    plan: EditPlan,
    *gates: str,
    need_all: bool = True,
    needs_bias: bool = False,
    input_features: int = 0,
) -> Iterable[tuple[RecurrentLayer, list[Cell]]]:
    """The selected layers that can take an edit, with their selected cells: layers that have
    every gate in `gates` (any of them, without `need_all`), biases if `needs_bias`, and at least
    `input_features` inputs.

    Layers skipped for lacking a gate or a sub-layer are recorded in the plan; selecting nothing
    at all is an error that lists what there is."""
    found = discover(checkpoint)
    layers = select_layers(found.layers, selection.layer_globs)
    if not layers:
        raise EditError(nothing_selected(found.layers, selection.layer_globs))
    chosen: list[tuple[RecurrentLayer, list[Cell]]] = []
    for layer in layers:
        missing = [gate for gate in gates if find_gate(layer.gates, gate) is None]
        if not need_all and len(missing) < len(gates):
            missing = []
        cells = selection.cells(layer)
        if missing:
            plan.skipped.append(f"{layer.display_name}: {layer.kind} has no {missing[0]} gate")
        elif needs_bias and not layer.bias:
            plan.skipped.append(
                f"{layer.display_name}: has no bias tensors (run `lstm-surgeon add-bias` first)"
            )
        elif layer.input_size < input_features:
            plan.skipped.append(
                f"{layer.display_name}: has {layer.input_size} input features, "
                f"not {input_features} (features count from 0)"
            )
        elif not cells:
            plan.skipped.append(
                f"{layer.display_name}: no sub-layer/direction matches the selection"
            )
        else:
            chosen.append((layer, cells))
    if not chosen:
        reasons = "; ".join(plan.skipped)
        raise EditError(f"no selected layer can take this edit ({reasons})")
    return chosen


def _bias_edits(
    checkpoint: Checkpoint,
    layer: RecurrentLayer,
    cell: Cell,
    gate: Gate,
    values: np.ndarray,
    mode: str,
) -> list[SliceEdit]:
    """The edits that give `gate` of `cell` the per-unit `values` under `mode`."""
    input_bias, recurrent_bias = (cell.region(role, gate.name) for role in BIAS_ROLES)
    assert input_bias is not None
    zeros = np.zeros_like(values)
    if recurrent_bias is None:  # one bias per gate: it is what the gate sees
        if mode not in ("effective", "add"):
            raise EditError(
                f"{layer.display_name}: stores one bias per gate; --mode {mode} needs two "
                "(use effective or add)"
            )
        targets = [(BIAS_IH, input_bias, values, mode == "add")]
    else:
        targets = {
            "effective": [
                (BIAS_IH, input_bias, values, False),
                (BIAS_HH, recurrent_bias, zeros, False),
            ],
            "both": [
                (BIAS_IH, input_bias, values, False),
                (BIAS_HH, recurrent_bias, values, False),
            ],
            "ih": [(BIAS_IH, input_bias, values, False)],
            "hh": [(BIAS_HH, recurrent_bias, values, False)],
            "add": [(BIAS_IH, input_bias, values, True)],
        }[mode]
    return [
        _region_edit(checkpoint, layer, cell, gate.name, role, region, new, add)
        for role, region, new, add in targets
    ]


def _region_edit(
    checkpoint: Checkpoint,
    layer: RecurrentLayer,
    cell: Cell,
    gate: str | None,
    role: str,
    region: Region,
    values: np.ndarray,
    add: bool,
) -> SliceEdit:
    """An edit giving `region` the canonical `values` (or adding them to it, with `add`)."""
    ref = region.tensor
    _require_editable(ref)
    old_raw = region.raw(checkpoint)
    opmath = compute_dtype(ref.dtype)
    _require_finite(values)
    with np.errstate(over="ignore"):
        new_raw = (
            _added(old_raw, values, ref) if add else round_to(values.astype(opmath), ref.dtype)
        )
    if not np.isfinite(widen(new_raw, ref.dtype)).all():
        raise EditError(f"{ref.name}: the new values overflow {ref.dtype.name}")
    return SliceEdit(
        region=region,
        layer=layer.name,
        cell_layer=cell.layer,
        direction=cell.direction,
        parameter=role,
        gate=gate,
        new_raw=np.ascontiguousarray(region.stored(new_raw)),
        before=_summary(old_raw, ref),
        after=_summary(new_raw, ref),
        changes_anything=not np.array_equal(
            np.ascontiguousarray(old_raw).view(np.uint8), new_raw.view(np.uint8)
        ),
    )


def _added(old_raw: np.ndarray, values: np.ndarray, ref: TensorRef) -> np.ndarray:
    """`old + values` as torch's `add_` computes it: the scalar is first cast to the tensor's dtype,
    the sum is computed in float32 (float64 for float64 tensors), then rounded to the dtype."""
    opmath = compute_dtype(ref.dtype)
    addend = widen(round_to(values.astype(opmath), ref.dtype), ref.dtype).astype(opmath)
    return round_to(widen(old_raw, ref.dtype).astype(opmath) + addend, ref.dtype)


def _zero_columns(
    checkpoint: Checkpoint, layer: RecurrentLayer, cell: Cell, columns: tuple[int, ...]
) -> SliceEdit:
    whole = cell.region(WEIGHT_IH)
    assert whole is not None
    region = whole.restricted_to_inputs(columns)
    zeros = np.zeros((len(region.units), len(columns)))
    return _region_edit(checkpoint, layer, cell, None, WEIGHT_IH, region, zeros, add=False)


def _require_finite(values: np.ndarray) -> None:
    if not np.isfinite(values).all():
        raise EditError("the bias value must be a finite number")


def _require_editable(ref: TensorRef) -> None:
    if ref.dtype.name not in EDITABLE:
        raise EditError(f"{ref.name}: cannot edit {ref.dtype.name} tensors")


def _summary(raw: np.ndarray, ref: TensorRef) -> Summary:
    summary = Summary.of(widen(np.asarray(raw), ref.dtype))
    assert summary is not None
    return summary


def _bias_removals(layer: RecurrentLayer) -> list[TensorRemoval]:
    """Every tensor holding a bias of the layer, once (a tensor may hold several cells' biases)."""
    names = {
        region.tensor.name: None
        for cell in layer.cells
        for role in BIAS_ROLES
        if (region := cell.region(role)) is not None
    }
    return [TensorRemoval(name, layer.name) for name in names]


# --- Finishing a plan: gate effects and notes -------------------------------------------------


def _finish(checkpoint: Checkpoint, plan: EditPlan) -> EditPlan:
    plan.effects = gate_effects(checkpoint, plan)
    plan.notes += shared_bytes_notes(checkpoint, plan)
    plan.notes += _optimizer_notes(checkpoint, plan)
    return plan


def gate_effects(checkpoint: Checkpoint, plan: EditPlan) -> list[GateEffect]:
    """The bias each gate sees before and after, for every (cell, gate) whose biases the plan edits."""
    layers = {layer.name: layer for layer in discover(checkpoint).layers}
    touched: dict[tuple[str, int, str, str], None] = {}
    for edit in plan.edits:
        if edit.gate is not None and edit.parameter in BIAS_ROLES:
            touched[(edit.layer, edit.cell_layer, edit.direction, edit.gate)] = None
    effects = []
    for layer_name, cell_layer, direction, gate_name in touched:
        layer = layers[layer_name]
        cell = next(c for c in layer.cells if (c.layer, c.direction) == (cell_layer, direction))
        gate = find_gate(layer.gates, gate_name)
        assert gate is not None
        before = _gate_sees(checkpoint, cell, gate, [])
        after = _gate_sees(checkpoint, cell, gate, plan.edits)
        effects.append(GateEffect(layer_name, cell_layer, direction, gate_name, before, after))
    return effects


def _gate_sees(
    checkpoint: Checkpoint, cell: Cell, gate: Gate, edits: list[SliceEdit]
) -> Summary | None:
    """The effective bias of `gate` once `edits` are applied (None for a gate that sums none)."""
    biases = []
    for role in BIAS_ROLES:
        region = cell.region(role, gate.name)
        if region is None:
            biases.append(None)
            continue
        ref = region.tensor
        mine = [edit for edit in edits if edit.tensor == ref.name]
        raw = region.raw_of(edited_copy(checkpoint.raw(ref), mine))
        biases.append(widen(raw, ref.dtype))
    effective = effective_bias(gate, *biases)
    return None if effective is None else Summary.of(effective)


def _optimizer_notes(checkpoint: Checkpoint, plan: EditPlan) -> list[str]:
    if not checkpoint.has_optimizer_state or not plan.changes_anything:
        return []
    if plan.changes_structure and plan.drop_optimizer_state:
        return ["the optimizer state is removed from the output (--drop-optimizer-state)"]
    if plan.additions or plan.removals:
        return [
            "the optimizer state no longer matches the parameters (it is indexed by parameter "
            "position); pass --drop-optimizer-state to remove it"
        ]
    return [
        "the optimizer state is unchanged: its moments for the edited tensors still reflect the old values"
    ]
