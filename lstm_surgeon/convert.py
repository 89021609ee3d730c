"""`convert`: the recurrent layers of any readable file as a PyTorch state dict.

Each layer becomes the parameters torch's module would hold (`<layer>.weight_ih_l0`,
`<layer>.bias_hh_l0_reverse`, `<layer>.weight_ih` for cells), gathered through the layer's regions by
`layouts.pytorch.module_parameters`: gates reordered, kernels transposed, single or packed biases
split so that every gate sees the same bias. Cells torch cannot compute (peepholes, another
activation...) are refused, naming the difference. The mapping from source regions to target tensors
is data, printed by `--json`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lstm_surgeon.checkpoint import Checkpoint, Contents, OutputTensor, StorageRef, TensorRef
from lstm_surgeon.discovery import discover, require_selected
from lstm_surgeon.dtypes import BY_NAME
from lstm_surgeon.errors import EditError, OutputError
from lstm_surgeon.formats import format_for_suffix
from lstm_surgeon.layers import RecurrentLayer
from lstm_surgeon.layouts.pytorch import ModuleParameter, module_parameters
from lstm_surgeon.writing import atomic_output, check_output_path

INVALID_CHARACTERS = re.compile(r"[^A-Za-z0-9_]")


@dataclass(frozen=True)
class Part:
    """Where one block of a target tensor comes from."""

    source: str  # the source tensor's name
    index: list[Any]  # the source region's index (per dimension: [start, stop], a position, a list)
    gate: str | None

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "index": self.index, "gate": self.gate}


@dataclass(frozen=True)
class Target:
    """One tensor of the converted state dict and the source parts stacked into it."""

    name: str
    layer: str  # the source layer's name
    dtype: str
    shape: tuple[int, ...]
    parts: tuple[Part, ...]  # () for a zero bias a one-bias layout stands for, or a carried tensor
    zeros: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.name,
            "layer": self.layer,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "zeros": self.zeros,
            "parts": [part.to_dict() for part in self.parts],
        }


@dataclass
class Conversion:
    """What `convert` writes: each target tensor and where its elements come from."""

    source: Path
    targets: list[Target] = field(default_factory=list)
    tensors: list[OutputTensor] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": str(self.source),
            "tensors": [target.to_dict() for target in self.targets],
        }


def dotted_name(name: str) -> str:
    """A layer's name as a valid dotted module path: `/encoder/LSTM_1` -> `encoder.LSTM_1`."""
    parts = [INVALID_CHARACTERS.sub("_", part) for part in re.split(r"[/.:]+", name)]
    return ".".join(part for part in parts if part)


def plan_conversion(
    checkpoint: Checkpoint, layer_globs: tuple[str, ...] = (), carry_others: bool = False
) -> Conversion:
    """The PyTorch state dict of the selected recurrent layers (and, with `carry_others`, every other
    tensor under its own name)."""
    found = discover(checkpoint)
    layers = require_selected(found.layers, layer_globs)
    if not layers:
        raise EditError(f"{checkpoint.path}: no recurrent layers to convert")
    conversion = Conversion(checkpoint.path)
    for layer in layers:
        _refuse_inexpressible(layer)
        for parameter in module_parameters(layer):
            _add_parameter(conversion, checkpoint, layer, parameter)
    if carry_others:
        recurrent = found.recurrent_tensor_names()
        for ref in checkpoint.tensors.values():
            if ref.name not in recurrent:
                _add_target(conversion, Target(ref.name, "", ref.dtype.name, ref.shape, ()), ref)
    return conversion


def _refuse_inexpressible(layer: RecurrentLayer) -> None:
    if layer.pytorch_differences:
        raise EditError(
            f"{layer.display_name}: torch's {layer.kind} cannot compute this cell "
            f"({'; '.join(layer.pytorch_differences)})"
        )


def _add_parameter(
    conversion: Conversion,
    checkpoint: Checkpoint,
    layer: RecurrentLayer,
    parameter: ModuleParameter,
) -> None:
    raw = parameter.raw(checkpoint)
    prefix = dotted_name(layer.name)
    name = f"{prefix}.{parameter.name}" if prefix else parameter.name
    parts = tuple(
        Part(region.tensor.name, region.index_to_json(), gate) for gate, region in parameter.parts
    )
    target = Target(
        name, layer.name, layer.dtype, raw.shape, parts, zeros=parameter.zeros_like is not None
    )
    _add_target(conversion, target, None, raw)


def _add_target(
    conversion: Conversion,
    target: Target,
    source: TensorRef | None,
    data: Any = None,
) -> None:
    if any(existing.name == target.name for existing in conversion.targets):
        raise EditError(f"two converted tensors would both be named {target.name!r}")
    ref = TensorRef(target.name, BY_NAME[target.dtype], target.shape, StorageRef("", 0, 0))
    conversion.targets.append(target)
    conversion.tensors.append(OutputTensor(ref, source=source, data=data))


def write_conversion(
    conversion: Conversion,
    checkpoint: Checkpoint,
    output: Path,
    force: bool = False,
    durable: bool = False,
) -> str:
    """Write the converted state dict to `output` (its suffix picks .safetensors or .pt), atomically;
    returns the format written. The file holds the converted tensors and nothing else."""
    target_format = format_for_suffix(output)
    if target_format is None or target_format.name not in ("safetensors", "pt"):
        raise OutputError(f"{output}: convert writes .safetensors or .pt files")
    check_output_path(output, checkpoint.path, force)
    plain = Checkpoint(checkpoint.path, checkpoint.format, {}, checkpoint.files, Contents())
    with atomic_output(output, 0o644, durable) as out:
        target_format.write(out, conversion.tensors, plain)
    return target_format.name
