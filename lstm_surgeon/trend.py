"""`trend` as a library call: how each gate's bias moves across the checkpoints of a training run.

For every layer, cell and gate, the mean and the 10th and 90th percentiles over the hidden units of
the bias the gate sees (`gates.effective_bias`; GRU's new gate has none, so its `b_in` and `b_hn`
are followed separately), one value per checkpoint, in run order.

Run order is the training counter stored in the checkpoints when every file has one: the step
(`global_step`, else `step`), else the `epoch`; otherwise the natural order of the names (`ep2`
before `ep10`). The order says which was used, so a chart's axis can say it too.

Each file is opened on its own and only its recurrent bias tensors are read (through the memory
map): following a run of many large checkpoints costs a header parse and a few kilobytes per file,
not a `torch.load` each.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lstm_surgeon.checkpoint import Checkpoint
from lstm_surgeon.discovery import discover, require_selected
from lstm_surgeon.errors import SurgeonError
from lstm_surgeon.formats import open_checkpoint
from lstm_surgeon.gates import Gate, check_gate_name, effective_bias
from lstm_surgeon.layers import BIAS_HH, BIAS_IH, RecurrentLayer

ORDER_STEP, ORDER_EPOCH, ORDER_NAME = "step", "epoch", "name"
COUNTERS_BY_ORDER: dict[str, tuple[str, ...]] = {
    ORDER_STEP: ("global_step", "step"),  # the first one a file has is its step
    ORDER_EPOCH: ("epoch",),
}
EFFECTIVE = "effective"
SPLIT_BIAS_NAMES = {BIAS_IH: "b_in", BIAS_HH: "b_hn"}  # GRU's names for the new gate's two biases
PERCENTILES = (10, 90)


class TrendError(SurgeonError):
    """The run cannot be followed as asked (no gate to follow)."""


@dataclass(frozen=True)
class RunPoint:
    """One checkpoint of the run, in order: its path and the counter that placed it (None when
    the order is by name)."""

    path: str
    step: int | None

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "step": self.step}


@dataclass(frozen=True)
class RunOrder:
    """How the checkpoints were ordered: by "step", "epoch" or "name", and the input positions in
    that order with the counter of each."""

    order: str
    positions: tuple[int, ...]
    steps: tuple[int | None, ...]


@dataclass(frozen=True)
class SeriesKey:
    """What a series follows: one bias of one gate of one cell. `bias` is "effective" for a gate
    that sums its biases, "bias_ih" or "bias_hh" for one that does not (GRU's new gate)."""

    layer: str
    cell_layer: int
    direction: str
    gate: str
    bias: str = EFFECTIVE

    @property
    def label(self) -> str:
        """The gate's name, with which of its biases for a gate followed bias by bias."""
        return (
            self.gate if self.bias == EFFECTIVE else f"{self.gate} ({SPLIT_BIAS_NAMES[self.bias]})"
        )


@dataclass(frozen=True)
class Spread:
    """The mean and the 10th and 90th percentiles of a bias over the hidden units."""

    mean: float
    p10: float
    p90: float

    @classmethod
    def of(cls, values: np.ndarray) -> Spread:
        p10, p90 = np.percentile(values, PERCENTILES)
        return cls(float(values.mean()), float(p10), float(p90))


@dataclass(frozen=True)
class Series:
    """One bias followed across the run: a value per checkpoint, None where that checkpoint does
    not have it (a layer added or dropped during the run)."""

    key: SeriesKey
    mean: tuple[float | None, ...]
    p10: tuple[float | None, ...]
    p90: tuple[float | None, ...]

    def to_dict(self) -> dict[str, Any]:
        key = self.key
        return {
            "layer": key.layer,
            "cell": {"layer": key.cell_layer, "direction": key.direction},
            "gate": key.gate,
            "bias": key.bias,
            "mean": list(self.mean),
            "p10": list(self.p10),
            "p90": list(self.p90),
        }


@dataclass(frozen=True)
class Trend:
    """Everything `trend` reports, as data: the chart, the JSON and the plot come from this."""

    order: str
    checkpoints: tuple[RunPoint, ...]
    series: tuple[Series, ...]
    warnings: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        return {
            "order": self.order,
            "checkpoints": [point.to_dict() for point in self.checkpoints],
            "series": [series.to_dict() for series in self.series],
        }


@dataclass(frozen=True)
class _Reading:
    """What one checkpoint contributes: its counters and the spread of every followed bias."""

    path: str
    counters: dict[str, int]
    spreads: dict[SeriesKey, Spread]
    warnings: tuple[str, ...]


def natural_key(name: str) -> tuple[Any, ...]:
    """Sort key that orders runs of digits by their number: `ep2` before `ep10`."""
    parts = re.split(r"([0-9]+)", name)
    return (
        tuple(int(part) if index % 2 else part.casefold() for index, part in enumerate(parts)),
        name,
    )


def run_order(counted: Sequence[tuple[str, Mapping[str, int]]]) -> RunOrder:
    """The order of checkpoints given as (path, training counters): by step when every one has a
    step, else by epoch when every one has an epoch, else by natural name order; ties by name."""
    for order, names in COUNTERS_BY_ORDER.items():
        steps = [_first_counter(counters, names) for _, counters in counted]
        if all(step is not None for step in steps):
            positions = sorted(
                range(len(counted)), key=lambda i: (steps[i], natural_key(counted[i][0]))
            )
            return RunOrder(order, tuple(positions), tuple(steps[i] for i in positions))
    positions = sorted(range(len(counted)), key=lambda i: natural_key(counted[i][0]))
    return RunOrder(ORDER_NAME, tuple(positions), (None,) * len(counted))


def _first_counter(counters: Mapping[str, int], names: Iterable[str]) -> int | None:
    return next((counters[name] for name in names if name in counters), None)


def training_counters(checkpoint: Checkpoint) -> dict[str, int]:
    """The training counters the checkpoint stores as whole numbers: plain integers of its
    container (`Contents.counters`: Lightning's `epoch` and `global_step`, a training loop's
    `epoch`), and metadata strings that are whole numbers (`"global_step": "1200"` in a
    safetensors header)."""
    names = {name for counters in COUNTERS_BY_ORDER.values() for name in counters}
    from_metadata = {
        name: int(value)
        for name, value in (checkpoint.contents.metadata or {}).items()
        if name in names and re.fullmatch(r"[+-]?[0-9]+", value.strip())
    }
    return from_metadata | dict(checkpoint.contents.counters)


def _gate_biases(
    gate: Gate, input_bias: np.ndarray | None, recurrent_bias: np.ndarray | None
) -> list[tuple[str, np.ndarray]]:
    """The biases a series follows for this gate: the one it sees, or both apart when it does not
    sum them; none for a cell without biases."""
    seen = effective_bias(gate, input_bias, recurrent_bias)
    if seen is not None:
        return [(EFFECTIVE, seen)]
    pairs = ((BIAS_IH, input_bias), (BIAS_HH, recurrent_bias))
    return [(name, values) for name, values in pairs if values is not None and not gate.biases_sum]


def _layer_spreads(
    checkpoint: Checkpoint, layer: RecurrentLayer, gates: tuple[str, ...]
) -> dict[SeriesKey, Spread]:
    spreads = {}
    for cell in layer.cells:
        for gate in layer.gates:
            if gates and gate.name not in gates:
                continue
            for bias, values in _gate_biases(gate, *cell.bias_values(checkpoint, gate)):
                key = SeriesKey(layer.name, cell.layer, cell.direction, gate.name, bias)
                spreads[key] = Spread.of(values)
    return spreads


def _read(path: Path, gates: tuple[str, ...], layer_globs: Sequence[str]) -> _Reading:
    """One checkpoint's counters and spreads (it is closed before the next one is opened)."""
    with open_checkpoint(path) as checkpoint:
        found = discover(checkpoint)
        spreads: dict[SeriesKey, Spread] = {}
        for layer in require_selected(found.layers, layer_globs):
            spreads.update(_layer_spreads(checkpoint, layer, gates))
        warnings = tuple(f"{path}: {w}" for w in checkpoint.warnings + found.warnings)
        return _Reading(str(path), training_counters(checkpoint), spreads, warnings)


def _series(key: SeriesKey, readings: list[_Reading]) -> Series:
    spreads = [reading.spreads.get(key) for reading in readings]
    return Series(
        key,
        *(
            tuple(None if spread is None else getattr(spread, stat) for spread in spreads)
            for stat in ("mean", "p10", "p90")
        ),
    )


def follow_run(
    paths: Iterable[str | Path], gates: Iterable[str] = (), layer_globs: Iterable[str] = ()
) -> Trend:
    """Follow the gate biases of `paths` (the checkpoints of one run, in any order) across the
    run. `gates` (names or short names) and `layer_globs` narrow what is followed; a glob that
    matches no layer of a checkpoint is an error naming the layers there are."""
    wanted = tuple(check_gate_name(gate) for gate in gates)
    globs = list(layer_globs)
    readings = [_read(Path(path), wanted, globs) for path in paths]
    order = run_order([(reading.path, reading.counters) for reading in readings])
    ordered = [readings[position] for position in order.positions]
    keys = list(dict.fromkeys(key for reading in ordered for key in reading.spreads))
    if not keys:
        what = f"gate {', '.join(wanted)}" if wanted else "gate bias"
        raise TrendError(f"no {what} to follow in the selected layers")
    return Trend(
        order=order.order,
        checkpoints=tuple(
            RunPoint(reading.path, step) for reading, step in zip(ordered, order.steps, strict=True)
        ),
        series=tuple(_series(key, ordered) for key in keys),
        warnings=tuple(dict.fromkeys(w for reading in readings for w in reading.warnings)),
    )
