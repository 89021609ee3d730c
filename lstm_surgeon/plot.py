"""Figures of a training run's gate biases for reports: `trend --plot FILE.png|FILE.svg`.

matplotlib is an optional extra (`lstm-surgeon[plot]`): it is imported only here and only when a
figure is drawn, and its absence is a one-line error with the command that installs it. Figures are
drawn on a bare `Figure` with the Agg canvas, never through pyplot, so no window can open and no
global backend is changed.

One panel per cell (layer, sub-layer, direction), a line per followed bias at its mean over the
units and a shaded band from its 10th to its 90th percentile; the x axis is the step or epoch the
checkpoints store, or their position in name order.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lstm_surgeon.errors import SurgeonError
from lstm_surgeon.trend import ORDER_EPOCH, ORDER_NAME, Series, Trend
from lstm_surgeon.writing import atomic_output

DPI = 100  # pixels per inch: `--plot-size` is in pixels, a PNG gets exactly that many
FORMATS = {".png": "png", ".svg": "svg"}
SIZE_LIMITS = (100, 10_000)  # pixels per side
INSTALL_HINT = "pip install 'lstm-surgeon[plot]'"
X_LABELS = {ORDER_EPOCH: "epoch", ORDER_NAME: "checkpoint (file name order)"}


class PlotError(SurgeonError):
    """The figure cannot be drawn as asked (no matplotlib, unknown format, bad size)."""


@dataclass(frozen=True)
class PlotRequest:
    """Where a figure goes, in which format and at which size (pixels)."""

    path: Path
    format: str
    width: int
    height: int


def plot_request(path: Path, size: str) -> PlotRequest:
    """The checked request, made before any checkpoint is read: a typo in the suffix, the size or
    the folder, or a missing matplotlib, should not cost a pass over a whole run."""
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise PlotError(
            f"{path}: a plot is written as .png or .svg, not {path.suffix or 'no suffix'}"
        )
    match = re.fullmatch(r"\s*([0-9]+)\s*[xX×]\s*([0-9]+)\s*", size)
    low, high = SIZE_LIMITS
    if match is None or not all(low <= int(side) <= high for side in match.groups()):
        raise PlotError(f"plot size {size!r} must be WIDTHxHEIGHT in pixels, each {low} to {high}")
    if not path.parent.is_dir():
        raise PlotError(f"{path}: the folder {path.parent} does not exist")
    _matplotlib()
    return PlotRequest(path, fmt, int(match[1]), int(match[2]))


def _matplotlib() -> tuple[Any, Any]:
    """matplotlib's `Figure` and Agg canvas, or the error that says how to install them."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotError(f"writing a plot needs matplotlib: {INSTALL_HINT}") from None
    return Figure, FigureCanvasAgg


def _x_values(trend: Trend) -> list[float]:
    if trend.order == ORDER_NAME:
        return [float(index) for index in range(len(trend.checkpoints))]
    return [float(point.step) for point in trend.checkpoints]  # type: ignore[arg-type]


def _nan(values: tuple[float | None, ...]) -> list[float]:
    return [math.nan if value is None else value for value in values]


def _panels(trend: Trend) -> dict[tuple[str, int, str], list[Series]]:
    """The series grouped by cell, in the order they come."""
    panels: dict[tuple[str, int, str], list[Series]] = {}
    for series in trend.series:
        key = series.key
        panels.setdefault((key.layer, key.cell_layer, key.direction), []).append(series)
    return panels


def _draw_panel(axes: Any, trend: Trend, cell: tuple[str, int, str], group: list[Series]) -> None:
    x = _x_values(trend)
    for series in group:
        (line,) = axes.plot(x, _nan(series.mean), marker=".", label=series.key.label)
        axes.fill_between(x, _nan(series.p10), _nan(series.p90), alpha=0.2, color=line.get_color())
    layer, sublayer, direction = cell
    axes.set_title(f"{layer or '(root)'} [{sublayer} {direction}]", fontsize="medium")
    axes.set_ylabel("bias (mean, p10-p90)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small", loc="best")


def figure(trend: Trend, width: int, height: int) -> Any:
    """The figure: a panel per cell, sharing the x axis (the run)."""
    figure_class, canvas_class = _matplotlib()
    fig = figure_class(figsize=(width / DPI, height / DPI), dpi=DPI, layout="constrained")
    canvas_class(fig)
    panels = _panels(trend)
    grid = fig.subplots(len(panels), 1, sharex=True, squeeze=False)
    for axes, (cell, group) in zip(grid[:, 0], panels.items(), strict=True):
        _draw_panel(axes, trend, cell, group)
    bottom = grid[-1, 0]
    bottom.set_xlabel(X_LABELS.get(trend.order, "step"))
    if trend.order == ORDER_NAME:
        bottom.set_xticks(_x_values(trend), [Path(p.path).name for p in trend.checkpoints])
        bottom.tick_params(axis="x", labelrotation=45)
    return fig


def write_plot(trend: Trend, request: PlotRequest) -> None:
    """Draw the trend into the requested file (replaced whole: a reader never sees half a plot)."""
    fig = figure(trend, request.width, request.height)
    with atomic_output(request.path, 0o644, durable=False) as out:
        fig.savefig(out, format=request.format, dpi=DPI)
