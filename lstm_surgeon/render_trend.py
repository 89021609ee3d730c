"""Terminal line charts for `trend`: one small chart per followed bias, checkpoints left to right.

Each column is a checkpoint (or, for a run longer than the terminal is wide, the average of a few
neighbouring ones): a dot at the mean over the hidden units and a bar from the 10th to the 90th
percentile. Glyphs are chosen when the chart is drawn: box-drawing characters, or ASCII when the
console cannot encode them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console, ConsoleOptions, RenderResult
from rich.text import Text

from lstm_surgeon.histogram import ValueRange, shared_range
from lstm_surgeon.output import clean
from lstm_surgeon.trend import ORDER_EPOCH, ORDER_NAME, Series, Trend

HEIGHT = 6  # rows per chart
LABEL_WIDTH = 10  # the value labels left of the axis
MAX_SPACING = 6  # columns per checkpoint, at most (a short run is spread out, not stretched)
ORDER_NOTES = {
    ORDER_NAME: "by file name, in natural order (not every checkpoint stores a step or an epoch)",
    ORDER_EPOCH: "by the epoch each checkpoint stores",
}
STEP_NOTE = "by the step each checkpoint stores (global_step or step)"


@dataclass(frozen=True)
class Glyphs:
    mean: str
    band: str
    tick: str
    rule: str
    corner: str
    line: str


BOX_GLYPHS = Glyphs(mean="●", band="│", tick="┤", rule="│", corner="└", line="─")
ASCII_GLYPHS = Glyphs(mean="o", band="|", tick="+", rule="|", corner="+", line="-")


@dataclass(frozen=True)
class _Column:
    """What one chart column shows: the mean, and the band from p10 to p90 (NaN: nothing)."""

    mean: float
    low: float
    high: float


def _nan(values: Sequence[float | None]) -> np.ndarray:
    return np.array([math.nan if value is None else value for value in values], dtype=np.float64)


def _columns(series: Series, count: int) -> list[_Column]:
    """`count` columns: one per checkpoint, or runs of neighbours averaged (the band spans the
    widest of them) when there are more checkpoints than columns."""
    means, lows, highs = _nan(series.mean), _nan(series.p10), _nan(series.p90)
    columns = []
    for run in np.array_split(np.arange(len(means)), count):
        finite = run[np.isfinite(means[run])]
        if finite.size == 0:
            columns.append(_Column(math.nan, math.nan, math.nan))
            continue
        columns.append(
            _Column(
                float(means[finite].mean()),
                float(np.nanmin(lows[finite])),
                float(np.nanmax(highs[finite])),
            )
        )
    return columns


def _row(value: float, value_range: ValueRange) -> int:
    """The chart row of `value`, 0 at the bottom."""
    low, high = value_range
    return round((value - low) / (high - low) * (HEIGHT - 1))


def _grid(columns: list[_Column], spacing: int, glyphs: Glyphs) -> tuple[list[str], ValueRange]:
    """The chart's rows, top first, and the value range they span."""
    value_range = shared_range(
        [np.array([c.low for c in columns]), np.array([c.high for c in columns])]
    )
    grid = [[" "] * (len(columns) * spacing) for _ in range(HEIGHT)]
    for index, column in enumerate(columns):
        if math.isnan(column.mean):
            continue
        x = index * spacing
        bottom, top = _row(column.low, value_range), _row(column.high, value_range)
        for row in range(bottom, top + 1):
            grid[row][x] = glyphs.band
        grid[_row(column.mean, value_range)][x] = glyphs.mean
    return ["".join(row).rstrip() for row in reversed(grid)], value_range


def _point_label(trend: Trend, index: int) -> str:
    point = trend.checkpoints[index]
    if point.step is None:
        return clean(Path(point.path).name)
    return f"{'epoch' if trend.order == ORDER_EPOCH else 'step'} {point.step}"


def _title(series: Series) -> Text:
    key = series.key
    title = Text(f"{clean(key.layer) or '(root)'} [{key.cell_layer} {key.direction}]", "bold cyan")
    title.append(f"  {key.label}", style="bold")
    drawn = [value for value in series.mean if value is not None]
    if drawn:
        title.append(f"  mean: first {drawn[0]:+.3f}, last {drawn[-1]:+.3f}")
    return title


def chart_columns(checkpoints: int, width: int) -> int:
    """How many columns a chart `width` characters wide gives the run: one per checkpoint, or as
    many as fit (each then the average of neighbours)."""
    return min(checkpoints, max(1, width - LABEL_WIDTH - 3))


def series_chart(trend: Trend, series: Series, width: int, glyphs: Glyphs) -> Iterator[Text]:
    """The lines of one series' chart, at most `width` characters wide."""
    count = chart_columns(len(trend.checkpoints), width)
    room = max(1, width - LABEL_WIDTH - 3)
    spacing = max(1, min(MAX_SPACING, room // count))
    rows, (low, high) = _grid(_columns(series, count), spacing, glyphs)
    yield _title(series)
    for index, row in enumerate(rows):
        label = {0: f"{high:+.3f}", HEIGHT - 1: f"{low:+.3f}"}.get(index, "")
        axis = glyphs.tick if label else glyphs.rule
        yield Text(f"{label.rjust(LABEL_WIDTH)} {axis} {row}".rstrip())
    plot_width = (count - 1) * spacing + 1
    yield Text(" " * (LABEL_WIDTH + 1) + glyphs.corner + glyphs.line * (plot_width + 1))
    yield Text(" " * (LABEL_WIDTH + 3) + _axis_labels(trend, plot_width), style="dim")


def _axis_labels(trend: Trend, plot_width: int) -> str:
    """The first and last checkpoints' labels under the chart's ends."""
    first, last = _point_label(trend, 0), _point_label(trend, len(trend.checkpoints) - 1)
    if len(trend.checkpoints) == 1:
        return first
    gap = plot_width - len(first) - len(last)
    return f"{first}{' ' * gap}{last}" if gap >= 2 else f"{first} ... {last}"


class TrendView:
    """Every series' chart and a legend, drawn for the console's width and encoding."""

    def __init__(self, trend: Trend) -> None:
        self.trend = trend

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        glyphs = ASCII_GLYPHS if options.ascii_only else BOX_GLYPHS
        for series in self.trend.series:
            yield from series_chart(self.trend, series, options.max_width, glyphs)
            yield Text()
        checkpoints = len(self.trend.checkpoints)
        columns = chart_columns(checkpoints, options.max_width)
        averaged = (
            f" (a column averages {checkpoints / columns:.1f})" if columns < checkpoints else ""
        )
        yield Text(
            f"{glyphs.mean} mean over the units, {glyphs.band} 10th to 90th percentile; "
            f"{checkpoints} checkpoints{averaged} in order "
            f"{ORDER_NOTES.get(self.trend.order, STEP_NOTE)}",
            style="dim",
        )
