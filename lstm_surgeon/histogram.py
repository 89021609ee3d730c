"""Histograms of per-unit gate biases: what `inspect --hist` and `diff --hist` draw.

Mean, min and max hide what people look for (a forget gate initialised to 1 that stayed there, a
spread, a few saturated units). A histogram per gate row shows it, and every row of one table shares
one value range, so rows compare at a glance: a narrow peak in one row and a wide spread in another
are drawn against the same axis. Counts, not drawings, are the record: the terminal and the JSON are
both rendered from `Histogram`.

Only finite values are counted (NaN and infinities have no place on an axis; `check` reports them),
so the counts add up to the hidden size of a healthy cell.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lstm_surgeon.checkpoint import Checkpoint
from lstm_surgeon.gates import effective_bias
from lstm_surgeon.layers import Cell, RecurrentLayer

BINS = 16  # characters per histogram: narrow enough for a table row beside the statistics
BLOCKS = "▁▂▃▄▅▆▇█"  # eight heights, lowest first
ASCII_LEVELS = ".:-=+*#@"  # the same eight heights for a stdout that cannot encode blocks
EMPTY_BIN = " "

ValueRange = tuple[float, float]


@dataclass(frozen=True)
class Histogram:
    """Counts of values per bin; `edges` has one more entry than `counts` (numpy's convention:
    bins are half-open, the last one closed)."""

    edges: tuple[float, ...]
    counts: tuple[int, ...]

    @property
    def value_range(self) -> ValueRange:
        return self.edges[0], self.edges[-1]

    def to_dict(self) -> dict[str, Any]:
        return {"edges": list(self.edges), "counts": list(self.counts)}


def finite(values: np.ndarray) -> np.ndarray:
    return values[np.isfinite(values)]


def shared_range(arrays: Iterable[np.ndarray | None]) -> ValueRange:
    """The smallest range holding every finite value of `arrays`; one value alone (a gate set to
    exactly 1.0 everywhere) gets numpy's unit-wide range around it, so it sits in a middle bin."""
    kept = [finite(array) for array in arrays if array is not None]
    values = np.concatenate(kept) if kept else np.empty(0)
    if values.size == 0:
        return -0.5, 0.5
    low, high = float(values.min()), float(values.max())
    if low == high:
        return low - 0.5, high + 0.5
    return low, high


def histogram_of(values: np.ndarray, value_range: ValueRange, bins: int = BINS) -> Histogram:
    """The histogram of the finite `values` over `value_range` (which holds them all)."""
    counts, edges = np.histogram(finite(values), bins=bins, range=value_range)
    return Histogram(tuple(float(edge) for edge in edges), tuple(int(count) for count in counts))


def histograms_over_one_range(
    arrays: Sequence[np.ndarray | None], bins: int = BINS
) -> tuple[ValueRange, list[Histogram | None]]:
    """Histograms of several arrays (None stays None) over the one range that holds them all, so
    they can be drawn one above the other and compared bin for bin."""
    value_range = shared_range(arrays)
    return value_range, [
        None if values is None else histogram_of(values, value_range, bins) for values in arrays
    ]


def bars(counts: Iterable[int], peak: int, levels: str = BLOCKS) -> str:
    """One character per bin, its height proportional to the count (`peak` is the full height);
    an empty bin is blank and a non-empty one is never lower than the lowest level, so a single
    saturated unit stays visible."""
    return "".join(
        EMPTY_BIN if count == 0 else levels[max(1, round(count / peak * len(levels))) - 1]
        for count in counts
    )


@dataclass(frozen=True)
class GateHistograms:
    """One gate's histograms: of the bias it sees, or (a gate that scales its recurrent bias by the
    reset gate, GRU's new gate) of its two biases separately, since their sum is no bias it sees."""

    gate: str
    effective: Histogram | None
    bias_ih: Histogram | None = None
    bias_hh: Histogram | None = None

    def drawn(self) -> tuple[tuple[str, Histogram], ...]:
        """The histograms to draw, each with the label that says what it counts ("" for the
        effective bias, which the table's heading names)."""
        labelled = (("", self.effective), ("b_in", self.bias_ih), ("b_hn", self.bias_hh))
        return tuple((label, hist) for label, hist in labelled if hist is not None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "histogram": _optional_dict(self.effective),
            "histogram_ih": _optional_dict(self.bias_ih),
            "histogram_hh": _optional_dict(self.bias_hh),
        }


@dataclass(frozen=True)
class CellHistograms:
    """Every gate of one cell over one shared range, in as many bins."""

    value_range: ValueRange
    bins: int
    gates: tuple[GateHistograms, ...]

    @property
    def peak(self) -> int:
        """The largest count of any bin: the full height, shared by every row of the table."""
        return max((max(h.counts) for g in self.gates for _, h in g.drawn()), default=0) or 1


def _optional_dict(histogram: Histogram | None) -> dict[str, Any] | None:
    return None if histogram is None else histogram.to_dict()


def cell_histograms(
    checkpoint: Checkpoint, layer: RecurrentLayer, cell: Cell, bins: int = BINS
) -> CellHistograms:
    """Histograms of every gate of `cell` over one range (reads only its bias tensors)."""
    arrays: list[np.ndarray | None] = []  # three per gate: the bias it sees, b_in, b_hn
    for gate in layer.gates:
        ih, hh = cell.bias_values(checkpoint, gate)
        separate = (None, None) if gate.biases_sum else (ih, hh)
        arrays.extend((effective_bias(gate, ih, hh), *separate))
    value_range, drawn = histograms_over_one_range(arrays, bins)
    gates = tuple(
        GateHistograms(gate.name, *drawn[3 * index : 3 * index + 3])
        for index, gate in enumerate(layer.gates)
    )
    return CellHistograms(value_range, bins, gates)
