"""`inspect` as a library call: the layers of a checkpoint with their gate statistics."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from lstm_surgeon.checkpoint import Checkpoint
from lstm_surgeon.discovery import discover, require_selected
from lstm_surgeon.histogram import CellHistograms, cell_histograms
from lstm_surgeon.layers import RecurrentLayer
from lstm_surgeon.stats import CellStats, layer_stats


@dataclass(frozen=True)
class LayerReport:
    layer: RecurrentLayer
    cells: tuple[CellStats, ...]
    histograms: tuple[CellHistograms, ...] = ()  # one per cell when asked for (`inspect --hist`)

    def to_dict(self) -> dict[str, Any]:
        layer = self.layer
        return {
            "name": layer.name,
            "framework": layer.framework,
            "kind": layer.kind,
            "input_size": layer.input_size,
            "hidden_size": layer.hidden_size,
            "proj_size": layer.proj_size,
            "num_layers": layer.num_layers,
            "bidirectional": layer.bidirectional,
            "bias": layer.bias,
            "dtype": layer.dtype,
            "attributes": layer.attributes,
            "pytorch_differences": list(layer.pytorch_differences),
            "tensors": sorted(layer.tensor_names()),
            "cells": [self._cell_dict(index) for index in range(len(self.cells))],
        }

    def _cell_dict(self, index: int) -> dict[str, Any]:
        """A cell's statistics, each gate with its histograms when they were asked for."""
        cell = self.cells[index].to_dict()
        if self.histograms:
            for gate, histograms in zip(cell["gates"], self.histograms[index].gates, strict=True):
                gate.update(histograms.to_dict())
        return cell


@dataclass(frozen=True)
class Inspection:
    """Everything `inspect` reports, as data: tables and JSON are both rendered from this."""

    path: str
    format: str
    size: int
    tensor_count: int
    layers: tuple[LayerReport, ...]
    other_tensor_count: int
    other_tensor_bytes: int
    has_optimizer_state: bool
    metadata: dict[str, str] | None
    warnings: tuple[str, ...] = field(default=())
    hints: tuple[str, ...] = field(default=())  # what the user may try (on stderr, not in JSON)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "format": self.format,
            "size": self.size,
            "tensor_count": self.tensor_count,
            "has_optimizer_state": self.has_optimizer_state,
            "metadata": self.metadata,
            "layers": [layer.to_dict() for layer in self.layers],
            "other_tensors": {"count": self.other_tensor_count, "bytes": self.other_tensor_bytes},
            "warnings": list(self.warnings),
        }


def inspect_checkpoint(
    checkpoint: Checkpoint, layer_globs: Iterable[str] = (), histograms: bool = False
) -> Inspection:
    """Discover the recurrent layers and compute their gate statistics, and with `histograms` the
    distribution of each gate's biases (reads only bias tensors); globs that match no layer are an
    error naming the layers there are."""
    found = discover(checkpoint)
    selected = require_selected(found.layers, layer_globs)
    recurrent = found.recurrent_tensor_names()
    others = [ref for name, ref in checkpoint.tensors.items() if name not in recurrent]
    return Inspection(
        path=str(checkpoint.path),
        format=checkpoint.format_name,
        size=checkpoint.size,
        tensor_count=len(checkpoint.tensors),
        layers=tuple(_layer_report(checkpoint, layer, histograms) for layer in selected),
        other_tensor_count=len(others),
        other_tensor_bytes=sum(ref.nbytes for ref in others),
        has_optimizer_state=checkpoint.has_optimizer_state,
        metadata=checkpoint.metadata,
        warnings=tuple(checkpoint.warnings + found.warnings),
    )


def _layer_report(checkpoint: Checkpoint, layer: RecurrentLayer, histograms: bool) -> LayerReport:
    cells = tuple(layer_stats(checkpoint, layer))
    if not histograms:
        return LayerReport(layer, cells)
    return LayerReport(
        layer, cells, tuple(cell_histograms(checkpoint, layer, cell) for cell in layer.cells)
    )
