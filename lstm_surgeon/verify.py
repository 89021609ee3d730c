"""`verify`: load every discovered layer into the real torch module and run it.

This is the one command that needs torch: it builds `nn.LSTM`/`nn.GRU`/... from the discovered
configuration, loads the tensors with `load_state_dict(strict=True)` in the file's dtype, and runs a
forward pass on random input (in float32, since CPU kernels for half types are incomplete). A layer
stored in another framework's layout is loaded through `layouts.pytorch.module_state`, and also run by
its own framework's runtime (`runtimes/`) on the same input: the two outputs must agree.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lstm_surgeon.checkpoint import Checkpoint
from lstm_surgeon.discovery import discover, require_selected
from lstm_surgeon.dtypes import BY_NAME, EDITABLE
from lstm_surgeon.gates import activate_array, pre_activation_at_zero
from lstm_surgeon.layers import BIAS_ROLES, RecurrentLayer
from lstm_surgeon.layouts.pytorch import gate_rows, module_parameter_name, module_state
from lstm_surgeon.runtimes import runtime_for
from lstm_surgeon.torch_import import import_torch

SEQUENCE_LENGTH, BATCH = 5, 2
RUNTIME_TOLERANCE = 1e-4  # float32 kernels of two frameworks on a short sequence agree far closer


@dataclass(frozen=True)
class GateOpening:
    """A gate's mean output at zero input and zero state, computed by torch from the loaded module."""

    layer: int
    direction: str
    gate: str
    opening: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "direction": self.direction,
            "gate": self.gate,
            "opening": self.opening,
        }


@dataclass(frozen=True)
class LayerVerification:
    name: str
    kind: str
    loaded: bool
    finite: bool
    error: str | None
    openings: tuple[GateOpening, ...] = ()
    framework: str = "pytorch"
    runtime_max_abs_diff: float | None = None  # against the layer's own framework, where not torch
    notes: tuple[str, ...] = ()  # what torch cannot compute, for a layer run by its runtime alone

    @property
    def ok(self) -> bool:
        within = self.runtime_max_abs_diff is None or self.runtime_max_abs_diff <= RUNTIME_TOLERANCE
        return self.loaded and self.finite and within

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "framework": self.framework,
            "kind": self.kind,
            "ok": self.ok,
            "loaded": self.loaded,
            "finite": self.finite,
            "error": self.error,
            "openings": [opening.to_dict() for opening in self.openings],
            "runtime_max_abs_diff": self.runtime_max_abs_diff,
            "notes": list(self.notes),
        }


@dataclass(frozen=True)
class Verification:
    path: str
    layers: tuple[LayerVerification, ...]
    warnings: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return bool(self.layers) and all(layer.ok for layer in self.layers)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "ok": self.ok,
            "layers": [layer.to_dict() for layer in self.layers],
            "warnings": list(self.warnings),
        }


def verify_checkpoint(
    checkpoint: Checkpoint, layer_globs: Iterable[str] = (), seed: int = 0
) -> Verification:
    """Load and run every selected layer in torch; report what fails."""
    torch = import_torch("verify")

    found = discover(checkpoint)
    selected = require_selected(found.layers, layer_globs)
    generator = torch.Generator().manual_seed(seed)
    results = tuple(_verify_layer(checkpoint, layer, torch, generator) for layer in selected)
    return Verification(str(checkpoint.path), results, tuple(found.warnings))


def build_module(layer: RecurrentLayer, torch: Any) -> Any:
    """The torch module the discovered configuration describes (RNN assumed tanh: not stored)."""
    nn = torch.nn
    if layer.is_cell:
        cell_class = {"LSTMCell": nn.LSTMCell, "GRUCell": nn.GRUCell, "RNNCell": nn.RNNCell}[
            layer.kind
        ]
        return cell_class(layer.input_size, layer.hidden_size, bias=layer.bias)
    options: dict[str, Any] = {
        "num_layers": layer.num_layers,
        "bias": layer.bias,
        "bidirectional": layer.bidirectional,
    }
    if layer.proj_size:
        options["proj_size"] = layer.proj_size
    layer_class = {"LSTM": nn.LSTM, "GRU": nn.GRU, "RNN": nn.RNN}[layer.kind]
    return layer_class(layer.input_size, layer.hidden_size, **options)


def state_dict_for(checkpoint: Checkpoint, layer: RecurrentLayer, torch: Any) -> dict[str, Any]:
    """The layer's tensors as torch tensors, keyed as the module names them, in the file's dtype."""
    state = {}
    dtype = BY_NAME[layer.dtype]
    for name, raw in module_state(checkpoint, layer).items():
        raw = np.ascontiguousarray(raw)
        if dtype.numpy_exact:
            tensor = torch.from_numpy(raw.copy())
        else:  # bfloat16 / float8: reinterpret the stored bits
            signed = raw.view(np.int16 if dtype.itemsize == 2 else np.int8)
            tensor = torch.from_numpy(signed.copy()).view(getattr(torch, dtype.name))
        state[name] = tensor
    return state


def _verify_layer(
    checkpoint: Checkpoint, layer: RecurrentLayer, torch: Any, generator: Any
) -> LayerVerification:
    if layer.dtype not in EDITABLE:  # the floating dtypes torch's recurrent modules take
        return _failed(layer, f"torch recurrent modules take floating weights, not {layer.dtype}")
    if layer.pytorch_differences:
        return _verify_in_runtime_alone(checkpoint, layer, torch, generator)
    try:
        module = build_module(layer, torch).to(getattr(torch, layer.dtype))
        module.load_state_dict(state_dict_for(checkpoint, layer, torch), strict=True)
    except (RuntimeError, TypeError, ValueError) as error:
        return _failed(layer, " ".join(str(error).strip().splitlines()[:3]))
    module = module.float()
    inputs = _inputs(layer, torch, generator)
    with torch.no_grad():
        result = module(inputs)
    output = list(_flatten(result))
    finite = all(bool(torch.isfinite(tensor).all()) for tensor in output)
    openings = tuple(_openings(module, layer))
    difference = _runtime_difference(checkpoint, layer, inputs, output[0])
    error = None if finite else "the forward pass produced NaN or Inf"
    if error is None and difference is not None and difference > RUNTIME_TOLERANCE:
        error = f"{layer.framework} computes other outputs than torch (max |diff| {difference:.3g})"
    return LayerVerification(
        layer.name, layer.kind, True, finite, error, openings, layer.framework, difference
    )


def _verify_in_runtime_alone(
    checkpoint: Checkpoint, layer: RecurrentLayer, torch: Any, generator: Any
) -> LayerVerification:
    """A layer torch's modules cannot compute (peepholes, another activation...): its own
    framework's runtime runs it, the output must be finite, and the differences are noted."""
    runtime = runtime_for(layer.framework)
    assert runtime is not None  # only other frameworks' layouts report differences from torch
    output = runtime.run(checkpoint, layer, _inputs(layer, torch, generator).numpy())
    finite = bool(np.isfinite(output).all())
    error = None if finite else f"{layer.framework}'s runtime produced NaN or Inf"
    notes = tuple(f"not compared with torch: {reason}" for reason in layer.pytorch_differences)
    return LayerVerification(
        layer.name, layer.kind, True, finite, error, framework=layer.framework, notes=notes
    )


def _failed(layer: RecurrentLayer, error: str) -> LayerVerification:
    return LayerVerification(layer.name, layer.kind, False, False, error)


def _inputs(layer: RecurrentLayer, torch: Any, generator: Any) -> Any:
    """Random input: (batch, features) for a cell, (sequence, batch, features) for a layer."""
    shape = (BATCH,) if layer.is_cell else (SEQUENCE_LENGTH, BATCH)
    return torch.randn(*shape, layer.input_size, generator=generator)


def _runtime_difference(
    checkpoint: Checkpoint, layer: RecurrentLayer, inputs: Any, output: Any
) -> float | None:
    """The largest |difference| between torch's output and the layer's own framework's, run on
    the same input (None for PyTorch's own layout: torch is its runtime)."""
    runtime = runtime_for(layer.framework)
    if runtime is None:
        return None
    return runtime.max_abs_difference(checkpoint, layer, inputs.numpy(), output.numpy())


def _flatten(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        for item in value:
            yield from _flatten(item)
    else:
        yield value


def _openings(module: Any, layer: RecurrentLayer) -> list[GateOpening]:
    """Each gate's mean output for zero input and zero state, from the loaded module's parameters
    (read back from torch, so a bias torch did not load as expected shows here)."""
    openings = []
    for cell in layer.cells if layer.bias else ():
        biases_of = {
            role: getattr(module, module_parameter_name(layer, role, cell))
            .detach()
            .double()
            .numpy()
            for role in BIAS_ROLES
        }
        biases = {
            gate.name: tuple(biases_of[role][_rows(position, layer)] for role in BIAS_ROLES)
            for position, gate in enumerate(layer.gates)
        }
        for gate in layer.gates:
            pre = pre_activation_at_zero(layer.gates, gate, biases, layer.hidden_size)
            mean = float(activate_array(gate.activation, pre).mean())
            openings.append(GateOpening(cell.layer, cell.direction, gate.name, mean))
    return openings


def _rows(position: int, layer: RecurrentLayer) -> slice:
    rows = gate_rows(position, layer.hidden_size)
    return slice(rows.start, rows.stop)
