"""Rich renderables built from the library's records (the JSON comes from the same records)."""

from __future__ import annotations

from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from lstm_surgeon.inspection import Inspection, LayerReport
from lstm_surgeon.output import clean
from lstm_surgeon.stats import CellStats, GateStats, Summary


FAMILY_NOTES = {
    "GRU": "new gate: b_hn is multiplied by the reset gate, so b_in + b_hn is no effective bias",
    "RNN": "the nonlinearity (tanh or relu) is not stored in a checkpoint; tanh is shown",
}


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


def gate_table(report: LayerReport, cell: CellStats) -> Table:
    table = Table(
        title=cell_label(report, cell),
        title_justify="left",
        title_style="italic",
        box=box.SIMPLE_HEAD,
    )
    table.add_column("gate")
    for heading in (
        "b_ih mean",
        "b_ih range",
        "b_hh mean",
        "b_hh range",
        "effective",
        "eff. range",
    ):
        table.add_column(heading, justify="right")
    table.add_column("at zero input", justify="right")
    for gate in cell.gates:
        table.add_row(gate.gate.name, *gate_row(gate))
    return table


def gate_row(gate: GateStats) -> list[str]:
    effective = summary_cells(gate.effective)
    if not gate.gate.biases_sum:
        effective = ("n/a", "b_hn × r")
    opening = (
        "—"
        if gate.activation_at_zero is None
        else f"{gate.activation}={gate.activation_at_zero:.3f}"
    )
    return [*summary_cells(gate.bias_ih), *summary_cells(gate.bias_hh), *effective, opening]


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
        if not report.layer.bias:
            parts.append(
                Text("  no bias tensors (add them with `lstm-surgeon add-bias`)", style="dim")
            )
            continue
        parts.extend(gate_table(report, cell) for cell in report.cells)
        note = FAMILY_NOTES.get(report.layer.kind.removesuffix("Cell"))
        if note:
            parts.append(Text(f"  {note}", style="dim"))
    if not inspection.layers:
        parts.append(Text("no recurrent layers found", style="yellow"))
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
