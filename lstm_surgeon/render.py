"""Rich renderables built from the library's records (the JSON comes from the same records)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich import box
from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from lstm_surgeon.histogram import ASCII_LEVELS, BLOCKS, bars
from lstm_surgeon.output import clean

if TYPE_CHECKING:  # records only: rendering must not import what builds them
    from pathlib import Path

    from lstm_surgeon.apply import WriteResult
    from lstm_surgeon.check import CheckReport
    from lstm_surgeon.convert import Conversion
    from lstm_surgeon.histogram import CellHistograms, Histogram, ValueRange
    from lstm_surgeon.inspection import Inspection, LayerReport
    from lstm_surgeon.layers import RecurrentLayer
    from lstm_surgeon.plan import EditPlan
    from lstm_surgeon.stats import CellStats, GateStats, Summary
    from lstm_surgeon.verify import GateOpening, Verification

FAMILY_NOTES = {
    "GRU": "new gate: b_hn is multiplied by the reset gate r, so b_in + b_hn is no effective bias; "
    "at zero input it shows tanh(b_in + r·b_hn)",
    "RNN": "the nonlinearity (tanh or relu) is not stored in a checkpoint; tanh is shown",
}


SUMMING_NEW_GATE_NOTE = (
    "new gate: the reset gate applies before the recurrent product, so b_in + b_hn is the "
    "effective bias (ONNX linear_before_reset=0)"
)


def family_note(layer: RecurrentLayer) -> str | None:
    """What the gate table cannot say about this kind of cell (a GRU's new gate, an RNN's
    nonlinearity), as this layer's own gates define it."""
    family = layer.kind.removesuffix("Cell")
    if family == "GRU" and all(gate.biases_sum for gate in layer.gates):
        return SUMMING_NEW_GATE_NOTE
    return FAMILY_NOTES.get(family)


def framework_lines(layer: RecurrentLayer) -> list[Text]:
    """A layer of another framework: what it stores beyond PyTorch's arguments, and what of it
    PyTorch's modules cannot compute."""
    if layer.framework == "pytorch":
        return []
    settings = ", ".join(f"{key}={_setting(value)}" for key, value in layer.attributes.items())
    lines = [Text(clean(f"  {layer.framework}: {settings}"), style="dim")]
    lines += [
        Text(clean(f"  PyTorch cannot compute: {difference}"), style="yellow")
        for difference in layer.pytorch_differences
    ]
    return lines


def _setting(value: object) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def human_size(nbytes: int) -> str:
    size = float(nbytes)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def number(value: float | None) -> str:
    return "—" if value is None else f"{value:+.4f}"


def summary_cells(summary: Summary | None) -> tuple[str, str]:
    """A summary as two table cells: the mean, and the range."""
    if summary is None:
        return "—", ""
    return number(summary.mean), f"{summary.min:+.3f} … {summary.max:+.3f}"


def layer_title(report: LayerReport) -> Text:
    layer = report.layer
    parts = [f"input {layer.input_size}", f"hidden {layer.hidden_size}"]
    if layer.proj_size:
        parts.append(f"proj {layer.proj_size}")
    if not layer.is_cell:
        parts.append(f"{layer.num_layers} layer{'s' if layer.num_layers > 1 else ''}")
    if layer.bidirectional:
        parts.append("bidirectional")
    parts.append("bias" if layer.bias else "no bias")
    parts.append(layer.dtype)
    title = Text(clean(layer.display_name), style="bold cyan")
    title.append(f"  {layer.kind}", style="bold")
    title.append("  " + " · ".join(parts))
    return title


def cell_label(report: LayerReport, cell: CellStats) -> str:
    if report.layer.is_cell:
        return "cell"
    return f"layer {cell.layer} {cell.direction}"


def summary_cell(summary: Summary | None) -> str:
    """A summary in one table cell: `+0.128 [-0.06, +0.28]` (mean [min, max])."""
    if summary is None:
        return "—"
    return f"{summary.mean:+.3f} [{summary.min:+.2f}, {summary.max:+.2f}]"


class HistogramBars:
    """Histograms drawn as bars, one line each, in block characters; in ASCII when the console
    cannot encode blocks (`PYTHONIOENCODING=ascii`, a terminal that is not UTF-8). Every line is
    as wide as its bins, so the rows of a table line up bin for bin."""

    def __init__(self, histograms: tuple[Histogram, ...], peak: int) -> None:
        self.histograms = histograms
        self.peak = peak

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        levels = ASCII_LEVELS if options.ascii_only else BLOCKS
        for histogram in self.histograms:
            yield Text(bars(histogram.counts, self.peak, levels))

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        width = max((len(histogram.counts) for histogram in self.histograms), default=0)
        return Measurement(width, width)


def gate_name_lines(name: str, drawn: tuple[tuple[str, Histogram], ...]) -> str:
    """The gate column beside its histograms: the name, and which bias each line counts where a
    gate has one histogram per bias (`new b_in` over `    b_hn`)."""
    labels = [label for label, _ in drawn if label]
    if not labels:
        return name
    return "\n".join(
        f"{name if index == 0 else ' ' * len(name)} {label}" for index, label in enumerate(labels)
    )


def axis_heading(title: str, value_range: ValueRange, bins: int) -> Text:
    """A histogram column's heading: its title, and the shared range's ends under the first and
    last bins."""
    low, high = (f"{end:+.2f}" for end in value_range)
    return Text(f"{title}\n{low}{high.rjust(max(1, bins - len(low)))}")


def gate_table(
    report: LayerReport, cell: CellStats, histograms: CellHistograms | None = None
) -> Table:
    table = Table(
        title=cell_label(report, cell),
        title_justify="left",
        title_style="italic",
        box=box.SIMPLE_HEAD,
    )
    table.add_column("gate", no_wrap=True, min_width=6)
    for heading in ("b_ih mean [min, max]", "b_hh mean [min, max]", "effective b_ih + b_hh"):
        table.add_column(Text(heading), justify="right", no_wrap=True)
    table.add_column("at zero input", justify="right", no_wrap=True)
    if histograms is None:
        for gate in cell.gates:
            table.add_row(gate.gate.name, *gate_row(gate))
        return table
    heading = axis_heading("distribution", histograms.value_range, histograms.bins)
    table.add_column(heading, no_wrap=True)
    for gate, drawn in zip(cell.gates, histograms.gates, strict=True):
        labelled = drawn.drawn()
        bars_cell = HistogramBars(tuple(histogram for _, histogram in labelled), histograms.peak)
        table.add_row(gate_name_lines(gate.gate.name, labelled), *gate_row(gate), bars_cell)
    return table


def gate_row(gate: GateStats) -> list[str]:
    effective = summary_cell(gate.effective) if gate.gate.biases_sum else "n/a (b_hn × r)"
    opening = "—"
    if gate.activation_at_zero is not None:
        symbol = "σ" if gate.activation == "sigmoid" else gate.activation
        opening = f"{symbol} {gate.activation_at_zero:.3f}"
    return [summary_cell(gate.bias_ih), summary_cell(gate.bias_hh), effective, opening]


def inspection_view(inspection: Inspection) -> RenderableType:
    header = Text(clean(inspection.path), style="bold")
    header.append(
        f"  {inspection.format}  {human_size(inspection.size)}  {inspection.tensor_count} tensors  "
        f"{len(inspection.layers)} recurrent layer{'s' if len(inspection.layers) != 1 else ''}"
    )
    parts: list[RenderableType] = [header]
    for report in inspection.layers:
        parts.append(Text())
        parts.append(layer_title(report))
        parts.extend(framework_lines(report.layer))
        if not report.layer.bias:
            parts.append(
                Text("  no bias tensors (add them with `lstm-surgeon add-bias`)", style="dim")
            )
            continue
        histograms = report.histograms or (None,) * len(report.cells)
        parts.extend(
            gate_table(report, cell, drawn)
            for cell, drawn in zip(report.cells, histograms, strict=True)
        )
        note = family_note(report.layer)
        if note:
            parts.append(Text(f"  {note}", style="dim"))
    if not inspection.layers:
        parts.append(Text("no recurrent layers found", style="yellow"))
    if inspection.other_tensor_count:
        parts.append(Text())
        parts.append(
            Text(
                f"{inspection.other_tensor_count} other tensor"
                f"{'s' if inspection.other_tensor_count != 1 else ''} "
                f"({human_size(inspection.other_tensor_bytes)}) not recurrent",
                style="dim",
            )
        )
    return Group(*parts)


def _cell_name(layer: str, cell_layer: int, direction: str) -> str:
    return f"{clean(layer) or '(root)'} [{cell_layer} {direction}]"


def _arrow(before: Summary | None, after: Summary | None) -> str:
    if before is None or after is None:
        return "—"
    return f"{number(before.mean)} → {number(after.mean)}"


def plan_view(plan: EditPlan) -> RenderableType:
    """The before/after preview of an edit plan: what each gate sees, and each slice written."""
    parts: list[RenderableType] = []
    if plan.effects:
        effects = Table(
            title="effective bias (b_ih + b_hh), mean", title_justify="left", box=box.SIMPLE_HEAD
        )
        for heading in ("layer [sub-layer direction]", "gate", "before → after", "after range"):
            effects.add_column(heading)
        for effect in plan.effects:
            after = (
                "" if effect.after is None else f"{effect.after.min:+.3f} … {effect.after.max:+.3f}"
            )
            effects.add_row(
                Text(_cell_name(effect.layer, effect.cell_layer, effect.direction)),
                effect.gate,
                _arrow(effect.before, effect.after) if effect.before else "n/a (b_hn * r)",
                after,
            )
        parts.append(effects)
    if plan.edits:
        edits = Table(title="slices written", title_justify="left", box=box.SIMPLE_HEAD)
        for heading in ("tensor", "gate", "rows", "columns", "mean before → after", "changed"):
            edits.add_column(heading)
        for edit in plan.edits:
            columns = "all" if edit.columns is None else ",".join(map(str, edit.columns))
            edits.add_row(
                Text(clean(edit.tensor)),
                edit.gate or "all",
                f"{edit.rows[0]}:{edit.rows[1]}",
                columns,
                _arrow(edit.before, edit.after),
                "yes" if edit.changes_anything else "no",
            )
        parts.append(edits)
    for addition in plan.additions:
        parts.append(
            Text(f"+ add {clean(addition.tensor)} {addition.dtype} {list(addition.shape)} (zeros)")
        )
    for removal in plan.removals:
        parts.append(Text(f"- drop {clean(removal.tensor)}"))
    if not plan.changes_anything:
        parts.append(
            Text("nothing to change: the checkpoint already has these values", style="green")
        )
    return Group(*parts)


def result_line(result: WriteResult) -> Text:
    if not result.written:
        return Text(f"{clean(result.path)} left as it was (nothing to change)", style="green")
    how = "patched in place" if result.in_place and result.method == "patch" else "written"
    line = Text(f"{clean(result.path)} {how} ({result.format}, {result.method})", style="green")
    if result.backup:
        line.append(f"; backup at {clean(result.backup)}", style="dim")
    return line


def verification_view(verification: Verification) -> RenderableType:
    table = Table(box=box.SIMPLE_HEAD)
    for heading in (
        "layer",
        "kind",
        "load (strict)",
        "forward finite",
        "gate openings at zero input",
    ):
        table.add_column(heading)
    for layer in verification.layers:
        openings = _opening_summary(layer.openings)
        if layer.notes:  # torch cannot build this cell: its own runtime ran it alone
            openings = f"run by {layer.framework} alone; torch cannot compute it"
        table.add_row(
            Text(clean(layer.name) or "(root)"),
            layer.kind,
            "ok" if layer.loaded else Text("FAILED", style="red"),
            "—" if not layer.loaded else ("ok" if layer.finite else Text("NaN/Inf", style="red")),
            openings if layer.error is None else Text(clean(layer.error), style="red"),
        )
    verdict = (
        Text("all layers load and run", style="green")
        if verification.ok
        else Text(
            "some layers fail" if verification.layers else "no recurrent layers to verify",
            style="red",
        )
    )
    return Group(table, verdict)


def _opening_summary(openings: tuple[GateOpening, ...]) -> str:
    """Mean opening per gate over the cells: `forget=0.731 input=0.500 …`."""
    by_gate: dict[str, list[float]] = {}
    for opening in openings:
        by_gate.setdefault(opening.gate, []).append(opening.opening)
    return " ".join(f"{gate}={sum(v) / len(v):.3f}" for gate, v in by_gate.items()) or "(no biases)"


def check_view(report: CheckReport) -> RenderableType:
    scanned = (
        f"{report.records_checked} zip records, {report.tensors_scanned} recurrent tensors checked"
    )
    if report.sound:
        return Text(f"{clean(report.path)}: sound ({scanned})", style="green")
    lines = [
        Text(f"{clean(report.path)}: {len(report.problems)} problem(s) ({scanned})", style="red")
    ]
    lines += [Text(f"  {clean(problem)}") for problem in report.problems]
    return Group(*lines)


def conversion_view(conversion: Conversion, output: Path, written: str) -> RenderableType:
    """Each converted tensor and the source tensors its blocks come from."""
    table = Table(box=box.SIMPLE_HEAD)
    for heading in ("tensor", "shape", "from"):
        table.add_column(heading, no_wrap=heading != "from")
    for target in conversion.targets:
        sources = sorted({part.source for part in target.parts})
        origin = "zeros" if target.zeros else ", ".join(map(clean, sources)) or "(as it was)"
        table.add_row(clean(target.name), "×".join(map(str, target.shape)), origin)
    footer = Text(f"wrote {clean(str(output))} ({written}, {len(conversion.targets)} tensors)")
    return Group(table, footer)
