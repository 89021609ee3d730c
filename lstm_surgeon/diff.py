"""`diff` as a library call: what changed between two checkpoints, down to the gate of a cell.

Tensors are matched by dotted name, in either format or across formats (a `.pt` against a
`.safetensors`). Recurrent parameters (found by discovery on each side) are sliced by gate, because
"encoder.bias_ih_l0 changed" says little while "its forget gate changed" says what an edit did; for
biases the effective bias `b_ih + b_hh` before and after is what decides how open a gate starts
(GRU's new gate has none: `b_hn` is scaled by the reset gate).

Equality follows `numpy.isclose(a, b, rtol, atol, equal_nan=True)` on values widened to float64
(complex128 for complex tensors): `|a - b| <= atol + rtol * |b|`, relative to B's value. With the
default tolerances that is exact equality of *values*: NaN against NaN at the same position is
equal, and so are -0.0 and 0.0 (bit patterns are not compared). Integer tensors of the same dtype
are compared as stored when the comparison is exact, since float64 cannot hold every int64.

Memory stays bounded: tensors are compared one at a time, each in chunks of `CHUNK_ELEMENTS` read
from the memory-mapped files, and only tensors present on both sides are read at all.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lstm_surgeon.checkpoint import Checkpoint, TensorRef
from lstm_surgeon.discovery import Discovery, discover, select_layers
from lstm_surgeon.dtypes import DType, widen
from lstm_surgeon.errors import SurgeonError
from lstm_surgeon.gates import Gate, effective_bias
from lstm_surgeon.histogram import Histogram, histograms_over_one_range
from lstm_surgeon.layers import BIAS_HH, BIAS_IH, BIAS_ROLES, Cell, RecurrentLayer, Region
from lstm_surgeon.stats import Summary

# Elements compared at once: 1M float64 values are 8 MB per operand, so a chunk with its temporaries
# stays under ~60 MB whatever the tensor's size (and measured faster than larger chunks).
CHUNK_ELEMENTS = 1 << 20


class DiffError(SurgeonError):
    """The comparison cannot be made as asked (bad tolerance, clashing names, no matching layer)."""


@dataclass(frozen=True)
class GateDiff:
    """How much one gate's rows of a recurrent tensor moved."""

    gate: str
    max_abs_diff: float
    mean_abs_diff: float
    changed: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "gate": self.gate,
            "max_abs_diff": self.max_abs_diff,
            "mean_abs_diff": self.mean_abs_diff,
            "changed": self.changed,
        }


@dataclass(frozen=True)
class EffectiveBias:
    """One gate's effective bias `b_ih + b_hh` in A (before) and B (after); None where absent.

    `histograms` (when asked for) are before's and after's, over one range shared by every gate of
    the cell, so they can be drawn side by side and compared."""

    gate: str
    before: Summary | None
    after: Summary | None
    histograms: tuple[Histogram | None, Histogram | None] | None = None

    def to_dict(self) -> dict[str, Any]:
        entry = {
            "gate": self.gate,
            "before": None if self.before is None else self.before.to_dict(),
            "after": None if self.after is None else self.after.to_dict(),
        }
        if self.histograms is not None:
            entry["histogram"] = {
                side: None if histogram is None else histogram.to_dict()
                for side, histogram in zip(("before", "after"), self.histograms, strict=True)
            }
        return entry


@dataclass(frozen=True)
class CellId:
    """Which cell of a recurrent layer: sub-layer index and direction (0, forward for a `*Cell`)."""

    layer: int
    direction: str

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "direction": self.direction}


@dataclass(frozen=True)
class TensorDiff:
    """One tensor present on both sides that differs: in values, dtype or shape."""

    key: str
    max_abs_diff: float | None  # None when the shapes differ (no element-wise comparison)
    mean_abs_diff: float | None
    gates: tuple[str, ...] = ()  # the gates that changed; () for tensors without gates
    gate_diffs: tuple[GateDiff, ...] = ()  # every gate, changed or not
    effective: tuple[EffectiveBias, ...] = ()  # biases only: the changed gates that sum
    layer: str | None = None
    kind: str | None = None
    parameter: str | None = None  # "weight_ih", "bias_hh", ... for recurrent tensors
    cell: CellId | None = None
    dtype: tuple[str, str] | None = None  # (A's, B's) when they differ
    shape: tuple[tuple[int, ...], tuple[int, ...]] | None = None  # (A's, B's) when they differ

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "gates": list(self.gates),
            "max_abs_diff": self.max_abs_diff,
            "mean_abs_diff": self.mean_abs_diff,
            "layer": self.layer,
            "kind": self.kind,
            "parameter": self.parameter,
            "cell": None if self.cell is None else self.cell.to_dict(),
            "dtype": None if self.dtype is None else list(self.dtype),
            "shape": None if self.shape is None else [list(side) for side in self.shape],
            "gate_diffs": [gate.to_dict() for gate in self.gate_diffs],
            "effective": [entry.to_dict() for entry in self.effective],
        }


@dataclass(frozen=True)
class DiffResult:
    """Everything `diff` reports, as data: the table and the JSON are both rendered from this.

    Keys are as compared, that is after `strip_prefixes`; `changed` and `removed` follow A's order,
    `added` follows B's.
    """

    a: str
    b: str
    a_format: str
    b_format: str
    atol: float
    rtol: float
    added: tuple[str, ...]
    removed: tuple[str, ...]
    changed: tuple[TensorDiff, ...]
    unchanged_count: int
    warnings: tuple[str, ...] = field(default=())
    # Layers compared across frameworks, as (A's, B's); then added/removed name layers, not tensors.
    matched: tuple[tuple[str, str], ...] = ()

    @property
    def identical(self) -> bool:
        """True when both sides hold the same names, dtypes, shapes and values within tolerance."""
        return not (self.added or self.removed or self.changed)

    def to_dict(self) -> dict[str, Any]:
        return {
            "identical": self.identical,
            "a": self.a,
            "b": self.b,
            "a_format": self.a_format,
            "b_format": self.b_format,
            "atol": self.atol,
            "rtol": self.rtol,
            "added": list(self.added),
            "removed": list(self.removed),
            "changed": [entry.to_dict() for entry in self.changed],
            "unchanged_count": self.unchanged_count,
            "warnings": list(self.warnings),
            "matched": [{"a": a, "b": b} for a, b in self.matched],
        }


def normalize_prefixes(prefixes: Iterable[str]) -> tuple[str, ...]:
    """The prefixes as whole dotted components: `module` and `module.` both strip `module.`.

    Stripping half a component (`mod` from `module.lstm`) would only ever create false matches.
    """
    return tuple(p if p.endswith(".") else p + "." for p in prefixes if p.strip("."))


def strip_key(name: str, prefixes: Sequence[str]) -> str:
    """`name` without any of `prefixes` in front, repeatedly (DDP around torch.compile gives
    `module._orig_mod.`); a name that is nothing but a prefix is kept whole."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in prefixes:
            if name.startswith(prefix) and len(name) > len(prefix):
                name, stripped = name[len(prefix) :], True
    return name


def _names(checkpoint: Checkpoint, prefixes: Sequence[str]) -> dict[str, TensorRef]:
    """The checkpoint's tensors by compared name; two tensors may not end up with one name."""
    by_name: dict[str, TensorRef] = {}
    for original, ref in checkpoint.tensors.items():
        name = strip_key(original, prefixes)
        if name in by_name:
            raise DiffError(
                f"{checkpoint.path}: both {by_name[name].name!r} and {original!r} become "
                f"{name!r} once prefixes are stripped"
            )
        by_name[name] = ref
    return by_name


@dataclass(frozen=True)
class _Recurrent:
    """A recurrent parameter as found on one side: its gates' regions, and the regions of the
    biases each gate sees (to report what the gate sees before and after)."""

    layer: str  # compared (stripped) layer name
    kind: str
    parameter: str  # the role: weight_ih, bias_hh, ...
    cell: CellId
    gate_regions: tuple[tuple[Gate, Region], ...]  # () for parameters without gates
    bias_regions: dict[str, tuple[Region | None, Region | None]] = field(hash=False)


def _recurrent_params(
    found: Discovery, prefixes: Sequence[str], globs: Sequence[str]
) -> dict[str, tuple[_Recurrent, ...]]:
    """Every recurrent tensor of the layers that match `globs` (all when none), by compared name,
    with each (role, cell) it holds: one in PyTorch's layout, several where a layout packs
    directions or both biases into one tensor (ONNX's `B`)."""
    params: dict[str, tuple[_Recurrent, ...]] = {}
    for layer in found.layers:
        name = strip_key(layer.cells[0].tensors()[0].name, prefixes).rpartition(".")[0]
        if globs and not any(fnmatch.fnmatchcase(n, g) for n in (name, layer.name) for g in globs):
            continue
        for cell in layer.cells:
            for tensor, recurrent in _cell_params(layer, name, cell, prefixes):
                params[tensor] = (*params.get(tensor, ()), recurrent)
    return params


def _cell_params(
    layer: RecurrentLayer, name: str, cell: Cell, prefixes: Sequence[str]
) -> Iterator[tuple[str, _Recurrent]]:
    biases = {
        gate.name: (cell.region(BIAS_IH, gate.name), cell.region(BIAS_HH, gate.name))
        for gate in layer.gates
    }
    for (role, gate_name), whole in cell.regions.items():
        if gate_name is not None:
            continue
        gate_regions = tuple(
            (gate, region)
            for gate in layer.gates
            if (region := cell.region(role, gate.name)) is not None
        )
        recurrent = _Recurrent(
            name, layer.kind, role, CellId(cell.layer, cell.direction), gate_regions, biases
        )
        yield strip_key(whole.tensor.name, prefixes), recurrent


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float

    @property
    def exact(self) -> bool:
        return self.atol == 0 and self.rtol == 0

    def close(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.isclose(a, b, rtol=self.rtol, atol=self.atol, equal_nan=True)


@dataclass
class Running:
    """Running |a - b| statistics and the changed flag of one region, accumulated chunk by chunk."""

    count: int = 0
    total: float = 0.0
    largest: float = 0.0
    changed: bool = False

    def add(self, diff: np.ndarray, changed: bool) -> None:
        if diff.size:
            self.count += diff.size
            self.total += float(diff.sum())
            self.largest = float(np.maximum(self.largest, diff.max()))  # NaN propagates
        self.changed = self.changed or changed

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0


def _widened(raw: np.ndarray, dtype: DType) -> np.ndarray:
    """Exact values for comparison: float64, or complex128 for complex (float64 drops the imaginary
    part)."""
    if dtype.storage.kind == "c":
        return raw.astype(np.complex128)
    return widen(raw, dtype)


def _abs_diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|a - b|, zero where the values are equal (inf against inf, NaN against NaN)."""
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.abs(a - b).astype(np.float64, copy=False)
    diff[(a == b) | (np.isnan(a) & np.isnan(b))] = 0.0
    return diff


def compare_chunk(
    raw_a: np.ndarray, raw_b: np.ndarray, dtypes: tuple[DType, DType], tol: Tolerance
) -> tuple[np.ndarray, bool]:
    a, b = _widened(raw_a, dtypes[0]), _widened(raw_b, dtypes[1])
    if tol.exact and dtypes[0] == dtypes[1] and dtypes[0].storage.kind in "iub":
        changed = bool(np.any(raw_a != raw_b))  # int64 beyond 2**53 is not exact in float64
    else:
        changed = not bool(np.all(tol.close(a, b)))
    return _abs_diff(a, b), changed


def _compare_flat(
    flats: tuple[np.ndarray, np.ndarray], dtypes: tuple[DType, DType], tol: Tolerance
) -> Running:
    running = Running()
    for start in range(0, flats[0].size, CHUNK_ELEMENTS):
        stop = min(start + CHUNK_ELEMENTS, flats[0].size)
        diff, changed = compare_chunk(flats[0][start:stop], flats[1][start:stop], dtypes, tol)
        running.add(diff, changed)
    return running


def _region_flats(
    raws: tuple[np.ndarray, np.ndarray], region: Region
) -> tuple[np.ndarray, np.ndarray]:
    """One gate's elements on both sides, flat (a view of the file where the region is contiguous,
    as a PyTorch gate's rows are)."""
    return region.raw_of(raws[0]).reshape(-1), region.raw_of(raws[1]).reshape(-1)


def merge_running(parts: Iterable[Running]) -> Running:
    merged = Running()
    for part in parts:
        merged.count += part.count
        merged.total += part.total
        merged.largest = float(np.maximum(merged.largest, part.largest))
        merged.changed = merged.changed or part.changed
    return merged


@dataclass(frozen=True)
class _Side:
    """One checkpoint with its tensors by compared name."""

    checkpoint: Checkpoint
    names: dict[str, TensorRef]
    prefixes: tuple[str, ...]


@dataclass(frozen=True)
class _Pair:
    """One name present on both sides."""

    name: str
    a: TensorRef
    b: TensorRef
    infos: tuple[_Recurrent, ...]  # each (role, cell) the tensor holds; () for other tensors


def _compare_pair(
    pair: _Pair,
    sides: tuple[_Side, _Side],
    tol: Tolerance,
    progress: Callable[[int], None] | None = None,
    histograms: bool = False,
) -> list[TensorDiff]:
    """The tensor's differences: one entry per (role, cell) of it that changed, or one for the
    whole tensor; none when it is unchanged within tolerance."""
    a, b = pair.a, pair.b
    if progress is not None:
        progress(a.nbytes)
    dtype = (a.dtype.name, b.dtype.name) if a.dtype != b.dtype else None
    first = pair.infos[0] if pair.infos else None
    if a.shape != b.shape:
        return [_tensor_diff(pair, first, None, (), dtype, (a.shape, b.shape), ())]
    raws = (sides[0].checkpoint.raw(a), sides[1].checkpoint.raw(b))
    dtypes = (a.dtype, b.dtype)
    per_info = [
        (
            info,
            [(g, _compare_flat(_region_flats(raws, r), dtypes, tol)) for g, r in info.gate_regions],
        )
        for info in pair.infos
    ]
    compared = [running for _, per_gate in per_info for _, running in per_gate]
    covered = sum(running.count for running in compared) == a.numel
    whole = merge_running(compared) if covered else _compare_flat(_flats(raws), dtypes, tol)
    if not whole.changed and dtype is None:
        return []
    diffs = []
    for info, per_gate in per_info:
        total = merge_running(running for _, running in per_gate) if per_gate else whole
        if total.changed or (dtype is not None and info is first):
            gate_diffs = tuple(GateDiff(g.name, r.largest, r.mean, r.changed) for g, r in per_gate)
            changed_gates = [gate for gate, running in per_gate if running.changed]
            effective = _effective(info, sides, changed_gates, histograms)
            diffs.append(_tensor_diff(pair, info, total, gate_diffs, dtype, None, effective))
    return diffs or [_tensor_diff(pair, None, whole, (), dtype, None, ())]


def _flats(raws: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    return raws[0].reshape(-1), raws[1].reshape(-1)


def _tensor_diff(
    pair: _Pair,
    info: _Recurrent | None,
    total: Running | None,
    gate_diffs: tuple[GateDiff, ...],
    dtype: tuple[str, str] | None,
    shape: tuple[tuple[int, ...], tuple[int, ...]] | None,
    effective: tuple[EffectiveBias, ...],
) -> TensorDiff:
    return TensorDiff(
        key=pair.name,
        max_abs_diff=None if total is None else total.largest,
        mean_abs_diff=None if total is None else total.mean,
        gates=tuple(gate.gate for gate in gate_diffs if gate.changed),
        gate_diffs=gate_diffs,
        effective=effective,
        layer=None if info is None else info.layer,
        kind=None if info is None else info.kind,
        parameter=None if info is None else info.parameter,
        cell=None if info is None else info.cell,
        dtype=dtype,
        shape=shape,
    )


def _effective(
    info: _Recurrent | None, sides: tuple[_Side, _Side], gates: list[Gate], histograms: bool
) -> tuple[EffectiveBias, ...]:
    """What each changed gate sees before and after, for a changed bias (else nothing); with
    `histograms`, its distributions over the range of every summing gate of the cell on both sides
    (the same range for the cell's `b_ih` and `b_hh`, whichever of them changed)."""
    summing = [gate for gate in gates if gate.biases_sum]
    if info is None or info.parameter not in BIAS_ROLES or not summing:
        return ()
    seen = {
        gate.name: (_gate_sees(sides[0], info, gate), _gate_sees(sides[1], info, gate))
        for gate, _ in info.gate_regions
        if gate.biases_sum
    }
    drawn: dict[str, tuple[Histogram | None, Histogram | None]] = {}
    if histograms:
        _, flat = histograms_over_one_range([values for pair in seen.values() for values in pair])
        drawn = dict(zip(seen, zip(flat[0::2], flat[1::2], strict=True), strict=True))
    return tuple(
        EffectiveBias(gate.name, *map(_optional_summary, seen[gate.name]), drawn.get(gate.name))
        for gate in summing
    )


def _optional_summary(values: np.ndarray | None) -> Summary | None:
    return None if values is None else Summary.of(values)


def _gate_sees(side: _Side, info: _Recurrent, gate: Gate) -> np.ndarray | None:
    """The bias `gate` sees on one side, or None when a bias is missing or reshaped there."""
    values = []
    for region in info.bias_regions[gate.name]:
        if region is None:
            values.append(None)
            continue
        ref = side.names.get(strip_key(region.tensor.name, side.prefixes))
        if ref is None or ref.shape != region.tensor.shape:
            return None
        values.append(widen(region.raw_of(side.checkpoint.raw(ref)), ref.dtype))
    return effective_bias(gate, *values)


def _check_tolerance(name: str, value: float) -> float:
    if not math.isfinite(value) or value < 0:
        raise DiffError(f"{name} must be a finite number >= 0, not {value}")
    return float(value)


def _scope(params: dict[str, _Recurrent], globs: Sequence[str], names: Iterable[str]) -> list[str]:
    """The names to compare: all of them, or only those of the selected layers."""
    return [name for name in names if not globs or name in params]


def diff_checkpoints(
    a: Checkpoint,
    b: Checkpoint,
    *,
    atol: float = 0.0,
    rtol: float = 0.0,
    layer_globs: Iterable[str] = (),
    strip_prefixes: Iterable[str] = (),
    progress: Callable[[int], None] | None = None,
    histograms: bool = False,
    matches: Sequence[tuple[str, str]] = (),
) -> DiffResult:
    """Compare `b` against `a` tensor by tensor (see the module docstring for what "equal" means).

    `layer_globs` restricts the comparison to the tensors of the recurrent layers whose name (with
    or without the stripped prefix) matches a glob, on either side; `strip_prefixes` (`module.`,
    `_orig_mod.`, `state_dict.`) are removed from the front of every name on both sides, so a DDP
    or Lightning checkpoint can be compared with a plain state dict. `histograms` adds, for each
    changed gate bias, the distribution of what the gate sees before and after.

    Files whose recurrent layers come from different frameworks (or `matches`, pairs of layer
    names) are compared layer by layer instead (`layer_diff`).
    """
    tol = Tolerance(_check_tolerance("atol", atol), _check_tolerance("rtol", rtol))
    found = (discover(a), discover(b))
    if matches or _frameworks(found[0]) != _frameworks(found[1]):
        return _diff_by_layers(a, b, found, tol, list(layer_globs), matches)
    prefixes = normalize_prefixes(strip_prefixes)
    globs = list(layer_globs)
    names = (_names(a, prefixes), _names(b, prefixes))
    # A's reading of a parameter wins: it is the side the user compares against.
    params = _recurrent_params(found[1], prefixes, globs) | _recurrent_params(
        found[0], prefixes, globs
    )
    if globs and not params:
        raise DiffError(f"no recurrent layer matches {', '.join(globs)} in {a.path} or {b.path}")
    in_a, in_b = _scope(params, globs, names[0]), _scope(params, globs, names[1])
    shared = [name for name in in_a if name in names[1]]
    sides = (_Side(a, names[0], prefixes), _Side(b, names[1], prefixes))
    pairs = (_Pair(n, names[0][n], names[1][n], params.get(n, ())) for n in shared)
    changed = [d for p in pairs for d in _compare_pair(p, sides, tol, progress, histograms)]
    return DiffResult(
        a=str(a.path),
        b=str(b.path),
        a_format=a.format_name,
        b_format=b.format_name,
        atol=tol.atol,
        rtol=tol.rtol,
        added=tuple(name for name in in_b if name not in names[0]),
        removed=tuple(name for name in in_a if name not in names[1]),
        changed=tuple(changed),
        unchanged_count=len(shared) - len({entry.key for entry in changed}),
        warnings=tuple(_warnings(a, found[0]) + _warnings(b, found[1])),
    )


def _frameworks(found: Discovery) -> set[str]:
    return {layer.framework for layer in found.layers}


def _diff_by_layers(
    a: Checkpoint,
    b: Checkpoint,
    found: tuple[Discovery, Discovery],
    tol: Tolerance,
    globs: list[str],
    matches: Sequence[tuple[str, str]],
) -> DiffResult:
    from lstm_surgeon.layer_diff import diff_layers

    layers = (select_layers(found[0].layers, globs), select_layers(found[1].layers, globs))
    if globs and not (layers[0] or layers[1]):
        raise DiffError(f"no recurrent layer matches {', '.join(globs)} in {a.path} or {b.path}")
    comparison = diff_layers(a, b, layers, matches, tol)
    return DiffResult(
        a=str(a.path),
        b=str(b.path),
        a_format=a.format_name,
        b_format=b.format_name,
        atol=tol.atol,
        rtol=tol.rtol,
        added=comparison.added,
        removed=comparison.removed,
        changed=tuple(comparison.changed),
        unchanged_count=comparison.unchanged_count,
        warnings=tuple(_warnings(a, found[0]) + _warnings(b, found[1]) + comparison.warnings),
        matched=tuple((pair.a.name, pair.b.name) for pair in comparison.pairs),
    )


def _warnings(checkpoint: Checkpoint, found: Discovery) -> list[str]:
    return [f"{checkpoint.path}: {warning}" for warning in checkpoint.warnings + found.warnings]
