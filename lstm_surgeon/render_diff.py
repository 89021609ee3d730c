"""Rich renderables for `diff`: the changed tensors, their gates, and effective biases before/after.

Every name that comes from a file (paths, tensor keys, layer names) goes through `clean` into a
plain `Text`, never into a markup string, so a tensor called `[red]x` prints as itself.
"""

from __future__ import annotations

import math

from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from lstm_surgeon.diff import DiffResult, EffectiveBias, TensorDiff
from lstm_surgeon.histogram import Histogram
from lstm_surgeon.output import clean
from lstm_surgeon.render import FAMILY_NOTES, HistogramBars, axis_heading, number, summary_cells


def magnitude(value: float | None) -> str:
    """A difference for a table cell: short, and readable from 1e-9 to 1e9."""
    if value is None:
        return "—"
    if math.isnan(value):
        return "nan"
    return f"{value:.4g}"


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def _header(result: DiffResult) -> Group:
    lines = []
    for side, path, fmt in (("a", result.a, result.a_format), ("b", result.b, result.b_format)):
        line = Text(f"{side}: ", style="dim")
        line.append(clean(path), style="bold")
        line.append(f"  {fmt}", style="dim")
        lines.append(line)
    if result.atol or result.rtol:
        lines.append(Text(f"equal within atol {result.atol:g}, rtol {result.rtol:g}", style="dim"))
    return Group(*lines)


def _verdict(result: DiffResult) -> Text:
    if result.identical:
        return Text("identical", style="bold green")
    counts = (
        f"{len(result.changed)} changed, {len(result.added)} added, {len(result.removed)} removed"
    )
    return Text(f"different: {counts}", style="bold yellow")


def _gates_cell(entry: TensorDiff) -> Text:
    if entry.gates:
        return Text(", ".join(entry.gates))
    return Text("—", style="dim")


def _note(entry: TensorDiff) -> Text:
    notes = []
    if entry.dtype is not None:
        notes.append(f"dtype {entry.dtype[0]} → {entry.dtype[1]}")
    if entry.shape is not None:
        notes.append(f"shape {list(entry.shape[0])} → {list(entry.shape[1])}")
    return Text("; ".join(notes), style="magenta")


def changed_table(changed: tuple[TensorDiff, ...]) -> Table:
    table = Table(box=box.SIMPLE_HEAD)
    table.add_column("changed tensor")
    table.add_column("gates changed")
    table.add_column("max |a-b|", justify="right")
    table.add_column("mean |a-b|", justify="right")
    table.add_column("note")
    for entry in changed:
        table.add_row(
            Text(clean(entry.key)),
            _gates_cell(entry),
            Text(magnitude(entry.max_abs_diff)),
            Text(magnitude(entry.mean_abs_diff)),
            _note(entry),
        )
    return table


def _cell_title(entry: TensorDiff) -> Text:
    title = Text(clean(entry.layer or "(root)"), style="bold cyan")
    if entry.kind is not None and entry.kind.endswith("Cell"):
        where = "cell"
    elif entry.cell is not None:
        where = f"layer {entry.cell.layer} {entry.cell.direction}"
    else:
        where = ""
    title.append(f"  {where}: effective bias b_ih + b_hh, changed gates", style="italic")
    return title


def _effective_by_cell(changed: tuple[TensorDiff, ...]) -> list[tuple[Text, list[EffectiveBias]]]:
    """One list per cell: changes to a cell's `b_ih` and `b_hh` share one effective bias."""
    cells: dict[tuple[object, ...], tuple[Text, dict[str, EffectiveBias]]] = {}
    for entry in changed:
        if not entry.effective:
            continue
        cell_key = (entry.layer, entry.cell)
        _, gates = cells.setdefault(cell_key, (_cell_title(entry), {}))
        for effective in entry.effective:
            gates.setdefault(effective.gate, effective)
    return [(title, list(gates.values())) for title, gates in cells.values()]


def effective_table(title: Text, gates: list[EffectiveBias]) -> Table:
    """Each changed gate's effective bias before and after, and (`--hist`) both distributions side
    by side on the cell's one range and one height."""
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD)
    table.add_column("gate")
    for heading in ("before", "before range", "after", "after range", "Δ mean"):
        table.add_column(heading, justify="right")
    drawn = [histogram for entry in gates for histogram in entry.histograms or () if histogram]
    peak = max((max(histogram.counts) for histogram in drawn), default=0) or 1
    if drawn:
        for side in ("before", "after"):
            heading = axis_heading(f"{side} (hist)", drawn[0].value_range, len(drawn[0].counts))
            table.add_column(heading, no_wrap=True)
    for entry in gates:
        shift = (
            None
            if entry.before is None or entry.after is None
            else entry.after.mean - entry.before.mean
        )
        cells = [*summary_cells(entry.before), *summary_cells(entry.after), number(shift)]
        bars = [_bars(histogram, peak) for histogram in entry.histograms or ()] if drawn else []
        table.add_row(Text(entry.gate), *(Text(cell) for cell in cells), *bars)
    return table


def _bars(histogram: Histogram | None, peak: int) -> HistogramBars:
    return HistogramBars(() if histogram is None else (histogram,), peak)


def _changed_gru_new_bias(entry: TensorDiff) -> bool:
    """A changed `b_in` or `b_hn`: the one gate bias change that has no effective bias to show."""
    is_bias = entry.parameter in ("bias_ih", "bias_hh")
    return (
        is_bias and entry.kind is not None and entry.kind.startswith("GRU") and "new" in entry.gates
    )


def _key_list(title: str, keys: tuple[str, ...], mark: str, style: str) -> Group:
    lines = [Text(title, style="bold")]
    lines.extend(Text(f"  {mark} {clean(key)}", style=style) for key in keys)
    return Group(*lines)


def diff_view(result: DiffResult) -> RenderableType:
    """The whole report: header, verdict, changed tensors, effective biases, added/removed keys."""
    parts: list[RenderableType] = [_header(result), _verdict(result)]
    for a, b in result.matched:
        parts.append(Text(f"layer {clean(a) or '(root)'} = {clean(b) or '(root)'}", style="dim"))
    if result.changed:
        parts.append(changed_table(result.changed))
    for title, gates in _effective_by_cell(result.changed):
        parts.append(effective_table(title, gates))
    if any(_changed_gru_new_bias(entry) for entry in result.changed):
        parts.append(Text(f"GRU {FAMILY_NOTES['GRU']}", style="dim"))
    if result.removed:
        parts.append(_key_list("only in a (removed):", result.removed, "-", "red"))
    if result.added:
        parts.append(_key_list("only in b (added):", result.added, "+", "green"))
    parts.append(Text(f"{_plural(result.unchanged_count, 'tensor')} identical", style="dim"))
    return Group(*parts)
